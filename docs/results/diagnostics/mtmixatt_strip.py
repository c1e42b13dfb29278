"""Diagnostic behind ``mtmixatt-strip.md``: fit one MTmixAtt variant (or RankMixer) on the ``ranking-scenarios``
data and print its valid mean AUC, and its valid AUC per tab (mean over tasks), as one JSON line. Not a benchmark:
valid split only, no test scores.

Usage (repository root, ~4 min per fit on one thread):
    OMP_NUM_THREADS=1 python docs/results/diagnostics/mtmixatt_strip.py --model mtmixatt \
        --args '{"scene_moe": "none", "ffn_mult": 3}' --seed 0
    ... --args '{"field_init": "identity", "field_dim": 16}'   # field encoders start as the identity
    ... --data 'sim:bench-v1?responses.tab_response=1.0'       # a world where tabs change how users respond
    ... --lr 0.01                                               # another learning rate than the benchmark's 3e-3
"""

from __future__ import annotations

import argparse
import json

import torch

import funnelrec.bench.ranking_baselines as rb
from funnelrec.bench.ranking import report_tabs, scenario_sizes, tab_scores


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="mtmixatt", choices=("mtmixatt", "rankmixer"))
    parser.add_argument("--args", default="{}", help="model config overrides, JSON")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data", default=None, help="data source (default: ranking-scenarios' sim:bench-v1)")
    parser.add_argument("--lr", type=float, default=3e-3, help="learning rate (the benchmark's pick: 3e-3)")
    opts = parser.parse_args()
    torch.set_num_threads(1)
    data = rb.load_ranking_data(scenario_sizes(False, opts.data).data, history_len=128, max_train_rows=None,
                                eval_users=None)
    model, facts = rb.fit_model(opts.model, data, opts.lr, 2, 256, opts.seed, json.loads(opts.args))
    probs, _ = rb.predict_split(model, data.datasets["valid"], data.parts["valid"].height, with_watch=False)
    per_tab = tab_scores(probs, data, report_tabs(data), split="valid")
    tabs = {k.split(".")[0]: round(v, 6) for k, v in per_tab.items() if k.endswith(".auc_mean")}
    print(json.dumps({"model": opts.model, "args": json.loads(opts.args), "seed": opts.seed, "lr": opts.lr,
                      "data": data.source.name,
                      **facts, "valid_tab_auc": tabs}), flush=True)


if __name__ == "__main__":
    main()
