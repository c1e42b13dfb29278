"""The ``funnelrec`` command line: simulate, data export-csv / info, bench; exit code 2 and one-line messages on
bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import polars as pl
import pytest
import torch
from typer.testing import CliRunner

from funnelrec.cli import app
from funnelrec.data.loaders.kuairand import kuairand_file_names, load_kuairand

ROOT = Path(__file__).resolve().parents[1]
ML100K = ROOT / "tests" / "fixtures" / "ml-100k"


@pytest.fixture(autouse=True)
def _one_torch_thread():
    """One intra-op thread (two xdist workers share 2 cores); ``bench`` sets its own count, restored here."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def runner():
    return CliRunner()


@pytest.fixture(scope="module")
def sim_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "world"
    res = CliRunner().invoke(app, ["simulate", "--profile", "small", "--days", "1", "--out", str(out), "num_users=50"])
    assert res.exit_code == 0, res.output
    return out


def _error_lines(res) -> list[str]:
    return [line for line in res.stderr.splitlines() if line.strip()]


def _unwrapped(text: str) -> str:
    """The text with every whitespace removed (rich wraps long messages, see the xfail below)."""
    return "".join(text.split())


# ---------------------------------------------------------------------------------------------------- simulate


def test_simulate_writes_the_folder(sim_dir):
    for name in ("log.parquet", "user_features.parquet", "video_features_basic.parquet", "oracle/oracle.parquet",
                 "world.json"):
        assert (sim_dir / name).is_file(), name
    data = load_kuairand(sim_dir)
    assert data.log["user_id"].n_unique() == 50
    assert data.log["date"].min() == 20220408
    meta = json.loads((sim_dir / "world.json").read_text())
    assert meta["config"]["num_users"] == 50 and meta["config"]["name"] == "small"


def test_simulate_refuses_an_existing_folder_without_force(runner, sim_dir):
    before = (sim_dir / "log.parquet").stat().st_mtime_ns
    res = runner.invoke(app, ["simulate", "--days", "1", "--out", str(sim_dir), "num_users=5"])
    assert res.exit_code == 2
    assert res.stderr.startswith("error:")
    assert _unwrapped(str(sim_dir)) in _unwrapped(res.stderr) and "--force" in res.stderr
    assert (sim_dir / "log.parquet").stat().st_mtime_ns == before


def test_simulate_force_replaces_the_folder(runner, tmp_path):
    out = tmp_path / "w"
    assert runner.invoke(app, ["simulate", "--days", "1", "--out", str(out), "num_users=5"]).exit_code == 0
    res = runner.invoke(app, ["simulate", "--days", "1", "--out", str(out), "--force", "num_users=7"])
    assert res.exit_code == 0, res.output
    assert load_kuairand(out).log["user_id"].n_unique() == 7
    assert [p.name for p in tmp_path.iterdir()] == ["w"]


@pytest.mark.parametrize("args, needle", [
    (["--days", "0"], "--days"),
    (["--days", "-3"], "--days"),
    (["nope=1"], "unknown key 'nope'"),
    (["days=abc"], "expected an integer"),
    (["--profile", "huge"], "huge"),
])
def test_simulate_bad_input_exits_2_with_one_line(runner, tmp_path, args, needle):
    out = tmp_path / "w"
    res = runner.invoke(app, ["simulate", "--out", str(out), "num_users=5", *args])
    assert res.exit_code == 2, res.output
    lines = _error_lines(res)
    assert len(lines) == 1, lines
    assert lines[0].startswith("error:") and needle in lines[0]
    assert not out.exists()


def test_long_error_messages_stay_on_one_line(runner, tmp_path):
    res = runner.invoke(app, ["simulate", "--out", str(tmp_path / "w"), "a" * 300 + "=1"])
    assert res.exit_code == 2
    assert len(_error_lines(res)) == 1


@pytest.mark.parametrize("override", ["foo=[abc]", "foo=[/]"])
def test_error_messages_are_printed_verbatim(runner, tmp_path, override):
    res = runner.invoke(app, ["simulate", "--out", str(tmp_path / "w"), override])
    assert res.exit_code == 2
    assert override in res.stderr


