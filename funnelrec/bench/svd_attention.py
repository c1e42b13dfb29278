"""``funnelrec bench svd-attention``: SOLAR-style SVD target attention (``funnelrec.nn.svd_attention``) against full
softmax attention and the linear / SIM baselines.

One request: M candidates [M, D] attend to an N-long history [N, D] (every event real), one head of width D, the
same ``SVDTargetAttention`` weights for every mode. Each timed call starts from the raw candidates and history (the
q/k/v projections are inside every method) and ends with the [M, D] output:

* ``full``: ``F.scaled_dot_product_attention`` (PyTorch's CPU flash kernel) — the reference;
* ``compact`` (``svd_compact`` *including* the decomposition: the Gram ``XᵀX`` (float32, the default), its D×D
  float64 eigendecomposition, softmax over R interest tokens) and ``cached`` (``svd_compact`` from a per-user ``HistorySVD`` built beforehand:
  only the O(M·R·D) part);
* ``exact`` (``svd_exact``: decomposition + softmax through the factors, SDPA's fused kernel over the R-wide factors)
  and ``exact_streamed`` (the same with our chunked online softmax, ``chunk`` events per step; timed only, against
  ``exact`` in a loop of its own, ``exact_streamed_over_exact_r{R}``);
* ``linear`` (ELU+1) and ``sim`` (top-``topk`` events per candidate by raw dot product, chunked, then softmax).

Timings alternate the methods inside each repeat (machines are noisy) and report medians; each sample is a block
of back-to-back calls of about 20 ms (``alternating_times``), so a sub-millisecond method is not timed as a lone
call right after a slow one. Figures, per R in
``ranks``: ``{compact,cached,exact,exact_streamed}_ms_r{R}``, ``speedup_vs_full_r{R}``, ``speedup_cached_r{R}``;
``speedup_exact`` / ``speedup_exact_streamed`` (full over exact at R = 32, no target); for the main rank
(R = 32): ``speedup_vs_full`` (target ≥ 10) and ``speedup_cached`` (target ≥ 50), ``flop_ratio`` /
``flop_ratio_cached`` (``FlopCounterMode``; the eigendecomposition, which it does not see, is added as 9·D³ per
request; the CPU flash kernel's formula comes from ``funnelrec.nn.seq_attention``).

Memory, two ways: ``peak_bytes_<method>`` — the peak of the bytes held by tensors the call allocated, tracked at the
aten-op level by a dispatch mode (deterministic; the inputs and weights are not counted; buffers a kernel allocates
internally, e.g. the flash kernel's per-thread blocks, are invisible to it) — and, in full runs, ``rss_mb_<method>``
— ``ru_maxrss`` of a fresh subprocess per method minus that of one that only builds the inputs (DESIGN §7; noisy
at the MB level). ``peak_memory_ratio`` = ``peak_bytes_full / peak_bytes_compact`` (R = 32).

Exactness: ``exact_max_abs_diff`` = max |svd_exact − full| on a rank-R history (R = 32) in float64 (target ≤ 1e-5),
``exact_max_abs_diff_float32`` the same in float32, ``cached_max_abs_diff`` between cached and uncached
``svd_compact``. Approximation: synthetic histories ``X = U diag(s) Vᵀ`` with ``s_i ∝ i^−α`` (random orthonormal U,
V; rows scaled to mean squared norm D), ``err_{compact,exact}_r{R}_a{α}`` = ‖out − out_full‖ / ‖out_full‖ (exact =
svd_exact on the full-rank history, i.e. attention over its rank-R truncation), ``err_compact_raw_r32_a{α}`` (the
literal tokens ``U_Rᵀ X``, ``normalize=False``) and ``err_{linear,sim}_a{α}``; on
``err_candidates`` candidates. Scaling: time per method at N in ``scaling`` (R = 32), ``slope_<method>`` = the
log-log slope of time against N, and a plot. ``--quick``: N = 512, M = 64 (keys only; no speed targets).

Example:
    funnelrec bench svd-attention --json
    funnelrec bench svd-attention --quick
"""

