"""Compare the retrievers on one data source: ``python -m funnelrec.retrieval.compare --data sim:small``.

Trains every requested retriever with the same trainer (AdamW, early stopping on validation Recall@50, the best
epoch kept) for each seed, evaluates on the leave-last-out test targets, and prints a table of mean ± std over the
seeds: Recall@10/50, NDCG@10, MRR@10, coverage@50, and true Recall@50 when the source is a simulated world. The last
stdout line with ``--json`` is one flat JSON object with every figure.

Example:
    python -m funnelrec.retrieval.compare --data "sim:small" --seeds 3
    python -m funnelrec.retrieval.compare --data movielens:tests/fixtures/ml-100k --models popularity,sasrec
"""

from __future__ import annotations

import argparse
import json
import math
import time

import torch

from funnelrec.data.sources import load_source
from funnelrec.retrieval import RETRIEVERS, RetrievalData, build_retriever, evaluate_retriever, fit_retriever

#: Per-model defaults of the comparison: (config overrides, trainer settings).
DEFAULTS: dict[str, tuple[dict, dict]] = {
    "popularity": ({}, {}),
    "two_tower": ({}, dict(epochs=30, batch_size=512, lr=2e-3, patience=3)),
    "sasrec": ({}, dict(epochs=40, batch_size=128, lr=2e-3, patience=4)),
}
REPORT = ("recall@10", "recall@50", "ndcg@10", "mrr@10", "coverage@50", "true_recall@50")


def compare(data_spec: str, models: list[str], seeds: int = 3, max_len: int = 50, cache_dir=None,
            progress: bool = False) -> dict[str, dict[str, list[float]]]:
    """Train and test every model for every seed; returns ``{model: {metric: [value per seed]}}`` (+ ``seconds``)."""
    src = load_source(data_spec, cache_dir=cache_dir, progress=progress)
    data = RetrievalData.from_source(src, max_len=max_len)
    out: dict[str, dict[str, list[float]]] = {}
    for name in models:
        overrides, fit = DEFAULTS.get(name, ({}, {}))
        if name == "sasrec":
            overrides = {"max_len": max_len, **overrides}
        rows: dict[str, list[float]] = {}
        for seed in range(seeds if fit else 1):  # popularity is deterministic
            torch.manual_seed(seed)
            model = build_retriever(name, data.spec, data.item_popularity(), item_features=data.item_features,
                                    **overrides)
            t0 = time.perf_counter()
            result = fit_retriever(model, data, seed=seed, progress=progress, **fit) if fit else None
            metrics = evaluate_retriever(model, data, "test", ks=(10, 50), oracle=src.world)
            metrics["seconds"] = time.perf_counter() - t0
            metrics["best_epoch"] = float(result.best_epoch) if result else math.nan
            for k, v in metrics.items():
                rows.setdefault(k, []).append(float(v))
        out[name] = rows
    out["_data"] = {"test_targets": [float(data.num_examples("test"))],
                    "train_positives": [float(data.num_examples("train"))], "items": [float(data.num_items - 1)]}
    return out


def _mean_std(values: list[float]) -> tuple[float, float]:
    m = sum(values) / len(values)
    s = math.sqrt(sum((v - m) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else 0.0
    return m, s


def main(argv: list[str] | None = None) -> dict[str, float]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default="sim:small", help="data source (sim:NAME[?k=v], kuairand:PATH, movielens:PATH)")
    p.add_argument("--models", default=",".join(RETRIEVERS), help="comma-separated retriever names")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--max-len", type=int, default=50)
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    p.add_argument("--cache-dir", default=None)
    p.add_argument("--json", action="store_true", help="print one flat JSON object as the last line")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    res = compare(args.data, models, seeds=args.seeds, max_len=args.max_len, cache_dir=args.cache_dir)
    info = {k: int(v[0]) for k, v in res.pop("_data").items()}
    print(f"{args.data}: {info['train_positives']:,} train positives, {info['test_targets']:,} test targets, "
          f"{info['items']:,} items; mean ± std over {args.seeds} seed(s); threads {torch.get_num_threads()}")
    cols = [c for c in REPORT if any(c in r for r in res.values())]
    print(f"{'model':<12}" + "".join(f"{c:>18}" for c in cols) + f"{'s/seed':>9}")
    flat: dict[str, float] = {}
    for name, rows in res.items():
        cells = []
        for c in cols:
            m, s = _mean_std(rows[c])
            cells.append(f"{m:.4f} ± {s:.4f}")
            flat[f"{name}.{c}"], flat[f"{name}.{c}.std"] = m, s
        print(f"{name:<12}" + "".join(f"{x:>18}" for x in cells) + f"{_mean_std(rows['seconds'])[0]:>9.1f}")
    if args.json:
        print(json.dumps(flat))
    return flat


if __name__ == "__main__":
    main()
