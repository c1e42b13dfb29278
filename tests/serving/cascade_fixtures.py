"""Shared fixture of the cascade tests: one small trained cascade and its exported bundle, built once per
process.

Import the fixture into a test module with ``from cascade_fixtures import cascade_env  # noqa: F401``. The
build (a 120-user, 3-day simulated world, every stage trained for one epoch, the pre-ranker distilled from 300
requests, the bundle exported) takes ~10 s on one thread; it is cached at module level, so every test module importing the fixture shares the same build even
though pytest registers the imported fixture once per module.

Nothing in here may be mutated by a test: ``env.cascade()`` returns a fresh cascade with its own live
histories for tests that append feedback, and bundle-corruption tests copy ``env.bundle`` first.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch

from funnelrec.data.splits import split_by_day
from funnelrec.serving.build import BuildConfig, CascadeParts, train_cascade
from funnelrec.serving.bundle import export_bundle
from funnelrec.serving.cascade import Cascade, FunnelSizes

SOURCE = "sim:small?num_users=120&days=3"
SIZES = FunnelSizes(retrieve=300, popular=50, prerank=100, pool=30, serve=10)
HISTORY_LEN = 20
NUM_REQUESTS = 24


@dataclass
class CascadeEnv:
    """What the shared build holds.

    Attributes:
        source: the simulated source the stages were trained on.
        parts: the trained parts.
        bundle: the exported bundle folder (read-only for tests: copy before corrupting it).
        requests: [B] logged requests of the test day (first request of the first ``NUM_REQUESTS`` users):
            ``user_id, time_ms, tab, hour``.
        cascade0: a cascade over ``parts`` that no test appends feedback to.
    """

    source: object
    parts: CascadeParts
    bundle: Path
    requests: pl.DataFrame
    cascade0: Cascade

    def cascade(self) -> Cascade:
        """A fresh cascade over the shared parts, with its own (empty) real-time history."""
        return self.parts.cascade()

    def args(self, requests: pl.DataFrame | None = None) -> tuple[np.ndarray, ...]:
        """``(user_ids, time_ms, tab, hour)`` arrays of ``requests`` (default: all test requests)."""
        r = self.requests if requests is None else requests
        return tuple(r.get_column(c).to_numpy().copy() for c in ("user_id", "time_ms", "tab", "hour"))


_BUILT: dict[str, CascadeEnv] = {}


def _build_args() -> dict:
    """The smallest build: one epoch per stage, few distillation requests, no closed-loop fusion tuning (speed
    knobs the build config does not have are left out)."""
    fast = dict(ranker_epochs=1, retriever_epochs=1, preranker_epochs=1, cem_iterations=1, distill_requests=300,
                closed_loop_iterations=0)
    known = BuildConfig.__dataclass_fields__
    return {**{k: v for k, v in fast.items() if k in known}, "history_len": HISTORY_LEN, "sizes": SIZES}


def _build(root: Path) -> CascadeEnv:
    from funnelrec.data.sources import load_source

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        source = load_source(SOURCE, cache_dir=root / "cache", progress=False)
        parts = train_cascade(source, BuildConfig(**_build_args()))
    finally:
        torch.set_num_threads(threads)
    bundle = export_bundle(parts, root / "bundle", name="test-bundle")
    test_day = split_by_day(source.log, valid_days=1, test_days=1)["test"]
    requests = (test_day.sort(["user_id", "time_ms"], maintain_order=True)
                .unique("user_id", keep="first", maintain_order=True)
                .head(NUM_REQUESTS)
                .select("user_id", "time_ms", "tab", (pl.col("hourmin") // 100).alias("hour")))
    assert requests.height == NUM_REQUESTS, "the test world has too few users active on its last day"
    return CascadeEnv(source=source, parts=parts, bundle=bundle, requests=requests, cascade0=parts.cascade())


@pytest.fixture(scope="session")
def cascade_env(tmp_path_factory) -> CascadeEnv:
    """The shared trained cascade (see the module doc)."""
    if "env" not in _BUILT:
        _BUILT["env"] = _build(tmp_path_factory.mktemp("cascade_env"))
    return _BUILT["env"]