def test_simulate_csv_writes_the_official_file_set(runner, tmp_path):
    out = tmp_path / "w"
    res = runner.invoke(app, ["simulate", "--days", "1", "--out", str(out), "--csv", "num_users=20"])
    assert res.exit_code == 0, res.output
    official = kuairand_file_names("pure")
    written = {p.name for p in (out / "csv").iterdir()}
    assert {*official["standard_1"], *official["standard_2"], *official["random"]} <= written
    assert written <= {n for group in official.values() for n in group}
    cols = ["user_id", "time_ms", "video_id"]
    assert load_kuairand(out / "csv").log.sort(cols).equals(load_kuairand(out).log.sort(cols))


def test_simulate_as_a_real_subprocess(tmp_path):
    out = tmp_path / "w"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "funnelrec", "simulate", "--profile", "small", "--days", "1", "--out", str(out),
           "num_users=30"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "wrote" in proc.stderr
    assert load_kuairand(out).log["user_id"].n_unique() == 30
    again = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert again.returncode == 2
    assert "alreadyexists" in _unwrapped(again.stderr) and "Traceback" not in again.stderr


# -------------------------------------------------------------------------------------------------------- data


def test_data_export_csv_and_info(runner, sim_dir, tmp_path):
    out = tmp_path / "csv"
    res = runner.invoke(app, ["data", "export-csv", str(sim_dir), str(out)])
    assert res.exit_code == 0, res.output
    assert (out / "log_standard_4_08_to_4_21_pure.csv").is_file()
    assert (out / "user_features_pure.csv").is_file() and (out / "video_features_basic_pure.csv").is_file()
    rows = pl.read_parquet(sim_dir / "log.parquet").height
    res = runner.invoke(app, ["data", "info", f"kuairand:{out}"])
    assert res.exit_code == 0, res.output
    assert f"{rows:,}" in res.stdout and "log" in res.stdout
    res = runner.invoke(app, ["data", "info", f"kuairand:{sim_dir}"])
    assert res.exit_code == 0 and f"{rows:,}" in res.stdout


def test_data_export_csv_of_a_missing_folder_exits_2(runner, tmp_path):
    res = runner.invoke(app, ["data", "export-csv", str(tmp_path / "nothing"), str(tmp_path / "out")])
    assert res.exit_code == 2
    assert "not found" in res.stderr
    assert not (tmp_path / "out").exists()


def test_data_info_movielens(runner):
    res = runner.invoke(app, ["data", "info", f"movielens:{ML100K}"])
    assert res.exit_code == 0, res.output
    assert "ratings" in res.stdout and "150" in res.stdout


@pytest.mark.parametrize("spec, needle", [
    ("bogus:somewhere", "unknown dataset spec"),
    ("no-scheme-at-all", "unknown dataset spec"),
    ("kuairand:/definitely/not/here", "not found"),
])
def test_data_info_bad_spec_exits_2(runner, spec, needle):
    res = runner.invoke(app, ["data", "info", spec])
    assert res.exit_code == 2
    assert needle in " ".join(res.stderr.split())


# ------------------------------------------------------------------------------------------------------- bench


def test_bench_list_names_the_simulator(runner):
    res = runner.invoke(app, ["bench", "list"])
    assert res.exit_code == 0
    assert "simulator" in res.stdout.split()


def test_bench_simulator_quick_json_prints_a_flat_json_line_last(runner):
    res = runner.invoke(app, ["bench", "simulator", "--quick", "--json", "--no-write"])
    assert res.exit_code == 0, res.output
    last = res.stdout.strip().splitlines()[-1]
    figures = json.loads(last)
    for key in ("impressions_per_s", "oracle_auc_is_click", "pop_auc_is_click", "oracle_minus_pop_auc_click"):
        assert isinstance(figures[key], float), key
    assert all(v is None or isinstance(v, (bool, int, float, str)) for v in figures.values())
    assert figures["oracle_minus_pop_auc_click"] == pytest.approx(
        figures["oracle_auc_is_click"] - figures["pop_auc_is_click"])
    assert figures["impressions_per_s"] > 0 and figures["profile"] == "small"


def test_bench_unknown_name_exits_2(runner):
    res = runner.invoke(app, ["bench", "no-such-bench"])
    assert res.exit_code == 2
    assert "no-such-bench" in res.stderr and "simulator" in res.stderr


def test_demo_rejects_too_few_days_before_running(runner):
    res = runner.invoke(app, ["demo", "--days", "2"])
    assert res.exit_code == 2
    assert "--days" in res.stderr
