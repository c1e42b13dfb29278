"""The popularity/position-only floor model."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest

from funnelrec.data.schema import LABEL_COLUMNS, LOG_COLUMNS
from funnelrec.errors import DataError
from funnelrec.metrics import auc
from funnelrec.ranking.popularity import PopularityPositionModel, with_position
from funnelrec.sim import World


@pytest.fixture(scope="module")
def sim():
    return World.from_profile("small", ["num_users=200", "days=3"]).simulate(progress=False)


@pytest.fixture(scope="module")
def split(sim):
    log = sim.log
    last = log["date"].max()
    return log.filter(pl.col("date") < last), log.filter(pl.col("date") == last)


@pytest.fixture(scope="module")
def fitted(split):
    return PopularityPositionModel().fit(split[0])


def test_with_position_numbers_rows_within_each_request(sim):
    log = with_position(sim.log)
    assert log["position"].to_list() == sim.oracle["position"].to_list()
    assert with_position(log) is log  # an existing column is kept
    tiny = pl.DataFrame({"user_id": [1, 2, 1, 1, 2], "time_ms": [5, 5, 5, 9, 5], "video_id": [0, 1, 2, 3, 4]})
    assert with_position(tiny)["position"].to_list() == [0, 0, 1, 0, 1]


def test_predict_shape_and_range(fitted, split):
    p = fitted.predict(split[1])
    assert p.shape == (split[1].height, len(LABEL_COLUMNS))
    assert np.isfinite(p).all() and ((p > 0) & (p < 1)).all()


def test_predictions_follow_the_label_rates_and_rank_better_than_chance(fitted, split):
    train, test = split
    p = fitted.predict(test)
    for t, task in enumerate(("is_click", "long_view", "is_like")):
        y = test[task].to_numpy()
        assert auc(p[:, t], y) > 0.55, task
        assert p[:, t].mean() == pytest.approx(train[task].cast(pl.Float64).mean(), rel=0.35), task


def test_later_positions_get_lower_click_probability(fitted, split):
    """The world's cascade makes lower slots less clicked; the model must learn the position effect."""
    test = split[1].head(200)
    top = fitted.predict(test.with_columns(pl.lit(0, dtype=pl.Int64).alias("position")))[:, 0]
    bottom = fitted.predict(test.with_columns(pl.lit(5, dtype=pl.Int64).alias("position")))[:, 0]
    assert (top > bottom).all()


def test_unseen_items_get_the_prior(fitted, split):
    row = split[1].head(1).with_columns(pl.lit(10**9, dtype=pl.Int64).alias("video_id"))
    p = fitted.predict(row)
    assert np.isfinite(p).all()


def test_predict_before_fit_is_a_data_error(split):
    with pytest.raises(DataError, match="not fitted"):
        PopularityPositionModel().predict(split[1])


def test_fit_on_an_empty_log_is_a_data_error():
    with pytest.raises(DataError, match="empty"):
        PopularityPositionModel().fit(pl.DataFrame(schema=LOG_COLUMNS))


def test_fit_without_a_label_column_names_it(split):
    with pytest.raises(DataError, match="is_like"):
        PopularityPositionModel().fit(split[0].drop("is_like"))
    only_click = PopularityPositionModel(tasks=("is_click",)).fit(split[0].drop("is_like"))
    assert only_click.predict(split[1]).shape == (split[1].height, 1)
