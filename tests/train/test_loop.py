"""The multi-task fit loop on a small simulated world: it learns, keeps the best epoch, and is deterministic."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import funnelrec.train.loop as loop
from funnelrec.data.dataset import RequestDataset
from funnelrec.data.features import FeatureSpec
from funnelrec.data.splits import split_by_day
from funnelrec.data.timeline import Timelines
from funnelrec.errors import ConfigError
from funnelrec.ranking.popularity import with_position
from funnelrec.ranking.shared_bottom import SharedBottom, SharedBottomConfig
from funnelrec.sim import World
from funnelrec.train import evaluate_multitask, fit_multitask
from funnelrec.train.loop import predict_dataset

HISTORY = 10


@pytest.fixture(scope="module")
def data():
    """300 users, 4 days: two train days, one valid day, one test day."""
    sim = World.from_profile("small", ["num_users=300", "days=4"]).simulate(progress=False)
    log = with_position(sim.log)
    splits = split_by_day(log, valid_days=1, test_days=1)
    spec = FeatureSpec.kuairand().fit(sim.users, sim.videos, splits["train"])
    timelines = Timelines.from_log(log, spec)

    def make(df):
        return RequestDataset(df, sim.users, sim.videos, spec, timelines, history_len=HISTORY)

    return {"spec": spec, "train": make(splits["train"]), "valid": make(splits["valid"]), "splits": splits}


def new_model(spec, seed: int = 0) -> SharedBottom:
    torch.manual_seed(seed)
    cfg = SharedBottomConfig(user_vocab=spec.vocab_sizes("user_sparse"), item_vocab=spec.vocab_sizes("item_sparse"),
                             user_dense=spec.num_user_dense, item_dense=spec.num_item_dense, history_pool=HISTORY,
                             bottom=[64, 32], head=16)
    return SharedBottom(cfg)


def test_fit_improves_validation_auc_over_an_untrained_model(data):
    model = new_model(data["spec"])
    untrained = evaluate_multitask(model, data["valid"])
    fit = fit_multitask(model, data["train"], data["valid"], epochs=3, seed=0, progress=False)
    assert len(fit.history) >= 2 and fit.samples_per_s > 0
    assert [h["epoch"] for h in fit.history] == list(range(len(fit.history)))
    assert fit.history[-1]["train_loss"] < fit.history[0]["train_loss"]
    best = fit.best_valid
    assert best["auc_is_click"] > untrained["auc_is_click"] + 0.05 and best["auc_is_click"] > 0.58, (best, untrained)
    assert best["auc_long_view"] > untrained["auc_long_view"] + 0.05  # rare tasks are noise on 300 users
    assert best["auc_mean"] == max(h["auc_mean"] for h in fit.history)
    # the model left behind is the best epoch's
    after = evaluate_multitask(model, data["valid"])
    assert after["auc_mean"] == pytest.approx(best["auc_mean"], abs=1e-9)


def test_fit_restores_the_best_epochs_weights_and_stops_early(data, monkeypatch):
    """Scripted validation scores: best at epoch 1, then two worse epochs -> stop after epoch 3 with epoch 1's
    weights."""
    scores = iter([0.60, 0.90, 0.70, 0.65, 0.99])
    snapshots = []

    def scripted(model, ds, batch_size=2048):
        snapshots.append({k: v.detach().clone() for k, v in model.state_dict().items()})
        return {"auc_mean": next(scores)}

    monkeypatch.setattr(loop, "evaluate_multitask", scripted)
    model = new_model(data["spec"])
    fit = fit_multitask(model, data["train"], data["valid"], epochs=5, patience=2, seed=0, progress=False)
    assert fit.best_epoch == 1 and fit.best_valid["auc_mean"] == 0.90
    assert len(fit.history) == 4  # epochs 0..3; epoch 4 never ran
    assert len(snapshots) == 4
    final = model.state_dict()
    for name, value in snapshots[1].items():
        assert torch.equal(final[name], value), name
    assert any(not torch.equal(snapshots[3][k], snapshots[1][k]) for k in snapshots[1])


def test_fit_is_deterministic_for_a_seed(data):
    small_train = data["train"]
    results = []
    for _ in range(2):
        model = new_model(data["spec"], seed=3)
        fit = fit_multitask(model, small_train, data["valid"], epochs=1, seed=5, progress=False)
        results.append((fit, model.state_dict()))
    (fit_a, state_a), (fit_b, state_b) = results
    for name in state_a:
        assert torch.equal(state_a[name], state_b[name]), name
    assert fit_a.history[0]["train_loss"] == fit_b.history[0]["train_loss"]
    assert fit_a.best_valid["auc_mean"] == fit_b.best_valid["auc_mean"]
    other = new_model(data["spec"], seed=3)
    fit_multitask(other, small_train, data["valid"], epochs=1, seed=6, progress=False)  # another shuffle order
    assert any(not torch.equal(other.state_dict()[k], state_a[k]) for k in state_a)


def test_predict_dataset_maps_back_to_the_log(data):
    model = new_model(data["spec"])
    probs, labels, rows = predict_dataset(model, data["valid"], batch_size=97)
    valid_log = data["splits"]["valid"]
    assert probs.shape == labels.shape == (valid_log.height, 6)
    assert sorted(rows.tolist()) == list(range(valid_log.height))
    np.testing.assert_array_equal(labels[:, 0], valid_log["is_click"].to_numpy()[rows])
    np.testing.assert_array_equal(labels[:, 1], valid_log["long_view"].to_numpy()[rows])
    assert ((probs > 0) & (probs < 1)).all()
    metrics = evaluate_multitask(model, data["valid"])
    assert set(metrics) == {f"auc_{t}" for t in data["valid"].tasks} | {"auc_mean"}
    assert all(math.isfinite(v) for v in metrics.values())


@pytest.mark.parametrize("kwargs", [{"epochs": 0}, {"batch_size": 0}])
def test_fit_rejects_empty_runs(data, kwargs):
    with pytest.raises(ConfigError):
        fit_multitask(new_model(data["spec"]), data["train"], data["valid"], progress=False, **kwargs)
