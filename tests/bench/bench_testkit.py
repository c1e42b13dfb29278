"""Shared pieces of the benchmark tests that run a benchmark through the CLI: the MovieLens fixture spec, the CLI
call, the flat-JSON reader, and the isolation every such module wants (a private world cache, one torch thread).

Import into a test module: ``from bench_testkit import ML100K, bench_cli, last_json, isolate_benchmark``.
"""

from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path

import pytest
from typer.testing import CliRunner

from funnelrec.bench import fix_threads
from funnelrec.cli import app

ML100K = f"movielens:{Path(__file__).resolve().parents[1] / 'fixtures' / 'ml-100k'}"


def bench_cli(name: str, *args: str):
    """``funnelrec bench NAME ARGS...`` through typer's test runner."""
    return CliRunner().invoke(app, ["bench", name, *args])


def last_json(res) -> dict:
    """The flat figures a ``--json`` run prints as its last stdout line (the run must have succeeded)."""
    assert res.exit_code == 0, res.output
    figures = json.loads(res.stdout.strip().splitlines()[-1])
    assert isinstance(figures, dict)
    assert all(v is None or isinstance(v, (bool, int, float, str)) for v in figures.values())
    return figures


@contextmanager
def isolate_benchmark(module, tmp_path_factory):
    """Simulated worlds go to a temporary cache, never the user's; the benchmark ``module`` runs on one torch
    thread (test workers share 2 cores, and oversubscribed threads slow every worker down)."""
    mp = pytest.MonkeyPatch()
    mp.setenv("FUNNELREC_CACHE_DIR", str(tmp_path_factory.mktemp("cache")))
    mp.setattr(module, "fix_threads", lambda n: fix_threads(1))
    try:
        yield
    finally:
        mp.undo()
