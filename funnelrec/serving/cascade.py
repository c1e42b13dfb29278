"""The cascade: retrieval → pre-ranking → ranking → fusion → re-ranking, batched over requests.

For B requests (user id, time, tab, hour) the cascade

1. slices each user's history (logged + real-time feedback, :class:`~funnelrec.serving.history.LiveTimelines`);
2. **retrieval** — two channels, merged and de-duplicated in order: the two-tower user vector searched in the ANN
   index (``FunnelSizes.retrieve`` items, the user's history window excluded) and the most popular unseen items
   (``popular``); the merge keeps the ANN's top ``retrieve − popular``, then the popular items, then the rest of
   the ANN list, up to ``retrieve`` distinct items;
3. **pre-ranking** — :class:`~funnelrec.serving.prerank.PreRanker` over the cached vectors keeps ``prerank``;
4. **ranking** — the multi-task ranker predicts the T task probabilities and watch time of each;
5. **fusion** — a ``Fusion`` (DESIGN §5) turns them into one score; the top ``pool`` form the re-ranking pool;
6. **re-ranking** — a ``Reranker`` (``funnelrec.rerank``: greedy by default, or generators + an evaluator such
   as FlashEvaluator) picks the served list from the pool.

Every stage builds its ``RequestBatch`` through :class:`~funnelrec.data.feature_tables.FeatureTables` — the
featurisation ``RequestDataset`` uses for training — and the result carries every stage's candidates, scores,
wall time and size. A user id outside the user table is a **cold start**: the unknown-user feature row (all
"unknown" indices), so the two-tower vector comes from the history alone (empty at first) and the popularity
channel carries the retrieval.

Default funnel (``FunnelSizes()``): 1,000 → 200 → rank → fuse → top 60 → 10.

Example:
    >>> cascade = load_bundle("bundles/demo")                                   # doctest: +SKIP
    >>> out = cascade.recommend([7, 8], time_ms=[t, t], tab=[1, 1], hour=[20, 20])  # doctest: +SKIP
    >>> out.items.shape, out.sizes                                              # doctest: +SKIP
    ((2, 10), {'retrieval': 1000, 'prerank': 200, 'ranking': 200, 'fusion': 60, 'rerank': 10})
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

from funnelrec.data.batch import RequestBatch
from funnelrec.data.feature_tables import FeatureTables
from funnelrec.errors import ConfigError, DataError
from funnelrec.ranking.watch_time import watch_seconds
from funnelrec.rerank import GreedyReranker, RerankPool
from funnelrec.retrieval.ann import AnnIndex
from funnelrec.serving.history import LiveTimelines
from funnelrec.serving.prerank import PreRanker

__all__ = ["FunnelSizes", "CascadeResult", "Cascade", "complete_lists", "fusion_inputs", "dedupe_rows", "STAGES"]

STAGES = ("retrieval", "prerank", "ranking", "fusion", "rerank")
#: Squash of predicted watch seconds into (0, 1) for the fusion inputs (as ``SessionEnvConfig.watch_scale_s``).
WATCH_SCALE_S = 30.0


@dataclass
class FunnelSizes:
    """Candidates kept by each stage.

    Args:
        retrieve: items kept after merging the retrieval channels (the ANN channel asks for this many).
        popular: items of the popularity channel.
        prerank: items the pre-ranker keeps for the ranker.
        pool: items of the re-ranking pool (top by fused score).
        serve: default list length served.
    """

    retrieve: int = 1000
    popular: int = 200
    prerank: int = 200
    pool: int = 60
    serve: int = 10

    def __post_init__(self) -> None:
        for name in ("retrieve", "popular", "prerank", "pool", "serve"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ConfigError(f"funnel sizes: {name} must be an integer >= 1, got {v!r}")
        if not self.retrieve >= self.prerank >= self.pool >= self.serve:
            raise ConfigError(f"funnel sizes must shrink: retrieve {self.retrieve} >= prerank {self.prerank} >= "
                              f"pool {self.pool} >= serve {self.serve}")


@dataclass
class CascadeResult:
    """What the cascade did for B requests (item *indices*: ``video_id + 1``; 0 = padding).

    Attributes:
        items: [B, L] the served lists (video ids; -1 at padding when fewer were available).
        stage_items: stage → [B, ·] item indices kept by the stage (retrieval, prerank, fusion, rerank).
        scores: per served item, stage → [B, L] its score at that stage (retrieval cosine or NaN for the
            popularity channel, pre-rank score, ranker's click probability ``p_click``, predicted watch seconds,
            fused score).
        pxtr: [B, L, T] the ranker's task probabilities of the served items.
        timings_ms: stage → wall milliseconds for the whole batch.
        sizes: stage → candidates kept (max over the batch).
        cold_start: [B] True where the user has no history (logged or real-time); unknown users start so.
        detail: only with ``recommend(..., detail=True)`` (None otherwise): every kept candidate's scores, for
            inspection (the funnel explorer). C = retrieved, P = pre-ranked, K = pool, L = served, N = history:

            * ``retrieval`` [B, C] cosine of ``stage_items["retrieval"]`` (NaN: popularity channel or padding);
            * ``prerank_all`` [B, C] pre-rank score of every retrieved item (-inf at padding);
            * ``prerank_pos`` [B, P] positions in the retrieval list of ``stage_items["prerank"]`` (pre-rank
              score order);
            * ``prerank`` [B, P], ``pxtr`` [B, P, T], ``watch_s`` [B, P], ``fusion`` [B, P] (-inf at padding):
              the pre-ranked items' pre-rank score, ranker task probabilities, predicted watch seconds and fused
              score (the ranking and fusion stages score exactly these items);
            * ``pool_pos`` [B, K], ``final_pos`` [B, L]: positions among the pre-ranked items of
              ``stage_items["fusion"]`` and ``stage_items["rerank"]``;
            * ``hist_items`` [B, N], ``hist_actions`` [B, N, A], ``hist_gap_s`` [B, N], ``hist_len`` [B]: the
              history every stage read (left-padded, most recent last).
    """

    items: np.ndarray
    stage_items: dict[str, Tensor]
    scores: dict[str, np.ndarray]
    pxtr: np.ndarray
    timings_ms: dict[str, float]
    sizes: dict[str, int]
    cold_start: np.ndarray
    tasks: tuple[str, ...] = field(default_factory=tuple)
    detail: dict[str, Tensor] | None = None


def complete_lists(chosen: Tensor, pool_score: Tensor, pool_mask: Tensor, count: int) -> Tensor:
    """[B, count] pool positions: the re-ranker's list (``chosen`` [B, L], in order) first, then the rest of the
    pool by fused score — so any ``count`` can be served from a re-ranker of a fixed list length L."""
    b, p = pool_score.shape
    key = pool_score.masked_fill(~pool_mask, float("-inf")).clone()
    top = torch.finfo(key.dtype).max
    rank = torch.arange(chosen.shape[1], dtype=key.dtype).expand(b, -1)
    key.scatter_(1, chosen, top - rank * (top / (2 * p + 2)))  # chosen first, in the re-ranker's order
    return key.topk(min(count, p), dim=1).indices


def dedupe_rows(items: Tensor, valid: Tensor, keep: int) -> tuple[Tensor, Tensor]:
    """The first ``keep`` distinct valid items of every row, in their order of appearance.

    Args:
        items: [B, C] item indices (channels concatenated in priority order).
        valid: [B, C] bool.
    Returns:
        ([B, keep] items, 0 at padding; [B, keep] position of each in ``items``, -1 at padding).
    """
    b, c = items.shape
    big = torch.iinfo(torch.int64).max
    key = torch.where(valid, items, torch.full_like(items, big))
    order = torch.sort(key, dim=1, stable=True).indices  # equal items: the earliest position first
    sorted_key = key.gather(1, order)
    first = torch.ones_like(valid)
    first[:, 1:] = sorted_key[:, 1:] != sorted_key[:, :-1]
    is_first = torch.zeros_like(valid).scatter(1, order, first) & valid
    pos = torch.arange(c).expand(b, c)
    rank_key = torch.where(is_first, pos, torch.full_like(pos, big))
    take = rank_key.topk(min(keep, c), dim=1, largest=False)
    ok = take.values < big
    chosen = items.gather(1, take.indices.clamp(max=c - 1))
    out_items = torch.where(ok, chosen, torch.zeros_like(chosen))
    out_pos = torch.where(ok, take.indices, torch.full_like(take.indices, -1))
    if out_items.shape[1] < keep:
        pad = keep - out_items.shape[1]
        out_items = torch.cat([out_items, out_items.new_zeros(b, pad)], 1)
        out_pos = torch.cat([out_pos, out_pos.new_full((b, pad), -1)], 1)
    return out_items, out_pos


def fusion_inputs(pxtr: Tensor, watch_s: Tensor, num_tasks: int = 6) -> Tensor:
    """[B, M, 7] the fusion inputs: the first six task probabilities and the squashed watch time
    ``s / (s + 30)`` (the input order of ``funnelrec.fusion.env.TASKS``)."""
    return torch.cat([pxtr[..., :num_tasks], (watch_s / (watch_s + WATCH_SCALE_S)).unsqueeze(-1)], -1)


class Cascade:
    """The serving funnel (see the module doc).

    Args:
        tables: the user and item feature tables.
        history: the users' histories (logged + real-time).
        retriever: a two-tower retriever (``user_vectors(batch)``).
        item_vectors: [I, D] cached item vectors by item index (row 0 = padding).
        ann: the ANN index over ``item_vectors`` (ids = item indices).
        item_log_pop: [I] log(1 + training positives) by item index.
        preranker: the pre-ranker.
        ranker: a multi-task ranker (``predict`` → [B, M, T], ``predict_watch_time`` → [B, M]).
        fusion: a ``Fusion`` (``score(pxtr [B, M, 7], user_state [B, S])``).
        reranker: a ``funnelrec.rerank.Reranker`` (``select(batch, RerankPool) -> RerankOutput``; default: the
            greedy re-ranker, by fused score); its list leads the served list, the pool's next items by fused
            score fill any remaining slots.
        item_duration_s: [I] duration of every item index in seconds (the ranker's watch-time head reads it).
        sizes: the funnel sizes.
        history_len: N, the history length every stage reads.
        tasks: the ranker's task names (its output order).
        metadata: free-form description (bundle name, versions) for ``describe``.
        videos: the video table (``video_id`` and feature columns) the item features come from, kept for
            inspection (the funnel explorer shows duration, tag, author); optional.
    """

    def __init__(self, tables: FeatureTables, history: LiveTimelines, retriever, item_vectors: Tensor,
                 ann: AnnIndex, item_log_pop: Tensor, preranker: PreRanker, ranker, fusion, reranker=None,
                 item_duration_s: Tensor | None = None, sizes: FunnelSizes | None = None, history_len: int = 50,
                 tasks: tuple[str, ...] = (), metadata: dict | None = None, videos=None):
        self.tables = tables
        self.history = history
        self.retriever = retriever.eval()
        self.item_vectors = item_vectors
        self.ann = ann
        self.item_log_pop = item_log_pop
        self.preranker = preranker.eval()
        self.ranker = ranker.eval()
        self.fusion = fusion
        self.sizes = sizes or FunnelSizes()
        self.reranker = reranker or GreedyReranker(list_len=self.sizes.serve)
        self.history_len = int(history_len)
        self.tasks = tuple(tasks)
        self.metadata = dict(metadata or {})
        self.videos = videos
        num_items = item_vectors.shape[0]
        if item_log_pop.shape[0] != num_items:
            raise ConfigError(f"item_log_pop has {item_log_pop.shape[0]} rows, item_vectors {num_items}")
        # item index -> row of the item feature table (unknown row for indices without a video)
        video_ids = np.arange(num_items, dtype=np.int64) - 1
        rows, known = tables.item_rows(np.maximum(video_ids, 0), allow_unknown=True)
        known[0] = False
        self.item_row = torch.from_numpy(np.where(known, rows, tables.unknown_item_row))
        self.item_known = torch.from_numpy(known)
        self.item_duration_s = (item_duration_s if item_duration_s is not None
                                else torch.zeros(num_items, dtype=torch.float32))
        pop = item_log_pop.masked_fill(~self.item_known, float("-inf"))
        self.popular_items = pop.argsort(descending=True)[: self.sizes.popular + self.history_len]
        self.popular_items = self.popular_items[torch.isfinite(pop[self.popular_items])]
        self.onnx = None  # OnnxStages while ranking / pre-ranking run through onnxruntime (use_onnx)

    def use_onnx(self, ranker=None, preranker=None, threads: int | None = None) -> "Cascade":
        """Run the ranker's dense part and / or the pre-ranker through onnxruntime sessions.

        Args:
            ranker: the ranker's exported graph (``funnelrec.serving.onnx_export.export_ranker``: bytes or a
                file), or None to keep ranking in PyTorch.
            preranker: the pre-ranker's graph (``export_preranker``), or None.
            threads: onnxruntime intra-op threads (default: torch's).
        Both None switches back to PyTorch. Returns the cascade.
        """
        from funnelrec.serving.onnx_export import OnnxStages

        if ranker is None and preranker is None:
            self.onnx = None
            self.metadata.pop("runtime", None)
        else:
            self.onnx = OnnxStages(self.ranker, self.preranker, ranker, preranker, threads)
            self.metadata["runtime"] = self.onnx.describe()
        return self

    # ------------------------------------------------------------------ batches
    @property
    def num_items(self) -> int:
        return int(self.item_vectors.shape[0])

    def known_user(self, user_id: int) -> bool:
        return bool(self.tables.user_rows([user_id], allow_unknown=True)[1][0])

    def known_item(self, video_id: int) -> bool:
        idx = int(video_id) + 1
        return 0 < idx < self.num_items and bool(self.item_known[idx])

    def request_batch(self, user_ids, time_ms, tab, hour, cand_items: Tensor, cand_mask: Tensor,
                      history=None) -> RequestBatch:
        """The ``RequestBatch`` of B requests over candidates ``cand_items`` [B, M] (item indices), built
        through the feature tables (unknown users → the unknown row; position 0 = the top slot)."""
        user_ids = np.asarray(user_ids, dtype=np.int64).reshape(-1).copy()  # callers' arrays may be read-only
        b = len(user_ids)
        urow, _ = self.tables.user_rows(user_ids, allow_unknown=True)
        user_sparse, user_dense = self.tables.user_features(torch.from_numpy(urow))
        hist = history if history is not None else self.history.history(user_ids, time_ms, self.history_len)
        cand_sparse, cand_dense = self.tables.item_features(self.item_row[cand_items])
        return RequestBatch(
            user_id=torch.from_numpy(user_ids), request_time_ms=torch.tensor(np.asarray(time_ms, np.int64)),
            user_sparse=user_sparse, user_dense=user_dense, hist_items=hist.items, hist_actions=hist.actions,
            hist_gap_s=hist.gap_s, hist_len=hist.length, cand_items=cand_items, cand_mask=cand_mask,
            cand_sparse=cand_sparse, cand_dense=cand_dense, tab=torch.tensor(np.asarray(tab, np.int64)),
            hour=torch.tensor(np.asarray(hour, np.int64)), position=torch.zeros_like(cand_items),
            duration_s=self.item_duration_s[cand_items] * cand_mask, labels=None, watch_time_s=None,
            is_rand=None)

    # ------------------------------------------------------------------ stages
    def _retrieve(self, user_vec: Tensor, hist_items: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """([B, C] merged items, [B, C] valid, [B, C] retrieval score: cosine, NaN for popularity)."""
        s = self.sizes
        b = user_vec.shape[0]
        seen = torch.where(hist_items > 0, hist_items, -1).numpy()  # [B, S], -1 = padding (item 0 is padding)
        k = min(s.retrieve, len(self.ann))
        sc, ids = self.ann.search(user_vec.numpy().astype(np.float32), k, exclude=seen)
        ann_items = torch.from_numpy(np.asarray(ids, dtype=np.int64))
        ann_valid = ann_items > 0
        ann_score = torch.from_numpy(np.asarray(sc, dtype=np.float32))
        pop = self.popular_items.expand(b, -1)
        pop_valid = ~(pop.unsqueeze(-1) == hist_items.unsqueeze(1)).any(-1)
        pop_rank = pop_valid.long().cumsum(1)
        pop_valid &= pop_rank <= s.popular
        # priority: the ANN's top (retrieve − popular), then the popular items, then the rest of the ANN list
        head = max(0, min(s.retrieve - s.popular, ann_items.shape[1]))
        nan = torch.full(pop.shape, float("nan"))
        items = torch.cat([ann_items[:, :head].clamp(min=0), pop, ann_items[:, head:].clamp(min=0)], 1)
        valid = torch.cat([ann_valid[:, :head], pop_valid, ann_valid[:, head:]], 1)
        score = torch.cat([ann_score[:, :head], nan, ann_score[:, head:]], 1)
        merged, pos = dedupe_rows(items, valid, s.retrieve)
        return merged, pos >= 0, score.gather(1, pos.clamp(min=0)).masked_fill(pos < 0, float("nan"))

    def retrieve(self, user_ids, time_ms, tab, hour, hist) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """The retrieval stage: ([B, D] user vectors, [B, C] merged items, [B, C] valid, [B, C] scores)."""
        empty = torch.zeros(len(user_ids), 1, dtype=torch.int64)
        batch0 = self.request_batch(user_ids, time_ms, tab, hour, empty, empty.bool(), history=hist)
        user_vec = self.retriever.user_vectors(batch0)
        return (user_vec, *self._retrieve(user_vec, hist.items))

    def rank(self, user_ids, time_ms, tab, hour, cand: Tensor, cand_mask: Tensor, hist) -> tuple[Tensor, Tensor]:
        """The ranking stage on candidates [B, M]: ([B, M, T] task probabilities, [B, M] watch seconds)."""
        batch = self.request_batch(user_ids, time_ms, tab, hour, cand, cand_mask, history=hist)
        # one forward for the task heads and the watch head
        out = self.ranker(batch) if self.onnx is None else self.onnx.rank(batch)
        return torch.sigmoid(out["logits"]), watch_seconds(out["watch"], batch.duration_s, self.ranker.watch)

    def fuse(self, pxtr: Tensor, watch: Tensor, cand_mask: Tensor) -> Tensor:
        """The fusion stage: [B, M] fused scores (-inf at padding)."""
        fused = self.fusion.score(fusion_inputs(pxtr, watch), torch.zeros(pxtr.shape[0], 1))
        return fused.masked_fill(~cand_mask, float("-inf"))

    @torch.inference_mode()
    def recommend(self, user_ids, time_ms, tab, hour, count: int | None = None,
                  detail: bool = False) -> CascadeResult:
        """Serve B requests.

        Args:
            user_ids: [B] raw user ids (unknown ids are cold starts).
            time_ms: [B] request times (histories hold only earlier events).
            tab: [B] KuaiRand tabs; hour: [B] hours of day.
            count: list length (default ``sizes.serve``; at most ``sizes.pool``).
            detail: also return every kept candidate's scores at every stage (``CascadeResult.detail``); the
                tensors are the ones the stages computed anyway, so this costs nothing but memory.
        """
        count = self.sizes.serve if count is None else int(count)
        if not 1 <= count <= self.sizes.pool:
            raise DataError(f"count must be in [1, {self.sizes.pool}] (the re-ranking pool), got {count}",
                            column="count")
        user_ids = np.asarray(user_ids, dtype=np.int64).reshape(-1)
        time_ms = np.asarray(time_ms, dtype=np.int64).reshape(-1)
        b = len(user_ids)
        if b == 0 or len(time_ms) != b or len(np.asarray(tab).reshape(-1)) != b \
                or len(np.asarray(hour).reshape(-1)) != b:
            raise DataError(f"need B >= 1 requests with one time, tab and hour each; got {b} users, "
                            f"{len(time_ms)} times", column="user_id")
        timings: dict[str, float] = {}
        stage_items: dict[str, Tensor] = {}
        t0 = time.perf_counter()
        hist = self.history.history(user_ids, time_ms, self.history_len)
        cold = hist.length.numpy() == 0  # nothing known of the user's behaviour (the ServingBackend contract)

        # retrieval
        user_vec, retrieved, valid, retrieval_score = self.retrieve(user_ids, time_ms, tab, hour, hist)
        stage_items["retrieval"] = retrieved
        t1 = time.perf_counter()
        timings["retrieval"] = (t1 - t0) * 1e3

        # pre-ranking
        scorer = self.preranker.score if self.onnx is None else self.onnx.prerank_score
        pre = scorer(user_vec, self.item_vectors[retrieved], self.item_log_pop[retrieved])
        pre = pre.masked_fill(~valid, float("-inf"))
        keep = pre.topk(min(self.sizes.prerank, pre.shape[1]), dim=1).indices
        cand = retrieved.gather(1, keep)
        cand_mask = valid.gather(1, keep)
        cand = cand * cand_mask
        pre_score, ret_score = pre.gather(1, keep), retrieval_score.gather(1, keep)
        stage_items["prerank"] = cand
        t2 = time.perf_counter()
        timings["prerank"] = (t2 - t1) * 1e3

        # ranking
        pxtr, watch = self.rank(user_ids, time_ms, tab, hour, cand, cand_mask, hist)
        t3 = time.perf_counter()
        timings["ranking"] = (t3 - t2) * 1e3

        # fusion
        fused = self.fuse(pxtr, watch, cand_mask)
        pool_pos = fused.topk(min(self.sizes.pool, fused.shape[1]), dim=1).indices
        pool = cand.gather(1, pool_pos)
        pool_mask = cand_mask.gather(1, pool_pos)
        stage_items["fusion"] = pool * pool_mask
        t4 = time.perf_counter()
        timings["fusion"] = (t4 - t3) * 1e3

        # re-ranking
        pool_batch = self.request_batch(user_ids, time_ms, tab, hour, pool * pool_mask, pool_mask, history=hist)
        pool_score = fused.gather(1, pool_pos)
        pool_inputs = fusion_inputs(pxtr, watch).gather(1, pool_pos.unsqueeze(-1).expand(-1, -1, 7))
        chosen = self.reranker.select(pool_batch, RerankPool(pool * pool_mask, pool_mask, pool_inputs,
                                                             pool_score)).positions
        pick = complete_lists(chosen, pool_score, pool_mask, count)
        final_pos = pool_pos.gather(1, pick)  # positions among the ranked candidates
        final = cand.gather(1, final_pos)
        final_mask = cand_mask.gather(1, final_pos)
        stage_items["rerank"] = final * final_mask
        timings["rerank"] = (time.perf_counter() - t4) * 1e3

        def at_final(x: Tensor) -> np.ndarray:
            return x.gather(1, final_pos).float().numpy()

        scores = {"retrieval": at_final(ret_score), "prerank": at_final(pre_score),
                  "p_click": at_final(pxtr[..., 0]), "watch_s": at_final(watch), "fusion": at_final(fused)}
        served_pxtr = pxtr.gather(1, final_pos.unsqueeze(-1).expand(-1, -1, pxtr.shape[-1])).numpy()
        items = np.where(final_mask.numpy(), final.numpy() - 1, -1)
        sizes = {"retrieval": int(valid.sum(1).max()), "prerank": int(cand_mask.sum(1).max()),
                 "ranking": int(cand_mask.sum(1).max()), "fusion": int(pool_mask.sum(1).max()),
                 "rerank": int(final_mask.sum(1).max())}
        extra = None
        if detail:
            extra = {"retrieval": retrieval_score, "prerank_all": pre, "prerank_pos": keep,
                     "prerank": pre_score, "pxtr": pxtr, "watch_s": watch, "fusion": fused,
                     "pool_pos": pool_pos, "final_pos": final_pos,
                     "hist_items": hist.items, "hist_actions": hist.actions, "hist_gap_s": hist.gap_s,
                     "hist_len": hist.length}
        return CascadeResult(items=items, stage_items=stage_items, scores=scores, pxtr=served_pxtr,
                             timings_ms=timings, sizes=sizes, cold_start=cold, tasks=self.tasks, detail=extra)
