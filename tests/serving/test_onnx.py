"""ONNX export of the ranker's and pre-ranker's dense parts: parity with PyTorch (≤ 1e-4) on real cascade
batches of several sizes, the cascade served through onnxruntime gives the PyTorch lists, bundles carry the
graphs checksummed, and a corrupt, foreign or mismatched graph is refused naming the file."""

import json
import shutil
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch
from cascade_fixtures import cascade_env  # noqa: F401

from funnelrec.data.batch import RequestBatch
from funnelrec.data.features import FeatureField, FeatureSpec
from funnelrec.errors import ConfigError
from funnelrec.ranking import build_ranker
from funnelrec.serving.bundle import BundleError, _sha256, export_bundle, load_bundle
from funnelrec.serving.onnx_export import (OnnxError, OnnxStages, RankerDense, export_preranker,
                                           export_ranker, onnx_session)

ATOL = 1e-4
SHAPES = [(1, 1), (1, 100), (5, 37), (24, 100)]  # (B requests, M candidates); 100 = the fixture's prerank


@pytest.fixture(scope="module")
def graphs(cascade_env):
    """The fixture cascade's exported graphs (ranker, pre-ranker) as bytes."""
    return export_ranker(cascade_env.parts.ranker), export_preranker(cascade_env.parts.preranker)


@pytest.fixture(scope="module")
def real(cascade_env):
    """The retrieval stage's output for the 24 test requests: what the pre-ranker and the ranker score."""
    c = cascade_env.cascade0
    u, t, tab, hour = cascade_env.args()
    with torch.inference_mode():
        hist = c.history.history(u, t, c.history_len)
        user_vec, cand, valid, _ = c.retrieve(u, t, tab, hour, hist)
    return (u, t, tab, hour), user_vec, cand, valid


@pytest.mark.parametrize("b,m", SHAPES)
def test_ranker_parity_on_cascade_batches(cascade_env, graphs, real, b, m):
    c = cascade_env.cascade0
    (u, t, tab, hour), _, cand, valid = real
    stages = OnnxStages(c.ranker, None, graphs[0], None, threads=1)
    with torch.inference_mode():
        batch = c.request_batch(u[:b], t[:b], tab[:b], hour[:b], cand[:b, :m] * valid[:b, :m], valid[:b, :m])
        want = c.ranker(batch)
        got = stages.rank(batch)
    assert got["logits"].shape == (b, m, len(c.tasks)) and got["watch"].shape == (b, m)
    assert float((got["logits"] - want["logits"]).abs().max()) <= ATOL
    assert float((got["watch"] - want["watch"]).abs().max()) <= ATOL
    assert batch.hist_len.sum() > 0 and valid[:b, :m].all(), "real requests: histories, full candidates"


@pytest.mark.parametrize("b,m", SHAPES + [(24, 300)])
def test_preranker_parity_on_cascade_batches(cascade_env, graphs, real, b, m):
    c = cascade_env.cascade0
    _, user_vec, cand, _ = real
    stages = OnnxStages(None, c.preranker, None, graphs[1], threads=1)
    items = cand[:b, :m]
    with torch.inference_mode():
        want = c.preranker.score(user_vec[:b], c.item_vectors[items], c.item_log_pop[items])
        got = stages.prerank_score(user_vec[:b], c.item_vectors[items], c.item_log_pop[items])
    assert got.shape == (b, m)
    assert float((got - want).abs().max()) <= ATOL


def test_cascade_with_onnx_serves_the_pytorch_lists(cascade_env, graphs):
    args = cascade_env.args()
    torch_out = cascade_env.cascade().recommend(*args)
    c = cascade_env.cascade().use_onnx(*graphs, threads=1)
    assert c.onnx is not None and c.metadata["runtime"]["ranker"] == "onnxruntime"
    onnx_out = c.recommend(*args)
    np.testing.assert_array_equal(onnx_out.items, torch_out.items)
    for stage in ("prerank", "p_click", "watch_s", "fusion"):
        np.testing.assert_allclose(onnx_out.scores[stage], torch_out.scores[stage], atol=ATOL, rtol=0)
    for stage in ("prerank", "fusion", "rerank"):  # the same items kept (near-ties may swap places inside)
        got, want = onnx_out.stage_items[stage], torch_out.stage_items[stage]
        assert torch.equal(got.sort(1).values, want.sort(1).values)
    # one stage at a time, and back to PyTorch
    c.use_onnx(ranker=graphs[0])
    assert c.onnx.describe()["preranker"] == "torch"
    np.testing.assert_array_equal(c.recommend(*args).items, torch_out.items)
    assert c.use_onnx().onnx is None and "runtime" not in c.metadata


def test_bundle_with_onnx_loads_and_serves(cascade_env, tmp_path):
    path = export_bundle(cascade_env.parts, tmp_path / "b", onnx=True)
    m = json.loads((path / "manifest.json").read_text())
    assert m["onnx"]["ranker"] == "onnx/ranker.onnx" and m["onnx"]["preranker"] == "onnx/preranker.onnx"
    for f in ("onnx/ranker.onnx", "onnx/preranker.onnx"):
        assert m["files"][f] == _sha256(path / f)
    args = cascade_env.args()
    c = load_bundle(path, runtime="onnx")
    assert c.onnx is not None and c.onnx.describe()["preranker"] == "onnxruntime"
    np.testing.assert_array_equal(c.recommend(*args).items, cascade_env.cascade0.recommend(*args).items)
    assert load_bundle(path).onnx is None  # the default runtime stays PyTorch


