"""The report of ``funnelrec bench ranking``: markdown tables (per task, per tab, cost, the claims) and the plot.

Every function reads the flat results dict (``{row}.{figure}`` keys, ``.std`` beside a mean) and skips what a run
did not measure, so a partial run (``--rows``) renders too.

Example:
    >>> res = {"mmoe.auc_mean": 0.7, "mmoe.auc_mean.std": 0.001}
    >>> cell(res, "mmoe.auc_mean")
    '0.7000 ± 0.0010'
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np

#: The figures behind the papers' claims, in report order (those a run has are shown).
CLAIM_KEYS = (
    "longer_minus_transformer_auc_mean", "longer_flops_vs_transformer",
    "rankmixer_minus_best_of_dcnv2_mmoe_auc_mean", "rankmixer_flops_vs_mmoe",
    "longer_edge_over_din", "longer_edge_over_din_switch_off", "longer_edge_shrink_switch_off",
    "hyformer_minus_longer_rankmixer_auc_mean", "hyformer_flops_vs_longer_rankmixer",
    "mtmixatt_minus_rankmixer_tab_auc_min", "mtmixatt_tabs_won_vs_rankmixer", "mtmixatt_flops_vs_rankmixer",
    "mtmixatt_minus_single_scenario_nonmain_tab_auc_mean", "mtmixatt_minus_single_scenario_nonmain_tab_auc_min",
    "mtmixatt_tab_edge_over_rankmixer", "mtmixatt_tab_edge_over_rankmixer_switch_off",
    "mtmixatt_tab_edge_shrink_switch_off",
    "onerank_tasks_improved_vs_ple", "onerank_tasks_degraded_vs_ple", "onerank_tasks_worse_than_ple_by_2std",
    "onerank_sparse_gain_min_vs_ple", "onerank_click_minus_ple", "onerank_click_minus_ple_in_std",
    "onerank_flops_vs_ple",
)


def cell(res: dict[str, Any], key: str, std: bool = True) -> str:
    """``mean ± std`` of ``key`` (``n/a`` when missing or not finite)."""
    v, s = res.get(key), res.get(key + ".std") if std else None
    if v is None or not np.isfinite(v):
        return "n/a"
    return f"{v:.4f}" + (f" ± {s:.4f}" if s is not None and np.isfinite(s) else "")


def summary_markdown(res: dict[str, Any], rows: Sequence[str], tasks: Sequence[str], tabs: Sequence[int],
                     info: dict[str, Any]) -> str:
    """Readable tables: per-task AUC and GAUC, per-tab mean AUC, cost, the claims."""
    short = [t.replace("is_", "") for t in tasks]
    eval_users = f" of {info['eval_users']:,} users drawn once" if info.get("eval_users") else ""
    lines = [f"**Data**: `{info['data']}` — {info['train_rows']:,} train (the most recent before valid) / "
             f"{info['valid_rows']:,} valid / {info['test_rows']:,} test impressions{eval_users}, histories of up to "
             f"{info['history_len']} events. Mean ± std over {info['seeds']} seed(s); learning rate per main row from "
             f"{list(info['lr_grid'])} on valid (seed 0), ablations reuse their parent's; at most {info['epochs']} "
             f"epoch(s), early stopping on valid mean AUC. Wall time {info['wall_s'] / 60:.1f} min on "
             f"{info['threads']} threads.", ""]
    table = ["popularity", *rows] + (["oracle"] if info["oracle"] else [])
    for title, metric in (("Test AUC", "auc"), ("Test GAUC", "gauc")):
        lines += [f"### {title}", "", "| model | mean | " + " | ".join(short) + " |",
                  "| --- | --- | " + " | ".join("---" for _ in short) + " |"]
        for r in table:
            mean = cell(res, f"{r}.auc_mean") if metric == "auc" else "—"
            lines.append(f"| {r} | {mean} | " + " | ".join(cell(res, f"{r}.{metric}.{t}") for t in tasks) + " |")
        lines.append("")
    tab_rows = [r for r in table if any(f"{r}.tab{t}.auc_mean" in res for t in tabs)]
    if tabs and tab_rows:
        lines += ["### Test AUC per tab (mean over tasks)", "",
                  "| model | " + " | ".join(f"tab {t}" for t in tabs) + " |",
                  "| --- | " + " | ".join("---" for _ in tabs) + " |"]
        lines += [f"| {r} | " + " | ".join(cell(res, f"{r}.tab{t}.auc_mean") for t in tabs) + " |" for r in tab_rows]
        lines.append("")
    lines += ["### Cost", "", "| model | params (dense) | FLOPs/sample | samples/s | lr | XAUC watch |",
              "| --- | --- | --- | --- | --- | --- |"]
    for k in rows:
        lines.append(f"| {k} | {res[f'{k}.params_dense']:,} | {res[f'{k}.flops_per_sample']:,.0f} | "
                     f"{res[f'{k}.samples_per_s']:,.0f} | {res[f'{k}.lr']:g} | {cell(res, f'{k}.xauc.watch')} |")
    lines.append("")
    claim_keys = [k for k in CLAIM_KEYS if k in res]
    if claim_keys:
        lines += ["### The papers' claims", "", "| figure | value |", "| --- | --- |"]
        lines += [f"| {k} | {res[k]:.4f} |" for k in claim_keys]
        lines.append("")
    return "\n".join(lines)


def plot_rows(res: dict[str, Any], rows: Sequence[str], ablations: set[str], out_dir: Path,
              stem: str = "ranking") -> list[str]:
    """Two panels: each row's mean test AUC above the popularity floor (error bars: std over seeds; the oracle's
    margin in the title), and the same against forward+backward FLOPs per sample (log scale)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    floor = res.get("popularity.auc_mean", 0.0)
    lift = np.array([res[f"{k}.auc_mean"] - floor for k in rows])
    err = np.array([np.nan_to_num(res.get(f"{k}.auc_mean.std", 0.0)) for k in rows])
    colors = ["tab:gray" if k in ablations else "tab:blue" for k in rows]
    fig, (bars, cost) = plt.subplots(1, 2, figsize=(12, 0.32 * len(rows) + 2.2),
                                     gridspec_kw={"width_ratios": [1.1, 1]})
    y = np.arange(len(rows))[::-1]
    bars.barh(y, lift, xerr=err, color=colors, capsize=2)
    bars.set_yticks(y, rows, fontsize=8)
    bars.axvline(0, color="k", lw=0.8)
    oracle = res.get("oracle.auc_mean")
    title = "mean test AUC − popularity floor" + (f" (oracle: +{oracle - floor:.3f})" if oracle else "")
    bars.set_title(title, fontsize=10)
    for k, yy, v, e in zip(rows, y, lift, err):
        bars.annotate(f"{v:+.4f}", (max(v, 0) + e, yy), xytext=(3, -3), textcoords="offset points", fontsize=7)
    for k, c in zip(rows, colors):
        x, v = res[f"{k}.flops_per_sample"], res[f"{k}.auc_mean"] - floor
        s = np.nan_to_num(res.get(f"{k}.auc_mean.std", 0.0))
        cost.errorbar(x, v, yerr=s, fmt="x" if k in ablations else "o", color=c, capsize=2)
        cost.annotate(k, (x, v), fontsize=6, xytext=(3, 2), textcoords="offset points")
    cost.axhline(0, color="k", lw=0.8)
    cost.set_xscale("log")
    cost.set_xlabel("forward+backward FLOPs per sample")
    cost.set_title("against cost (o: models, x: ablations)", fontsize=10)
    fig.tight_layout()
    name = f"{stem}_auc_vs_flops.png"
    fig.savefig(out_dir / name, dpi=110)
    plt.close(fig)
    return [name]


__all__ = ["CLAIM_KEYS", "cell", "plot_rows", "summary_markdown"]
