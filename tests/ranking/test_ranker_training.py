"""Every ranker learns on a tiny simulated world: 2 epochs beat the untrained model on validation click AUC (and the
D2Q watch head beats it on watch-time XAUC); training is deterministic for a seed."""

from __future__ import annotations

import pytest
import torch

from funnelrec.metrics import xauc
from funnelrec.ranking import build_ranker
from funnelrec.ranking.watch_time import WatchTimeDebiaser
from funnelrec.train.loop import evaluate_multitask
from ranking_testkit import RANKER_NAMES


def train(model, ds, epochs: int = 2, seed: int = 0, lr: float = 2e-3):
    """The loop of ``funnelrec.train.loop.fit_multitask`` on the model's own ``training_loss``."""
    torch.manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-5)
    losses = []
    for epoch in range(epochs):
        model.train()
        for batch in ds.iter_batches(64, shuffle=True, seed=seed + epoch):
            loss = model.training_loss(batch)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0)
            opt.step()
            losses.append(float(loss.detach()))
    return losses


@torch.no_grad()
def watch_xauc(model, ds) -> float:
    model.eval()
    pred, true = [], []
    for batch in ds.iter_batches(512):
        pred.append(model.predict_watch_time(batch)[batch.cand_mask])
        true.append(batch.watch_time_s[batch.cand_mask])
    return xauc(torch.cat(pred).numpy(), torch.cat(true).numpy())


@pytest.fixture(scope="module")
def d2q(tiny_world):
    return WatchTimeDebiaser.from_log(tiny_world["splits"]["train"], buckets=10, quantiles=20)


@pytest.mark.parametrize("name", RANKER_NAMES)
def test_two_epochs_beat_the_untrained_model(name, tiny_world, d2q):
    torch.manual_seed(0)
    model = build_ranker(name, tiny_world["spec"], watch=d2q, history_pool=20)
    before = evaluate_multitask(model, tiny_world["valid"])
    before_xauc = watch_xauc(model, tiny_world["valid"])
    losses = train(model, tiny_world["train"])
    after = evaluate_multitask(model, tiny_world["valid"])
    assert sum(losses[-10:]) < sum(losses[:10])
    assert after["auc_is_click"] > before["auc_is_click"] + 0.03 and after["auc_is_click"] > 0.57, (before, after)
    assert after["auc_long_view"] > before["auc_long_view"] + 0.03
    assert watch_xauc(model, tiny_world["valid"]) > before_xauc


def test_training_is_deterministic_for_a_seed(tiny_world):
    states, losses = [], []
    for _ in range(2):
        torch.manual_seed(5)
        model = build_ranker("din", tiny_world["spec"], history_pool=20)
        losses.append(train(model, tiny_world["train"], epochs=1, seed=3))
        states.append(model.state_dict())
    assert losses[0] == losses[1]
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])
