"""The ANN index of the funnel: inner-product search over item (or user) embeddings, on FAISS.

One class, :class:`AnnIndex`, over one of three FAISS indexes chosen by :class:`AnnConfig` ``kind``:

========  ==========================================================================================================
kind      FAISS index (inner product, the two-tower score)
========  ==========================================================================================================
flat      ``IndexIDMap2(IndexFlatIP)``: exact search, the reference
hnsw      ``IndexIDMap2(IndexHNSWFlat(D, M))``: graph search; ``ef_construction`` at build, ``ef_search`` per query
ivf       ``IndexIVFFlat(IndexFlatIP, D, nlist)``: k-means lists (``nlist`` = 4·√N by default), ``nprobe`` per query
========  ==========================================================================================================

From FAISS: the three index structures, their search, id selectors (``IDSelectorBatch`` / ``IDSelectorNot`` in
``SearchParameters``), ``write_index`` / ``read_index``. From the issue: the kinds, tombstones with a rebuild past a
threshold, filtered search by per-request exclusion (fetch k + |seen| and mask) and by an allowed set, the
checksummed save. Ours: everything else below.

* **IDs** are external non-negative int64 (an item's ``video_id``, a user's ``user_id``); -1 marks "no result".
* **Vectors are kept** (float32 [N, D], row-aligned with the ids) so that the index can be rebuilt and small
  allowed sets searched exactly.
* **Removal** marks tombstones (HNSW cannot delete): searches skip them with an ``IDSelectorNot`` over their ids,
  and when they pass ``rebuild_fraction`` of the stored rows the index is rebuilt from the live vectors (IVF
  re-trains its lists). Re-adding a removed id rebuilds first.
* **Filtered search** (:meth:`AnnIndex.search`): ``exclude`` = one id list per query (seen items): the search
  fetches ``k + max |seen|`` and masks, so an exact index gives exactly the exact filtered top k; ``allow`` = one
  id set for every query (available users): an ``IDSelectorBatch`` inside the search, or, for at most
  ``allow_exact_below`` live ids, an exact scan of their stored vectors (graph search degrades on tiny sets).
* **Save / load** (:meth:`AnnIndex.save`, :meth:`AnnIndex.load`): a folder with ``index.faiss``
  (``faiss.write_index``), ``vectors.npy``, ``ids.npy`` (no pickle) and ``manifest.json`` (format, config, D,
  counts, tombstones and the sha256 of each file); loading verifies every checksum.

Shapes: N stored vectors, D width, Q queries, k results per query.

Args of a search: ``queries [Q, D]`` float, ``k`` ≥ 1, ``exclude`` (Q id lists or None), ``allow`` (ids or None);
it returns ``(scores [Q, k] float32, ids [Q, k] int64)``, best first, ``-inf`` / ``-1`` where fewer than k
qualify.

Example:
    >>> import numpy as np
    >>> rng = np.random.default_rng(0)
    >>> items = rng.standard_normal((500, 8)).astype(np.float32)
    >>> items /= np.linalg.norm(items, axis=1, keepdims=True)  # unit vectors: each is its own best match
    >>> index = AnnIndex.build(items, ids=np.arange(1000, 1500), config=AnnConfig(kind="hnsw", ef_search=64))
    >>> scores, top = index.search(items[:2], k=3)
    >>> scores.shape, top[:, 0].tolist()
    ((2, 3), [1000, 1001])
    >>> _, top = index.search(items[:2], k=3, exclude=[[1000], None])
    >>> 1000 in top[0], int(top[1, 0])
    (False, 1001)
    >>> index.remove([1001]), len(index), index.tombstones.tolist()
    (1, 499, [1001])
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import faiss
import numpy as np

from funnelrec.errors import ConfigError, DataError
from funnelrec.retrieval.ann_filters import (check_ids, check_vectors, compact_topk, exact_topk, exclusion_mask,
                                             flatten_exclusions)
from funnelrec.utils.io import atomic_path, sha256_file

__all__ = ["AnnConfig", "AnnIndex", "KINDS", "FORMAT", "auto_nlist"]

KINDS = ("flat", "ivf", "hnsw")
#: The format tag of a saved index's manifest.
FORMAT = "funnelrec-ann-v1"
_FILES = ("index.faiss", "vectors.npy", "ids.npy")


def auto_nlist(n: int) -> int:
    """The default IVF list count for N vectors: 4·√N (the issue's choice), at most N // 39 (FAISS wants ≥ 39
    training points per list), at least 1."""
    return max(1, min(int(round(4 * math.sqrt(max(n, 1)))), n // 39))


@dataclass
class AnnConfig:
    """Which index and its parameters.

    Args:
        kind: ``"flat"`` (exact), ``"ivf"`` or ``"hnsw"``.
        hnsw_m: M, graph neighbours per node (HNSW).
        ef_construction: candidate list size while building (HNSW).
        ef_search: candidate list size while searching (HNSW); below the k fetched, recall drops.
        nlist: IVF lists; None = :func:`auto_nlist` of the vectors the index is first built (or rebuilt) on.
        nprobe: lists visited per query (IVF; capped at nlist).
        train_per_list: k-means training points per list, sampled from the vectors (IVF).
        seed: seed of the training sample and of k-means (IVF).
        rebuild_fraction: rebuild when tombstones exceed this share of the stored rows, in (0, 1].
        allow_exact_below: allowed sets with at most this many live ids are searched exactly (0 = never).
    """

    kind: str = "flat"
    hnsw_m: int = 32
    ef_construction: int = 120
    ef_search: int = 128
    nlist: int | None = None
    nprobe: int = 16
    train_per_list: int = 64
    seed: int = 0
    rebuild_fraction: float = 0.25
    allow_exact_below: int = 2048

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ConfigError(f"ann: kind must be one of {', '.join(KINDS)}, got {self.kind!r}")
        for name in ("hnsw_m", "ef_construction", "ef_search", "nprobe", "train_per_list"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
                raise ConfigError(f"ann: {name} must be an integer >= 1, got {value!r}")
        if self.nlist is not None and (isinstance(self.nlist, bool) or not isinstance(self.nlist, (int, np.integer))
                                       or self.nlist < 1):
            raise ConfigError(f"ann: nlist must be an integer >= 1 or None, got {self.nlist!r}")
        if not (isinstance(self.rebuild_fraction, (int, float)) and 0 < self.rebuild_fraction <= 1):
            raise ConfigError(f"ann: rebuild_fraction must be in (0, 1], got {self.rebuild_fraction!r}")
        if isinstance(self.allow_exact_below, bool) or not isinstance(self.allow_exact_below, (int, np.integer)) \
                or self.allow_exact_below < 0:
            raise ConfigError(f"ann: allow_exact_below must be an integer >= 0, got {self.allow_exact_below!r}")


_sha256 = sha256_file  # the checksum recorded in the manifest


class AnnIndex:
    """Inner-product ANN index with external ids, tombstones, filtered search and checksummed save (module doc).

    Args:
        dim: D, the vector width.
        config: :class:`AnnConfig` (default: exact).

    Build one with :meth:`build` (vectors + ids) or start empty and :meth:`add`.
    """

    def __init__(self, dim: int, config: AnnConfig | None = None):
        if isinstance(dim, bool) or not isinstance(dim, (int, np.integer)) or dim < 1:
            raise ConfigError(f"ann: dim must be an integer >= 1, got {dim!r}")
        self.dim = int(dim)
        self.config = config if config is not None else AnnConfig()
        if not isinstance(self.config, AnnConfig):
            raise ConfigError(f"ann: config must be an AnnConfig, got {type(self.config).__name__}")
        self._vectors = np.zeros((0, self.dim), np.float32)  # [N, D] stored rows (tombstoned ones too)
        self._ids = np.zeros(0, np.int64)                      # [N] their ids
        self._dead = np.zeros(0, bool)                         # [N] tombstone flags
        self._num_dead = 0                                     # their count (searches must not pay O(N) for it)
        self._order: tuple | None = None                       # (argsort of _ids, sorted _ids): id -> row
        self._index = None                                     # the FAISS index; None while nothing was added
        self._dead_sel = None                                  # cached IDSelectorNot over the tombstones
        self._plain: tuple | None = None                       # cached (key, SearchParameters) without selector
        self.nlist: int | None = None                          # IVF lists in use

    # ------------------------------------------------------------------ construction
    @classmethod
    def build(cls, vectors, ids=None, config: AnnConfig | None = None) -> "AnnIndex":
        """A new index over ``vectors [N, D]`` with ``ids [N]`` (default 0 .. N-1)."""
        vectors = np.asarray(vectors)
        if vectors.ndim != 2:
            raise DataError(f"vectors must be [N, D], got shape {list(vectors.shape)}", column="vectors")
        index = cls(vectors.shape[1], config)
        index.add(vectors, ids)
        return index

    def _new_faiss(self, n: int):
        c, d = self.config, self.dim
        if c.kind == "flat":
            return faiss.IndexIDMap2(faiss.IndexFlatIP(d))
        if c.kind == "hnsw":
            inner = faiss.IndexHNSWFlat(d, int(c.hnsw_m), faiss.METRIC_INNER_PRODUCT)
            inner.hnsw.efConstruction = int(c.ef_construction)
            inner.hnsw.efSearch = int(c.ef_search)
            return faiss.IndexIDMap2(inner)
        nlist = int(c.nlist) if c.nlist is not None else auto_nlist(n)
        if n < nlist:
            raise DataError(f"ivf: nlist={nlist} needs at least {nlist} vectors to train on, got {n}",
                            column="vectors")
        self.nlist = nlist
        ivf = faiss.IndexIVFFlat(faiss.IndexFlatIP(d), d, nlist, faiss.METRIC_INNER_PRODUCT)
        ivf.cp.seed = int(c.seed)
        ivf.nprobe = min(int(c.nprobe), self.nlist)
        return ivf

    def _faiss_add(self, vectors: np.ndarray, ids: np.ndarray) -> None:
        if self._index is None:
            self._index = self._new_faiss(len(vectors))
            if self.config.kind == "ivf":
                n_train = min(len(vectors), self.config.train_per_list * self.nlist)
                rng = np.random.default_rng(self.config.seed)
                sample = vectors if n_train == len(vectors) else vectors[np.sort(rng.choice(len(vectors), n_train,
                                                                                            replace=False))]
                self._index.train(np.ascontiguousarray(sample))
        self._index.add_with_ids(np.ascontiguousarray(vectors), np.ascontiguousarray(ids))

    def _rows(self, ids: np.ndarray) -> np.ndarray:
        """Storage rows of ``ids`` (-1 where unknown)."""
        if len(self._ids) == 0:
            return np.full(ids.shape, -1, np.int64)
        if self._order is None:
            order = np.argsort(self._ids, kind="stable")
            self._order = (order, self._ids[order])
        order, sorted_ids = self._order
        at = np.minimum(np.searchsorted(sorted_ids, ids), len(sorted_ids) - 1)
        return np.where(sorted_ids[at] == ids, order[at], -1)

    def _live_rows(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(rows, live)``: storage rows of ``ids`` (-1 where unknown) and whether each is a live id."""
        rows = self._rows(ids)
        live = rows >= 0
        live[live] = ~self._dead[rows[live]]
        return rows, live

    def add(self, vectors, ids=None) -> None:
        """Add ``vectors [n, D]`` with new ``ids [n]`` (default: continuing after the largest id).

        Raises:
            DataError: a wrong shape or dimension, non-finite values, negative, repeated or already present ids.
        """
        vectors = check_vectors(vectors, self.dim, "vectors")
        n = len(vectors)
        if ids is None:
            start = int(self._ids.max()) + 1 if len(self._ids) else 0
            ids = np.arange(start, start + n, dtype=np.int64)
        ids = check_ids(ids, n)
        if n == 0:
            return
        uniq, counts = np.unique(ids, return_counts=True)
        if (counts > 1).any():
            raise DataError(f"id {int(uniq[counts > 1][0])} appears twice in one add", column="ids")
        rows, live = self._live_rows(ids)
        if live.any():
            raise DataError(f"id {int(ids[live][0])} is already in the index (remove it first to replace its "
                            "vector)", column="ids")
        if (rows >= 0).any():  # a removed id comes back: drop its old row first
            self.rebuild()
        self._faiss_add(vectors, ids)
        self._vectors = np.concatenate([self._vectors, vectors]) if len(self._vectors) else vectors.copy()
        self._ids = np.concatenate([self._ids, ids])
        self._dead = np.concatenate([self._dead, np.zeros(n, bool)])
        self._order = None

    def remove(self, ids) -> int:
        """Tombstone ``ids`` (each must be live); rebuild when tombstones pass ``rebuild_fraction``.

        Returns:
            The number of ids removed.

        Raises:
            DataError: an id not in the index (or already removed), named in the message.
        """
        ids = check_ids(ids)
        rows, live = self._live_rows(ids)
        if not live.all():
            raise DataError(f"unknown id {int(ids[~live][0])}: not in the index (or already removed)", column="ids")
        self._dead[rows] = True
        self._num_dead, self._dead_sel = int(self._dead.sum()), None
        if self._num_dead > self.config.rebuild_fraction * len(self._dead):
            self.rebuild()
        return int(len(np.unique(ids)))

    def rebuild(self) -> None:
        """Drop the tombstoned rows and rebuild the FAISS index from the live vectors (IVF re-trains)."""
        live = ~self._dead
        self._vectors, self._ids = self._vectors[live], self._ids[live]
        self._dead, self._num_dead = np.zeros(len(self._ids), bool), 0
        self._order, self._index, self._dead_sel = None, None, None
        if len(self._ids):
            self._faiss_add(self._vectors, self._ids)

    # ------------------------------------------------------------------ state
    def __len__(self) -> int:
        """Live (not removed) vectors."""
        return len(self._ids) - self._num_dead

    @property
    def num_stored(self) -> int:
        """Rows held by the FAISS index, tombstones included."""
        return int(len(self._ids))

    @property
    def tombstones(self) -> np.ndarray:
        """Removed ids not yet dropped by a rebuild."""
        return self._ids[self._dead].copy()

    def ids(self) -> np.ndarray:
        """The live ids, in insertion order."""
        return self._ids[~self._dead].copy()

    def get_vectors(self, ids) -> np.ndarray:
        """[n, D] stored vectors of live ``ids``; ``DataError`` naming an unknown id."""
        ids = check_ids(ids)
        rows, live = self._live_rows(ids)
        if not live.all():
            raise DataError(f"unknown id {int(ids[~live][0])}: not in the index", column="ids")
        return self._vectors[rows].copy()

    def index_bytes(self) -> int:
        """Size of the FAISS index serialised (``faiss.serialize_index``); 0 while empty."""
        return 0 if self._index is None else int(faiss.serialize_index(self._index).size)

    def set_search_params(self, ef_search: int | None = None, nprobe: int | None = None) -> None:
        """Change ``ef_search`` (HNSW) / ``nprobe`` (IVF) of later searches (kept in the config and on save)."""
        changes = {k: v for k, v in (("ef_search", ef_search), ("nprobe", nprobe)) if v is not None}
        self.config = dataclasses.replace(self.config, **changes)

    # ------------------------------------------------------------------ search
    def _params(self, sel):
        c = self.config
        if sel is None:  # the common case: one parameter object per setting, not one per query
            key = (c.kind, int(c.ef_search), int(c.nprobe), self.nlist)
            if self._plain is None or self._plain[0] != key:
                self._plain = (key, self._make_params(None))
            return self._plain[1]
        return self._make_params(sel)

    def _make_params(self, sel):
        c = self.config
        extra = {} if sel is None else {"sel": sel}
        if c.kind == "hnsw":
            return faiss.SearchParametersHNSW(efSearch=int(c.ef_search), **extra)
        if c.kind == "ivf":
            return faiss.SearchParametersIVF(nprobe=min(int(c.nprobe), self.nlist or 1), **extra)
        return faiss.SearchParameters(**extra) if extra else None

    def _tombstone_selector(self):
        if self._dead_sel is None and self._num_dead:
            batch = faiss.IDSelectorBatch(np.ascontiguousarray(self._ids[self._dead]))
            self._dead_sel = (faiss.IDSelectorNot(batch), batch)  # keep the inner selector alive
        return None if self._dead_sel is None else self._dead_sel[0]

    def search(self, queries, k: int, exclude=None, allow=None) -> tuple[np.ndarray, np.ndarray]:
        """Top-``k`` inner-product search, optionally filtered.

        Args:
            queries: [Q, D] (or one [D] vector).
            k: results per query.
            exclude: None, or Q id lists (None / 1-D ints; negative entries are padding): ids never returned to
                that query. Fetches ``k + longest list`` and masks, so the flat index gives the exact filtered top k.
            allow: None, or ids: only these are returned (for every query); ids not in the index are ignored.

        Returns:
            ``(scores [Q, k] float32, ids [Q, k] int64)``, best first; ``-inf`` / ``-1`` where fewer qualify.

        Raises:
            ConfigError: ``k`` not a positive integer.
            DataError: an empty index, queries of the wrong dimension or non-finite, bad exclusion/allow lists.
        """
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
            raise ConfigError(f"ann: k must be an integer >= 1, got {k!r}")
        k = int(k)
        if len(self) == 0:
            raise DataError("search on an empty index (no live vectors): add vectors first", column="ids")
        q = check_vectors(queries, self.dim, "queries")
        excl_row, excl_id, longest = flatten_exclusions(exclude, len(q))
        fetch = k + longest
        if allow is not None:
            allow_ids = np.unique(check_ids(allow, what="allow"))
            rows, live = self._live_rows(allow_ids)
            rows = np.sort(rows[live])
            if len(rows) <= self.config.allow_exact_below:
                scores, ids = exact_topk(q, self._vectors[rows], self._ids[rows], fetch)
            else:
                batch = faiss.IDSelectorBatch(np.ascontiguousarray(self._ids[rows]))
                scores, ids = self._faiss_search(q, min(fetch, len(rows)), batch)
        else:
            scores, ids = self._faiss_search(q, min(fetch, len(self)), self._tombstone_selector())
        if longest == 0 and ids.shape[1] == k:
            return scores, ids
        drop = exclusion_mask(self._rows(ids), excl_row, self._rows(excl_id), max(1, len(self._ids)))
        return compact_topk(scores, ids, drop, k)

    def _faiss_search(self, q: np.ndarray, k: int, sel) -> tuple[np.ndarray, np.ndarray]:
        scores, ids = self._index.search(q, k, params=self._params(sel))
        missing = ids < 0
        if missing.any():
            scores[missing] = -np.inf
        return scores, ids

    # ------------------------------------------------------------------ save / load
    def save(self, path: str | os.PathLike) -> Path:
        """Write the index to the folder ``path`` (replaced atomically); returns it. See the module doc."""
        folder = Path(path)
        with atomic_path(folder) as tmp:
            tmp.mkdir()
            files = {}
            if self._index is not None:
                faiss.write_index(self._index, str(tmp / "index.faiss"))
                files["index.faiss"] = None
            np.save(tmp / "vectors.npy", self._vectors, allow_pickle=False)
            np.save(tmp / "ids.npy", self._ids, allow_pickle=False)
            files.update({"vectors.npy": None, "ids.npy": None})
            manifest = {
                "format": FORMAT, "config": dataclasses.asdict(self.config), "dim": self.dim,
                "stored": self.num_stored, "live": len(self), "nlist": self.nlist,
                "tombstones": [int(x) for x in self.tombstones],
                "sha256": {name: _sha256(tmp / name) for name in files},
            }
            (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n", encoding="utf-8")
        return folder

    @classmethod
    def load(cls, path: str | os.PathLike) -> "AnnIndex":
        """Read a folder written by :meth:`save`, verifying every file's sha256.

        Raises:
            DataError: a missing folder, manifest or file, a checksum mismatch (naming the file), or contents that
                disagree with the manifest.
        """
        folder = Path(path)
        mpath = folder / "manifest.json"
        if not mpath.is_file():
            raise DataError("no manifest.json: not a saved ANN index folder", path=folder)
        try:
            manifest = json.loads(mpath.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise DataError(f"not valid JSON ({err})", path=mpath) from None
        found = manifest.get("format") if isinstance(manifest, dict) else type(manifest).__name__
        if found != FORMAT:
            raise DataError(f"expected format {FORMAT!r}, got {found!r}", path=mpath)
        sums = manifest.get("sha256") or {}
        for name in sums:
            if name not in _FILES:
                raise DataError(f"unexpected file {name!r} in the manifest", path=mpath)
            fpath = folder / name
            if not fpath.is_file():
                raise DataError("missing file listed in the manifest", path=fpath)
            got = _sha256(fpath)
            if got != sums[name]:
                raise DataError(f"checksum mismatch: sha256 {got[:12]}… but the manifest says {str(sums[name])[:12]}… "
                                "(the file changed after it was saved)", path=fpath)
        for name in ("vectors.npy", "ids.npy"):
            if name not in sums:
                raise DataError(f"the manifest lists no checksum for {name}", path=mpath)
        try:
            config = AnnConfig(**manifest["config"])
            index = cls(int(manifest["dim"]), config)
        except (KeyError, TypeError, ConfigError) as err:
            raise DataError(f"bad config or dim in the manifest ({err})", path=mpath) from None
        vectors = np.load(folder / "vectors.npy", allow_pickle=False)
        ids = np.load(folder / "ids.npy", allow_pickle=False)
        if vectors.shape != (len(ids), index.dim) or len(ids) != manifest.get("stored"):
            raise DataError(f"vectors {list(vectors.shape)} and ids [{len(ids)}] disagree with the manifest "
                            f"(stored={manifest.get('stored')}, dim={index.dim})", path=folder)
        index._vectors, index._ids = vectors.astype(np.float32, copy=False), ids.astype(np.int64, copy=False)
        index._dead = np.isin(index._ids, np.asarray(manifest.get("tombstones", []), np.int64))
        index._num_dead = int(index._dead.sum())
        index.nlist = manifest.get("nlist")
        if "index.faiss" in sums:
            index._index = faiss.read_index(str(folder / "index.faiss"))
            if index._index.d != index.dim or index._index.ntotal != len(ids):
                raise DataError(f"the FAISS index holds {index._index.ntotal} vectors of width {index._index.d}, "
                                f"the manifest {len(ids)} of width {index.dim}", path=folder / "index.faiss")
        elif len(ids):
            raise DataError("the manifest lists stored vectors but no index.faiss", path=mpath)
        return index
