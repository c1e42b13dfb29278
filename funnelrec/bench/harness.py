"""Benchmark harness: a registry of named benchmarks, targets, timing helpers and result files.

Conventions every benchmark follows:

* A benchmark ``NAME`` is a function ``fn(quick: bool, **kwargs) -> BenchResult`` registered with
  ``@register_benchmark("NAME")``. Its ``results`` are a *flat* dict of scalars (bool, int, float, str).
  Modules under ``funnelrec/bench/`` are imported on demand, so registering there is enough to be found.
* ``--json`` mode prints that dict as ONE flat JSON line, the last line of stdout (benchmarks log to stderr).
  Non-finite floats are written as ``null`` so the line is strict JSON.
* A full (non-quick) run writes ``docs/results/NAME.json`` -- name, command, config, git_sha, machine, threads,
  quick, timestamp, results, targets (name, value, target string, met), plots -- and renders
  ``docs/results/NAME.md`` from that JSON. Plot paths are stored relative to the results folder.

Example:
    >>> @register_benchmark("doc_demo")
    ... def _demo(quick: bool, size: int = 3) -> BenchResult:
    ...     return BenchResult("doc_demo", {"items_per_s": 250000.0}, {"size": size},
    ...                        targets=[Target("items_per_s", ">=", 200000)])
    >>> r = run_benchmark("doc_demo", quick=True, json_mode=True)
    {"items_per_s": 250000.0}
    >>> r.targets[0].check(r.results["items_per_s"]), r.targets[0].describe()
    (True, '>= 200000')
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import json
import math
import os
import pkgutil
import platform
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from funnelrec.errors import ConfigError, DataError, FunnelrecError
from funnelrec.utils.io import atomic_path

__all__ = [
    "Target",
    "BenchResult",
    "register_benchmark",
    "get_benchmark",
    "list_benchmarks",
    "run_benchmark",
    "result_to_json",
    "write_result",
    "render_markdown",
    "flat_json_line",
    "machine_info",
    "git_sha",
    "fix_threads",
    "time_it",
    "interleaved_times",
    "mean_std",
    "beats",
    "peak_rss_subprocess",
]

Scalar = bool | int | float | str

_OPS: dict[str, Callable[[float, Any], bool]] = {
    ">=": lambda v, t: v >= t,
    "<=": lambda v, t: v <= t,
    ">": lambda v, t: v > t,
    "<": lambda v, t: v < t,
    "in": lambda v, t: t[0] <= v <= t[1],
}


def _fmt_num(x: Any) -> str:
    """Short, exact-looking number text: 200000.0 -> '200000', 0.25 -> '0.25', 1234567.891 -> '1.23457e+06'."""
    if isinstance(x, bool) or not isinstance(x, (int, float, np.integer, np.floating)):
        return str(x)
    if isinstance(x, (int, np.integer)):
        return str(int(x))
    x = float(x)
    if math.isfinite(x) and x.is_integer() and abs(x) < 1e15:
        return str(int(x))
    return f"{x:.6g}"


@dataclass
class Target:
    """A pass/fail threshold on one figure of a benchmark's results.

    Args:
        name: the results key the target applies to.
        op: one of ``">="``, ``"<="``, ``">"``, ``"<"``, ``"in"``.
        threshold: a number, or for ``"in"`` an inclusive ``(lo, hi)`` pair.

    Example:
        >>> Target("auc", "in", (0.7, 0.8)).check(0.75), Target("qps", ">=", 2e5).describe()
        (True, '>= 200000')
    """

    name: str
    op: str
    threshold: float | tuple[float, float]

    def __post_init__(self) -> None:
        if self.op not in _OPS:
            raise ConfigError(f"Target {self.name!r}: op must be one of {sorted(_OPS)}, got {self.op!r}")
        if self.op == "in":
            t = self.threshold
            if not isinstance(t, (tuple, list)) or len(t) != 2 or not t[0] <= t[1]:
                raise ConfigError(f"Target {self.name!r}: threshold for 'in' must be a (lo, hi) pair, got {t!r}")
            self.threshold = (t[0], t[1])
        elif isinstance(self.threshold, bool) or not isinstance(self.threshold, (int, float, np.number)):
            raise ConfigError(f"Target {self.name!r}: threshold must be a number, got {self.threshold!r}")

    def check(self, value: Any) -> bool:
        """True when ``value`` meets the target (a missing, non-numeric or NaN value never does)."""
        if value is None or isinstance(value, (str, bool)):
            return False
        try:
            v = float(value)
        except (TypeError, ValueError):
            return False
        if math.isnan(v):
            return False
        return bool(_OPS[self.op](v, self.threshold))

    def describe(self) -> str:
        """The requirement as text, e.g. ``'>= 200000'`` or ``'in [0.7, 0.8]'``."""
        if self.op == "in":
            lo, hi = self.threshold  # type: ignore[misc]
            return f"in [{_fmt_num(lo)}, {_fmt_num(hi)}]"
        return f"{self.op} {_fmt_num(self.threshold)}"


@dataclass
class BenchResult:
    """What a benchmark returns.

    Args:
        name: the benchmark name (the registry key; also the results file stem).
        results: flat dict of figures (bool, int, float or str values only).
        config: the settings the run used (sizes, seeds, ...); JSON-serialisable.
        targets: thresholds checked against ``results``.
        plots: PNG paths to embed in the markdown (relative to the results folder, or absolute).
        quick: whether this was a quick (smoke) run; quick runs write no files.
        command: the command line that reproduces the run.
        summary: markdown placed above the generic results table of the report (e.g. a models x tasks table,
            notes on the protocol); kept in the JSON document as ``summary``.
    """

    name: str
    results: dict[str, Scalar]
    config: dict[str, Any] = field(default_factory=dict)
    targets: list[Target] = field(default_factory=list)
    plots: list[str] = field(default_factory=list)
    quick: bool = False
    command: str = ""
    summary: str = ""


# --------------------------------------------------------------------------------------------------- JSON output


def _scalar(key: str, value: Any) -> Scalar | None:
    """Validate and normalise one results value (numpy/torch scalars -> Python; NaN/inf -> None)."""
    if isinstance(value, torch.Tensor):
        if value.numel() != 1 or value.dim() != 0:
            raise DataError(f"results[{key!r}] must be a scalar, got a tensor of shape {list(value.shape)}")
        value = value.item()
    if isinstance(value, np.generic):
        value = value.item()
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    raise DataError(f"results[{key!r}] must be a scalar (bool, int, float, str), got {type(value).__name__}")


def _clean_results(results: dict[str, Any]) -> dict[str, Scalar | None]:
    if not isinstance(results, dict):
        raise DataError(f"results must be a dict, got {type(results).__name__}")
    out = {}
    for k, v in results.items():
        if not isinstance(k, str):
            raise DataError(f"results keys must be strings, got {k!r}")
        out[k] = _scalar(k, v)
    return out


def flat_json_line(results: dict[str, Any]) -> str:
    """One line of strict JSON for a flat results dict; raises ``DataError`` on a nested or non-scalar value.

    Example:
        >>> flat_json_line({"qps": 1.5, "ok": True, "bad": float("nan")})
        '{"qps": 1.5, "ok": true, "bad": null}'
    """
    return json.dumps(_clean_results(results), allow_nan=False, separators=(", ", ": "))


def _jsonable(x: Any) -> Any:
    """Make a config value JSON-serialisable (tuples -> lists, numpy/torch scalars -> Python, paths -> str)."""
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, torch.Tensor) and x.numel() == 1:
        return _jsonable(x.item())
    if isinstance(x, np.generic):
        return _jsonable(x.item())
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, (str, int, float, bool)) or x is None:
        return x
    if dataclasses.is_dataclass(x) and not isinstance(x, type):
        return _jsonable(dataclasses.asdict(x))
    return str(x)


def result_to_json(result: BenchResult, out_dir: str | os.PathLike = "docs/results") -> dict[str, Any]:
    """The JSON document of a result (see the module docstring); plot paths are made relative to ``out_dir``."""
    results = _clean_results(result.results)
    targets = []
    for t in result.targets:
        if t.name not in result.results:
            raise ConfigError(f"target {t.name!r} names no figure of benchmark {result.name!r}")
        value = results[t.name]
        targets.append({"name": t.name, "value": value, "target": t.describe(), "met": t.check(value)})
    plots = []
    for p in result.plots:
        p = Path(p)
        plots.append(os.path.relpath(p, out_dir) if p.is_absolute() else p.as_posix())
    return {
        "name": result.name,
        "command": result.command,
        "config": _jsonable(result.config),
        "git_sha": git_sha(),
        "machine": machine_info(),
        "threads": torch.get_num_threads(),
        "quick": bool(result.quick),
        "timestamp": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "results": results,
        "targets": targets,
        "plots": plots,
        "summary": result.summary,
    }


def write_result(result: BenchResult, out_dir: str | os.PathLike = "docs/results") -> tuple[Path, Path]:
    """Write ``out_dir/NAME.json`` and the ``out_dir/NAME.md`` rendered from it, each atomically.

    Returns:
        ``(json_path, md_path)``.
    """
    out = Path(out_dir)
    doc = result_to_json(result, out)
    json_path, md_path = out / f"{result.name}.json", out / f"{result.name}.md"
    with atomic_path(json_path) as tmp:
        tmp.write_text(json.dumps(doc, indent=2, allow_nan=False, ensure_ascii=False) + "\n", encoding="utf-8")
    with atomic_path(md_path) as tmp:
        tmp.write_text(render_markdown(doc), encoding="utf-8")
    return json_path, md_path


def _md_cell(x: Any) -> str:
    if x is None:
        return "n/a"
    if isinstance(x, bool):
        return "true" if x else "false"
    if isinstance(x, (int, float)):
        return _fmt_num(x)
    if isinstance(x, (dict, list)):
        x = json.dumps(x)
    return str(x).replace("|", "\\|").replace("\n", " ")


def render_markdown(doc: dict[str, Any]) -> str:
    """Render the markdown report of a results JSON document (as written by ``write_result``).

    Example:
        >>> md = render_markdown({"name": "demo", "command": "funnelrec bench demo", "results": {"x": 1.0},
        ...                       "targets": [{"name": "x", "value": 1.0, "target": ">= 0.5", "met": True}]})
        >>> md.splitlines()[0], "| x | 1 | >= 0.5 | ✅ |" in md
        ('# Benchmark: demo', True)
    """
    name = doc.get("name", "?")
    lines = [f"# Benchmark: {name}", ""]
    meta = []
    if doc.get("timestamp"):
        meta.append(f"run {doc['timestamp']}")
    if doc.get("git_sha"):
        meta.append(f"commit `{doc['git_sha']}`")
    if "threads" in doc:
        meta.append(f"{doc['threads']} torch threads")
    if doc.get("quick"):
        meta.append("**quick run**")
    if meta:
        lines += [", ".join(meta) + ".", ""]
    lines += ["## Command", "", "```bash", str(doc.get("command", "")), "```", ""]
    if doc.get("summary"):
        lines += [str(doc["summary"]).strip(), ""]
    machine = doc.get("machine") or {}
    if machine:
        lines += ["## Machine", ""]
        lines += [f"- **{k}**: {_md_cell(v)}" for k, v in machine.items()]
        lines.append("")
    config = doc.get("config") or {}
    if config:
        lines += ["## Config", "", "| key | value |", "| --- | --- |"]
        lines += [f"| {_md_cell(k)} | {_md_cell(v)} |" for k, v in config.items()]
        lines.append("")
    lines += ["## Results", "", "| figure | value |", "| --- | --- |"]
    lines += [f"| {_md_cell(k)} | {_md_cell(v)} |" for k, v in (doc.get("results") or {}).items()]
    lines.append("")
    targets = doc.get("targets") or []
    if targets:
        met = sum(bool(t.get("met")) for t in targets)
        lines += ["## Targets", "", f"{met} of {len(targets)} met.", ""]
        lines += ["| figure | value | target | met |", "| --- | --- | --- | --- |"]
        for t in targets:
            mark = "✅" if t.get("met") else "❌"
            cells = [_md_cell(t.get("name")), _md_cell(t.get("value")), _md_cell(t.get("target")), mark]
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    plots = doc.get("plots") or []
    if plots:
        lines += ["## Plots", ""]
        for p in plots:
            lines += [f"![{Path(p).stem}]({p})", ""]
    return "\n".join(lines).rstrip("\n") + "\n"


# ------------------------------------------------------------------------------------------ machine and timing


def machine_info() -> dict[str, Any]:
    """Platform, CPU count and model (if readable), Python, torch and numpy versions, and the GPU if any."""
    info: dict[str, Any] = {
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": np.__version__,
    }
    cpu = None
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    cpu = cpu or platform.processor() or None
    if cpu:
        info["cpu_model"] = cpu
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def git_sha() -> str:
    """The commit of the funnelrec checkout (``HEAD``), or ``"unknown"`` outside a git work tree."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=Path(__file__).resolve().parent,
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    sha = out.stdout.strip()
    return sha if out.returncode == 0 and sha else "unknown"


