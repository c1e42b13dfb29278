"""``funnelrec bench longer-kv-cache``: LONGER's KV-cache serving path against its training forward.

One request with a ``history``-long history (every event real) and ``candidates`` candidates, scored by one LONGER
model (``LongerConfig`` defaults for width, heads, layers, merge and query sampling; ``history_pool = history``,
``num_queries`` = the paper's 100 at full size) in two ways:

* **cached** (serving): ``encode_user`` once (the sequence-side K/V of every layer), then ``score_with_cache`` runs
  only the m global tokens of each candidate against the cache. Timed end to end (encode + score), and apart.
* **naive** (the strongest plain code for the same output): the training ``forward`` applied to the request
  expanded to M pointwise rows (M requests × 1 candidate, same history), batched (``chunk`` rows per call, to
  bound memory). Each row tokenises, merges and attends over the whole history again, as a model without a cache
  must. ``request_forward_ms`` also times ``forward`` on the request as it is (1 request × M candidates: the history
  is tokenised and merged once, the attention still runs per candidate).

Figures: ``max_abs_diff`` (logits and watch head, real candidates) between the cached path and the training forward
of the same weights computed in **float64** (target ≤ 1e-5: the two paths compute the same function);
``max_abs_diff_float32`` the same in float32 (round-off of a different summation order, reported as it is);
``speedup`` = naive time / cached time (target ≥ 20); ``flop_ratio`` = naive FLOPs / cached FLOPs
(``FlopCounterMode``; matmuls and attention, dense Q×K counted for both); cache size; parameters. Torch threads are
fixed with ``fix_threads``. ``--quick``: 64 candidates, 256 events, 16 queries (keys only; no speed target).

Example:
    funnelrec bench longer-kv-cache --json
    funnelrec bench longer-kv-cache --quick
"""

from __future__ import annotations

import copy
import dataclasses
import sys

import torch
from torch.utils.flop_counter import FlopCounterMode

from funnelrec.bench.harness import BenchResult, Target, fix_threads, register_benchmark, time_it
from funnelrec.data.batch import RequestBatch
from funnelrec.errors import ConfigError
from funnelrec.ranking.budget import count_params
from funnelrec.ranking.longer import Longer, LongerConfig

#: a KuaiRand-like feature layout (27 user fields, 7 item fields; the vocabularies only set table sizes)
USER_VOCAB = [27_285] + [16] * 26
ITEM_VOCAB = [10_000, 2_541, 3, 13, 6, 42, 22]
USER_DENSE, ITEM_DENSE, ACTIONS = 4, 2, 7


def make_request(history: int, candidates: int, seed: int = 0) -> RequestBatch:
    """One request: ``history`` real events (most recent last, gaps growing into the past), ``candidates``
    candidates with random features."""
    g = torch.Generator().manual_seed(seed)
    b = RequestBatch.empty(batch_size=1, history=history, candidates=candidates, user_fields=len(USER_VOCAB),
                           user_dense=USER_DENSE, item_fields=len(ITEM_VOCAB), item_dense=ITEM_DENSE,
                           actions=ACTIONS)
    b.user_sparse = torch.stack([torch.randint(1, v, (1,), generator=g) for v in USER_VOCAB], 1)
    b.user_dense = torch.randn(1, USER_DENSE, generator=g)
    b.hist_len = torch.tensor([history])
    b.hist_items = torch.randint(1, ITEM_VOCAB[0], (1, history), generator=g)
    b.hist_actions = (torch.rand(1, history, ACTIONS, generator=g) < 0.3).float()
    b.hist_gap_s = torch.rand(1, history, generator=g).mul(3600).flip(1).cumsum(1).flip(1)
    b.cand_sparse = torch.stack([torch.randint(1, v, (1, candidates), generator=g) for v in ITEM_VOCAB], -1)
    b.cand_items = b.cand_sparse[..., 0].clone()
    b.cand_dense = torch.randn(1, candidates, ITEM_DENSE, generator=g)
    b.duration_s = torch.rand(1, candidates, generator=g) * 60 + 5
    b.tab, b.hour = torch.tensor([1]), torch.tensor([20])
    return b.validate()


def pointwise_rows(request: RequestBatch, start: int = 0, stop: int | None = None) -> RequestBatch:
    """Candidates ``start:stop`` of a one-request batch as that many requests of one candidate each (the history
    repeated), the way pointwise training rows look."""
    m = request.num_candidates
    stop = m if stop is None else min(stop, m)
    r = stop - start
    per_req = {"user_id", "request_time_ms", "user_sparse", "user_dense", "hist_items", "hist_actions", "hist_gap_s",
               "hist_len", "tab", "hour", "context_dense"}
    kwargs = {}
    for f in dataclasses.fields(request):
        v = getattr(request, f.name)
        if not isinstance(v, torch.Tensor):
            kwargs[f.name] = v
        elif f.name in per_req:
            kwargs[f.name] = v.expand(r, *v.shape[1:])
        else:  # [1, M, ...] → [r, 1, ...]
            kwargs[f.name] = v[0, start:stop].unsqueeze(1)
    return RequestBatch(**kwargs)


def to_dtype(batch: RequestBatch, dtype: torch.dtype) -> RequestBatch:
    """Every floating tensor of ``batch`` cast to ``dtype``."""
    out = {}
    for f in dataclasses.fields(batch):
        v = getattr(batch, f.name)
        out[f.name] = v.to(dtype) if isinstance(v, torch.Tensor) and v.is_floating_point() else v
    return RequestBatch(**out)


def _max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], mask: torch.Tensor) -> float:
    return max(float((a[k] - b[k])[mask].abs().max()) for k in ("logits", "watch"))


