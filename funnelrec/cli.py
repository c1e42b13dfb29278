"""The ``funnelrec`` command line (typer + rich).

Commands:
    funnelrec demo                                   simulate a small world, train a multi-task ranker, report
    funnelrec simulate --profile bench-v1 --days 7 --out DIR [key=value ...]
    funnelrec data export-csv SIM_DIR OUT_DIR        a simulated log as the official KuaiRand CSV file set
    funnelrec data info PATH                         what a dataset folder holds (kuairand:/movielens:/recbole:)
    funnelrec bench NAME [--quick] [--json] [--data SPEC] [--seeds N]   benchmarks (``funnelrec bench list``)
    funnelrec train ranking|retrieval --model NAME --data SPEC [--config YAML] [--name RUN] [key=value ...]
    funnelrec eval runs/NAME [--split test|valid]    metrics of a trained run (writes runs/NAME/eval_<split>.json)
    funnelrec export bundle --out bundles/NAME [--data SPEC]   train every cascade stage, write a checksummed bundle
    funnelrec serve --bundle bundles/NAME [--port 8000]        the HTTP service over a bundle's cascade
    torchrun --nproc_per_node=N -m funnelrec train … the same training, data-parallel (docs/distributed.md)

Every command fails on bad input with a one-line message that names the file, column or option, and exit code 2.
"""

from __future__ import annotations

import sys
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from funnelrec.errors import FunnelrecError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="funnelrec: a multi-stage recommender system on a KuaiRand-calibrated simulator.")
data_app = typer.Typer(no_args_is_help=True, help="Datasets: convert, inspect.")
app.add_typer(data_app, name="data")
export_app = typer.Typer(no_args_is_help=True, help="Export trained artefacts.")
app.add_typer(export_app, name="export")
console = Console(stderr=True)


def _fail(err: Exception) -> None:
    # Plain text, never markup or wrapped: the message is one line and may contain brackets from user input.
    typer.echo(f"error: {' '.join(str(err).split())}", err=True)
    raise typer.Exit(code=2)


@app.command()
def simulate(
    out: Path = typer.Option(..., "--out", help="Output folder (created atomically; must not exist unless --force)."),
    profile: str = typer.Option("small", "--profile", help="World profile: small, bench-v1 or long."),
    config: Path = typer.Option(None, "--config", help="A world config YAML (as in configs/sim/); overrides --profile."),
    days: int = typer.Option(None, "--days", help="Days to simulate (default: the profile's)."),
    csv: bool = typer.Option(False, "--csv", help="Also write the official KuaiRand CSV file set into OUT/csv."),
    force: bool = typer.Option(False, "--force", help="Replace an existing output folder."),
    overrides: list[str] = typer.Argument(None, help="World config overrides, key=value (e.g. days=3)."),
) -> None:
    """Simulate a world and write its logs in the KuaiRand log schema (Parquet) plus side tables."""
    from funnelrec.sim import World

    try:
        if days is not None and days < 1:
            raise FunnelrecError(f"--days must be >= 1, got {days}")
        if out.exists() and not force:
            raise FunnelrecError(f"{out} already exists; pass --force to replace it")
        if config is not None:
            from funnelrec.sim.config import apply_overrides, load_world_config

            world = World(apply_overrides(load_world_config(str(config)), overrides or []))
        else:
            world = World.from_profile(profile, overrides or [])
        sim = world.simulate(days=days)
        sim.write(out)
        if csv:
            from funnelrec.data.loaders.kuairand import write_kuairand_csv

            write_kuairand_csv({"log": sim.log, "users": sim.users, "videos": sim.videos}, out / "csv")
    except FunnelrecError as err:
        _fail(err)
    log = sim.log
    console.print(f"wrote {log.height:,} impressions of {log['user_id'].n_unique():,} users over "
                  f"{log['date'].n_unique()} dates to [bold]{out}[/]")


@data_app.command("export-csv")
def export_csv(
    sim_dir: Path = typer.Argument(..., help="A folder written by `funnelrec simulate`."),
    out: Path = typer.Argument(..., help="Output folder for the KuaiRand CSV files."),
) -> None:
    """Write a simulated log as the official KuaiRand-Pure CSV file set."""
    from funnelrec.data.loaders.kuairand import load_kuairand, write_kuairand_csv

    try:
        data = load_kuairand(sim_dir)
        write_kuairand_csv(data, out)
    except FunnelrecError as err:
        _fail(err)
    console.print(f"wrote KuaiRand CSV files to [bold]{out}[/]")


