"""``funnelrec demo``: the funnel's first stage end to end on the built-in world, in about a minute on a laptop.

1. Simulate ``sim:small`` (real KuaiRand-Pure users and videos, simulated behaviour).
2. Write the log in the KuaiRand schema and read it back through the KuaiRand loader (as any real log would be).
3. Split by day (train / valid / test), fit the feature spec on train, build request batches with histories.
4. Train a Shared-Bottom multi-task ranker (6 tasks + watch time) with early stopping on validation AUC.
5. Report test AUC per task beside the popularity/position-only model and the world's oracle, and the share of
   the popularity→oracle gap the model closes.

Later funnel stages extend this same command into the full cascade.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import numpy as np
import polars as pl
import torch
from rich.console import Console
from rich.table import Table

from funnelrec.bench.simulator import ORACLE_OF
from funnelrec.data.dataset import RequestDataset
from funnelrec.data.features import FeatureSpec
from funnelrec.data.loaders.kuairand import load_kuairand
from funnelrec.data.splits import split_by_day
from funnelrec.data.timeline import Timelines
from funnelrec.metrics import auc, gap_closed
from funnelrec.ranking.popularity import PopularityPositionModel, with_position
from funnelrec.ranking.shared_bottom import SharedBottom, SharedBottomConfig
from funnelrec.sim import World
from funnelrec.train.loop import fit_multitask, predict_dataset


def run_demo(profile: str = "small", epochs: int = 6, seed: int = 0, history_len: int = 50, users: int = 3000,
             days: int = 6, console: Console | None = None) -> dict[str, float]:
    """Run the demo and print its report; return the figures (test AUCs per task and gap closed).

    Args:
        profile: world profile; ``users`` and ``days`` override its size (the last day is test, the one before
            valid).
        epochs: at most this many epochs (early stopping on validation mean AUC).
        seed: model seed.
        history_len: N, the history length of each request.
    """
    console = console or Console()
    torch.manual_seed(seed)
    t0 = time.perf_counter()
    console.rule(f"[bold]funnelrec demo[/] — world sim:{profile}")
    world = World.from_profile(profile, [f"num_users={users}", f"days={days}"])
    sim = world.simulate()
    with tempfile.TemporaryDirectory() as tmp:
        sim.write(Path(tmp) / "world")
        data = load_kuairand(Path(tmp) / "world")
    log = with_position(data.log).with_columns(pl.int_range(pl.len()).alias("oracle_row"))
    if not log.select("user_id", "video_id", "time_ms").equals(sim.log.select("user_id", "video_id", "time_ms")):
        raise RuntimeError("the KuaiRand round trip changed the log order")  # the oracle rows would not align
    console.print(f"simulated {log.height:,} impressions of {log['user_id'].n_unique():,} users over "
                  f"{log['date'].n_unique()} days (written and re-read in the KuaiRand schema)")

    splits = split_by_day(log, valid_days=1, test_days=1)
    spec = FeatureSpec.kuairand().fit(data.users, data.videos, splits["train"])
    timelines = Timelines.from_log(log, spec)  # strictly-before slicing keeps later feedback out of features
    make = lambda df: RequestDataset(df, data.users, data.videos, spec, timelines, history_len=history_len)  # noqa: E731
    train, valid, test = make(splits["train"]), make(splits["valid"]), make(splits["test"])
    console.print(f"requests: train {len(train):,} · valid {len(valid):,} · test {len(test):,}")

    cfg = SharedBottomConfig(user_vocab=spec.vocab_sizes("user_sparse"), item_vocab=spec.vocab_sizes("item_sparse"),
                             user_dense=spec.num_user_dense, item_dense=spec.num_item_dense, history_pool=history_len)
    model = SharedBottom(cfg)
    fit = fit_multitask(model, train, valid, epochs=epochs, seed=seed)
    console.print(f"trained Shared-Bottom ({sum(p.numel() for p in model.parameters()):,} params): best valid "
                  f"mean AUC {fit.best_valid['auc_mean']:.4f} at epoch {fit.best_epoch + 1}, "
                  f"{fit.samples_per_s:,.0f} samples/s")

    probs, labels, rows = predict_dataset(model, test)
    test_log = splits["test"]
    oracle = sim.oracle[test_log["oracle_row"].to_numpy()[rows]]
    pop = PopularityPositionModel().fit(splits["train"]).predict(test_log)[rows]
    table = Table(title=f"test day: {len(rows):,} impressions")
    for col in ("task", "positives", "popularity/position", "Shared-Bottom", "oracle", "gap closed"):
        table.add_column(col, justify="right" if col != "task" else "left")
    report: dict[str, float] = {}
    for t, task in enumerate(test.tasks):
        y = labels[:, t]
        m_model, m_pop = auc(probs[:, t], y), auc(pop[:, t], y)
        m_oracle = auc(oracle[ORACLE_OF[task]].to_numpy(), y)
        closed = gap_closed(m_model, m_pop, m_oracle)
        report.update({f"auc_{task}": m_model, f"pop_auc_{task}": m_pop, f"oracle_auc_{task}": m_oracle,
                       f"gap_closed_{task}": closed})
        table.add_row(task, f"{int(y.sum()):,}", f"{m_pop:.4f}", f"{m_model:.4f}", f"{m_oracle:.4f}",
                      f"{closed:.0%}" if np.isfinite(closed) else "n/a")
    console.print(table)
    console.print(f"done in {time.perf_counter() - t0:.0f} s. Next: `funnelrec bench simulator`, "
                  f"`funnelrec simulate --profile bench-v1 --days 7 --out data/bench-v1`.")
    return report
