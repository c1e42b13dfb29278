"""The funnel explorer: one request's path through the cascade as JSON, and the page that shows it.

``CascadeBackend.explore(request)`` runs the cascade once with ``detail=True``; :func:`explore_payload` turns
the result into the JSON the service returns on ``POST /explore`` (and the page ``GET /explorer`` renders):

* ``history`` — the events every stage read (the last ``history_len`` strictly before the request, logged and
  real-time), most recent first: item id, time, the actions taken, the item's features;
* ``funnel`` — each stage's candidates kept and wall time;
* ``stages`` — one table per stage: the retrieved items (merge order; cosine, or the popularity channel), the
  pre-ranked items (pre-rank order; pre-rank score and the ranker's task probabilities, watch seconds and
  fused score, since ranking and fusion score exactly these), the re-ranking pool (fused-score order) and the
  served list with the item features (duration, tag, author, type, upload date). Each table lists its first
  ``max_per_stage`` rows plus any served item further down, every row with its rank in that stage and
  ``final_rank`` (its rank in the served list, null if not served); rows carry every score they have, the
  ``columns`` name the ones the page shows (the served list shows the first two task probabilities).

History times are exact (read from the live histories, :func:`history_times`), not rebuilt from the float32
gaps the models read.

Table columns are described in the payload (``key``, ``label``, ``kind``), so the page renders any stage
generically. Scores the stage does not have are null (JSON has no NaN). All of it is ours.

Example:
    >>> backend = CascadeBackend(load_bundle("bundles/demo"))                       # doctest: +SKIP
    >>> req = RecommendRequest(user_id=7, request_id="r1")                          # doctest: +SKIP
    >>> page = backend.explore(req, max_per_stage=20)                               # doctest: +SKIP
    >>> [s["name"] for s in page["stages"]], page["stages"][-1]["rows"][0]["tag"]   # doctest: +SKIP
    (['retrieval', 'prerank', 'fusion', 'rerank'], '39')
"""

from __future__ import annotations

import math
from importlib import resources

import numpy as np

from funnelrec.errors import ConfigError
from funnelrec.serving.cascade import STAGES

__all__ = ["ItemCatalog", "explore_payload", "explorer_page", "history_times", "FEATURE_COLUMNS",
           "STAGE_LABELS"]

#: Video-table columns shown as item features (besides ``duration_s``), when the table has them.
FEATURE_COLUMNS = ("tag", "author_id", "video_type", "upload_dt")
STAGE_LABELS = {"retrieval": "Retrieval", "prerank": "Pre-ranking", "ranking": "Ranking", "fusion": "Fusion",
                "rerank": "Re-ranking"}
_TABLE_TITLES = {"retrieval": "Retrieved candidates",
                 "prerank": "Pre-ranked candidates (scored by the ranker)",
                 "fusion": "Re-ranking pool (top by fused score)", "rerank": "Served list"}
_TASK_LABELS = {"is_click": "click", "long_view": "long view", "is_like": "like", "is_follow": "follow",
                "is_comment": "comment", "is_forward": "forward", "is_hate": "hate"}


def explorer_page() -> str:
    """The explorer page (``funnelrec/serving/static/explorer.html``: one self-contained file, no CDN)."""
    return resources.files("funnelrec.serving").joinpath("static/explorer.html").read_text(encoding="utf-8")


class ItemCatalog:
    """Display features of every item index of a cascade: duration (the ranker's ``item_duration_s``) and the
    ``FEATURE_COLUMNS`` of its video table (``cascade.videos``; none without one).

    Args:
        cascade: a :class:`~funnelrec.serving.cascade.Cascade`.
    """

    def __init__(self, cascade):
        n = cascade.num_items
        self.duration_s = cascade.item_duration_s.numpy().astype(np.float64)
        self.known = cascade.item_known.numpy()
        self.columns: dict[str, np.ndarray] = {}
        videos = getattr(cascade, "videos", None)
        if videos is None:
            return
        rows = cascade.item_row.numpy()
        for name in FEATURE_COLUMNS:
            if name not in videos.columns:
                continue
            values = np.empty(videos.height + 1, dtype=object)  # last: the unknown row
            values[:-1] = videos.get_column(name).to_list()
            values[-1] = None
            out = np.full(n, None, dtype=object)
            out[self.known] = values[np.minimum(rows[self.known], videos.height)]
            self.columns[name] = out

    def features(self, items: np.ndarray) -> dict[str, list]:
        """Feature columns of item indices [M]: ``duration_s`` and the table's (null where unknown)."""
        items = np.asarray(items, dtype=np.int64)
        ok = self.known[items]
        dur = np.round(self.duration_s[items], 3).tolist()
        out = {"duration_s": [_num(d) if k else None for d, k in zip(dur, ok)]}
        for name, col in self.columns.items():
            out[name] = [_plain(v) for v in col[items].tolist()]
        return out


