"""ONNX export of the cascade's dense stages, and onnxruntime as their serving runtime.

What goes into a graph, and what stays in PyTorch:

* **ranker** — the split is ``MultiTaskRanker.features(batch)`` (``RankingInputs``: every embedding
  look-up, the pooled or target-attended history, the dense values) | the rest of ``forward``. The graph
  takes ``features`` = ``features(batch).flat`` [B, M, F_in] and returns the task ``logits`` [B, M, T] and
  the ``watch`` head [B, M]; the look-ups (sparse ids → rows of large tables) stay in PyTorch, as do the
  sigmoid and the D2Q quantile → seconds table of ``watch_seconds``. Any ranker whose ``forward`` reads the
  batch only through ``self.features(batch).flat`` exports (``shared_bottom``, ``mmoe``, ``ple``, ``dcnv2``,
  ``din``); one that reads more of the batch (``rankmixer`` reads ``cand_mask``, sequence models read the
  history) is refused with a ``ConfigError`` naming the field it read.
* **pre-ranker** — entirely dense: the graph takes the cached ``user_vec`` [B, D], the candidates'
  ``item_vec`` [B, M, D] and ``log_pop`` [B, M] and returns the fused pre-rank ``score`` [B, M]
  (Σ_t log σ(logit_t)); the gather of the item vectors by candidate stays outside.

Both are exported by PyTorch's TorchScript exporter (``torch.onnx.export(..., dynamo=False)``, opset
:data:`OPSET`; the torch.export-based exporter needs ``onnxscript``, one more dependency for the same graph)
with dynamic batch (B) and candidate (M) axes, then checked against PyTorch on random inputs (max |Δ| ≤ 1e-4)
before they are returned. :class:`OnnxStages` runs them with onnxruntime (CPU provider, ``threads`` intra-op
threads; ``InferenceSession.run`` is thread-safe, so concurrent requests share one session) and is what
``Cascade.use_onnx`` installs; ``export_bundle(..., onnx=True)`` writes ``onnx/ranker.onnx`` and
``onnx/preranker.onnx`` into a bundle (checksummed like every file) and ``load_bundle(path, runtime="onnx")``
serves with them. A graph whose inputs do not fit the bundle's models (wrong kind, wrong widths) or that
onnxruntime cannot parse is refused, naming it.

All of this is ours (the papers do not cover model export).

Example:
    >>> import torch
    >>> from funnelrec.serving.prerank import PreRanker, PreRankerConfig
    >>> pre = PreRanker(PreRankerConfig(dim=8)).eval()
    >>> graph = export_preranker(pre)                      # bytes of an ONNX model
    >>> stages = OnnxStages(preranker_model=pre, preranker=graph, threads=1)
    >>> u, v, p = torch.randn(2, 8), torch.randn(2, 5, 8), torch.rand(2, 5)
    >>> bool((stages.prerank_score(u, v, p) - pre.score(u, v, p)).abs().max() < 1e-4)
    True
"""

from __future__ import annotations

import copy
import io
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from funnelrec.errors import ConfigError, FunnelrecError

__all__ = ["OPSET", "OnnxError", "RankerDense", "PreRankerDense", "export_ranker", "export_preranker",
           "export_onnx_files", "OnnxStages", "onnx_session", "PARITY_ATOL"]

#: ONNX opset of the exported graphs.
OPSET = 17
#: Largest |ONNX − PyTorch| accepted by the export check.
PARITY_ATOL = 1e-4
_KIND_KEY = "funnelrec.kind"


class OnnxError(FunnelrecError):
    """An ONNX graph that cannot be exported, loaded or used with the models it is meant for."""


# ------------------------------------------------------------------------------------------------ dense parts
class _GivenFeatures:
    """Stands in for ``RankingFeatures``: only ``flat`` exists (what the exportable rankers read)."""

    def __init__(self, flat: Tensor):
        self.flat = flat

    def __getattr__(self, name: str):
        raise ConfigError(f"the ranker reads features.{name}, not only features.flat: its dense part "
                          f"cannot be exported on its own")


class _NoBatch:
    """Stands in for the ``RequestBatch`` while the dense part runs: any read names the field and refuses."""

    def __getattr__(self, name: str):
        raise ConfigError(f"the ranker's forward reads batch.{name} beyond its input features: only rankers "
                          f"whose forward reads the batch through self.features(batch).flat export to ONNX")


