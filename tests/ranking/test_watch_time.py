"""The D2Q watch-time debiaser: buckets, quantile labels, the inverse map, serialisation and errors."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest
import torch

from funnelrec.errors import ConfigError, DataError
from funnelrec.ranking.watch_time import WatchTimeDebiaser, resolve_watch_head, watch_loss, watch_seconds


@pytest.fixture(scope="module")
def data():
    """Durations with ties (whole seconds) and watch times with atoms (full plays and zeros)."""
    g = torch.Generator().manual_seed(0)
    duration = torch.randint(5, 300, (20_000,), generator=g).float()
    ratio = torch.rand(20_000, generator=g) ** 2
    ratio = torch.where(torch.rand(20_000, generator=g) < 0.15, torch.ones(()), ratio)  # full plays
    ratio = torch.where(torch.rand(20_000, generator=g) < 0.05, torch.zeros(()), ratio)  # zero plays
    return duration, duration * ratio


@pytest.fixture(scope="module")
def d2q(data):
    return WatchTimeDebiaser.fit(*data, buckets=20, quantiles=50)


def test_buckets_are_equal_frequency_duration_groups(data, d2q):
    duration, _ = data
    assert d2q.num_buckets == 20 and d2q.num_quantiles == 50
    assert d2q.edges.shape == (19,) and d2q.table.shape == (20, 51)
    counts = torch.bincount(d2q.bucket(duration), minlength=20)
    assert counts.min() > 0.7 * len(duration) / 20 and counts.max() < 1.3 * len(duration) / 20
    # longer groups watch longer: the debiaser keeps duration's own effect in the tables, not in the label
    assert (d2q.table[5:, 25] > d2q.table[:-5, 25]).all()
    assert d2q.table[-1, 25] > 5 * d2q.table[0, 25]


def test_labels_are_uniform_within_every_bucket(data, d2q):
    duration, watch = data
    q = d2q.to_quantile(watch, duration)
    assert ((q >= 0) & (q <= 1)).all()
    b = d2q.bucket(duration)
    for k in (0, 7, 19):  # the label means the same in every group: its mean is ~0.5 in each
        assert abs(float(q[b == k].mean()) - 0.5) < 0.05
    # a long and a short video with the same watch time get very different labels (the duration is deconfounded)
    assert d2q.to_quantile(torch.tensor(20.0), torch.tensor(10.0)) > 0.9
    assert d2q.to_quantile(torch.tensor(20.0), torch.tensor(290.0)) < 0.3


def test_round_trip_and_monotonicity(data, d2q):
    duration, watch = data
    q = d2q.to_quantile(watch, duration)
    back = d2q.to_seconds(q, duration)
    torch.testing.assert_close(back, watch, rtol=1e-4, atol=1e-3)  # exact inside each bucket's range
    # monotone in the watch time, for every bucket
    grid = torch.linspace(0, 320, 2001)
    for dur in (6.0, 60.0, 250.0):
        qs = d2q.to_quantile(grid, torch.full_like(grid, dur))
        assert (qs[1:] >= qs[:-1]).all() and qs[0] <= 0.05 and qs[-1] == 1.0
        secs = d2q.to_seconds(torch.linspace(0, 1, 501), torch.full((501,), dur))
        assert (secs[1:] >= secs[:-1]).all()
    # values outside a bucket's range clamp to its ends; quantiles outside [0, 1] are clamped
    row = d2q.table[d2q.bucket(torch.tensor(60.0))]
    assert d2q.to_seconds(torch.tensor(1.7), torch.tensor(60.0)) == row[-1]
    assert d2q.to_seconds(torch.tensor(-1.0), torch.tensor(60.0)) == row[0]
    # the inverse of a mid-bucket quantile lies between that bucket's knots
    x = d2q.to_seconds(torch.tensor(0.51), torch.tensor(60.0))
    assert row[25] <= x <= row[26]


def test_atoms_map_to_the_middle_of_their_knots():
    d2q = WatchTimeDebiaser(torch.tensor([]), torch.tensor([[0.0, 0.0, 0.0, 5.0, 10.0]]))  # 50% zeros, Q = 4
    q = d2q.to_quantile(torch.tensor([0.0, 2.5, 5.0, 7.5, 10.0, 11.0]), torch.zeros(6))
    torch.testing.assert_close(q, torch.tensor([0.25, 0.625, 0.75, 0.875, 1.0, 1.0]))
    torch.testing.assert_close(d2q.to_seconds(q, torch.zeros(6)), torch.tensor([0.0, 2.5, 5.0, 7.5, 10.0, 10.0]))


def test_ties_in_duration_never_leave_an_empty_bucket():
    duration = np.r_[np.full(850, 10.0), np.linspace(11, 60, 150)]  # 85% of the videos last 10 s
    d2q = WatchTimeDebiaser.fit(duration, duration * 0.5, buckets=10, quantiles=4)
    assert d2q.num_buckets == 2  # eight of the nine edges are the minimum: only the 90% one survives
    single = WatchTimeDebiaser.fit(np.full(10, 7.0), np.arange(10.0), buckets=10, quantiles=4)
    assert single.num_buckets == 1 and single.edges.numel() == 0
    counts = torch.bincount(d2q.bucket(torch.tensor(duration)), minlength=d2q.num_buckets)
    assert (counts > 0).all()


def test_serialisation_round_trip(d2q, tmp_path):
    state = d2q.state_dict()
    assert set(state) == {"edges", "table"}
    torch.save(state, tmp_path / "d2q.pt")
    again = WatchTimeDebiaser.from_state_dict(torch.load(tmp_path / "d2q.pt"))
    w, d = torch.tensor([3.0, 40.0]), torch.tensor([20.0, 200.0])
    torch.testing.assert_close(again.to_quantile(w, d), d2q.to_quantile(w, d))
    with pytest.raises(ConfigError, match="table"):
        WatchTimeDebiaser.from_state_dict({"edges": state["edges"]})


def test_from_log_reads_the_kuairand_columns():
    log = pl.DataFrame({"duration_ms": [10_000, 20_000, 30_000, 40_000], "play_time_ms": [5_000, 0, 30_000, 1_000]})
    d2q = WatchTimeDebiaser.from_log(log, buckets=2, quantiles=2)
    assert d2q.num_buckets == 2
    with pytest.raises(DataError, match="play_time_ms"):
        WatchTimeDebiaser.from_log(log.drop("play_time_ms"))


@pytest.mark.parametrize("kwargs,error,match", [
    ({"duration_s": [1.0, 2.0], "watch_s": [1.0]}, DataError, "watch_s"),
    ({"duration_s": [], "watch_s": []}, DataError, "no impressions"),
    ({"duration_s": [1.0, float("nan")], "watch_s": [1.0, 1.0]}, DataError, "duration_s"),
    ({"duration_s": [1.0, 2.0], "watch_s": [1.0, -1.0]}, DataError, "watch_s"),
    ({"duration_s": [1.0], "watch_s": [1.0], "buckets": 0}, ConfigError, "buckets"),
])
def test_fit_errors(kwargs, error, match):
    with pytest.raises(error, match=match):
        WatchTimeDebiaser.fit(**kwargs)


def test_watch_head_choice(d2q):
    assert resolve_watch_head("auto", None) == "log1p" and resolve_watch_head("auto", d2q) == "d2q"
    assert resolve_watch_head("log1p", d2q) == "log1p"
    with pytest.raises(ConfigError, match="WatchTimeDebiaser"):
        resolve_watch_head("d2q", None)
    with pytest.raises(ConfigError, match="watch_head"):
        resolve_watch_head("huber", None)
    with pytest.raises(ConfigError, match="WatchTimeDebiaser"):
        resolve_watch_head("auto", {"edges": 1})


def test_heads_losses_and_seconds(d2q):
    w, d = torch.tensor([[0.0, 12.0, 200.0]]), torch.tensor([[30.0, 30.0, 250.0]])
    pred = torch.tensor([[0.3, -1.0, 2.0]])
    torch.testing.assert_close(watch_loss(pred, w, d, None), (pred - torch.log1p(w)) ** 2)
    label = d2q.to_quantile(w, d)
    torch.testing.assert_close(watch_loss(pred, w, d, d2q),
                               torch.nn.functional.binary_cross_entropy_with_logits(pred, label, reduction="none"))
    torch.testing.assert_close(watch_seconds(pred, d, None), torch.expm1(pred.clamp(min=0)))
    torch.testing.assert_close(watch_seconds(pred, d, d2q), d2q.to_seconds(torch.sigmoid(pred), d))
    # the BCE against a soft label is minimised where the predicted quantile equals the label
    logit = torch.zeros(3, requires_grad=True)
    opt = torch.optim.SGD([logit], lr=5.0)
    for _ in range(300):
        opt.zero_grad()
        watch_loss(logit, w[0], d[0], d2q).sum().backward()
        opt.step()
    torch.testing.assert_close(torch.sigmoid(logit.detach()), label[0], atol=1e-3, rtol=0)
