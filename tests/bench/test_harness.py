"""The benchmark harness: targets, result files, the flat JSON line, the registry and helpers."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from funnelrec.bench import harness
from funnelrec.bench.harness import (
    BenchResult,
    Target,
    fix_threads,
    flat_json_line,
    get_benchmark,
    git_sha,
    machine_info,
    peak_rss_subprocess,
    register_benchmark,
    render_markdown,
    run_benchmark,
    time_it,
    write_result,
)
from funnelrec.errors import ConfigError, DataError, FunnelrecError


@pytest.fixture
def clean_registry(monkeypatch):
    """An isolated registry so dummy benchmarks do not leak between tests."""
    monkeypatch.setattr(harness, "_REGISTRY", {})
    monkeypatch.setattr(harness, "_DISCOVERED", True)
    return harness._REGISTRY


# ---------------------------------------------------------------------------------------------------- targets


@pytest.mark.parametrize(
    "op, threshold, value, met",
    [
        (">=", 200000, 200000, True),
        (">=", 200000, 199999.9, False),
        ("<=", 0.5, 0.5, True),
        (">", 1, 1, False),
        ("<", 1, 0.99, True),
        ("in", (0.7, 0.8), 0.7, True),
        ("in", (0.7, 0.8), 0.81, False),
        (">=", 0, float("nan"), False),
        (">=", 0, None, False),
        (">=", 0, "fast", False),
        (">=", 0, np.float32(1.0), True),
    ],
)
def test_target_check(op, threshold, value, met):
    assert Target("x", op, threshold).check(value) is met


def test_target_describe():
    assert Target("qps", ">=", 200000).describe() == ">= 200000"
    assert Target("qps", ">=", 2e5).describe() == ">= 200000"
    assert Target("p99", "<", 0.025).describe() == "< 0.025"
    assert Target("auc", "in", (0.7, 0.8)).describe() == "in [0.7, 0.8]"


@pytest.mark.parametrize("op, threshold", [("==", 1), ("in", 1), ("in", (2, 1)), (">=", "a"), (">=", (1, 2))])
def test_target_rejects_bad_op_or_threshold(op, threshold):
    with pytest.raises(ConfigError, match="Target 'x'"):
        Target("x", op, threshold)


# ------------------------------------------------------------------------------------------ json and markdown


def _result(tmp_path=None) -> BenchResult:
    return BenchResult(
        name="demo",
        results={
            "qps": 250000.0,
            "p99_ms": 31.5,
            "rows": 1000,
            "ok": True,
            "model": "two|tower",
            "gap": float("nan"),
        },
        config={"batch": 512, "ks": (10, 50), "seed": np.int64(3)},
        targets=[Target("qps", ">=", 200000), Target("p99_ms", "<=", 25), Target("gap", ">", 0)],
        plots=["demo_latency.png"],
        quick=False,
        command="funnelrec bench demo --threads 4",
    )


def test_write_result_round_trip(tmp_path):
    json_path, md_path = write_result(_result(), out_dir=tmp_path / "results")
    assert json_path == tmp_path / "results" / "demo.json" and md_path.name == "demo.md"
    assert sorted(p.name for p in (tmp_path / "results").iterdir()) == ["demo.json", "demo.md"]  # no temp files
    doc = json.loads(json_path.read_text())
    keys = ("name", "command", "config", "git_sha", "machine", "threads", "quick", "timestamp", "results", "targets")
    assert set(keys) <= set(doc)
    assert doc["name"] == "demo" and doc["quick"] is False
    assert doc["config"] == {"batch": 512, "ks": [10, 50], "seed": 3}
    assert doc["results"]["gap"] is None  # non-finite floats become null
    assert doc["threads"] == torch.get_num_threads()
    assert {"platform", "cpu_count", "python", "torch"} <= set(doc["machine"])
    assert doc["targets"] == [
        {"name": "qps", "value": 250000.0, "target": ">= 200000", "met": True},
        {"name": "p99_ms", "value": 31.5, "target": "<= 25", "met": False},
        {"name": "gap", "value": None, "target": "> 0", "met": False},
    ]
    assert doc["plots"] == ["demo_latency.png"]
    # the markdown file is exactly the rendering of the JSON file
    md = md_path.read_text()
    assert md == render_markdown(doc)
    assert md.startswith("# Benchmark: demo\n")
    assert "```bash\nfunnelrec bench demo --threads 4\n```" in md
    assert "| qps | 250000 | >= 200000 | ✅ |" in md
    assert "| p99_ms | 31.5 | <= 25 | ❌ |" in md
    assert "two\\|tower" in md  # pipes escaped inside tables
    assert "![demo_latency](demo_latency.png)" in md
    assert doc["machine"]["python"] in md


def test_write_result_replaces_existing_files(tmp_path):
    write_result(_result(), out_dir=tmp_path)
    r = _result()
    r.results["qps"] = 1.0
    json_path, _ = write_result(r, out_dir=tmp_path)
    assert json.loads(json_path.read_text())["results"]["qps"] == 1.0


def test_write_result_rejects_target_without_figure(tmp_path):
    r = _result()
    r.targets.append(Target("missing", ">=", 1))
    with pytest.raises(ConfigError, match="missing"):
        write_result(r, out_dir=tmp_path)
    assert not any(tmp_path.iterdir())


def test_flat_json_line():
    line = flat_json_line({"a": 1, "b": 2.5, "c": "x", "d": True, "e": np.float32(0.5), "f": torch.tensor(3)})
    assert "\n" not in line
    assert json.loads(line) == {"a": 1, "b": 2.5, "c": "x", "d": True, "e": 0.5, "f": 3}
    assert json.loads(flat_json_line({"x": float("inf")})) == {"x": None}


@pytest.mark.parametrize(
    "bad", [{"a": {"b": 1}}, {"a": [1, 2]}, {"a": (1,)}, {"a": np.zeros(3)}, {"a": torch.zeros(2)}, {"a": object()}]
)
def test_flat_json_line_rejects_nested_values(bad):
    with pytest.raises(DataError, match="results\\['a'\\]"):
        flat_json_line(bad)


# -------------------------------------------------------------------------------------------------- registry


def test_registry_errors(clean_registry):
    @register_benchmark("alpha")
    def alpha(quick: bool) -> BenchResult:
        return BenchResult("alpha", {"x": 1})

    assert get_benchmark("alpha") is alpha
    with pytest.raises(ConfigError, match="unknown benchmark 'beta'; known: alpha"):
        get_benchmark("beta")
    with pytest.raises(ConfigError, match="already registered"):

        @register_benchmark("alpha")
        def other(quick: bool) -> BenchResult:  # pragma: no cover - never called
            return BenchResult("alpha", {})

    with pytest.raises(ConfigError, match="benchmark name"):
        register_benchmark("has space")


def test_run_benchmark_json_mode_prints_parseable_last_line(clean_registry, capsys, tmp_path):
    @register_benchmark("dummy")
    def dummy(quick: bool, size: int = 10) -> BenchResult:
        print("some log line")
        results = {"size": size, "items_per_s": 3.5e5, "quick": quick}
        return BenchResult("dummy", results, {"size": size}, [Target("items_per_s", ">=", 2e5)])

    r = run_benchmark("dummy", quick=True, json_mode=True, out_dir=tmp_path, size=7)
    out = capsys.readouterr().out.strip().splitlines()
    assert json.loads(out[-1]) == {"size": 7, "items_per_s": 350000.0, "quick": True}
    assert r.quick is True and r.command
    assert not any(tmp_path.iterdir())  # quick runs write nothing

    run_benchmark("dummy", quick=False, json_mode=True, out_dir=tmp_path)
    captured = capsys.readouterr()
    assert json.loads(captured.out.strip().splitlines()[-1])["quick"] is False
    assert "wrote" in captured.err
    assert json.loads((tmp_path / "dummy.json").read_text())["targets"][0]["met"] is True
    assert (tmp_path / "dummy.md").exists()


def test_run_benchmark_table_mode(clean_registry, capsys, tmp_path):
    @register_benchmark("tabled")
    def tabled(quick: bool) -> BenchResult:
        return BenchResult("tabled", {"latency_ms": 12.0}, targets=[Target("latency_ms", "<", 10)])

    run_benchmark("tabled", quick=False, json_mode=False, write=False, out_dir=tmp_path)
    out = capsys.readouterr().out
    assert "latency_ms" in out and "< 10" in out and "❌" in out
    assert not any(tmp_path.iterdir())


def test_runs_that_write_no_report_do_not_write_plots_into_the_results_folder(clean_registry, tmp_path):
    seen = []

    @register_benchmark("plotting")
    def plotting(quick: bool, out_dir: str = "docs/results") -> BenchResult:
        seen.append(Path(out_dir))
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        (Path(out_dir) / "plotting.png").write_bytes(b"png")
        return BenchResult("plotting", {"x": 1.0})

    for kwargs in ({"write": False}, {"quick": True}):
        run_benchmark("plotting", quick=kwargs.get("quick", False), json_mode=True, write=kwargs.get("write", True),
                      out_dir=tmp_path)
        assert not (tmp_path / "plotting.png").exists(), kwargs
        assert seen[-1] != tmp_path
    run_benchmark("plotting", quick=False, json_mode=True, out_dir=tmp_path)
    assert seen[-1] == tmp_path and (tmp_path / "plotting.png").exists()


def test_run_benchmark_rejects_bad_return(clean_registry):
    @register_benchmark("broken")
    def broken(quick: bool):
        return {"x": 1}

    with pytest.raises(ConfigError, match="expected BenchResult"):
        run_benchmark("broken", quick=True, json_mode=True)


# --------------------------------------------------------------------------------------------------- helpers


def test_machine_info_and_git_sha(tmp_path, monkeypatch):
    info = machine_info()
    assert info["cpu_count"] >= 1 and info["torch"] == torch.__version__
    json.dumps(info)
    sha = git_sha()
    assert sha == "unknown" or len(sha) == 40


def test_git_sha_outside_git(monkeypatch, tmp_path):
    monkeypatch.setattr(harness, "__file__", str(tmp_path / "harness.py"))
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path.parent))
    assert git_sha() == "unknown"


def test_fix_threads():
    before = torch.get_num_threads()
    try:
        assert fix_threads(1) == 1 == torch.get_num_threads()
    finally:
        torch.set_num_threads(before)
    with pytest.raises(ConfigError, match="threads"):
        fix_threads(0)


def test_time_it():
    calls = []
    t = time_it(lambda: calls.append(1), repeats=5, warmup=2)
    assert len(calls) == 7
    assert set(t) >= {"median_s", "p50", "p99"}
    assert 0 <= t["min_s"] <= t["median_s"] == t["p50"] <= t["p99"]
    with pytest.raises(ConfigError, match="repeats"):
        time_it(lambda: None, repeats=0)


def test_peak_rss_subprocess():
    small = peak_rss_subprocess("pass")
    big = peak_rss_subprocess("x = bytearray(80_000_000); x[::4096] = b'1' * len(x[::4096])")
    assert big - small > 60_000_000
    with pytest.raises(FunnelrecError, match="exited with 3"):
        peak_rss_subprocess("import sys; sys.exit(3)")


def test_peak_rss_subprocess_timeout():
    with pytest.raises(FunnelrecError, match="timeout"):
        peak_rss_subprocess("import time; time.sleep(30)", timeout=0.5)


def test_run_benchmark_records_given_command(clean_registry, capsys, tmp_path):
    @register_benchmark("cmd")
    def cmd(quick: bool) -> BenchResult:
        return BenchResult("cmd", {"x": 1})

    run_benchmark("cmd", quick=False, json_mode=True, out_dir=tmp_path, command="funnelrec bench cmd")
    capsys.readouterr()
    assert json.loads((tmp_path / "cmd.json").read_text())["command"] == "funnelrec bench cmd"
    assert "```bash\nfunnelrec bench cmd\n```" in (tmp_path / "cmd.md").read_text()