@data_app.command("info")
def data_info(spec: str = typer.Argument(..., help="kuairand:PATH, movielens:PATH or recbole:PATH")) -> None:
    """Load a dataset and print its size."""
    from funnelrec.data.loaders import load_dataset

    try:
        data = load_dataset(spec)
    except FunnelrecError as err:
        _fail(err)
    table = Table(title=spec)
    table.add_column("table")
    table.add_column("rows", justify="right")
    table.add_column("columns")
    for name, value in vars(data).items():
        if hasattr(value, "height"):
            table.add_row(name, f"{value.height:,}", ", ".join(value.columns[:8]) + (" …" if value.width > 8 else ""))
    Console().print(table)


@app.command()
def bench(
    name: str = typer.Argument(..., help="Benchmark name, or `list`."),
    quick: bool = typer.Option(False, "--quick", help="A small, fast run (checked in the test suite)."),
    json_mode: bool = typer.Option(False, "--json", help="Print the figures as one flat JSON line, last."),
    no_write: bool = typer.Option(False, "--no-write", help="Do not write docs/results (full runs write)."),
    data: str = typer.Option(None, "--data", help="Data source of benchmarks that take one: sim:NAME[?k=v], "
                             "kuairand:PATH or movielens:PATH (default: the benchmark's own)."),
    seeds: int = typer.Option(None, "--seeds", help="Seeds of benchmarks that train models (default: theirs)."),
    rows: str = typer.Option(None, "--rows", help="Comma-separated rows of benchmarks made of rows (e.g. ranking): "
                             "run only these."),
    extend: bool = typer.Option(False, "--extend", help="With --rows: merge the rows into the previous full run's "
                                "results instead of replacing them (benchmarks that support it)."),
    threads: int = typer.Option(None, "--threads", help="Torch threads of benchmarks that fix them (default: "
                                "theirs, mostly 1)."),
) -> None:
    """Run a benchmark; full runs write docs/results/NAME.json and NAME.md."""
    import inspect

    from funnelrec.bench import get_benchmark, list_benchmarks, run_benchmark

    if name == "list":
        for n in list_benchmarks():
            print(n)
        return
    try:
        row_list = tuple(r.strip() for r in rows.split(",") if r.strip()) if rows is not None else None
        if row_list is not None and not row_list:
            raise FunnelrecError("--rows needs at least one row name")
        kwargs = {k: v for k, v in (("data", data), ("seeds", seeds), ("rows", row_list),
                                    ("extend", extend or None), ("threads", threads)) if v is not None}
        if kwargs:
            accepted = inspect.signature(get_benchmark(name)).parameters
            for key in kwargs:
                if key not in accepted:
                    raise FunnelrecError(f"benchmark {name!r} does not take --{key}")
        if seeds is not None and seeds < 1:
            raise FunnelrecError(f"--seeds must be >= 1, got {seeds}")
        if threads is not None and threads < 1:
            raise FunnelrecError(f"--threads must be >= 1, got {threads}")
        command = "funnelrec bench " + " ".join(sys.argv[sys.argv.index(name):]) if name in sys.argv else None
        run_benchmark(name, quick=quick, json_mode=json_mode, write=not no_write, command=command, **kwargs)
    except FunnelrecError as err:
        _fail(err)