@register_benchmark("longer-kv-cache")
def bench_longer_kv_cache(quick: bool = False, candidates: int | None = None, history: int | None = None,
                          num_queries: int | None = None, threads: int = 2, chunk: int | None = None,
                          repeats: int | None = None, seed: int = 0) -> BenchResult:
    """Run the LONGER KV-cache benchmark (see the module docstring)."""
    threads = fix_threads(threads)
    m = candidates or (64 if quick else 1000)
    n = history or (256 if quick else 2000)
    k = num_queries or (16 if quick else 100)
    chunk = chunk or (m if quick else 250)
    repeats = repeats or (3 if quick else 5)
    if min(m, n, k, chunk, repeats) < 1:
        raise ConfigError(f"candidates, history, num_queries, chunk and repeats must be >= 1, got {m}, {n}, {k}, "
                          f"{chunk}, {repeats}")
    torch.manual_seed(seed)
    config = LongerConfig(user_vocab=USER_VOCAB, item_vocab=ITEM_VOCAB, user_dense=USER_DENSE,
                          item_dense=ITEM_DENSE, num_actions=ACTIONS, history_pool=n, num_queries=k,
                          train_path="per_candidate")  # the independent reference: one token set per candidate
    model = Longer(config).eval()
    request = make_request(n, m, seed)
    real = request.cand_mask
    print(f"longer-kv-cache: {m} candidates, {n} events, D={config.dim}, {config.num_layers} self layers, "
          f"merge={config.merge}×{config.merge_size}, k={k}, {threads} threads", file=sys.stderr)

    def cached():
        return model.score_with_cache(model.encode_user(request), request)

    def naive():
        outs = [model(pointwise_rows(request, s, s + chunk)) for s in range(0, m, chunk)]
        return {key: torch.cat([o[key] for o in outs], 0).view(1, m, *outs[0][key].shape[2:]) for key in outs[0]}

    with torch.inference_mode():
        # parity: the same weights in float64 (the function), then float32 (round-off, as it is)
        model64 = copy.deepcopy(model).double()
        req64 = to_dtype(request, torch.float64)
        diff64 = _max_diff(model64.score_with_cache(model64.encode_user(req64), req64), model64(req64), real)
        del model64, req64
        out_cached, out_naive = cached(), naive()
        diff32 = _max_diff(out_cached, model(request), real)
        diff32_naive = _max_diff(out_cached, out_naive, real)
        cache_bytes = model.encode_user(request).nbytes
        # FLOPs
        with FlopCounterMode(display=False) as fc:
            cached()
        with FlopCounterMode(display=False) as fn:
            naive()
        # time
        t_cached = time_it(cached, repeats=max(repeats, 5), warmup=2)
        t_encode = time_it(lambda: model.encode_user(request), repeats=max(repeats, 5), warmup=1)
        cache = model.encode_user(request)
        t_score = time_it(lambda: model.score_with_cache(cache, request), repeats=max(repeats, 5), warmup=1)
        t_naive = time_it(naive, repeats=repeats, warmup=1)
        t_request = time_it(lambda: model(request), repeats=repeats, warmup=1)
    flops_cached, flops_naive = fc.get_total_flops(), fn.get_total_flops()
    params = count_params(model)
    results = {
        "candidates": m, "history": n, "seq_tokens": -(-n // config.merge_size), "num_queries": k,
        "num_global": model.num_global, "dim": config.dim, "self_layers": config.num_layers, "merge": config.merge,
        "merge_k": config.merge_size, "query_sampling": config.query_sampling, "threads": threads,
        "max_abs_diff": diff64, "max_abs_diff_float32": diff32, "max_abs_diff_float32_vs_pointwise": diff32_naive,
        "cached_ms": t_cached["median_s"] * 1e3, "encode_ms": t_encode["median_s"] * 1e3,
        "score_ms": t_score["median_s"] * 1e3, "naive_ms": t_naive["median_s"] * 1e3,
        "request_forward_ms": t_request["median_s"] * 1e3,
        "speedup": t_naive["median_s"] / t_cached["median_s"],
        "speedup_vs_request_forward": t_request["median_s"] / t_cached["median_s"],
        "cached_candidates_per_s": m / t_cached["median_s"], "naive_candidates_per_s": m / t_naive["median_s"],
        "cached_flops": float(flops_cached), "naive_flops": float(flops_naive),
        "flop_ratio": flops_naive / max(flops_cached, 1),
        "cache_bytes": cache_bytes, "params_dense": params["params_dense"],
        "params_embedding": params["params_embedding"],
    }
    targets = [Target("max_abs_diff", "<=", 1e-5), Target("speedup", ">=", 20)]
    if quick:  # small sizes on a busy CI core are not a speed measurement
        targets = targets[:1]
    summary = (f"One request, {n} history events, {m} candidates; LONGER with the default width/layers "
               f"(D = {config.dim}, {config.heads} heads, 1 cross-causal + {config.num_layers} self-causal layers, "
               f"{config.merge} merge K = {config.merge_size}, {k} {config.query_sampling} queries). *cached* = "
               f"`encode_user` + `score_with_cache`; *naive* = the training `forward` on the request expanded to "
               f"{m} pointwise rows, {chunk} rows per call. `max_abs_diff` compares the two paths in float64.")
    return BenchResult("longer-kv-cache", results,
                       config={"candidates": m, "history": n, "num_queries": k, "threads": threads, "chunk": chunk,
                               "repeats": repeats, "seed": seed, "model": dataclasses.asdict(config)},
                       targets=targets, quick=quick, summary=summary)


__all__ = ["bench_longer_kv_cache", "make_request", "pointwise_rows", "to_dtype"]
