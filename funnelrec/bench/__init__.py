"""Benchmarks: a registry of named benchmarks and the harness that runs them and records their results.

Register a benchmark in any module of this package with ``@register_benchmark("NAME")``; ``run_benchmark`` finds
it, runs it, prints a table (or, in JSON mode, one flat JSON line last on stdout) and, for full runs, writes
``docs/results/NAME.json`` and ``docs/results/NAME.md``. See ``funnelrec.bench.harness`` for the conventions.

Example:
    >>> from funnelrec.bench import Target
    >>> Target("recall@50", ">=", 0.2).check(0.31)
    True
"""

from funnelrec.bench.harness import (
    BenchResult,
    Target,
    fix_threads,
    flat_json_line,
    get_benchmark,
    git_sha,
    list_benchmarks,
    machine_info,
    peak_rss_subprocess,
    register_benchmark,
    render_markdown,
    result_to_json,
    run_benchmark,
    time_it,
    write_result,
)

__all__ = [
    "BenchResult",
    "Target",
    "fix_threads",
    "flat_json_line",
    "get_benchmark",
    "git_sha",
    "list_benchmarks",
    "machine_info",
    "peak_rss_subprocess",
    "register_benchmark",
    "render_markdown",
    "result_to_json",
    "run_benchmark",
    "time_it",
    "write_result",
]
