"""``funnelrec demo``: the funnel's first stage end to end on the built-in world, in about a minute on a laptop.

1. Simulate ``sim:small`` (real KuaiRand-Pure users and videos, simulated behaviour).
2. Write the log in the KuaiRand schema and read it back through the KuaiRand loader (as any real log would be).
3. Split by day (train / valid / test), fit the feature spec on train, build request batches with histories.
4. Train a Shared-Bottom multi-task ranker (6 tasks + watch time) with early stopping on validation AUC.
5. Report test AUC per task beside the popularity/position-only model and the world's oracle, and the share of
   the popularity→oracle gap the model closes.
6. Train every stage of the cascade on the same log (two-tower retrieval + FAISS index, pre-ranker, ranker with a
   watch-time head, CEM-tuned fusion, re-ranker), export it as a checksummed bundle, load the bundle, start the
   HTTP service on a free loopback port, and send it requests: the funnel of a few users (candidates and time per
   stage, the served list with item features), a cold-start user, and a feedback event changing the next list.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import polars as pl
import torch
from rich.console import Console
from rich.table import Table

from funnelrec.bench.simulator import ORACLE_OF
from funnelrec.data.dataset import RequestDataset
from funnelrec.data.features import FeatureSpec
from funnelrec.data.loaders.kuairand import load_kuairand
from funnelrec.data.objectives import task_names
from funnelrec.data.sources import Source
from funnelrec.data.splits import split_by_day
from funnelrec.data.timeline import Timelines
from funnelrec.metrics import auc, gap_closed
from funnelrec.ranking.popularity import PopularityPositionModel, with_position
from funnelrec.ranking.shared_bottom import SharedBottom, SharedBottomConfig
from funnelrec.sim import World
from funnelrec.train.loop import fit_multitask, predict_dataset

if TYPE_CHECKING:
    from funnelrec.serving.build import BuildConfig


def run_demo(profile: str = "small", epochs: int = 6, seed: int = 0, history_len: int = 50, users: int = 3000,
             days: int = 6, console: Console | None = None, cascade: bool = True,
             bundle_dir: str | Path = "bundles/demo", build: BuildConfig | None = None) -> dict[str, float]:
    """Run the demo and print its report; return the figures (test AUCs per task and gap closed).

    Args:
        profile: world profile; ``users`` and ``days`` override its size (the last day is test, the one before
            valid).
        epochs: at most this many epochs (early stopping on validation mean AUC).
        seed: model seed.
        history_len: N, the history length of each request.
        cascade: also train, export and serve the whole cascade (step 6).
        bundle_dir: where the cascade's bundle is written (replaced if present).
        build: how the cascade's stages are trained (default: ``demo_build_config(epochs, seed)``).
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
    if cascade:
        source = Source(name=f"sim:{profile}", kind="sim", log=data.log, users=data.users, videos=data.videos,
                        spec_factory=FeatureSpec.kuairand, tasks=tuple(task_names()), world=world)
        report.update(serve_cascade_demo(source, build or demo_build_config(epochs, seed), Path(bundle_dir),
                                         console))
    console.print(f"done in {time.perf_counter() - t0:.0f} s. Next: `funnelrec serve --bundle {bundle_dir}`, "
                  f"`funnelrec bench cascade`, `funnelrec bench simulator`.")
    return report


def demo_build_config(epochs: int = 3, seed: int = 0) -> BuildConfig:
    """The demo's stage training: short (≤ 3 epochs per stage, 800 distillation requests)."""
    from funnelrec.serving.build import BuildConfig

    e = max(1, min(3, epochs))
    return BuildConfig(ranker_epochs=e, retriever_epochs=e, preranker_epochs=2, distill_requests=800, seed=seed)