def _num(x) -> float | None:
    x = float(x)
    return x if math.isfinite(x) else None


def _plain(v):
    if v is None or isinstance(v, (str, bool, int)):
        return v
    if isinstance(v, float):
        return v if math.isfinite(v) else None
    return str(v)


def _col(key: str, label: str, kind: str) -> dict[str, str]:
    return {"key": key, "label": label, "kind": kind}


def _shown(n_valid: int, final_rank: np.ndarray, max_rows: int) -> np.ndarray:
    """Positions [S] listed of a stage's ``n_valid`` rows: the first ``max_rows``, then served items below."""
    pos = np.arange(n_valid)
    return pos[(pos < max_rows) | (final_rank[:n_valid] > 0)]


def _final_rank(items: np.ndarray, final: np.ndarray) -> np.ndarray:
    """[M] 1-based rank in the served list ``final`` [L] of each item of ``items`` [M]; 0: not served."""
    hit = (items[:, None] == final[None, :]) & (final[None, :] > 0)
    return np.where(hit.any(1), hit.argmax(1) + 1, 0)


def _rows(columns: dict[str, list]) -> list[dict]:
    keys = list(columns)
    return [dict(zip(keys, vals)) for vals in zip(*columns.values())]


def _floats(a: np.ndarray) -> list:
    return [x if math.isfinite(x) else None for x in np.asarray(a, dtype=np.float64).tolist()]


def history_times(live, user_id: int, time_ms: int, n: int) -> tuple[np.ndarray, np.ndarray] | None:
    """Exact times and play seconds of the ``n`` events a request's history holds, oldest first, or None if
    they cannot be matched (the ``History`` tensors carry only float32 gaps, seconds off for a years-old log).

    Same order as :meth:`~funnelrec.serving.history.LiveTimelines.history`: the logged events strictly before
    ``time_ms``, then the real-time ones, the last ``n`` of both.

    Args:
        live: the cascade's ``LiveTimelines``.
    Returns:
        ([n] epoch ms, [n] play seconds) or None.
    """
    base = live.base
    start, end = base.bounds([user_id], [time_ms])
    sl = slice(int(start[0]), int(end[0]))
    recent = live.recent_events()
    mine = (recent.get_column("user_id") == user_id) & (recent.get_column("time_ms") < time_ms)
    recent = recent.filter(mine)
    recent = recent.sort("time_ms", maintain_order=True)
    times = np.concatenate([base.time_ms[sl], recent.get_column("time_ms").to_numpy().astype(np.int64)])
    play = np.concatenate([base.play_s.numpy()[sl].astype(np.float64),
                           recent.get_column("play_time_ms").to_numpy().astype(np.float64) / 1000.0])
    if len(times) < n:
        return None
    return times[len(times) - n:], play[len(play) - n:]


