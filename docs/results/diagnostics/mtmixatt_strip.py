"""Diagnostic behind ``mtmixatt-strip.md``: fit one MTmixAtt variant (or RankMixer) on the ``ranking-scenarios``
data and print its valid mean AUC as one JSON line. Not a benchmark: valid split only, no test scores.

Usage (repository root, ~4 min per fit on one thread):
    OMP_NUM_THREADS=1 python docs/results/diagnostics/mtmixatt_strip.py --model mtmixatt \
        --args '{"scene_moe": "none", "ffn_mult": 3}' --seed 0
    ... --args '{"field_init": "identity", "field_dim": 16}'   # field encoders start as the identity
"""

from __future__ import annotations

import argparse
import json

import torch

import funnelrec.bench.ranking_baselines as rb
from funnelrec.bench.ranking import scenario_sizes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="mtmixatt", choices=("mtmixatt", "rankmixer"))
    parser.add_argument("--args", default="{}", help="model config overrides, JSON")
    parser.add_argument("--seed", type=int, default=0)
    opts = parser.parse_args()
    torch.set_num_threads(1)
    data = rb.load_ranking_data(scenario_sizes(False, None).data, history_len=128, max_train_rows=None,
                                eval_users=None)
    _, facts = rb.fit_model(opts.model, data, 3e-3, 2, 256, opts.seed, json.loads(opts.args))
    print(json.dumps({"model": opts.model, "args": json.loads(opts.args), "seed": opts.seed, **facts}), flush=True)


if __name__ == "__main__":
    main()