class RankerDense(nn.Module):
    """The dense part of a multi-task ranker: ``features(batch).flat`` [B, M, F_in] → (logits [B, M, T], watch
    [B, M]).

    Runs the ranker's own ``forward`` on a shallow copy whose ``features`` returns the given tensor, so it is
    exactly the ranker's computation after its input encoder (the ranker itself is not modified).

    Args:
        ranker: a ``MultiTaskRanker`` (eval mode for export).

    Example:
        >>> from funnelrec.ranking.shared_bottom import SharedBottom, SharedBottomConfig
        >>> from funnelrec.data.batch import RequestBatch
        >>> model = SharedBottom(SharedBottomConfig(user_vocab=[10], item_vocab=[20], user_dense=0,
        ...                                         item_dense=0)).eval()
        >>> batch = RequestBatch.empty(batch_size=2, history=5, candidates=3)
        >>> logits, watch = RankerDense(model)(model.features(batch).flat)
        >>> bool(torch.equal(logits, model(batch)["logits"])), watch.shape
        (True, torch.Size([2, 3]))
    """

    def __init__(self, ranker: nn.Module):
        super().__init__()
        if not callable(getattr(ranker, "features", None)):
            raise ConfigError(f"{type(ranker).__name__} has no features(batch): not a MultiTaskRanker")
        self.ranker = copy.copy(ranker)  # shares parameters; only the copy's ``features`` is replaced
        self.in_dim = int(ranker.inputs.out_dim)

    def forward(self, features: Tensor) -> tuple[Tensor, Tensor]:
        """features [B, M, F_in] → (logits [B, M, T], watch [B, M])."""
        object.__setattr__(self.ranker, "features", lambda _batch: _GivenFeatures(features))
        out = type(self.ranker).forward(self.ranker, _NoBatch())
        return out["logits"], out["watch"]


class PreRankerDense(nn.Module):
    """The pre-ranker's fused score: (user_vec [B, D], item_vec [B, M, D], log_pop [B, M]) → score [B, M]."""

    def __init__(self, preranker: nn.Module):
        super().__init__()
        self.preranker = preranker
        self.dim = int(preranker.config.dim)

    def forward(self, user_vec: Tensor, item_vec: Tensor, log_pop: Tensor) -> Tensor:
        return self.preranker.score(user_vec, item_vec, log_pop)


# ----------------------------------------------------------------------------------------------------- export
def _export(module: nn.Module, args: tuple[Tensor, ...], inputs: list[str], outputs: list[str],
            dynamic: dict[str, dict[int, str]], kind: str) -> bytes:
    buf = io.BytesIO()
    was_training = module.training
    module.eval()
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation and tracer notes
            torch.onnx.export(module, args, buf, dynamo=False, input_names=inputs, output_names=outputs,
                              dynamic_axes=dynamic, opset_version=OPSET, do_constant_folding=True)
    finally:
        module.train(was_training)
    import onnx

    model = onnx.load_from_string(buf.getvalue())
    entry = model.metadata_props.add()
    entry.key, entry.value = _KIND_KEY, kind
    return model.SerializeToString()


def _check_parity(graph: bytes, module: nn.Module, args: tuple[Tensor, ...], names: list[str],
                  what: str) -> None:
    sess = onnx_session(graph, threads=1, name=what)
    with torch.no_grad():
        want = module(*args)
    want = want if isinstance(want, tuple) else (want,)
    got = sess.run(None, {n: a.numpy() for n, a in zip(names, args)})
    for w, g in zip(want, got):
        err = float(np.abs(w.numpy() - g).max())
        if not err <= PARITY_ATOL:
            raise OnnxError(f"{what}: ONNX output differs from PyTorch by {err:.3g} (> {PARITY_ATOL})")


