"""FeatureTables: id look-ups (known, unknown, duplicates), the zero row, and RequestDataset batches built
from it equal to a direct ``spec.transform_*`` computation."""

from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch
from test_dataset import make_log

from funnelrec.data.dataset import RequestDataset
from funnelrec.data.feature_tables import FeatureTables, table_rows
from funnelrec.data.features import FeatureSpec
from funnelrec.data.timeline import Timelines
from funnelrec.errors import ConfigError, DataError

ASSETS = Path(__file__).resolve().parents[2] / "funnelrec" / "assets" / "kuairand_pure"
N_USERS, N_VIDEOS = 30, 80


@pytest.fixture(scope="module")
def users():
    # shuffled, so table rows differ from id order
    table = pl.read_parquet(ASSETS / "user_features_pure.parquet").head(N_USERS + 5)
    return table.sample(fraction=1.0, seed=1, shuffle=True)


@pytest.fixture(scope="module")
def videos():
    return pl.read_parquet(ASSETS / "video_features_basic_pure.parquet").head(N_VIDEOS + 5).sample(
        fraction=1.0, seed=2, shuffle=True)


@pytest.fixture(scope="module")
def spec(users, videos):
    return FeatureSpec().fit(users, videos)


@pytest.fixture(scope="module")
def tables(users, videos, spec):
    return FeatureTables(users, videos, spec)


def _row_of(df: pl.DataFrame, key: str) -> dict[int, int]:
    return {int(k): i for i, k in enumerate(df.get_column(key).to_list())}


def test_shapes_and_zero_row(tables, users, videos, spec):
    u, i = users.height, videos.height
    assert tables.user_sparse.shape == (u + 1, spec.num_user_sparse)
    assert tables.user_dense.shape == (u + 1, spec.num_user_dense)
    assert tables.item_sparse.shape == (i + 1, spec.num_item_sparse)
    assert tables.item_dense.shape == (i + 1, spec.num_item_dense)
    assert tables.user_sparse.dtype == torch.int64 and tables.user_dense.dtype == torch.float32
    assert tables.unknown_user_row == u and tables.unknown_item_row == i
    for t in (tables.user_sparse, tables.user_dense, tables.item_sparse, tables.item_dense):
        assert not t[-1].any(), "the last row (unknown id / padding) must be all zeros"
    # the rows above it are the spec's transforms, in table order
    np.testing.assert_array_equal(tables.user_sparse[:-1].numpy(), spec.transform_users(users))
    np.testing.assert_array_equal(tables.user_dense[:-1].numpy(), spec.transform_users_dense(users))
    np.testing.assert_array_equal(tables.item_sparse[:-1].numpy(), spec.transform_items(videos))
    np.testing.assert_array_equal(tables.item_dense[:-1].numpy(), spec.transform_items_dense(videos))


def test_known_ids(tables, users, videos):
    uids = users.get_column("user_id").to_numpy()[::-1][:7]
    rows, known = tables.user_rows(uids)
    assert known.all()
    np.testing.assert_array_equal(tables.user_keys[rows], uids)
    vids = videos.get_column("video_id").to_numpy()[[3, 0, 3, 9]]  # repeats are fine
    rows, known = tables.item_rows(torch.as_tensor(vids).tolist())
    assert known.all()
    np.testing.assert_array_equal(tables.video_keys[rows], vids)
    sparse, dense = tables.user_features(torch.from_numpy(tables.user_rows(uids)[0]))
    rmap = _row_of(users, "user_id")
    np.testing.assert_array_equal(sparse.numpy(), tables.user_sparse.numpy()[[rmap[int(x)] for x in uids]])
    assert dense.shape == (len(uids), tables.user_dense.shape[1])