def explore_payload(cascade, out, request: dict, catalog: ItemCatalog, max_per_stage: int = 100,
                    row: int = 0) -> dict:
    """The explorer JSON of request ``row`` of a ``cascade.recommend(..., detail=True)`` result (see the
    module doc).

    Args:
        cascade: the cascade that produced ``out``.
        out: its ``CascadeResult`` (``detail`` required).
        request: what was asked: ``user_id, time_ms, tab, hour, count, request_id`` (echoed).
        catalog: the cascade's :class:`ItemCatalog`.
        max_per_stage: rows listed per stage table (served items further down are listed too).
        row: which request of the batch.
    Returns:
        a JSON-ready dict: ``request``, ``cold_start``, ``known_user``, ``tasks``, ``history``, ``funnel``,
        ``total_ms``, ``stages`` (see the module doc).
    """
    if isinstance(max_per_stage, bool) or not isinstance(max_per_stage, int) or max_per_stage < 1:
        raise ConfigError(f"explore: max_per_stage must be an integer >= 1, got {max_per_stage!r}")
    d = out.detail
    if d is None:
        raise ConfigError("explore: the cascade result has no detail (call recommend(..., detail=True))")
    tasks = tuple(out.tasks) or tuple(f"task{i}" for i in range(d["pxtr"].shape[-1]))
    si = {k: v[row].numpy() for k, v in out.stage_items.items()}
    final = si["rerank"]

    # ------------------------------------------------------------------ history (most recent first)
    n = int(d["hist_len"][row])
    width = d["hist_items"].shape[1]
    hpos = np.arange(width - 1, width - 1 - n, -1, dtype=np.int64)
    h_items = d["hist_items"][row].numpy()[hpos]
    h_gap = d["hist_gap_s"][row].numpy().astype(np.float64)[hpos]
    h_act = d["hist_actions"][row].numpy()[hpos] > 0
    names = list(cascade.history.action_columns)
    t = int(request["time_ms"])
    exact = history_times(cascade.history, int(request["user_id"]), t, n)
    if exact is not None:
        h_time, h_play = exact[0][::-1], _floats(np.round(exact[1][::-1], 3))
        h_ago = ((t - h_time) / 1000.0).tolist()
    else:  # from the float32 gaps the stages read
        h_time, h_play, h_ago = t - np.round(h_gap * 1000.0).astype(np.int64), [None] * n, _floats(h_gap)
    history = _rows({
        "item_id": [int(i) - 1 if i > 0 else None for i in h_items.tolist()],
        "time_ms": [int(x) for x in h_time.tolist()],
        "ago_s": h_ago,
        "actions": [[names[j] for j in np.flatnonzero(a).tolist()] for a in h_act],
        "play_s": h_play,
        **catalog.features(h_items),
    })

    # ------------------------------------------------------------------ shared per-candidate arrays
    ret_items, ret_score = si["retrieval"], d["retrieval"][row].numpy()
    pre_all = d["prerank_all"][row].numpy()
    pre_items, pre_pos = si["prerank"], d["prerank_pos"][row].numpy()
    pre_score, pxtr = d["prerank"][row].numpy(), d["pxtr"][row].numpy()
    watch, fused = d["watch_s"][row].numpy(), d["fusion"][row].numpy()
    pool_pos, final_pos = d["pool_pos"][row].numpy(), d["final_pos"][row].numpy()
    channel = np.where(np.isnan(ret_score), "popular", "ann")
    task_cols = [_col(f"p_{k}", f"p({_TASK_LABELS.get(k, k)})", "prob") for k in tasks]

    def scored(pos: np.ndarray) -> dict[str, list]:
        """Ranker and fusion scores of pre-ranked positions ``pos``."""
        return {**{f"p_{k}": _floats(pxtr[pos, j]) for j, k in enumerate(tasks)},
                "watch_s": _floats(watch[pos]), "fused": _floats(fused[pos])}

    stages = []

    # retrieval: merge order (valid items form a prefix)
    n_ret = int((ret_items > 0).sum())
    fr = _final_rank(ret_items, final)
    kept = np.zeros(len(ret_items), dtype=bool)
    kept[pre_pos[pre_items > 0]] = True
    s = _shown(n_ret, fr, max_per_stage)
    stages.append({
        "name": "retrieval", "size": n_ret,
        "channels": {"ann": int((channel[:n_ret] == "ann").sum()),
                     "popular": int((channel[:n_ret] == "popular").sum())},
        "columns": [_col("rank", "#", "rank"), _col("item_id", "item", "id"),
                    _col("channel", "channel", "text"),
                    _col("cosine", "cosine", "score"), _col("prerank", "pre-rank score", "score"),
                    _col("kept", "kept by pre-ranking", "flag"), _col("final_rank", "served", "rank")],
        "rows": _rows({"rank": (s + 1).tolist(), "item_id": (ret_items[s] - 1).tolist(),
                       "channel": channel[s].tolist(), "cosine": _floats(ret_score[s]),
                       "prerank": _floats(pre_all[s]), "kept": kept[s].tolist(),
                       "final_rank": [int(x) or None for x in fr[s].tolist()]})})

    # pre-ranking (and ranking + fusion over the same items): pre-rank score order
    n_pre = int((pre_items > 0).sum())
    fr = _final_rank(pre_items, final)
    in_pool = np.zeros(len(pre_items), dtype=bool)
    in_pool[pool_pos[si["fusion"] > 0]] = True
    s = _shown(n_pre, fr, max_per_stage)
    stages.append({
        "name": "prerank", "size": n_pre,
        "columns": [_col("rank", "#", "rank"), _col("item_id", "item", "id"),
                    _col("prerank", "pre-rank score", "score"),
                    *task_cols, _col("watch_s", "watch s", "sec"), _col("fused", "fused", "score"),
                    _col("retrieval_rank", "retrieval #", "rank"), _col("in_pool", "in pool", "flag"),
                    _col("final_rank", "served", "rank")],
        "rows": _rows({"rank": (s + 1).tolist(), "item_id": (pre_items[s] - 1).tolist(),
                       "prerank": _floats(pre_score[s]), **scored(s),
                       "retrieval_rank": (pre_pos[s] + 1).tolist(), "in_pool": in_pool[s].tolist(),
                       "final_rank": [int(x) or None for x in fr[s].tolist()]})})

    # fusion: the re-ranking pool, fused-score order
    n_pool = int((si["fusion"] > 0).sum())
    fr = _final_rank(si["fusion"], final)
    s = _shown(n_pool, fr, max_per_stage)
    ps = pool_pos[s]
    stages.append({
        "name": "fusion", "size": n_pool,
        "columns": [_col("rank", "#", "rank"), _col("item_id", "item", "id"), _col("fused", "fused", "score"),
                    *task_cols, _col("watch_s", "watch s", "sec"), _col("prerank_rank", "pre-rank #", "rank"),
                    _col("final_rank", "served", "rank")],
        "rows": _rows({"rank": (s + 1).tolist(), "item_id": (pre_items[ps] - 1).tolist(), **scored(ps),
                       "prerank_rank": (ps + 1).tolist(),
                       "final_rank": [int(x) or None for x in fr[s].tolist()]})})

    # re-ranking: the served list with the item features
    n_fin = int((final > 0).sum())
    fs = final_pos[:n_fin]
    feats = catalog.features(final[:n_fin])
    feat_cols = [_col("duration_s", "duration s", "sec"),
                 *[_col(k, k.replace("_", " ").replace(" id", ""), "text") for k in catalog.columns]]
    stages.append({
        "name": "rerank", "size": n_fin,
        "columns": [_col("rank", "#", "rank"), _col("item_id", "item", "id"), *feat_cols,
                    _col("fused", "fused", "score"), *task_cols[:2], _col("watch_s", "watch s", "sec"),
                    _col("channel", "channel", "text"), _col("retrieval_rank", "retrieval #", "rank"),
                    _col("prerank_rank", "pre-rank #", "rank")],
        "rows": _rows({"rank": list(range(1, n_fin + 1)), "item_id": (final[:n_fin] - 1).tolist(), **feats,
                       **scored(fs), "channel": channel[pre_pos[fs]].tolist(),
                       "retrieval_rank": (pre_pos[fs] + 1).tolist(), "prerank_rank": (fs + 1).tolist(),
                       "final_rank": list(range(1, n_fin + 1))})})
    for st in stages:
        st["label"] = STAGE_LABELS[st["name"]]
        st["title"] = _TABLE_TITLES[st["name"]]
        st["shown"] = len(st["rows"])
        st["ms"] = float(out.timings_ms.get(st["name"], 0.0))

    funnel = [{"stage": k, "label": STAGE_LABELS[k], "size": int(out.sizes.get(k, 0)),
               "ms": float(out.timings_ms.get(k, 0.0))} for k in STAGES if k in out.sizes]
    return {
        "request": dict(request), "cold_start": bool(out.cold_start[row]),
        "known_user": bool(cascade.known_user(int(request["user_id"]))), "tasks": list(tasks),
        "history": {"length": n, "max_len": int(width), "events": history},
        "funnel": funnel, "total_ms": float(sum(f["ms"] for f in funnel)), "stages": stages,
    }