def fix_threads(n: int) -> int:
    """Set torch's intra-op thread count to ``n`` (for comparable timings) and return the count now in effect."""
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
        raise ConfigError(f"threads must be a positive integer, got {n!r}")
    torch.set_num_threads(int(n))
    return torch.get_num_threads()


def mean_std(values) -> tuple[float, float]:
    """Mean and sample standard deviation (ddof 1; 0 for one value) of the finite values (None / NaN / inf
    dropped); ``(nan, nan)`` when none is left.

    Example:
        >>> mean_std([1.0, 3.0, None])
        (2.0, 1.4142135623730951)
    """
    arr = np.asarray([v for v in values if v is not None and np.isfinite(v)], dtype=np.float64)
    if arr.size == 0:
        return math.nan, math.nan
    return float(arr.mean()), float(arr.std(ddof=1)) if arr.size > 1 else 0.0


def beats(a, b) -> bool:
    """DESIGN §7: the mean paired difference a − b over seeds exceeds 2 std (one seed: any positive difference)."""
    m, s = mean_std([x - y for x, y in zip(a, b)])
    return bool(m > 2 * s)


def interleaved_times(fns: dict[str, Callable[[], Any]], repeats: int, warmup: int = 3) -> dict[str, np.ndarray]:
    """Wall times [repeats] of each ``fn()``, the functions called turn by turn (order reversed every other
    turn), so a noisy machine slows them alike; ``warmup`` untimed calls of each first."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    names = list(fns)
    times = {n: np.empty(repeats) for n in names}
    for r in range(repeats):  # timing loop: each call timed on its own
        for n in (names if r % 2 == 0 else names[::-1]):
            t0 = time.perf_counter()
            fns[n]()
            times[n][r] = time.perf_counter() - t0
    return times


def time_it(fn: Callable[[], Any], repeats: int = 20, warmup: int = 3) -> dict[str, float]:
    """Wall-clock timing of ``fn()``: ``warmup`` untimed calls, then ``repeats`` timed ones.

    Returns:
        ``{"median_s", "p50", "p99", "mean_s", "min_s"}`` in seconds (``p50`` equals ``median_s``).

    Example:
        >>> t = time_it(lambda: sum(range(100)), repeats=5, warmup=1)
        >>> t["min_s"] <= t["median_s"] <= t["p99"]
        True
    """
    if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
        raise ConfigError(f"repeats must be a positive integer, got {repeats!r}")
    if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 0:
        raise ConfigError(f"warmup must be a non-negative integer, got {warmup!r}")
    for _ in range(warmup):
        fn()
    times = np.empty(repeats)
    for i in range(repeats):  # timing loop: each call must be timed on its own
        t0 = time.perf_counter()
        fn()
        times[i] = time.perf_counter() - t0
    med = float(np.median(times))
    return {
        "median_s": med,
        "p50": med,
        "p99": float(np.percentile(times, 99)),
        "mean_s": float(times.mean()),
        "min_s": float(times.min()),
    }


_RSS_DRIVER = """
import os, sys
pid = os.fork()
if pid == 0:
    null = os.open(os.devnull, os.O_WRONLY)
    os.dup2(null, 1)
    os.execv(sys.executable, [sys.executable, "-c", sys.argv[1]])
