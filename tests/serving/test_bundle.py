"""Model bundles: export → load serves identical recommendations; missing, corrupt or foreign files, bad
manifests and non-tensor pickles are refused with a ``BundleError`` naming the file; no overwriting by
accident."""

import json
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from cascade_fixtures import HISTORY_LEN, SIZES, cascade_env  # noqa: F401

from funnelrec.serving.bundle import (BUNDLE_FORMAT, BundleError, _sha256, export_bundle, load_bundle,
                                      load_parts)

FILES = ("feature_spec.json", "users.parquet", "videos.parquet", "history.parquet", "retriever.pt",
         "preranker.pt", "ranker.pt", "tensors.pt")


class _Payload:
    """Unpickling this runs code: it creates the file ``path``."""

    def __init__(self, path: Path):
        self.path = path

    def __reduce__(self):
        return (Path.touch, (self.path,))


@pytest.fixture
def bundle(cascade_env, tmp_path) -> Path:
    """A private copy of the shared bundle (safe to corrupt)."""
    return Path(shutil.copytree(cascade_env.bundle, tmp_path / "b"))


def _manifest(path: Path) -> dict:
    return json.loads((path / "manifest.json").read_text())


def _write_manifest(path: Path, m: dict) -> None:
    (path / "manifest.json").write_text(json.dumps(m))


def test_manifest_lists_every_file(cascade_env):
    m = _manifest(cascade_env.bundle)
    assert m["format"] == BUNDLE_FORMAT and m["name"] == "test-bundle"
    root = cascade_env.bundle
    on_disk = {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()}
    assert set(m["files"]) == on_disk - {"manifest.json"}
    assert set(FILES) <= set(m["files"]) and any(f.startswith("ann/") for f in m["files"])
    assert all(_sha256(cascade_env.bundle / f) == d for f, d in m["files"].items())
    assert m["sizes"] == {"retrieve": SIZES.retrieve, "popular": SIZES.popular, "prerank": SIZES.prerank,
                          "pool": SIZES.pool, "serve": SIZES.serve}
    assert m["history_len"] == HISTORY_LEN and tuple(m["tasks"]) == cascade_env.parts.tasks
    assert not list(cascade_env.bundle.parent.glob("*.tmp")), "the temporary export folder was left behind"


def test_roundtrip_serves_identical_recommendations(cascade_env):
    loaded = load_bundle(cascade_env.bundle)
    assert loaded.metadata["name"] == "test-bundle" and loaded.metadata["path"] == str(cascade_env.bundle)
    users, times, tab, hour = cascade_env.args()
    users = np.r_[users, int(cascade_env.parts.users.get_column("user_id").max()) + 7]  # and a cold start
    times, tab, hour = np.r_[times, times[0]], np.r_[tab, tab[0]], np.r_[hour, hour[0]]
    a = cascade_env.cascade0.recommend(users, times, tab, hour)
    b = loaded.recommend(users, times, tab, hour)
    np.testing.assert_array_equal(a.items, b.items)
    for k in a.scores:
        np.testing.assert_array_equal(a.scores[k], b.scores[k])
    np.testing.assert_array_equal(a.pxtr, b.pxtr)
    np.testing.assert_array_equal(a.cold_start, b.cold_start)
    for k in a.stage_items:
        assert torch.equal(a.stage_items[k], b.stage_items[k]), k
    assert (loaded.sizes, loaded.history_len, loaded.tasks) == (SIZES, HISTORY_LEN, cascade_env.parts.tasks)


def test_load_parts_restores_every_part(cascade_env):
    parts, src = load_parts(cascade_env.bundle), cascade_env.parts
    for name in ("retriever", "preranker", "ranker"):
        got, want = getattr(parts, name).state_dict(), getattr(src, name).state_dict()
        assert got.keys() == want.keys(), name
        assert all(torch.equal(got[k], want[k]) for k in want), name
        assert not getattr(parts, name).training
    assert torch.equal(parts.item_vectors, src.item_vectors)
    assert torch.equal(parts.item_log_pop, src.item_log_pop)
    assert torch.equal(parts.fusion.log_weights, src.fusion.log_weights)
    assert parts.fusion.kind == src.fusion.kind
    assert parts.users.equals(src.users) and parts.videos.equals(src.videos)
    assert parts.history_log.equals(src.history_log)
    assert parts.spec.to_dict() == src.spec.to_dict()
    assert (parts.ranker_name, parts.ranker_args) == (src.ranker_name, src.ranker_args)