@pytest.fixture(scope="module")
def onnx_bundle(cascade_env, tmp_path_factory) -> Path:
    return export_bundle(cascade_env.parts, tmp_path_factory.mktemp("onnx") / "b", onnx=True)


def _copy(bundle: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(bundle, tmp_path / "copy"))


def _rechecksum(path: Path, rel: str) -> None:
    m = json.loads((path / "manifest.json").read_text())
    m["files"][rel] = _sha256(path / rel)
    (path / "manifest.json").write_text(json.dumps(m))


def test_corrupted_onnx_fails_its_checksum(onnx_bundle, tmp_path):
    path = _copy(onnx_bundle, tmp_path)
    data = bytearray((path / "onnx/ranker.onnx").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (path / "onnx/ranker.onnx").write_bytes(bytes(data))
    with pytest.raises(BundleError, match=r"onnx/ranker\.onnx: checksum mismatch"):
        load_bundle(path, runtime="onnx")


def test_unparsable_onnx_is_refused_even_with_a_matching_checksum(onnx_bundle, tmp_path):
    path = _copy(onnx_bundle, tmp_path)
    (path / "onnx/preranker.onnx").write_bytes(b"\x08\x07not a model" * 50)
    _rechecksum(path, "onnx/preranker.onnx")
    with pytest.raises(BundleError, match=r"onnx/preranker\.onnx: onnxruntime cannot load it"):
        load_bundle(path, runtime="onnx")


def test_swapped_graphs_are_refused(onnx_bundle, tmp_path):
    path = _copy(onnx_bundle, tmp_path)
    r, p = path / "onnx/ranker.onnx", path / "onnx/preranker.onnx"
    a, b = r.read_bytes(), p.read_bytes()
    r.write_bytes(b)
    p.write_bytes(a)
    _rechecksum(path, "onnx/ranker.onnx")
    _rechecksum(path, "onnx/preranker.onnx")
    with pytest.raises(BundleError, match=r"onnx/ranker\.onnx: not a funnelrec ranker graph"):
        load_bundle(path, runtime="onnx")


def test_graph_of_another_width_is_refused(cascade_env):
    other = build_ranker("shared_bottom", _tiny_spec()).eval()
    with pytest.raises(OnnxError, match="input features has width"):
        OnnxStages(cascade_env.parts.ranker, None, export_ranker(other), None, threads=1)


def test_runtime_onnx_needs_graphs_and_a_known_runtime(cascade_env):
    with pytest.raises(BundleError, match="no ONNX graphs"):
        load_bundle(cascade_env.bundle, runtime="onnx")
    with pytest.raises(ConfigError, match="runtime"):
        load_bundle(cascade_env.bundle, runtime="tensorrt")
    with pytest.raises(OnnxError, match="cannot load"):
        onnx_session(b"garbage", name="x.onnx")


def _tiny_spec() -> FeatureSpec:
    spec = FeatureSpec(user_sparse=[FeatureField("user_id", encoding="id")], user_dense=[],
                       item_sparse=[FeatureField("video_id", encoding="id")], item_dense=[])
    return spec.fit(pl.DataFrame({"user_id": [0, 1, 2]}), pl.DataFrame({"video_id": [0, 1, 2, 3]}))


@pytest.mark.parametrize("name", ["mmoe", "ple", "dcnv2", "din"])
def test_other_rankers_export_with_parity(name):
    torch.manual_seed(0)
    model = build_ranker(name, _tiny_spec()).eval()  # DIN: target attention over the history
    stages = OnnxStages(model, None, export_ranker(model), None, threads=1)
    batch = RequestBatch.empty(batch_size=3, history=4, candidates=5)
    g = torch.Generator().manual_seed(1)
    vocab = model.config.item_vocab[0]
    batch.cand_sparse = torch.randint(0, vocab, batch.cand_sparse.shape, generator=g)
    batch.hist_items = torch.randint(1, vocab, batch.hist_items.shape, generator=g)
    batch.hist_actions = torch.randint(0, 2, batch.hist_actions.shape, generator=g).float()
    batch.hist_len = torch.full_like(batch.hist_len, 4)
    with torch.inference_mode():
        want, got = model(batch), stages.rank(batch)
    assert float((got["logits"] - want["logits"]).abs().max()) <= ATOL
    assert float((got["watch"] - want["watch"]).abs().max()) <= ATOL


def test_a_ranker_reading_the_batch_is_refused_naming_the_field():
    model = build_ranker("transformer", _tiny_spec()).eval()
    with pytest.raises(ConfigError, match=r"reads batch\.\w+ beyond its input features"):
        export_ranker(model)
    with pytest.raises(ConfigError, match=r"reads batch\.\w+"):
        RankerDense(model)(torch.zeros(1, 1, model.inputs.out_dim))


def test_module_examples_run():
    import doctest

    import funnelrec.serving.onnx_export as module

    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0
