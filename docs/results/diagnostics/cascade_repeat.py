"""Diagnostic behind the determinism note of ``fusion-seed-spread.md``: train the ``fusion-ranker`` cascade once
and print a hash of every stage's weights as one JSON line. Two runs (separate processes, the same thread count)
must print the same line.

Usage (repository root, ~7 min on 2 threads; ``--quick`` trains the small world's one-epoch cascade in seconds):
    OMP_NUM_THREADS=2 python docs/results/diagnostics/cascade_repeat.py --threads 2
"""

from __future__ import annotations

import argparse
import hashlib
import json
import time

import torch

from funnelrec.bench import fusion as F


def weights_hash(tensors: dict[str, torch.Tensor]) -> str:
    """A short SHA-1 of the named tensors' float32 bytes, in name order."""
    h = hashlib.sha1()
    for name, value in sorted(tensors.items()):
        if torch.is_tensor(value):
            h.update(name.encode())
            h.update(value.detach().float().contiguous().numpy().tobytes())
    return h.hexdigest()[:12]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--quick", action="store_true")
    opts = parser.parse_args()
    torch.set_num_threads(opts.threads)
    start = time.perf_counter()
    world = F.QUICK_RANKER_WORLD if opts.quick else F.FULL_PLAN.world
    parts = F.train_ranker(world, opts.quick, False)
    out = {"world": world, "threads": opts.threads,
           "retriever": weights_hash(parts.retriever.state_dict()),
           "item_vectors": weights_hash({"v": parts.item_vectors}),
           "ranker": weights_hash(parts.ranker.state_dict()),
           "fusion": weights_hash({"log_weights": parts.fusion.log_weights}),
           "preranker": weights_hash(parts.preranker.state_dict()),
           "ranker_valid_auc_mean": parts.figures["ranker_valid_auc_mean"],
           "wall_s": round(time.perf_counter() - start, 1)}
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
