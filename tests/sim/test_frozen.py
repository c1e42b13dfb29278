"""The frozen worlds: the code's profiles must equal the configs in configs/sim/ (bench-v1 above all).

Changing bench-v1 is its own piece of work that re-runs every benchmark; this test makes such a change visible.
"""

from pathlib import Path

import pytest
import yaml

from funnelrec.sim.config import PROFILES, WorldConfig, profile

CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "sim"


@pytest.mark.parametrize("name", PROFILES)
def test_profile_matches_frozen_config(name):
    frozen = yaml.safe_load((CONFIGS / f"{name}.yaml").read_text())
    assert profile(name).to_dict() == WorldConfig.from_dict(frozen).to_dict()


def test_bench_world_builds_with_its_large_seed():
    from funnelrec.sim.catalog import Catalog

    cfg = profile("bench-v1")
    cat = Catalog.build(seed=cfg.seed, latent_dim=cfg.catalog.latent_dim)
    assert cat.num_items == 7583 and bool(cat.latent.isfinite().all())