def export_ranker(ranker: nn.Module, path: str | Path | None = None, check: bool = True) -> bytes:
    """Export the ranker's dense part (:class:`RankerDense`) to ONNX.

    Args:
        ranker: a ``MultiTaskRanker`` whose ``forward`` reads the batch only through ``features(batch).flat``.
        path: also write the graph there.
        check: compare onnxruntime with PyTorch on random features of two shapes (``OnnxError`` over 1e-4).
    Returns:
        the serialised ONNX model (input ``features`` [B, M, F_in]; outputs ``logits`` [B, M, T], ``watch``
        [B, M]; B and M dynamic).
    """
    dense = RankerDense(ranker).eval()
    g = torch.Generator().manual_seed(0)
    example = (torch.randn(2, 3, dense.in_dim, generator=g),)
    with torch.no_grad():
        dense(*example)  # a ranker that reads more than the features fails here, with its field named
    axes = {0: "B", 1: "M"}
    graph = _export(dense, example, ["features"], ["logits", "watch"],
                    {"features": axes, "logits": axes, "watch": axes}, "ranker")
    if check:
        for b, m in ((1, 1), (3, 17)):
            features = torch.randn(b, m, dense.in_dim, generator=g)
            _check_parity(graph, dense, (features,), ["features"], "ranker")
    if path is not None:
        Path(path).write_bytes(graph)
    return graph


def export_preranker(preranker: nn.Module, path: str | Path | None = None, check: bool = True) -> bytes:
    """Export the pre-ranker's score (:class:`PreRankerDense`) to ONNX.

    Returns:
        the serialised ONNX model (inputs ``user_vec`` [B, D], ``item_vec`` [B, M, D], ``log_pop`` [B, M];
        output ``score`` [B, M]; B and M dynamic).
    """
    dense = PreRankerDense(preranker).eval()
    g = torch.Generator().manual_seed(0)

    def sample(b: int, m: int) -> tuple[Tensor, Tensor, Tensor]:
        return (torch.randn(b, dense.dim, generator=g), torch.randn(b, m, dense.dim, generator=g),
                torch.rand(b, m, generator=g) * 5)

    names = ["user_vec", "item_vec", "log_pop"]
    graph = _export(dense, sample(2, 3), names, ["score"],
                    {"user_vec": {0: "B"}, "item_vec": {0: "B", 1: "M"}, "log_pop": {0: "B", 1: "M"},
                     "score": {0: "B", 1: "M"}}, "preranker")
    if check:
        for b, m in ((1, 1), (3, 17)):
            _check_parity(graph, dense, sample(b, m), names, "preranker")
    if path is not None:
        Path(path).write_bytes(graph)
    return graph


def export_onnx_files(ranker: nn.Module, preranker: nn.Module, folder: str | Path) -> dict:
    """Write ``folder/ranker.onnx`` and ``folder/preranker.onnx``; returns the bundle manifest's ``onnx``
    entry (file names relative to the folder's parent, opset, exporter, onnx / onnxruntime versions)."""
    import onnx
    import onnxruntime

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    export_ranker(ranker, folder / "ranker.onnx")
    export_preranker(preranker, folder / "preranker.onnx")
    return {"ranker": f"{folder.name}/ranker.onnx", "preranker": f"{folder.name}/preranker.onnx",
            "opset": OPSET, "exporter": "torchscript", "onnx": onnx.__version__,
            "onnxruntime": onnxruntime.__version__}


# ---------------------------------------------------------------------------------------------------- serving
def onnx_session(graph: bytes | str | Path, threads: int = 1, name: str | None = None):
    """An onnxruntime ``InferenceSession`` (CPU) over a serialised graph or a file; ``OnnxError`` naming
    ``name`` (or the file) when onnxruntime cannot load it."""
    import onnxruntime as ort

    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise ConfigError(f"onnx: threads must be an integer >= 1, got {threads!r}")
    label = name or (str(graph) if isinstance(graph, (str, Path)) else "ONNX graph")
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    try:
        data = Path(graph).read_bytes() if isinstance(graph, (str, Path)) else bytes(graph)
        return ort.InferenceSession(data, opts, providers=["CPUExecutionProvider"])
    except Exception as e:  # noqa: BLE001 - onnxruntime raises its own exception types for a bad graph
        raise OnnxError(f"{label}: onnxruntime cannot load it ({type(e).__name__}: "
                        f"{' '.join(str(e).split())[:300]})") from e


def _kind(sess) -> str | None:
    return sess.get_modelmeta().custom_metadata_map.get(_KIND_KEY)