@app.command()
def train(
    stage: str = typer.Argument(..., help="Funnel stage: ranking or retrieval."),
    overrides: list[str] = typer.Argument(None, help="RunConfig overrides, key=value (train.epochs=1, "
                                          "train.lr=1e-3, model_args.embed_dim=32, ...)."),
    model: str = typer.Option(None, "--model", help="Model name in the stage's registry (e.g. shared_bottom)."),
    data: str = typer.Option(None, "--data", help="sim:small | sim:bench-v1 | kuairand:PATH | movielens:PATH "
                             "(sim sources take ?key=value&... world overrides)."),
    config: Path = typer.Option(None, "--config", help="A RunConfig YAML (as in configs/train/)."),
    name: str = typer.Option(None, "--name", help="Run name: the folder runs/NAME (default: stage-model-time)."),
    resume: bool = typer.Option(False, "--resume", help="Continue runs/NAME from checkpoints/last.pt."),
    force: bool = typer.Option(False, "--force", help="Delete an existing runs/NAME and start over."),
) -> None:
    """Train a model of a funnel stage into runs/NAME (config.yaml, metrics.jsonl, checkpoints, plots).

    Also runs data-parallel under torchrun: `torchrun --nproc_per_node=N -m funnelrec train ...`.
    """
    from funnelrec.config import load_config
    from funnelrec.train.config import STAGES, RunConfig
    from funnelrec.train.distributed import destroy_distributed, is_rank0
    from funnelrec.train.run import load_run_config, train_run

    try:
        if stage not in STAGES:
            raise FunnelrecError(f"unknown stage {stage!r}; choose one of {', '.join(STAGES)}")
        if resume and force:
            raise FunnelrecError("--resume and --force exclude each other")
        flags = [f"stage={stage}"] + [f"{k}={v}" for k, v in (("model", model), ("data", data),
                                                                ("train.run_name", name)) if v is not None]
        cfg = load_config(RunConfig, config, flags + list(overrides or []))
        if resume:
            if not cfg.train.run_name:
                raise FunnelrecError("--resume needs --name (the run to continue)")
            run_dir = Path(cfg.train.runs_dir) / cfg.train.run_name
            if (run_dir / "config.yaml").is_file():
                saved = load_run_config(run_dir, list(overrides or []))
                for key, given in (("stage", stage), ("model", model), ("data", data)):
                    if given is not None and getattr(saved, key) != given:
                        raise FunnelrecError(f"--resume: {run_dir} was trained with {key}={getattr(saved, key)!r}, "
                                             f"not {given!r}")
                saved.train.run_name, saved.train.runs_dir = cfg.train.run_name, cfg.train.runs_dir
                cfg = saved
        result = train_run(cfg, resume=resume, force=force)
    except FunnelrecError as err:
        _fail(err)
    if is_rank0():
        metric = cfg.train.metric
        best = result.best_valid.get(metric)
        state = "stopped early" if result.stopped_early else ("done" if result.finished else "paused (max_steps)")
        console.print(f"{state}: {result.global_step:,} steps, best valid {metric} "
                      f"{best if best is None else f'{best:.4f}'} at epoch {result.best_epoch + 1}, "
                      f"{result.samples_per_s:,.0f} samples/s → [bold]{result.run_dir}[/]")
        console.print(f"next: funnelrec eval {result.run_dir} --split test")
    destroy_distributed()


@app.command("eval")
def eval_run(
    run: Path = typer.Argument(..., help="A run folder written by `funnelrec train` (runs/NAME)."),
    split: str = typer.Option("test", "--split", help="test, valid or train."),
    checkpoint: str = typer.Option("best", "--checkpoint", help="best or last."),
    json_mode: bool = typer.Option(False, "--json", help="Print the result as one JSON line."),
) -> None:
    """Evaluate a trained run on a split; writes runs/NAME/eval_<split>.json."""
    import json

    from funnelrec.train.run import evaluate_run, jsonable

    try:
        out = evaluate_run(run, split=split, checkpoint=checkpoint)
    except FunnelrecError as err:
        _fail(err)
    if json_mode:
        print(json.dumps(jsonable(out)))
        return
    table = Table(title=f"{out['model']} on {out['data']} — {split} ({checkpoint}.pt, epoch {out['epoch'] + 1})")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key, value in out["metrics"].items():
        table.add_row(key, f"{value:.4f}")
    Console().print(table)
    console.print(f"wrote {Path(run) / f'eval_{split}.json'}")


@app.command()
def demo(
    profile: str = typer.Option("small", "--profile", help="World profile of the demo."),
    epochs: int = typer.Option(6, "--epochs", help="Training epochs of the multi-task model."),
    seed: int = typer.Option(0, "--seed"),
    users: int = typer.Option(3000, "--users", help="Users of the demo world."),
    days: int = typer.Option(6, "--days", help="Days of the demo world (last = test, the one before = valid)."),
) -> None:
    """Simulate a world, train a multi-task ranker on its logs, and report it against popularity and the oracle."""
    from funnelrec.demo import run_demo

    try:
        if users < 1 or days < 3:
            raise FunnelrecError(f"--users must be >= 1 and --days >= 3 (train, valid, test), got {users}, {days}")
        run_demo(profile=profile, epochs=epochs, seed=seed, users=users, days=days)
    except FunnelrecError as err:
        _fail(err)