from __future__ import annotations

import math
import sys
import textwrap
import time
import weakref
from pathlib import Path

import numpy as np
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.flop_counter import FlopCounterMode

import funnelrec.nn.seq_attention  # noqa: F401  (registers the CPU flash-attention FLOP formula)
from funnelrec.bench.harness import BenchResult, Target, fix_threads, peak_rss_subprocess, register_benchmark
from funnelrec.errors import ConfigError
from funnelrec.nn.svd_attention import SVDTargetAttention

METHODS = ("full", "compact", "cached", "exact", "linear", "sim")
MAIN_RANK = 32


def low_rank_history(n: int, d: int, rank: int, seed: int = 0, dtype=torch.float32) -> torch.Tensor:
    """A [1, n, d] history of rank ``rank`` (Gaussian factors, float64 product), rows of mean squared norm ≈ d."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, n, rank, generator=g, dtype=torch.float64) @ torch.randn(1, rank, d, generator=g,
                                                                                dtype=torch.float64)
    return (x / math.sqrt(rank)).to(dtype)


def decaying_history(n: int, d: int, alpha: float, seed: int = 0) -> torch.Tensor:
    """A [1, n, d] history with singular values ``s_i ∝ i^−alpha`` (random orthonormal factors), rows scaled to mean
    squared norm d."""
    g = torch.Generator().manual_seed(seed)
    u, _ = torch.linalg.qr(torch.randn(n, d, generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
    s = torch.arange(1, d + 1, dtype=torch.float64).pow(-alpha)
    x = (u * s) @ v.T
    x = x * math.sqrt(n * d / float(x.square().sum()))
    return x.unsqueeze(0).float()


class PeakBytes(TorchDispatchMode):
    """Peak bytes held by the storages created inside the mode (outputs of aten ops; views and in-place results that
    reuse an argument's storage are not counted again). A storage's bytes are released when it is garbage."""

    def __init__(self):
        super().__init__()
        self.live: dict[int, int] = {}
        self.current = self.peak = 0

    def _free(self, key: int) -> None:
        self.current -= self.live.pop(key, 0)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        seen = {a.untyped_storage().data_ptr() for a in tree_flatten((args, kwargs))[0]
                if isinstance(a, torch.Tensor)}
        for t in tree_flatten(out)[0]:
            if not isinstance(t, torch.Tensor):
                continue
            key = t.untyped_storage().data_ptr()
            nbytes = t.untyped_storage().nbytes()
            if key in seen or key in self.live or nbytes == 0:
                continue
            self.live[key] = nbytes
            self.current += nbytes
            self.peak = max(self.peak, self.current)
            weakref.finalize(t.untyped_storage(), self._free, key)  # a storage outlives its views' bases
        return out


def peak_bytes(fn) -> int:
    """``PeakBytes`` of one call of ``fn``."""
    with torch.inference_mode(), PeakBytes() as probe:
        out = fn()
        del out
    return probe.peak


def alternating_times(fns: dict[str, callable], repeats: int, warmup: int = 1,
                      min_block_s: float = 0.02) -> dict[str, float]:
    """Median seconds per call of each function; the functions take turns inside every repeat.

    Each sample is a block of back-to-back calls lasting about ``min_block_s`` (one call for the slow methods, tens
    for a sub-millisecond one), and the block's time is divided by its calls: a lone sub-millisecond call timed
    right after another method's 30 ms call measures the thread pool waking up as much as the method (we saw the
    cached path read 0.4–0.8 ms that way from one run to the next)."""
    calls = {}
    for k, fn in fns.items():
        for _ in range(warmup):
            fn()
        t0 = time.perf_counter()
        fn()
        calls[k] = max(1, math.ceil(min_block_s / max(time.perf_counter() - t0, 1e-9)))
    times = {k: [] for k in fns}
    for _ in range(repeats):  # timing loop: each block is timed on its own
        for k, fn in fns.items():
            t0 = time.perf_counter()
            for _ in range(calls[k]):
                fn()
            times[k].append((time.perf_counter() - t0) / calls[k])
    return {k: float(np.median(v)) for k, v in times.items()}


def _methods(att: SVDTargetAttention, q: torch.Tensor, x: torch.Tensor, rank_atts: dict, rank: int) -> dict:
    """The callables of every method at ``rank`` (caches are built here, outside any timing)."""
    a = rank_atts[rank]
    cache = a.decompose(x)
    return {"full": lambda: att(q, x, mode="full"),
            "compact": lambda: a(q, x, mode="svd_compact"),
            "cached": lambda: a(q, cache=cache, mode="svd_compact"),
            "exact": lambda: a(q, x, mode="svd_exact"),
            "linear": lambda: att(q, x, mode="linear"),
            "sim": lambda: att(q, x, mode="sim")}


def _flops(fn) -> int:
    with torch.inference_mode(), FlopCounterMode(display=False) as fc:
        fn()
    return fc.get_total_flops()


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def _alpha_key(alpha: float) -> str:
    return f"{alpha:g}".replace(".", "p").replace("-", "m")


_RSS_CODE = textwrap.dedent("""
    import torch
    from funnelrec.bench.svd_attention import low_rank_history
    from funnelrec.nn.svd_attention import SVDTargetAttention
    torch.set_num_threads({threads})
    torch.manual_seed({seed})
    att = SVDTargetAttention(dim={d}, heads={heads}, rank={rank}, chunk={chunk}, topk={topk})
    q = torch.randn(1, {m}, {d})
    x = torch.randn(1, {n}, {d})
    with torch.inference_mode():
        cache = att.decompose(x) if "{method}" == "cached" else None
        mode = {{"full": "full", "compact": "svd_compact", "cached": "svd_compact", "exact": "svd_exact",
                "linear": "linear", "sim": "sim", "none": None}}["{method}"]
        if mode is not None:
            out = att(q, None if cache is not None else x, cache=cache, mode=mode)