def serve_cascade_demo(source: Source, build: BuildConfig, bundle_dir: Path, console: Console) -> dict[str, float]:
    """Step 6 of the demo: train the cascade, export and reload its bundle, serve it and query it over HTTP."""
    import httpx

    from funnelrec.serving.app import ServiceConfig, create_app
    from funnelrec.serving.build import train_cascade
    from funnelrec.serving.bundle import export_bundle, load_bundle
    from funnelrec.serving.cascade_backend import CascadeBackend
    from funnelrec.serving.server import background_server

    console.rule("[bold]the cascade[/] — retrieval → pre-ranking → ranking → fusion → re-ranking")
    t0 = time.perf_counter()
    parts = train_cascade(source, build, console=console)
    path = export_bundle(parts, bundle_dir, overwrite=True)
    cascade = load_bundle(path)
    console.print(f"bundle {path} written and reloaded (checksums verified) in {time.perf_counter() - t0:.0f} s")
    now = int(source.log["time_ms"].max()) + 1
    users = source.log.group_by("user_id").len().sort(["len", "user_id"], descending=True)["user_id"][:3].to_list()
    videos = source.videos.select("video_id", "video_duration", "tag")
    figures: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as logs:
        config = ServiceConfig(port=0, log_dir=logs, max_count=cascade.sizes.pool)
        with background_server(create_app(CascadeBackend(cascade), config)) as url, httpx.Client(timeout=60) as http:
            console.print(f"service up at {url} — {http.get(f'{url}/healthz').json()}")
            for i, user in enumerate([*users, 10**12]):
                body = {"user_id": user, "count": 10, "time_ms": now + i, "context": {"tab": 1, "hour": 20}}
                res = http.post(f"{url}/recommend", json=body)
                res.raise_for_status()
                out = res.json()
                _print_funnel(console, out, videos)
                figures[f"served_{i}"] = float(len(out["items"]))
            # feedback: the first user watches the top item to the end; the next list changes
            first = http.post(f"{url}/recommend", json={"user_id": users[0], "count": 10, "time_ms": now + 10}).json()
            top = first["items"][0]["item_id"]
            event = {"event_id": f"demo-{top}", "user_id": users[0], "item_id": top, "time_ms": now + 11,
                     "is_click": 1, "long_view": 1, "is_like": 1, "play_time_ms": 60_000}
            ack = http.post(f"{url}/feedback", json={"events": [event]}).json()
            after = http.post(f"{url}/recommend", json={"user_id": users[0], "count": 10, "time_ms": now + 12}).json()
            before_ids = [it["item_id"] for it in first["items"]]
            after_ids = [it["item_id"] for it in after["items"]]
            console.print(f"feedback {ack}: user {users[0]} watched item {top}; next list {after_ids} "
                          f"(before {before_ids}; the watched item is {'gone' if top not in after_ids else 'kept'})")
            figures["feedback_changed_list"] = float(after_ids != before_ids)
            bad = http.post(f"{url}/recommend", json={"user_id": "seven", "count": 10_000})
            console.print(f"a bad request gets {bad.status_code}: {bad.json()}")
    return figures


def _print_funnel(console: Console, out: dict, videos: pl.DataFrame) -> None:
    """One user's funnel: candidates and time per stage, then the served list with item features."""
    stages = Table(title=f"user {out['user_id']}{' (cold start)' if out['cold_start'] else ''}: the funnel")
    for col in ("stage", "candidates out", "ms"):
        stages.add_column(col, justify="right" if col != "stage" else "left")
    for stage, ms in out["timings_ms"].items():
        stages.add_row(stage, f"{out['sizes'].get(stage, 0):,}", f"{ms:.1f}")
    served = Table(title="served list")
    for col in ("rank", "video", "duration s", "tag", "retrieval", "pre-rank", "p(click)", "watch s", "fused"):
        served.add_column(col, justify="right")
    feats = {r["video_id"]: r for r in videos.filter(
        pl.col("video_id").is_in([it["item_id"] for it in out["items"]])).iter_rows(named=True)}
    for it in out["items"]:
        f, sc = feats.get(it["item_id"], {}), it["scores"]
        dur = f.get("video_duration")
        served.add_row(str(it["rank"]), str(it["item_id"]), f"{dur / 1000:.0f}" if dur else "–", str(f.get("tag", "–")),
                       f"{sc['retrieval']:.3f}" if "retrieval" in sc else "popular",
                       f"{sc.get('prerank', float('nan')):.2f}", f"{sc.get('p_click', float('nan')):.3f}",
                       f"{sc.get('watch_s', float('nan')):.1f}", f"{sc.get('fusion', float('nan')):.2f}")
    console.print(stages)
    console.print(served)