_, status, usage = os.wait4(pid, 0)
print(usage.ru_maxrss, os.waitstatus_to_exitcode(status))
"""


def peak_rss_subprocess(python_code: str, timeout: float | None = 600) -> int:
    """Peak resident memory (``ru_maxrss``, in bytes) of a fresh Python process running ``python_code``.

    Linux carries a process's peak RSS across ``fork`` and ``exec``, so a child forked straight from a big
    process (say, a test run that imported torch) would report at least the parent's size. The code therefore
    runs as the grandchild of a small driver interpreter, whose own footprint (~10 MB) is the floor of the
    figure. The figure includes the interpreter itself (~10 MB, plus ~300 MB once torch is imported). The
    child's stdout is discarded; a failure raises ``FunnelrecError`` with the last line of its stderr.

    Example:
        >>> peak_rss_subprocess("x = bytearray(50_000_000)") > 50_000_000
        True
    """
    proc = subprocess.Popen(
        [sys.executable, "-c", _RSS_DRIVER, python_code],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # its own process group, so a timeout can end the grandchild too
    )
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise FunnelrecError(f"peak_rss_subprocess: the child ran past timeout={timeout} s") from exc
    fields = stdout.split()
    if proc.returncode != 0 or len(fields) != 2:
        raise FunnelrecError(f"peak_rss_subprocess: the driver failed: {stderr.strip()[-300:]!r}")
    maxrss, code = int(fields[0]), int(fields[1])
    if code != 0:
        tail = stderr.strip().splitlines()[-1:] or [""]
        raise FunnelrecError(f"peak_rss_subprocess: the child exited with {code}: {tail[0]}")
    scale = 1 if sys.platform == "darwin" else 1024  # Linux reports kilobytes, macOS bytes
    return maxrss * scale


# ----------------------------------------------------------------------------------------------------- registry

_REGISTRY: dict[str, Callable[..., BenchResult]] = {}
_DISCOVERED = False


def register_benchmark(name: str) -> Callable[[Callable[..., BenchResult]], Callable[..., BenchResult]]:
    """Decorator registering ``fn(quick: bool, **kwargs) -> BenchResult`` under ``name``.

    Re-registering the same function (a module re-import) is allowed; a different function under a taken name
    raises ``ConfigError``.
    """
    if not isinstance(name, str) or not name or any(c in name for c in "/\\ "):
        raise ConfigError(f"benchmark name must be a non-empty string without spaces or slashes, got {name!r}")

    def deco(fn: Callable[..., BenchResult]) -> Callable[..., BenchResult]:
        old = _REGISTRY.get(name)
        if old is not None and (old.__module__, old.__qualname__) != (fn.__module__, fn.__qualname__):
            raise ConfigError(f"benchmark {name!r} is already registered by {old.__module__}.{old.__qualname__}")
        _REGISTRY[name] = fn
        return fn

    return deco


def _discover() -> None:
    """Import every public module of ``funnelrec.bench`` once, so that their benchmarks register themselves."""
    global _DISCOVERED
    if _DISCOVERED:
        return
    _DISCOVERED = True
    import funnelrec.bench as pkg

    for mod in pkgutil.iter_modules(pkg.__path__):
        if not mod.name.startswith("_") and mod.name != "harness":
            importlib.import_module(f"{pkg.__name__}.{mod.name}")


def list_benchmarks() -> list[str]:
    """Sorted names of all benchmarks (after importing the modules of ``funnelrec.bench``)."""
    _discover()
    return sorted(_REGISTRY)


def get_benchmark(name: str) -> Callable[..., BenchResult]:
    """The function registered under ``name``; ``ConfigError`` listing the known names otherwise."""
    if name not in _REGISTRY:
        _discover()
    try:
        return _REGISTRY[name]
    except KeyError:
        known = ", ".join(sorted(_REGISTRY)) or "none"
        raise ConfigError(f"unknown benchmark {name!r}; known: {known}") from None


def _print_table(result: BenchResult, paths: tuple[Path, Path] | None) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    table = Table(title=f"benchmark {result.name}" + (" (quick)" if result.quick else ""))
    table.add_column("figure")
    table.add_column("value", justify="right")
    table.add_column("target")
    table.add_column("met")
    targets = {t.name: t for t in result.targets}
    for k, v in result.results.items():
        t = targets.get(k)
        met = ("✅" if t.check(v) else "❌") if t else ""
        table.add_row(k, _md_cell(_scalar(k, v)), t.describe() if t else "", met)
    console.print(table)
    if paths is not None:
        console.print(f"wrote {paths[0]} and {paths[1]}")


def _default_command(name: str, quick: bool) -> str:
    """The running command line, or a Python one-liner that reruns the benchmark when argv says nothing."""
    argv = list(sys.argv)
    if argv and argv[0] not in ("", "-c", "-m"):
        return shlex.join([Path(argv[0]).name, *argv[1:]])
    call = f"run_benchmark({json.dumps(name)}, quick={bool(quick)}, json_mode=False)"
    return shlex.join(["python", "-c", f"from funnelrec.bench import run_benchmark; {call}"])


def run_benchmark(
    name: str,
    quick: bool,
    json_mode: bool,
    write: bool = True,
    out_dir: str | os.PathLike = "docs/results",
    command: str | None = None,
    **kwargs: Any,
) -> BenchResult:
    """Run benchmark ``name``, write its result files (full runs only) and report.

    Args:
        name: registered benchmark name.
        quick: smoke-sized run; never writes files.
        json_mode: print only the flat results JSON, as the last stdout line (no table).
        write: write ``out_dir/NAME.json`` and ``.md`` for a full run (default True).
        out_dir: the results folder.
        command: the command line to record (the CLI passes its own); otherwise the benchmark's ``command``,
            else ``sys.argv``.
        **kwargs: passed to the benchmark function.

    Returns:
        The ``BenchResult``, with ``name``, ``quick`` and ``command`` set by the harness.
    """
    fn = get_benchmark(name)
    if "out_dir" in inspect.signature(fn).parameters:  # benchmarks that write plots put them beside the report
        # a run that writes no report must not overwrite the published plots either: they go to a scratch folder
        kwargs.setdefault("out_dir", out_dir if (write and not quick) else tempfile.mkdtemp(prefix="funnelrec-plots-"))
    result = fn(quick=quick, **kwargs)
    if not isinstance(result, BenchResult):
        raise ConfigError(f"benchmark {name!r} returned {type(result).__name__}, expected BenchResult")
    result.name, result.quick = name, bool(quick)
    if command:
        result.command = command
    elif not result.command:
        result.command = _default_command(name, quick)
    line = flat_json_line(result.results)  # validates the results before anything is written
    paths = write_result(result, out_dir) if (write and not quick) else None
    if json_mode:
        if paths is not None:
            print(f"wrote {paths[0]} and {paths[1]}", file=sys.stderr)
        sys.stdout.flush()
        print(line, flush=True)
    else:
        _print_table(result, paths)
    return result