@export_app.command("bundle")
def export_bundle_cmd(
    out: Path = typer.Option(..., "--out", help="Bundle folder to write (e.g. bundles/demo)."),
    data: str = typer.Option("sim:small", "--data", help="Training data: sim:NAME[?k=v] or kuairand:PATH."),
    ranker: str = typer.Option("shared_bottom", "--ranker", help="Registered ranker name."),
    epochs: int = typer.Option(3, "--epochs", help="At most this many epochs for the retriever and the ranker."),
    seed: int = typer.Option(0, "--seed"),
    force: bool = typer.Option(False, "--force", help="Replace an existing bundle folder."),
    onnx: bool = typer.Option(False, "--onnx", help="Also export the ranker and pre-ranker to ONNX (onnx/)."),
) -> None:
    """Train every stage of the cascade on DATA and write them as one checksummed bundle."""
    from funnelrec.data.sources import load_source
    from funnelrec.serving.build import BuildConfig, train_cascade
    from funnelrec.serving.bundle import export_bundle

    try:
        if epochs < 1:
            raise FunnelrecError(f"--epochs must be >= 1, got {epochs}")
        if out.exists() and not force:
            raise FunnelrecError(f"bundle folder {out} exists (pass --force to replace it)")
        source = load_source(data)
        parts = train_cascade(source, BuildConfig(ranker=ranker, ranker_epochs=epochs, retriever_epochs=epochs,
                                                  seed=seed), console=console)
        path = export_bundle(parts, out, overwrite=force, onnx=onnx)
        console.print(f"wrote bundle {path} ({sum(f.stat().st_size for f in path.rglob('*') if f.is_file()) / 1e6:.1f}"
                      f" MB); serve it with `funnelrec serve --bundle {path}`")
    except FunnelrecError as err:
        _fail(err)


@app.command()
def serve(
    bundle: Path = typer.Option(..., "--bundle", help="A bundle folder (funnelrec export bundle)."),
    host: str = typer.Option("127.0.0.1", "--host", help="Interface to bind (loopback by default)."),
    port: int = typer.Option(8000, "--port", help="TCP port (0 = any free port)."),
    log_dir: Path = typer.Option(None, "--log-dir", help="Feedback log folder (default: BUNDLE/../feedback-NAME)."),
    port_file: Path = typer.Option(None, "--port-file", help="Write the bound port here once listening."),
    cache: str = typer.Option("memory", "--cache", help="Per-user result cache: memory, redis or none."),
    redis_url: str = typer.Option("redis://127.0.0.1:6379/0", "--redis-url", help="Redis of --cache redis."),
    runtime: str = typer.Option("torch", "--runtime", help="Ranking / pre-ranking runtime: torch or onnx "
                                "(a bundle exported with --onnx)."),
    cache_mode: str = typer.Option("serve", "--cache-mode", help="serve: answer from a user's cached next items "
                                   "whenever it holds enough; degrade: only when the service is overloaded."),
) -> None:
    """Serve a bundle's cascade over HTTP: /recommend, /feedback, /healthz, /metrics."""
    from funnelrec.serving.app import ServiceConfig
    from funnelrec.serving.bundle import load_bundle
    from funnelrec.serving.cascade_backend import CascadeBackend
    from funnelrec.serving.result_cache import CacheConfig, CachedBackend, make_cache
    from funnelrec.serving.server import serve as run_server

    try:
        if cache_mode not in ("serve", "degrade"):
            raise FunnelrecError(f"--cache-mode must be serve or degrade, got {cache_mode!r}")
        store = make_cache(cache, redis_url)
        cascade = load_bundle(bundle, runtime=runtime)
        logs = log_dir if log_dir is not None else bundle.parent / f"feedback-{bundle.name}"
        config = ServiceConfig(host=host, port=port, log_dir=str(logs), max_count=cascade.sizes.pool)
        backend = CascadeBackend(cascade)
        cached = CachedBackend(backend, store, CacheConfig(serve_cached=cache_mode == "serve")) if store else None
        run_server(backend if cached is None else cached, config, port_file=port_file)
    except FunnelrecError as err:
        _fail(err)


def main() -> None:  # pragma: no cover - console entry
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