def _check_io(sess, label: str, kind: str, inputs: dict[str, int], outputs: tuple[str, ...]) -> None:
    """Refuse a graph that is not a ``kind`` graph with these inputs (name → width of the last axis)."""
    if _kind(sess) != kind:
        raise OnnxError(f"{label}: not a funnelrec {kind} graph (metadata {_KIND_KEY}={_kind(sess)!r})")
    got = {i.name: i.shape for i in sess.get_inputs()}
    if set(got) != set(inputs) or tuple(o.name for o in sess.get_outputs()) != outputs:
        raise OnnxError(f"{label}: inputs {sorted(got)} / outputs {[o.name for o in sess.get_outputs()]}, "
                        f"expected {sorted(inputs)} / {list(outputs)}")
    for n, width in inputs.items():
        last = got[n][-1] if got[n] else None
        if width and last != width:
            raise OnnxError(f"{label}: input {n} has width {last}, the model needs {width}")


class OnnxStages:
    """Ranking and pre-ranking through onnxruntime sessions (what ``Cascade.use_onnx`` installs).

    A stage without a graph runs its PyTorch model, so one can switch stages separately.

    Args:
        ranker_model: the cascade's ranker (its ``features`` run in PyTorch; required with ``ranker``).
        preranker_model: the cascade's pre-ranker (required with ``preranker``).
        ranker: the exported ranker graph (bytes or a file), or None.
        preranker: the exported pre-ranker graph, or None.
        threads: onnxruntime intra-op threads per session (default: torch's thread count).
    """

    def __init__(self, ranker_model: nn.Module | None = None, preranker_model: nn.Module | None = None,
                 ranker: bytes | str | Path | None = None, preranker: bytes | str | Path | None = None,
                 threads: int | None = None):
        threads = torch.get_num_threads() if threads is None else threads
        self.ranker_model, self.preranker_model = ranker_model, preranker_model
        self.ranker_sess = self.preranker_sess = None
        if ranker is not None:
            if ranker_model is None:
                raise ConfigError("onnx: a ranker graph needs the ranker model (its input encoder runs in "
                                  "PyTorch)")
            label = str(ranker) if isinstance(ranker, (str, Path)) else "ranker graph"
            self.ranker_sess = onnx_session(ranker, threads, label)
            _check_io(self.ranker_sess, label, "ranker", {"features": int(ranker_model.inputs.out_dim)},
                      ("logits", "watch"))
        if preranker is not None:
            if preranker_model is None:
                raise ConfigError("onnx: a pre-ranker graph needs the pre-ranker model")
            label = str(preranker) if isinstance(preranker, (str, Path)) else "pre-ranker graph"
            self.preranker_sess = onnx_session(preranker, threads, label)
            d = int(preranker_model.config.dim)
            _check_io(self.preranker_sess, label, "preranker", {"user_vec": d, "item_vec": d, "log_pop": 0},
                      ("score",))
        self.threads = threads

    def describe(self) -> dict:
        def runtime(sess) -> str:
            return "onnxruntime" if sess is not None else "torch"

        return {"ranker": runtime(self.ranker_sess), "preranker": runtime(self.preranker_sess),
                "threads": self.threads}

    def rank(self, batch) -> dict[str, Tensor]:
        """The ranker's ``forward(batch)``: ``{"logits": [B, M, T], "watch": [B, M]}`` (input encoder in
        PyTorch, the rest in onnxruntime)."""
        if self.ranker_sess is None:
            return self.ranker_model(batch)
        with torch.inference_mode():
            flat = self.ranker_model.features(batch).flat
        logits, watch = self.ranker_sess.run(None, {"features": flat.float().contiguous().numpy()})
        return {"logits": torch.from_numpy(logits), "watch": torch.from_numpy(watch)}

    def prerank_score(self, user_vec: Tensor, item_vec: Tensor, log_pop: Tensor) -> Tensor:
        """[B, M] the pre-ranker's fused score (as ``PreRanker.score``)."""
        if self.preranker_sess is None:
            return self.preranker_model.score(user_vec, item_vec, log_pop)
        feed = {"user_vec": user_vec, "item_vec": item_vec, "log_pop": log_pop}
        (score,) = self.preranker_sess.run(None, {k: v.float().contiguous().numpy() for k, v in feed.items()})
        return torch.from_numpy(score)
