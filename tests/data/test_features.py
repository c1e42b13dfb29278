import json
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from funnelrec.data.features import (
    DEFAULT_HASH_BUCKETS, FeatureField, FeatureSpec, hash_index, item_index, splitmix64, video_id,
)
from funnelrec.errors import ConfigError, DataError

ASSETS = Path(__file__).resolve().parents[2] / "funnelrec" / "assets" / "kuairand_pure"


@pytest.fixture(scope="module")
def users():
    return pl.read_parquet(ASSETS / "user_features_pure.parquet").head(1000)


@pytest.fixture(scope="module")
def videos():
    return pl.read_parquet(ASSETS / "video_features_basic_pure.parquet").head(500)


@pytest.fixture(scope="module")
def spec(users, videos):
    return FeatureSpec().fit(users, videos)


def _one_field_spec(f: FeatureField, side="user"):
    empty = dict(user_sparse=[], user_dense=[], item_sparse=[], item_dense=[])
    empty[f"{side}_{'sparse' if f.kind == 'sparse' else 'dense'}"] = [f]
    return FeatureSpec(**empty)


# ------------------------------------------------------------------ default spec
def test_default_spec_layout(spec, users, videos):
    assert spec.fitted
    assert spec.names("user_sparse")[:2] == ["user_id", "user_active_degree"]
    assert spec.names("user_sparse")[-1] == "onehot_feat17"
    assert (spec.num_user_sparse, spec.num_user_dense, spec.num_item_sparse, spec.num_item_dense) == (27, 4, 7, 2)
    assert spec.names("item_sparse") == ["video_id", "author_id", "video_type", "upload_type", "music_type",
                                         "tag_first", "tag_second"]
    assert spec.names("item_dense") == ["log_duration_s", "aspect_ratio"]
    u = spec.transform_users(users)
    i = spec.transform_items(videos)
    assert u.shape == (1000, 27) and u.dtype == np.int64
    assert i.shape == (500, 7) and i.dtype == np.int64
    for arr, sizes in ((u, spec.vocab_sizes("user_sparse")), (i, spec.vocab_sizes("item_sparse"))):
        assert (arr >= 0).all() and (arr < np.array(sizes)[None, :]).all()
    # id fields: index = id + 1
    np.testing.assert_array_equal(u[:, 0], users["user_id"].to_numpy() + 1)
    np.testing.assert_array_equal(i[:, 0], videos["video_id"].to_numpy() + 1)
    assert spec.num_items == int(videos["video_id"].max()) + 2
    assert spec.num_users == int(users["user_id"].max()) + 2
    # every real categorical value gets a real index (min_freq = 1, fit on the same table)
    assert (u[:, 1:9] > 0).all()
    ud = spec.transform_users_dense(users)
    idn = spec.transform_items_dense(videos)
    assert ud.shape == (1000, 4) and idn.shape == (500, 2) and ud.dtype == np.float32
    assert np.isfinite(ud).all() and np.isfinite(idn).all()
    np.testing.assert_allclose(ud.mean(0), 0, atol=1e-4)
    np.testing.assert_allclose(ud.std(0), 1, atol=1e-3)


def test_nulls_map_to_zero(spec, users, videos):
    u = spec.transform_users(users)
    j = spec.names("user_sparse").index("onehot_feat12")
    null = users["onehot_feat12"].is_null().to_numpy()
    assert null.any() and (u[null, j] == 0).all() and (u[~null, j] > 0).all()
    i = spec.transform_items(videos)
    tnull = videos["tag"].is_null().to_numpy() if videos["tag"].null_count() else None
    second = videos["tag"].str.split(",").list.len().fill_null(0).to_numpy() < 2
    assert (i[second, 6] == 0).all() and (i[~second, 6] > 0).all()
    if tnull is not None:
        assert (i[tnull, 5] == 0).all()
    # a dense null becomes 0 (the mean) after standardisation
    dn = videos["video_duration"].is_null().to_numpy()
    if dn.any():
        assert (spec.transform_items_dense(videos)[dn, 0] == 0).all()