""")


def plot_scaling(ns: list[int], times_ms: dict[str, list[float]], out_dir: Path, stem: str = "svd_attention") -> str:
    """Log-log time against N per method, with a slope-1 guide; returns the PNG's file name (in ``out_dir``)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    name = f"{stem}_scaling.png"
    fig, ax = plt.subplots(figsize=(6, 4.5))
    for method, ys in times_ms.items():
        ax.plot(ns, ys, marker="o", label=method)
    ref = times_ms["full"]
    ax.plot(ns, [ref[0] * n / ns[0] for n in ns], "k:", lw=1, label="∝ N")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("history length N")
    ax.set_ylabel("time per request (ms)")
    ax.set_title("SVD target attention: time vs N (R = 32)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out_dir / name, dpi=110)
    plt.close(fig)
    return name


def plot_errors(ranks: list[int], alphas: list[float], errs: dict[tuple[str, float, int], float], out_dir: Path,
                stem: str = "svd_attention") -> str:
    """Relative error against full softmax vs R, one line per (mode, α); returns the PNG's file name."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    name = f"{stem}_error.png"
    fig, ax = plt.subplots(figsize=(6, 4.5))
    for mode, style in (("compact", "-"), ("exact", "--")):
        for alpha in alphas:
            ax.plot(ranks, [errs[(mode, alpha, r)] for r in ranks], style, marker="o", label=f"{mode} α={alpha:g}")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("rank R")
    ax.set_ylabel("‖out − full‖ / ‖full‖")
    ax.set_title("error vs full softmax (svd_exact = rank-R truncation)")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(out_dir / name, dpi=110)
    plt.close(fig)
    return name


@register_benchmark("svd-attention")
def bench_svd_attention(quick: bool = False, history: int | None = None, candidates: int | None = None,
                        dim: int = 64, heads: int = 1, ranks: tuple[int, ...] = (16, 32, 64),
                        threads: int = 2, chunk: int = 1024, topk: int = 100, repeats: int | None = None,
                        scaling: tuple[int, ...] | None = None, alphas: tuple[float, ...] = (0.0, 0.5, 1.0, 2.0),
                        err_candidates: int | None = None, memory_subprocess: bool | None = None, seed: int = 0,
                        out_dir: str = "docs/results") -> BenchResult:
    """Run the SVD-attention benchmark (see the module docstring)."""
    n = (512 if quick else 8192) if history is None else history
    m = (64 if quick else 2000) if candidates is None else candidates
    repeats = (3 if quick else 10) if repeats is None else repeats
    scaling = tuple(((256, 512, 1024) if quick else (1024, 2048, 4096, 8192, 16384)) if scaling is None else scaling)
    m_err = (32 if quick else 256) if err_candidates is None else err_candidates
    memory_subprocess = (not quick) if memory_subprocess is None else memory_subprocess
    ranks = tuple(ranks)
    for name, val in (("history", n), ("candidates", m), ("dim", dim), ("heads", heads), ("chunk", chunk),
                      ("topk", topk), ("repeats", repeats), ("err_candidates", m_err)):
        if isinstance(val, bool) or not isinstance(val, int) or val < 1:
            raise ConfigError(f"svd-attention: {name} must be a positive integer, got {val!r}")
    if not ranks or MAIN_RANK not in ranks or any(not isinstance(r, int) or not 1 <= r <= dim for r in ranks):
        raise ConfigError(f"svd-attention: ranks must be integers in [1, dim={dim}] including {MAIN_RANK}, "
                          f"got {ranks!r}")
    if len(scaling) < 2 or any(not isinstance(s, int) or s < 1 for s in scaling):
        raise ConfigError(f"svd-attention: scaling must be at least two positive history lengths, got {scaling!r}")
    if not alphas or any(not isinstance(a, (int, float)) or a < 0 for a in alphas):
        raise ConfigError(f"svd-attention: alphas must be non-negative numbers, got {alphas!r}")
    threads = fix_threads(threads)
    print(f"svd-attention: N={n}, M={m}, D={dim}, heads={heads}, R in {ranks}, chunk={chunk}, topk={topk}, "
          f"{threads} threads", file=sys.stderr)

    torch.manual_seed(seed)
    att = SVDTargetAttention(dim=dim, heads=heads, rank=MAIN_RANK, chunk=chunk, topk=topk).eval()
    rank_atts = {}
    for r in ranks:  # the same weights at every rank
        rank_atts[r] = SVDTargetAttention(dim=dim, heads=heads, rank=r, chunk=chunk, topk=topk).eval()
        rank_atts[r].load_state_dict(att.state_dict())
    g = torch.Generator().manual_seed(seed + 1)
    q = torch.randn(1, m, dim, generator=g)
    x = torch.randn(1, n, dim, generator=g)
    results: dict[str, object] = {"history": n, "candidates": m, "dim": dim, "heads": heads, "main_rank": MAIN_RANK,
                                  "chunk": chunk, "topk": topk, "threads": threads}

    with torch.inference_mode():
        # exactness on a rank-32 history (float64, then float32), and cached vs uncached
        x_lr = low_rank_history(n, dim, MAIN_RANK, seed)
        a64 = SVDTargetAttention(dim=dim, heads=heads, rank=MAIN_RANK, chunk=chunk).double()
        a64.load_state_dict(att.state_dict())
        q64, x64 = q.double(), x_lr.double()
        results["exact_max_abs_diff"] = float((a64(q64, x64, mode="svd_exact") - a64(q64, x64, mode="full"))
                                              .abs().max())
        results["exact_max_abs_diff_float32"] = float((att(q, x_lr, mode="svd_exact") - att(q, x_lr, mode="full"))
                                                      .abs().max())
        results["cached_max_abs_diff"] = float((att(q, cache=att.decompose(x)) - att(q, x)).abs().max())
        results["cache_bytes"] = att.decompose(x).nbytes
        del a64, q64, x64, x_lr

        # time per rank (the R-free methods are timed with every rank, and their medians pooled)
        pooled = {k: [] for k in ("full", "linear", "sim")}
        for r in ranks:
            fns = _methods(att, q, x, rank_atts, r)
            if r != ranks[0]:
                fns = {k: v for k, v in fns.items() if k in ("full", "compact", "cached", "exact")}
            t = alternating_times(fns, repeats)
            for k in pooled:
                if k in t:
                    pooled[k].append(t[k])
            for k in ("compact", "cached", "exact"):
                results[f"{k}_ms_r{r}"] = t[k] * 1e3
            # the streamed kernel in its own loop: a slow call between the fast ones would slow them too
            streamed = SVDTargetAttention(dim=dim, heads=heads, rank=r, chunk=chunk, exact_kernel="streamed").eval()
            streamed.load_state_dict(att.state_dict())
            ts = alternating_times({"exact": fns["exact"], "exact_streamed": lambda: streamed(q, x, mode="svd_exact")},
                                   repeats)
            results[f"exact_streamed_ms_r{r}"] = ts["exact_streamed"] * 1e3
            results[f"exact_streamed_over_exact_r{r}"] = ts["exact_streamed"] / ts["exact"]
            results[f"speedup_vs_full_r{r}"] = t["full"] / t["compact"]
            results[f"speedup_cached_r{r}"] = t["full"] / t["cached"]
            results[f"full_ms_with_r{r}"] = t["full"] * 1e3
        for k, v in pooled.items():
            results[f"{k}_ms"] = float(np.median(v)) * 1e3
        results["speedup_vs_full"] = results[f"speedup_vs_full_r{MAIN_RANK}"]
        results["speedup_cached"] = results[f"speedup_cached_r{MAIN_RANK}"]
        results["speedup_exact"] = results["full_ms_with_r32"] / results["exact_ms_r32"]
        results["speedup_exact_streamed"] = results["speedup_exact"] / results["exact_streamed_over_exact_r32"]

        # FLOPs and memory at the main rank
        fns = _methods(att, q, x, rank_atts, MAIN_RANK)
        eig = 9 * dim ** 3  # eigh of the D×D Gram, unseen by FlopCounterMode
        flops = {k: _flops(fn) + (eig if k in ("compact", "exact") else 0) for k, fn in fns.items()}
        for k in METHODS:
            results[f"flops_{k}"] = float(flops[k])
        results["flop_ratio"] = flops["full"] / max(flops["compact"], 1)
        results["flop_ratio_cached"] = flops["full"] / max(flops["cached"], 1)
        results["flop_ratio_exact"] = flops["full"] / max(flops["exact"], 1)
        mem = {k: peak_bytes(fn) for k, fn in fns.items()}
        for k in METHODS:
            results[f"peak_bytes_{k}"] = mem[k]
        results["peak_memory_ratio"] = mem["full"] / max(mem["compact"], 1)
        results["peak_memory_ratio_cached"] = mem["full"] / max(mem["cached"], 1)
        results["mn_matrix_bytes"] = m * n * 4  # one float32 [M, N] score matrix, for scale

        # approximation error against full softmax vs R and the spectrum decay α
        errs: dict[tuple[str, float, int], float] = {}
        q_err = q[:, :m_err]
        for alpha in alphas:
            xa = decaying_history(n, dim, alpha, seed)
            ref = att(q_err, xa, mode="full")
            ak = _alpha_key(alpha)
            for r in ranks:
                for mode, key in (("svd_compact", "compact"), ("svd_exact", "exact")):
                    errs[(key, alpha, r)] = _rel_err(rank_atts[r](q_err, xa, mode=mode), ref)
                    results[f"err_{key}_r{r}_a{ak}"] = errs[(key, alpha, r)]
            raw = SVDTargetAttention(dim=dim, heads=heads, rank=MAIN_RANK, normalize=False)
            raw.load_state_dict(att.state_dict())
            results[f"err_compact_raw_r{MAIN_RANK}_a{ak}"] = _rel_err(raw(q_err, xa, mode="svd_compact"), ref)
            results[f"err_linear_a{ak}"] = _rel_err(att(q_err, xa, mode="linear"), ref)
            results[f"err_sim_a{ak}"] = _rel_err(att(q_err, xa, mode="sim"), ref)

        # scaling over N at the main rank
        scale_ms: dict[str, list[float]] = {k: [] for k in METHODS}
        for ns in scaling:
            xs = torch.randn(1, ns, dim, generator=g)
            t = alternating_times(_methods(att, q, xs, rank_atts, MAIN_RANK), max(3, repeats // 2))
            for k in METHODS:
                scale_ms[k].append(t[k] * 1e3)
                results[f"scale_{k}_ms_n{ns}"] = t[k] * 1e3
        logn = np.log(np.asarray(scaling, dtype=float))
        for k in METHODS:
            results[f"slope_{k}"] = float(np.polyfit(logn, np.log(scale_ms[k]), 1)[0])

    if memory_subprocess:  # DESIGN §7: ru_maxrss of a fresh process per method, minus an inputs-only process
        fmt = {"threads": threads, "seed": seed, "d": dim, "heads": heads, "rank": MAIN_RANK, "chunk": chunk,
               "topk": topk, "m": m, "n": n}
        base = peak_rss_subprocess(_RSS_CODE.format(method="none", **fmt))
        for k in METHODS:
            results[f"rss_mb_{k}"] = (peak_rss_subprocess(_RSS_CODE.format(method=k, **fmt)) - base) / 2 ** 20

    plots = []
    if not quick:
        plots = [plot_scaling(list(scaling), scale_ms, Path(out_dir)),
                 plot_errors(list(ranks), list(alphas), errs, Path(out_dir))]
    targets = [Target("exact_max_abs_diff", "<=", 1e-5), Target("speedup_vs_full", ">=", 10),
               Target("speedup_cached", ">=", 50)]
    if quick:  # tiny sizes on a busy CI core are not a speed measurement
        targets = targets[:1]
    summary = (f"One request: {m} candidates attend to {n} history events, D = {dim}, {heads} head(s), the same "
               f"weights in every mode; {threads} torch threads. *compact* = `svd_compact` including the "
               f"decomposition (float32 Gram + float64 D×D eigh); *cached* = `svd_compact` from a per-user `HistorySVD`; "
               f"*exact* = `svd_exact` through SDPA's fused kernel over the R-wide factors (*exact_streamed*: our "
               f"chunked online softmax, {chunk} events per step); *full* = SDPA. The SVD-attention "
               f"formula is our reconstruction of SOLAR (arXiv 2603.02561), not the paper's published equation; "
               f"see `funnelrec/nn/svd_attention.py`. `svd_compact` is an approximation: `err_compact_*` is its "
               f"relative error against full softmax on histories with singular values ∝ i^−α.")
    config = {"history": n, "candidates": m, "dim": dim, "heads": heads, "ranks": list(ranks), "threads": threads,
              "chunk": chunk, "topk": topk, "repeats": repeats, "scaling": list(scaling), "alphas": list(alphas),
              "err_candidates": m_err, "memory_subprocess": memory_subprocess, "seed": seed}
    return BenchResult("svd-attention", results, config=config, targets=targets, plots=plots, quick=quick,
                       summary=summary)


__all__ = ["METHODS", "PeakBytes", "alternating_times", "bench_svd_attention", "decaying_history",
           "low_rank_history", "peak_bytes", "plot_errors", "plot_scaling"]