@pytest.mark.parametrize("name", ["videos.parquet", "ranker.pt", "feature_spec.json", "ann"])
def test_missing_file(bundle, name):
    target = bundle / name
    if target.is_dir():  # a file of the ANN index
        target = sorted(p for p in target.rglob("*") if p.is_file())[0]
    target.unlink()
    with pytest.raises(BundleError, match="missing") as e:
        load_bundle(bundle)
    assert str(target) in str(e.value)


@pytest.mark.parametrize("name", list(FILES))
def test_corrupted_file(bundle, name):
    f = bundle / name
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0x01  # flip one bit
    f.write_bytes(bytes(data))
    with pytest.raises(BundleError, match="checksum") as e:
        load_bundle(bundle)
    assert str(f) in str(e.value)


def test_bad_manifest_json(bundle):
    (bundle / "manifest.json").write_text('{"format": 1, "files": {')
    with pytest.raises(BundleError, match="not valid JSON") as e:
        load_parts(bundle)
    assert "manifest.json" in str(e.value)
    (bundle / "manifest.json").write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(BundleError, match="manifest.json"):
        load_parts(bundle)


@pytest.mark.parametrize("version", [BUNDLE_FORMAT + 1, 0, "1", None])
def test_unknown_format_version(bundle, version):
    m = _manifest(bundle)
    m["format"] = version
    _write_manifest(bundle, m)
    with pytest.raises(BundleError, match="bundle format") as e:
        load_bundle(bundle)
    assert "manifest.json" in str(e.value)


def test_manifest_missing_a_field(bundle):
    m = _manifest(bundle)
    del m["ranker"]
    _write_manifest(bundle, m)
    with pytest.raises(BundleError, match="'ranker'") as e:
        load_bundle(bundle)
    assert "manifest.json" in str(e.value)


def test_not_a_bundle(tmp_path):
    with pytest.raises(BundleError, match="does not exist"):
        load_bundle(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(BundleError, match="manifest.json"):
        load_bundle(tmp_path / "empty")


def test_export_refuses_to_overwrite(cascade_env, tmp_path):
    out = tmp_path / "again"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(BundleError, match="exists"):
        export_bundle(cascade_env.parts, out)
    assert (out / "keep.txt").read_text() == "mine"
    export_bundle(cascade_env.parts, out, overwrite=True)
    assert not (out / "keep.txt").exists() and (out / "manifest.json").is_file()
    assert not (tmp_path / "again.tmp").exists()
    users, times, tab, hour = cascade_env.args(cascade_env.requests.head(4))
    np.testing.assert_array_equal(load_bundle(out).recommend(users, times, tab, hour).items,
                                  cascade_env.cascade0.recommend(users, times, tab, hour).items)


@pytest.mark.parametrize("how", ["pickle", "torch.save"])
def test_weights_only_refuses_code(bundle, tmp_path, how):
    """A .pt file swapped for a pickle that would run code (checksum recomputed in the manifest) is refused
    and the code never runs."""
    marker = tmp_path / "pwned"
    f = bundle / "preranker.pt"
    payload = {"mlp.0.weight": _Payload(marker)}
    if how == "pickle":
        f.write_bytes(pickle.dumps(payload, protocol=2))
    else:
        torch.save(payload, f)
    # the payload works when unpickled without restrictions
    pickle.loads(pickle.dumps(_Payload(tmp_path / "works")))
    assert (tmp_path / "works").exists()
    m = _manifest(bundle)
    m["files"]["preranker.pt"] = _sha256(f)
    _write_manifest(bundle, m)
    with pytest.raises(BundleError, match="cannot load tensors") as e:
        load_bundle(bundle)
    assert str(f) in str(e.value)
    assert not marker.exists(), "unpickling ran code from the bundle"
