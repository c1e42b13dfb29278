"""Model bundles: every stage of the cascade in one checksummed folder, and back.

A bundle (``funnelrec export bundle --out bundles/NAME``) holds

==========================  =====================================================================
``manifest.json``           format version, funnelrec / torch versions, creation time, every stage's name and
                            config, funnel sizes, training figures, and the **sha256 of every other file**
``feature_spec.json``       the fitted ``FeatureSpec`` (one for all stages)
``users.parquet``           the user feature table; ``videos.parquet`` the video table
``history.parquet``         the logged events serving histories start from
``retriever.pt``            two-tower ``state_dict``; ``preranker.pt``; ``ranker.pt`` (with its watch-time tables)
``tensors.pt``              item vectors [I, D] and log popularity [I]
``ann/``                    the FAISS index (``AnnIndex.save``: its own manifest and checksums)
``onnx/``                   optional (``export_bundle(..., onnx=True)``): ``ranker.onnx``,
                            ``preranker.onnx``, the dense parts of the ranker and the pre-ranker
==========================  =====================================================================

Loading (:func:`load_bundle`) checks the manifest's format, that every listed file exists and matches its checksum
(a ``BundleError`` names the file otherwise), then rebuilds the models from their configs and loads the weights
with ``torch.load(weights_only=True)``: a bundle can only carry tensors, never code. No pickle anywhere.
``load_bundle(path, runtime="onnx")`` serves ranking and pre-ranking through onnxruntime sessions over the
bundle's ``onnx/`` graphs (``funnelrec.serving.onnx_export``; checksummed like every file; a graph onnxruntime
cannot load, or one that does not fit the bundle's models, is a ``BundleError`` naming it).

Example:
    >>> export_bundle(parts, "bundles/demo")                      # doctest: +SKIP
    >>> cascade = load_bundle("bundles/demo")                     # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import json
import platform
import shutil
from datetime import datetime, timezone
from pathlib import Path

import polars as pl
import torch

import funnelrec
from funnelrec.data.features import FeatureSpec
from funnelrec.errors import ConfigError, FunnelrecError
from funnelrec.fusion.formulas import FormulaFusion
from funnelrec.ranking import build_ranker
from funnelrec.ranking.watch_time import WatchTimeDebiaser
from funnelrec.retrieval.ann import AnnIndex
from funnelrec.retrieval.two_tower import TwoTowerConfig, TwoTowerRetriever
from funnelrec.serving.build import CascadeParts
from funnelrec.serving.cascade import Cascade, FunnelSizes
from funnelrec.serving.prerank import PreRanker, PreRankerConfig
from funnelrec.utils.io import sha256_file

__all__ = ["BundleError", "export_bundle", "load_bundle", "load_parts", "BUNDLE_FORMAT"]

BUNDLE_FORMAT = 1
_MANIFEST = "manifest.json"


class BundleError(FunnelrecError):
    """A bundle folder that cannot be loaded: missing, corrupt or from an unknown format."""


_sha256 = sha256_file  # the checksum recorded in the manifest


def export_bundle(parts: CascadeParts, out: str | Path, name: str | None = None,
                  overwrite: bool = False, onnx: bool = False) -> Path:
    """Write ``parts`` as a bundle folder ``out`` (written next to it, then renamed into place).

    ``onnx=True`` also exports the ranker's and pre-ranker's dense parts to ``onnx/`` (parity-checked).
    Raises ``BundleError`` if ``out`` exists and ``overwrite`` is False.
    """
    out = Path(out)
    if out.exists() and not overwrite:
        raise BundleError(f"bundle folder {out} exists (pass overwrite=True / --force to replace it)")
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    (tmp / "feature_spec.json").write_text(json.dumps(parts.spec.to_dict(), indent=1))
    parts.users.write_parquet(tmp / "users.parquet")
    parts.videos.write_parquet(tmp / "videos.parquet")
    parts.history_log.write_parquet(tmp / "history.parquet")
    torch.save(parts.retriever.state_dict(), tmp / "retriever.pt")
    torch.save(parts.preranker.state_dict(), tmp / "preranker.pt")
    torch.save(parts.ranker.state_dict(), tmp / "ranker.pt")
    torch.save({"item_vectors": parts.item_vectors.contiguous(), "item_log_pop": parts.item_log_pop.contiguous()},
               tmp / "tensors.pt")
    parts.ann.save(tmp / "ann")
    onnx_entry = None
    if onnx:
        from funnelrec.serving.onnx_export import export_onnx_files

        onnx_entry = export_onnx_files(parts.ranker, parts.preranker, tmp / "onnx")
    files = sorted(p for p in tmp.rglob("*") if p.is_file())
    manifest = {
        "format": BUNDLE_FORMAT, "name": name or out.name, "funnelrec": funnelrec.__version__,
        "torch": torch.__version__, "python": platform.python_version(),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "retriever": {"kind": "two_tower", "config": dataclasses.asdict(parts.retriever_config)},
        "preranker": {"config": dataclasses.asdict(parts.preranker.config)},
        "ranker": {"name": parts.ranker_name, "args": parts.ranker_args},
        "fusion": {"kind": parts.fusion.kind, "log_weights": parts.fusion.log_weights.tolist(),
                   "beta": parts.fusion.beta},
        "reranker": {"kind": "score_order"},
        "sizes": dataclasses.asdict(parts.sizes), "history_len": parts.history_len, "tasks": list(parts.tasks),
        "figures": parts.figures,
        **({"onnx": onnx_entry} if onnx_entry else {}),
        "files": {p.relative_to(tmp).as_posix(): _sha256(p) for p in files},
    }
    (tmp / _MANIFEST).write_text(json.dumps(manifest, indent=1))
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return out


def _manifest(path: Path) -> dict:
    if not path.is_dir():
        raise BundleError(f"bundle folder {path} does not exist")
    mf = path / _MANIFEST
    if not mf.is_file():
        raise BundleError(f"{mf}: missing manifest (not a funnelrec bundle?)")
    try:
        manifest = json.loads(mf.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BundleError(f"{mf}: not valid JSON ({e})") from e
    if manifest.get("format") != BUNDLE_FORMAT:
        raise BundleError(f"{mf}: bundle format {manifest.get('format')!r}, this funnelrec reads {BUNDLE_FORMAT}")
    for key in ("files", "retriever", "preranker", "ranker", "fusion", "sizes", "history_len", "tasks"):
        if key not in manifest:
            raise BundleError(f"{mf}: missing field {key!r}")
    required = {"feature_spec.json", "users.parquet", "videos.parquet", "history.parquet", "retriever.pt",
                "preranker.pt", "ranker.pt", "tensors.pt"}
    if not isinstance(manifest["files"], dict) or (missing := sorted(required - set(manifest["files"]))):
        raise BundleError(f"{mf}: the files list lacks {missing or 'a mapping'} (every file must be checksummed)")
    for rel, digest in manifest["files"].items():
        f = path / rel
        if not f.is_file():
            raise BundleError(f"{f}: missing (listed in the manifest)")
        if _sha256(f) != digest:
            raise BundleError(f"{f}: checksum mismatch (corrupt or modified file)")
    return manifest


def _weights(path: Path) -> dict:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unreadable file is a bundle error naming it
        raise BundleError(f"{path}: cannot load tensors ({type(e).__name__}: {e})") from e


def _restore(model: torch.nn.Module, state: dict, path: Path) -> None:
    try:
        model.load_state_dict(state)
    except (RuntimeError, KeyError, TypeError) as e:
        raise BundleError(f"{path}: weights do not fit the model of the manifest ({' '.join(str(e).split())[:300]})") \
            from e


def load_parts(path: str | Path) -> CascadeParts:
    """The :class:`CascadeParts` of a bundle folder (checksums verified first)."""
    path = Path(path)
    m = _manifest(path)
    spec = FeatureSpec.from_dict(json.loads((path / "feature_spec.json").read_text()))
    users = pl.read_parquet(path / "users.parquet")
    videos = pl.read_parquet(path / "videos.parquet")
    history = pl.read_parquet(path / "history.parquet")
    rcfg_dict = dict(m["retriever"]["config"])
    rcfg_dict["hidden"] = tuple(rcfg_dict.get("hidden", ()))
    rcfg = TwoTowerConfig(**rcfg_dict)
    rstate = _weights(path / "retriever.pt")
    if not isinstance(rstate, dict) or "item_sparse" not in rstate or "item_dense" not in rstate:
        raise BundleError(f"{path / 'retriever.pt'}: not a two-tower state (no item_sparse / item_dense)")
    retriever = TwoTowerRetriever(rcfg, rstate["item_sparse"], rstate["item_dense"])
    _restore(retriever, rstate, path / "retriever.pt")
    pcfg = PreRankerConfig(**m["preranker"]["config"])
    preranker = PreRanker(pcfg)
    _restore(preranker, _weights(path / "preranker.pt"), path / "preranker.pt")
    kstate = _weights(path / "ranker.pt")
    watch_state = {k.removeprefix("watch."): v for k, v in kstate.items() if k.startswith("watch.")}
    watch = WatchTimeDebiaser.from_state_dict(watch_state) if watch_state else None
    ranker = build_ranker(m["ranker"]["name"], spec, watch, **m["ranker"]["args"])
    _restore(ranker, kstate, path / "ranker.pt")
    tensors = _weights(path / "tensors.pt")
    if not isinstance(tensors, dict) or not {"item_vectors", "item_log_pop"} <= set(tensors):
        raise BundleError(f"{path / 'tensors.pt'}: needs item_vectors and item_log_pop")
    fusion = FormulaFusion(m["fusion"]["kind"], torch.tensor(m["fusion"]["log_weights"]),
                           beta=m["fusion"].get("beta", 0.01))
    try:
        ann = AnnIndex.load(path / "ann")
    except FunnelrecError as e:
        raise BundleError(f"{path / 'ann'}: {e}") from e
    for model in (retriever, preranker, ranker):
        model.eval()
    return CascadeParts(spec=spec, users=users, videos=videos, history_log=history, retriever=retriever,
                        retriever_config=rcfg, item_vectors=tensors["item_vectors"], ann=ann,
                        item_log_pop=tensors["item_log_pop"], preranker=preranker, ranker=ranker,
                        ranker_name=m["ranker"]["name"], ranker_args=m["ranker"]["args"], fusion=fusion,
                        sizes=FunnelSizes(**m["sizes"]), history_len=int(m["history_len"]), tasks=tuple(m["tasks"]),
                        figures=m.get("figures", {}))


def load_bundle(path: str | Path, runtime: str = "torch") -> Cascade:
    """The serving :class:`Cascade` of a bundle folder (see the module doc).

    Args:
        runtime: ``"torch"``, or ``"onnx"`` to rank and pre-rank through the bundle's ONNX graphs.
    """
    if runtime not in ("torch", "onnx"):
        raise ConfigError(f"bundle: runtime must be 'torch' or 'onnx', got {runtime!r}")
    path = Path(path)
    parts = load_parts(path)
    m = json.loads((path / _MANIFEST).read_text())
    meta = {"name": m.get("name"), "created": m.get("created"), "funnelrec": m.get("funnelrec"),
            "ranker": m["ranker"]["name"], "path": str(path)}
    cascade = parts.cascade(meta)
    return _use_onnx(cascade, path, m) if runtime == "onnx" else cascade


def _use_onnx(cascade: Cascade, path: Path, manifest: dict) -> Cascade:
    """Switch ``cascade`` to the bundle's ONNX graphs (checksums were verified by ``load_parts``)."""
    entry = manifest.get("onnx")
    if not isinstance(entry, dict) or not {"ranker", "preranker"} <= set(entry):
        raise BundleError(f"{path / _MANIFEST}: the bundle has no ONNX graphs (export it with onnx=True / "
                          f"--onnx)")
    files = {k: path / entry[k] for k in ("ranker", "preranker")}
    for f in files.values():
        if f.relative_to(path).as_posix() not in manifest["files"]:
            raise BundleError(f"{f}: not checksummed in the manifest")
    try:
        return cascade.use_onnx(files["ranker"], files["preranker"])
    except FunnelrecError as e:
        raise BundleError(str(e)) from e
