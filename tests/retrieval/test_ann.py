"""``funnelrec.retrieval.ann``: exact / IVF / HNSW search against a numpy brute force, filtered search, add and
remove with tombstones and rebuilds, the checksummed save/load round trip, and bad input."""

from __future__ import annotations

import doctest
import json

import numpy as np
import pytest

import funnelrec.retrieval.ann as ann_module
import funnelrec.retrieval.ann_filters as ann_filters_module
from funnelrec.errors import ConfigError, DataError
from funnelrec.retrieval.ann import AnnConfig, AnnIndex, auto_nlist

D, N = 16, 3000


@pytest.fixture(scope="module")
def corpus():
    """Unit vectors (cosine, like the two-tower's) with scattered large ids, and queries."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((N, D)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    ids = rng.choice(10**9, size=N, replace=False).astype(np.int64)
    q = rng.standard_normal((40, D)).astype(np.float32)
    return x, ids, q


def brute_force(x, ids, q, k, exclude=None, allow=None):
    """The reference: score everything in float64, mask, sort; -1 / -inf padded."""
    s = q.astype(np.float64) @ x.astype(np.float64).T
    if allow is not None:
        s[:, ~np.isin(ids, allow)] = -np.inf
    for r, seen in enumerate(exclude or []):
        if seen is not None:
            s[r, np.isin(ids, np.asarray(seen))] = -np.inf
    order = np.argsort(-s, axis=1, kind="stable")[:, :k]
    top_s = np.take_along_axis(s, order, 1)
    return np.where(np.isfinite(top_s), top_s, -np.inf), np.where(np.isfinite(top_s), ids[order], -1)


def exclusions(gt_ids, rng, all_ids):
    """Per-query seen lists that hit the true top k (so results must shift), with padding and unknown ids."""
    out = []
    for r, row in enumerate(gt_ids):
        if r % 5 == 0:
            out.append(None)
        elif r % 5 == 1:
            out.append([])
        else:
            hits = row[rng.random(len(row)) < 0.5]
            extra = rng.choice(all_ids, size=r % 7)
            out.append(np.concatenate([hits, extra, [-1, -1, 10**12]]).astype(np.int64))  # -1 padding, unknown id
    return out


def recall(got, ref):
    hit = [len(set(a[a >= 0]) & set(b[b >= 0])) / max(1, (b >= 0).sum()) for a, b in zip(got, ref)]
    return float(np.mean(hit))


def assert_same(got, ref):
    (gs, gi), (rs, ri) = got, ref
    np.testing.assert_array_equal(gi, ri)
    np.testing.assert_allclose(gs, rs.astype(np.float32), rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------------------ search


def test_flat_equals_exact(corpus):
    x, ids, q = corpus
    index = AnnIndex.build(x, ids)
    assert len(index) == N and index.config.kind == "flat"
    assert_same(index.search(q, 10), brute_force(x, ids, q, 10))


def test_flat_filtered_search_equals_exact_filtered(corpus):
    x, ids, q = corpus
    index = AnnIndex.build(x, ids, AnnConfig(kind="flat"))
    _, gt = brute_force(x, ids, q, 20)
    excl = exclusions(gt, np.random.default_rng(1), ids)
    assert_same(index.search(q, 20, exclude=excl), brute_force(x, ids, q, 20, exclude=excl))
    # a [Q, S] array padded with -1 is read the same way
    padded = np.full((len(q), 12), -1, np.int64)
    for r in range(len(q)):
        padded[r, :10] = gt[r, :10] if r % 2 else -1
    lists = [row[row >= 0] for row in padded]
    assert_same(index.search(q, 20, exclude=padded), brute_force(x, ids, q, 20, exclude=lists))


@pytest.mark.parametrize("exact_below", [0, 10_000])  # the FAISS IDSelectorBatch path and the exact-scan path
def test_allowed_set_equals_exact(corpus, exact_below):
    x, ids, q = corpus
    rng = np.random.default_rng(2)
    allow = np.concatenate([rng.choice(ids, 400, replace=False), [10**12]])  # an id not in the index is ignored
    index = AnnIndex.build(x, ids, AnnConfig(kind="flat", allow_exact_below=exact_below))
    ref = brute_force(x, ids, q, 15, allow=allow)
    assert_same(index.search(q, 15, allow=allow), ref)
    excl = exclusions(ref[1], rng, ids)
    assert_same(index.search(q, 15, allow=allow, exclude=excl), brute_force(x, ids, q, 15, exclude=excl, allow=allow))


def test_ivf_with_every_list_probed_is_exact(corpus):
    x, ids, q = corpus
    index = AnnIndex.build(x, ids, AnnConfig(kind="ivf", nlist=16, nprobe=16))
    assert index.nlist == 16
    _, gt = brute_force(x, ids, q, 10)
    excl = exclusions(gt, np.random.default_rng(3), ids)
    assert_same(index.search(q, 10, exclude=excl), brute_force(x, ids, q, 10, exclude=excl))
    index.set_search_params(nprobe=1)
    assert recall(index.search(q, 10)[1], gt) < 0.9  # one list of sixteen misses neighbours


def test_hnsw_filtered_search_matches_exact_in_recall(corpus):
    x, ids, q = corpus
    index = AnnIndex.build(x, ids, AnnConfig(kind="hnsw", hnsw_m=16, ef_construction=100, ef_search=256))
    _, gt = brute_force(x, ids, q, 20)
    assert recall(index.search(q, 20)[1], gt) >= 0.98
    rng = np.random.default_rng(4)
    excl = exclusions(gt, rng, ids)
    got_s, got = index.search(q, 20, exclude=excl)
    assert recall(got, brute_force(x, ids, q, 20, exclude=excl)[1]) >= 0.98
    for row, seen in zip(got, excl):
        assert seen is None or not np.isin(row, seen).any()
    assert (np.diff(got_s, axis=1) <= 1e-6).all()  # best first
    allow = rng.choice(ids, 2500, replace=False)
    index.config.allow_exact_below = 0
    _, got = index.search(q, 20, allow=allow, exclude=excl)
    assert np.isin(got[got >= 0], allow).all()
    assert recall(got, brute_force(x, ids, q, 20, exclude=excl, allow=allow)[1]) >= 0.95


def test_fewer_results_than_k_are_padded(corpus):
    x, ids, q = corpus
    for kind in ("flat", "hnsw"):
        index = AnnIndex.build(x[:5], ids[:5], AnnConfig(kind=kind))
        s, got = index.search(q[:3], 8, exclude=[ids[:2], None, []])
        assert got.shape == (3, 8) and s.dtype == np.float32 and got.dtype == np.int64
        assert (got[0] >= 0).sum() == 3 and (got[1] >= 0).sum() == 5
        assert (got[0, 3:] == -1).all() and np.isneginf(s[0, 3:]).all()
        s, got = index.search(q[:2], 4, allow=ids[:2])
        assert set(got[0]) == {ids[0], ids[1], -1}
    one = AnnIndex.build(x[:3], ids[:3])
    _, got = one.search(x[1], 1)  # one [D] query
    assert got.tolist() == [[ids[1]]]


# ----------------------------------------------------------------------------------------------- add / remove


@pytest.mark.parametrize("kind", ["flat", "hnsw", "ivf"])
def test_add_remove_and_rebuild(corpus, kind):
    x, ids, q = corpus
    cfg = AnnConfig(kind=kind, nlist=8 if kind == "ivf" else None, nprobe=8, ef_search=128, rebuild_fraction=0.2)
    index = AnnIndex.build(x[:2000], ids[:2000], cfg)
    index.add(x[2000:], ids[2000:])  # incremental add
    assert len(index) == N and index.num_stored == N
    _, top = index.search(x[2500:2510], 1)
    assert top[:, 0].tolist() == ids[2500:2510].tolist()  # each new item is its own best match
    gone = ids[2500:2510]
    assert index.remove(gone) == 10
    assert len(index) == N - 10 and index.num_stored == N and sorted(index.tombstones) == sorted(gone)
    _, top = index.search(x[2500:2510], 5)
    assert not np.isin(top, gone).any()
    live = np.setdiff1d(ids, gone)
    if kind == "hnsw":
        assert recall(index.search(q, 5)[1], brute_force(x, ids, q, 5, allow=live)[1]) >= 0.95
    else:  # flat, and IVF probing all of its 8 lists: exact
        assert_same(index.search(q, 5), brute_force(x, ids, q, 5, allow=live))
    # past rebuild_fraction (20 % of the stored rows) the index is rebuilt from the live vectors
    index.remove(ids[:600])
    assert index.num_stored == N - 610 and len(index.tombstones) == 0 and len(index) == N - 610
    _, top = index.search(q, 10)
    assert not np.isin(top, ids[:600]).any() and not np.isin(top, gone).any()
    # a removed id can come back with a new vector
    index.add(x[:1], ids[2500:2501])
    assert index.get_vectors([ids[2500]]).tolist() == x[:1].tolist()
    assert len(index) == N - 609


def test_default_ids_continue_after_the_largest():
    rng = np.random.default_rng(5)
    index = AnnIndex(4)
    index.add(rng.standard_normal((3, 4)))
    index.add(rng.standard_normal((2, 4)))
    assert index.ids().tolist() == [0, 1, 2, 3, 4]
    index.add(rng.standard_normal((1, 4)), ids=[10])
    index.add(rng.standard_normal((1, 4)))
    assert index.ids().tolist()[-1] == 11


def test_ivf_rebuild_retrains_on_the_live_vectors(corpus):
    x, ids, _ = corpus
    index = AnnIndex.build(x, ids, AnnConfig(kind="ivf", rebuild_fraction=0.5))
    assert index.nlist == auto_nlist(N) == min(round(4 * N ** 0.5), N // 39)
    index.remove(ids[:1600])
    assert index.num_stored == N - 1600 and index.nlist == auto_nlist(N - 1600)


# ------------------------------------------------------------------------------------------------ save / load


@pytest.mark.parametrize("kind", ["flat", "hnsw", "ivf"])
def test_save_load_round_trip(corpus, kind, tmp_path):
    x, ids, q = corpus
    index = AnnIndex.build(x, ids, AnnConfig(kind=kind, ef_search=64, nprobe=4, rebuild_fraction=0.5))
    index.remove(ids[:7])
    before = index.search(q, 10, exclude=[ids[10:20]] * len(q))
    path = index.save(tmp_path / "idx")
    assert sorted(p.name for p in path.iterdir()) == ["ids.npy", "index.faiss", "manifest.json", "vectors.npy"]
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["config"]["kind"] == kind and manifest["dim"] == D and manifest["live"] == N - 7
    assert sorted(manifest["tombstones"]) == sorted(ids[:7].tolist()) and len(manifest["sha256"]) == 3
    loaded = AnnIndex.load(path)
    assert loaded.config == index.config and loaded.nlist == index.nlist and len(loaded) == N - 7
    assert sorted(loaded.tombstones) == sorted(ids[:7])
    after = loaded.search(q, 10, exclude=[ids[10:20]] * len(q))
    np.testing.assert_array_equal(after[1], before[1])
    np.testing.assert_array_equal(after[0], before[0])
    loaded.add(x[:1] * 0.5, ids=[ids[0]])  # the loaded index keeps working
    assert len(loaded) == N - 6
    index.save(tmp_path / "idx")  # saving over an existing folder replaces it
    assert len(AnnIndex.load(tmp_path / "idx")) == N - 7


def test_empty_index_saves_and_loads(tmp_path):
    AnnIndex(8, AnnConfig(kind="hnsw")).save(tmp_path / "empty")
    loaded = AnnIndex.load(tmp_path / "empty")
    assert len(loaded) == 0 and loaded.dim == 8 and loaded.config.kind == "hnsw"


@pytest.mark.parametrize("name", ["index.faiss", "vectors.npy", "ids.npy"])
def test_load_detects_a_changed_file(corpus, tmp_path, name):
    x, ids, _ = corpus
    path = AnnIndex.build(x[:100], ids[:100], AnnConfig(kind="hnsw")).save(tmp_path / "idx")
    data = bytearray((path / name).read_bytes())
    data[-1] ^= 0xFF
    (path / name).write_bytes(bytes(data))
    with pytest.raises(DataError, match=rf"{name}.*checksum mismatch"):
        AnnIndex.load(path)
    (path / name).unlink()
    with pytest.raises(DataError, match=rf"{name}.*missing"):
        AnnIndex.load(path)


def test_load_rejects_a_folder_without_manifest_or_with_a_bad_one(tmp_path):
    with pytest.raises(DataError, match="manifest.json"):
        AnnIndex.load(tmp_path)
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(DataError, match="manifest.json.*not valid JSON"):
        AnnIndex.load(tmp_path)
    (tmp_path / "manifest.json").write_text(json.dumps({"format": "other"}))
    with pytest.raises(DataError, match="funnelrec-ann-v1"):
        AnnIndex.load(tmp_path)


# -------------------------------------------------------------------------------------------------- bad input


def test_bad_inputs_give_clear_errors(corpus):
    x, ids, q = corpus
    with pytest.raises(ConfigError, match="kind must be one of flat, ivf, hnsw, got 'annoy'"):
        AnnConfig(kind="annoy")
    with pytest.raises(ConfigError, match="ef_search must be an integer >= 1"):
        AnnConfig(kind="hnsw", ef_search=0)
    with pytest.raises(ConfigError, match="rebuild_fraction"):
        AnnConfig(rebuild_fraction=0)
    with pytest.raises(DataError, match="empty index"):
        AnnIndex(D).search(q, 5)
    index = AnnIndex.build(x, ids, AnnConfig(kind="hnsw"))
    with pytest.raises(DataError, match=r"D = 16 .*got shape \[40, 8\]"):
        index.search(q[:, :8], 5)
    with pytest.raises(DataError, match=r"D = 16 .*got shape \[3, 17\]"):
        index.add(np.zeros((3, 17), np.float32), ids=[1, 2, 3])
    with pytest.raises(ConfigError, match="k must be an integer >= 1, got 0"):
        index.search(q, 0)
    with pytest.raises(DataError, match="unknown id 424242"):
        index.remove([ids[0], 424242])
    assert len(index) == N  # a failed remove changes nothing
    with pytest.raises(DataError, match=f"id {ids[3]} is already in the index"):
        index.add(x[:1], ids=[ids[3]])
    with pytest.raises(DataError, match="id 7 appears twice"):
        AnnIndex(D).add(x[:2], ids=[7, 7])
    with pytest.raises(DataError, match="ids must be >= 0"):
        AnnIndex(D).add(x[:1], ids=[-1])
    with pytest.raises(DataError, match="expected 2, got 3"):
        AnnIndex(D).add(x[:2], ids=[1, 2, 3])
    with pytest.raises(DataError, match="non-finite"):
        index.search(np.full((1, D), np.nan, np.float32), 5)
    with pytest.raises(DataError, match="one id list per query: expected 40, got 2"):
        index.search(q, 5, exclude=[[1], [2]])
    with pytest.raises(DataError, match=r"exclude\[1\] must be a 1-D list of integer ids"):
        index.search(q[:2], 5, exclude=[[1], [2.5]])
    with pytest.raises(DataError, match="exclude must hold integer ids, got a float64 array"):
        index.search(q[:2], 5, exclude=np.array([[1.0], [2.0]]))
    with pytest.raises(DataError, match="unknown id 99"):
        index.get_vectors([99])
    with pytest.raises(DataError, match="nlist=64 needs at least 64 vectors"):
        AnnIndex.build(x[:10], config=AnnConfig(kind="ivf", nlist=64))
    with pytest.raises(DataError, match=r"vectors must be \[N, D\]"):
        AnnIndex.build(x[0])


def test_module_doctests():
    for module in (ann_module, ann_filters_module):
        result = doctest.testmod(module)
        assert result.failed == 0 and result.attempted > 0


def test_padded_exclusion_array_flattens_like_the_lists():
    from funnelrec.retrieval.ann_filters import flatten_exclusions

    rng = np.random.default_rng(3)
    padded = np.where(rng.random((7, 9)) < 0.4, -1, rng.integers(0, 50, (7, 9)))
    padded[2] = -1
    lists = [row[row >= 0] for row in padded]
    rows_a, ids_a, longest_a = flatten_exclusions(padded, 7)
    rows_b, ids_b, longest_b = flatten_exclusions(lists, 7)
    assert longest_a == longest_b == max(len(x) for x in lists)
    assert sorted(zip(rows_a.tolist(), ids_a.tolist())) == sorted(zip(rows_b.tolist(), ids_b.tolist()))
    assert flatten_exclusions(np.full((3, 4), -1), 3)[2] == 0