def test_item_index_convention(spec):
    assert item_index(0) == 1 and video_id(1) == 0
    vids = np.array([0, 5, 499, 500, -1])
    np.testing.assert_array_equal(spec.item_index(vids), [1, 6, 500, 0, 0])
    np.testing.assert_array_equal(spec.video_id(np.array([1, 6])), [0, 5])


# ------------------------------------------------------------------ vocabularies
def test_min_freq_oov_and_order():
    df = pl.DataFrame({"c": ["a", "a", "a", "b", "b", "c", None, "d", "d"]})
    s = _one_field_spec(FeatureField("c", min_freq=2)).fit(df, None)
    f = s.field("c")
    assert f.vocab == ["a", "b", "d"]  # most frequent first, ties by value
    assert f.vocab_size == 4
    out = s.transform_users(pl.DataFrame({"c": ["a", "b", "c", None, "d", "zzz"]}))[:, 0]
    assert out.tolist() == [1, 2, 0, 0, 3, 0]
    # the fit-time override applies to every vocab field
    s2 = _one_field_spec(FeatureField("c")).fit(df, None, min_freq=3)
    assert s2.field("c").vocab == ["a"]


def test_integral_float_and_int_values_share_keys():
    df = pl.DataFrame({"x": [9.0, 9.0, 4.0, None, float("nan")]})
    s = _one_field_spec(FeatureField("x")).fit(df, None)
    assert s.field("x").vocab == [9, 4]
    assert s.transform_users(pl.DataFrame({"x": [4.0, 9.0, 7.0, None]}))[:, 0].tolist() == [2, 1, 0, 0]
    # a non-integral float at transform time maps to OOV rather than failing
    assert s.transform_users(pl.DataFrame({"x": [4.5, 9.0]}))[:, 0].tolist() == [0, 1]


def test_log_weighted_fit_restricts_vocab_to_train(users, videos):
    log = pl.DataFrame({"user_id": [0, 0, 1], "video_id": [3, 3, 4]})
    s = FeatureSpec().fit(users, videos, log)
    u = s.transform_users(users)
    seen_deg = set(users.filter(pl.col("user_id").is_in([0, 1]))["user_active_degree"].to_list())
    assert len(s.field("user_active_degree").vocab) == len(seen_deg)
    assert u[:, 0].tolist() == (users["user_id"].to_numpy() + 1).tolist()  # id fields span the whole table
    a = s.transform_items(videos)[:, 1]
    assert a[3] > 0 and a[4] > 0
    others = ~videos["author_id"].is_in(videos[[3, 4]]["author_id"].to_list()).to_numpy()
    assert (a[others] == 0).all()
    # min_freq counts impressions: video 4's author has 1 impression
    s2 = FeatureSpec().fit(users, videos, log, min_freq=2)
    a2 = s2.transform_items(videos)[:, 1]
    assert a2[3] > 0 and (a2[4] == 0 or videos["author_id"][4] == videos["author_id"][3])


# ------------------------------------------------------------------ hashing
def test_splitmix64_reference_value():
    # first output of the reference splitmix64 generator seeded with 0
    assert int(splitmix64(np.array([0]))[0]) == 0xE220A8397B1DCDAF


def test_hash_determinism_and_range():
    vals = pl.Series("v", np.arange(-50, 5000, dtype=np.int64)).append(pl.Series("v", [None], dtype=pl.Int64))
    h1 = hash_index(vals, 97, salt="author_id")
    h2 = hash_index(vals.clone(), 97, salt="author_id")
    np.testing.assert_array_equal(h1, h2)
    assert h1[-1] == 0 and h1[:-1].min() >= 1 and h1[:-1].max() <= 97
    assert len(np.unique(h1[:-1])) == 97  # all buckets used
    h3 = hash_index(vals, 97, salt="music_id")
    assert (h3 != h1).mean() > 0.5  # salts decorrelate fields
    strs = pl.Series(["a", "b", None, "a"])
    hs = hash_index(strs, 10, salt="f")
    assert hs[0] == hs[3] and hs[2] == 0 and 1 <= hs[1] <= 10
    np.testing.assert_array_equal(hs, hash_index(pl.Series(["a", "b", None, "a"]), 10, salt="f"))


