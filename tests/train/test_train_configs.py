"""Every frozen training config in configs/train loads, validates and names a registered model of its stage."""

from pathlib import Path

import pytest

from funnelrec.config import load_config
from funnelrec.ranking import RANKERS
from funnelrec.retrieval import RETRIEVERS
from funnelrec.train.config import RunConfig

CONFIGS = sorted((Path(__file__).resolve().parents[2] / "configs" / "train").glob("*.yaml"))


def test_there_is_a_config_per_baseline():
    names = {p.stem for p in CONFIGS}
    for model in RANKERS:
        assert any(n.startswith(f"ranking-{model}-") for n in names), model
    for model in RETRIEVERS:
        assert any(n.startswith(f"retrieval-{model}-") for n in names), model


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_config_loads_and_names_its_model(path):
    cfg = load_config(RunConfig, path, [])
    cfg.validate()
    registry = RANKERS if cfg.stage == "ranking" else RETRIEVERS
    assert cfg.model in registry
    assert path.stem.startswith(f"{cfg.stage}-{cfg.model}-")
    assert cfg.data.startswith("sim:")