def test_unknown_ids(tables, users, videos):
    absent_user = int(users.get_column("user_id").max()) + 17
    known_user = int(users.get_column("user_id")[0])
    with pytest.raises(DataError, match="users table") as e:
        tables.user_rows([known_user, absent_user])
    assert e.value.column == "user_id" and str(absent_user) in str(e.value)
    rows, known = tables.user_rows([known_user, absent_user, -1], allow_unknown=True)
    assert known.tolist() == [True, False, False]
    assert rows[1] == rows[2] == tables.unknown_user_row
    sparse, dense = tables.user_features(torch.from_numpy(rows))
    assert not sparse[1:].any() and not dense[1:].any()

    absent_video = int(videos.get_column("video_id").max()) + 5
    with pytest.raises(DataError, match="videos table") as e:
        tables.item_rows([absent_video])
    assert e.value.column == "video_id"
    rows, known = tables.item_rows([absent_video, int(videos.get_column("video_id")[1])], allow_unknown=True)
    assert known.tolist() == [False, True] and rows[0] == tables.unknown_item_row and rows[1] == 1
    # item features keep any leading shape; the unknown row reads zeros
    grid = torch.tensor([[rows[0], rows[1], rows[0]], [rows[1], rows[1], rows[0]]])
    cs, cd = tables.item_features(grid)
    assert cs.shape == (2, 3, tables.item_sparse.shape[1]) and cd.shape == (2, 3, tables.item_dense.shape[1])
    assert not cs[0, 0].any() and not cd[1, 2].any()
    torch.testing.assert_close(cs[1, 0], tables.item_sparse[1])


def test_duplicate_ids_name_the_table(users, videos, spec):
    dup_users = pl.concat([users, users.head(1)])
    with pytest.raises(DataError, match="duplicate ids in the users table") as e:
        FeatureTables(dup_users, videos, spec)
    assert e.value.column == "user_id" and str(int(users.get_column("user_id")[0])) in str(e.value)
    dup_videos = pl.concat([videos.tail(1), videos])
    with pytest.raises(DataError, match="duplicate ids in the videos table") as e:
        FeatureTables(users, dup_videos, spec)
    assert e.value.column == "video_id"


def test_bad_inputs(users, videos, spec):
    with pytest.raises(ConfigError, match="fitted"):
        FeatureTables(users, videos, FeatureSpec())
    with pytest.raises(DataError, match="missing key column") as e:
        FeatureTables(users.drop("user_id"), videos, spec)
    assert e.value.column == "user_id"
    with pytest.raises(DataError, match="polars DataFrame"):
        FeatureTables(users, {"video_id": [1]}, spec)
    with pytest.raises(DataError, match="empty table"):
        table_rows([1], np.zeros(0, np.int64), table="videos", column="video_id")


def test_table_rows_reference():
    rng = np.random.default_rng(0)
    keys = rng.permutation(1000)[:300] * 3
    q = rng.integers(-5, 3000, 500)
    rows, found = table_rows(q, keys, table="t", column="c", allow_unknown=True)
    where = {int(k): i for i, k in enumerate(keys)}
    np.testing.assert_array_equal(found, [int(x) in where for x in q])
    np.testing.assert_array_equal(rows, [where.get(int(x), len(keys)) for x in q])


def test_request_dataset_batches_equal_direct_transforms(users, videos, spec):
    log = make_log(seed=3, requests=120, users=N_USERS, videos=N_VIDEOS)
    # make_log draws ids 0..N-1; keep those present in the (shuffled, truncated) tables
    log = log.filter(pl.col("user_id").is_in(users.get_column("user_id").implode())
                     & pl.col("video_id").is_in(videos.get_column("video_id").implode()))
    ds = RequestDataset(log, users, videos, spec, Timelines.from_log(log, spec), history_len=8)
    assert isinstance(ds.tables, FeatureTables)
    batch = ds.batch(np.arange(len(ds)))
    us, ud = spec.transform_users(users), spec.transform_users_dense(users)
    vs, vd = spec.transform_items(videos), spec.transform_items_dense(videos)
    urow, vrow = _row_of(users, "user_id"), _row_of(videos, "video_id")
    ur = [urow[int(u)] for u in batch.user_id]
    np.testing.assert_array_equal(batch.user_sparse.numpy(), us[ur])
    np.testing.assert_array_equal(batch.user_dense.numpy(), ud[ur])
    mask = batch.cand_mask.numpy()
    vid = log.get_column("video_id").to_numpy()[batch.extras["log_row"].numpy()[mask]]
    np.testing.assert_array_equal(batch.cand_items.numpy()[mask], vid + 1)
    vr = [vrow[int(v)] for v in vid]
    np.testing.assert_array_equal(batch.cand_sparse.numpy()[mask], vs[vr])
    np.testing.assert_array_equal(batch.cand_dense.numpy()[mask], vd[vr])
    assert not mask.all(), "the log should have pages of different sizes (padding)"
    assert not batch.cand_sparse.numpy()[~mask].any() and not batch.cand_dense.numpy()[~mask].any()