def test_auto_encoding_hashes_large_vocab(users, videos):
    s = FeatureSpec().fit(users, videos, hash_threshold=10, hash_buckets=64)
    f = s.field("author_id")
    assert f.method == "hash" and f.vocab_size == 65
    a = s.transform_items(videos)[:, 1]
    assert a.min() >= 1 and a.max() <= 64
    # small-cardinality fields of the same spec are still vocabularies
    assert s.field("video_type").method == "vocab"
    s_default = FeatureSpec().fit(users, videos)
    assert s_default.field("author_id").method == "vocab"
    h = FeatureSpec(item_sparse=[FeatureField("video_id", encoding="id"), FeatureField("author_id", encoding="hash")])
    h.fit(users, videos)
    assert h.field("author_id").vocab_size == DEFAULT_HASH_BUCKETS + 1


# ------------------------------------------------------------------ serialisation
def test_to_dict_from_dict_round_trip(users, videos):
    s = FeatureSpec().fit(users, videos, hash_threshold=100, hash_buckets=1000)
    d = json.loads(json.dumps(s.to_dict()))
    s2 = FeatureSpec.from_dict(d)
    assert s2.to_dict() == s.to_dict()
    np.testing.assert_array_equal(s2.transform_users(users), s.transform_users(users))
    np.testing.assert_array_equal(s2.transform_items(videos), s.transform_items(videos))
    np.testing.assert_array_equal(s2.transform_users_dense(users), s.transform_users_dense(users))
    np.testing.assert_array_equal(s2.transform_items_dense(videos), s.transform_items_dense(videos))
    assert s.copy().to_dict() == s.to_dict()
    with pytest.raises(ConfigError):
        FeatureSpec.from_dict({**d, "version": 99})
    bad = json.loads(json.dumps(d))
    bad["user_sparse"][0]["bogus"] = 1
    with pytest.raises(ConfigError, match="bogus"):
        FeatureSpec.from_dict(bad)


# ------------------------------------------------------------------ errors
def test_errors(users, videos):
    with pytest.raises(DataError) as e:
        FeatureSpec().fit(users.drop("user_active_degree"), videos)
    assert e.value.column == "user_active_degree" and e.value.path == "users"
    with pytest.raises(ConfigError, match="not fitted"):
        FeatureSpec().transform_users(users)
    with pytest.raises(DataError, match="empty"):
        FeatureSpec().fit(users.clear(), videos)
    with pytest.raises(DataError):
        FeatureSpec().fit(None, videos)
    with pytest.raises(ConfigError):
        FeatureField("x", kind="image")
    with pytest.raises(ConfigError):
        FeatureField("x", encoding="bpe")
    with pytest.raises(ConfigError):
        FeatureField("x", min_freq=0)
    with pytest.raises(ConfigError, match="ratio"):
        FeatureField("x", kind="dense", transform="ratio")
    with pytest.raises(ConfigError, match="kind"):
        FeatureSpec(user_sparse=[FeatureField("x", kind="dense")])
    with pytest.raises(ConfigError, match="duplicate"):
        FeatureSpec(user_sparse=[FeatureField("x"), FeatureField("x")])
    with pytest.raises(ConfigError, match="unknown feature"):
        FeatureSpec().field("nope")
    with pytest.raises(DataError) as e:
        _one_field_spec(FeatureField("uid", source="user_active_degree", encoding="id")).fit(users, None)
    assert e.value.column == "user_active_degree"
