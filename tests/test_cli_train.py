"""``funnelrec train`` / ``funnelrec eval``: the run folder, resume / force, eval reproducing the logged
validation metrics from the saved config, one-line errors with exit code 2."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from typer.testing import CliRunner

from funnelrec.cli import app

ROOT = Path(__file__).resolve().parents[1]
DATA = "sim:small?num_users=100&days=3"
FAST = ["train.progress=false", "train.batch_size=128", "train.history_len=10", "model_args.bottom=[32,16]"]


def _have(module: str, attr: str | None = None) -> bool:
    try:
        if importlib.util.find_spec(module) is None:
            return False
        return attr is None or hasattr(importlib.import_module(module), attr)
    except ImportError:
        return False


needs_ranking = pytest.mark.skipif(not (_have("funnelrec.data.sources", "load_source")
                                        and _have("funnelrec.ranking", "build_ranker")),
                                   reason="funnelrec.data.sources / funnelrec.ranking.build_ranker not there yet")
needs_retrieval = pytest.mark.skipif(not (_have("funnelrec.data.sources", "load_source")
                                          and _have("funnelrec.retrieval", "build_retriever")),
                                     reason="funnelrec.retrieval.build_retriever not there yet")


@pytest.fixture(autouse=True)
def _one_torch_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A working folder (runs/ goes there) and a private simulated-world cache."""
    root = tmp_path_factory.mktemp("cli_train")
    old_cwd, old_cache = os.getcwd(), os.environ.get("FUNNELREC_CACHE_DIR")
    os.environ["FUNNELREC_CACHE_DIR"] = str(root / "cache")
    os.chdir(root)
    yield root
    os.chdir(old_cwd)
    if old_cache is None:
        os.environ.pop("FUNNELREC_CACHE_DIR", None)
    else:
        os.environ["FUNNELREC_CACHE_DIR"] = old_cache


def invoke(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def ranking_run(workdir):
    res = invoke("train", "ranking", "--model", "shared_bottom", "--data", DATA, "--name", "r1", "train.epochs=1",
                 *FAST)
    assert res.exit_code == 0, res.output
    return workdir / "runs" / "r1"


@needs_ranking
def test_train_ranking_writes_the_run_folder(ranking_run):
    for name in ("config.yaml", "feature_spec.json", "metrics.jsonl", "learning_curve.png", "checkpoints/last.pt",
                 "checkpoints/best.pt"):
        assert (ranking_run / name).is_file(), name
    cfg = yaml.safe_load((ranking_run / "config.yaml").read_text())
    assert cfg["stage"] == "ranking" and cfg["model"] == "shared_bottom" and cfg["data"] == DATA
    assert cfg["train"]["epochs"] == 1 and cfg["train"]["run_name"] == "r1"
    assert cfg["model_args"] == {"bottom": [32, 16]}
    (line,) = [json.loads(x) for x in (ranking_run / "metrics.jsonl").read_text().splitlines()]
    assert {"auc_mean", "gauc_mean", "auc_is_click", "gauc_is_click", "train_loss", "samples_per_s"} <= set(line)
    torch.load(ranking_run / "checkpoints" / "best.pt", weights_only=True)


@needs_ranking
def test_eval_reads_the_run_back(ranking_run):
    res = invoke("eval", ranking_run, "--split", "test")
    assert res.exit_code == 0, res.output
    out = json.loads((ranking_run / "eval_test.json").read_text())
    assert out["split"] == "test" and out["checkpoint"] == "best" and 0 <= out["metrics"]["auc_mean"] <= 1
    # the data, features and weights rebuilt from the run folder give exactly the logged validation metrics
    res = invoke("eval", ranking_run, "--split", "valid", "--json")
    assert res.exit_code == 0, res.output
    valid = json.loads(res.stdout.strip().splitlines()[-1])["metrics"]
    logged = json.loads((ranking_run / "metrics.jsonl").read_text().splitlines()[0])
    assert valid["auc_mean"] == pytest.approx(logged["auc_mean"], abs=1e-6)
    assert valid["gauc_is_click"] == pytest.approx(logged["gauc_is_click"], abs=1e-6)


@needs_ranking
def test_existing_runs_need_resume_or_force(ranking_run):
    base = ["train", "ranking", "--model", "shared_bottom", "--data", DATA, "--name", "r1", *FAST]
    res = invoke(*base, "train.epochs=1")
    assert res.exit_code == 2 and "already exists" in res.stderr and "--resume" in res.stderr
    res = invoke(*base, "--resume", "--model", "mmoe")
    assert res.exit_code == 2 and "model='shared_bottom'" in " ".join(res.stderr.split())


@needs_ranking
def test_resume_continues_with_more_epochs(workdir):
    base = ["train", "ranking", "--model", "shared_bottom", "--data", DATA, "--name", "r2", *FAST]
    assert invoke(*base, "train.epochs=1").exit_code == 0
    res = invoke("train", "ranking", "--name", "r2", "--resume", "train.epochs=2", "train.patience=5")
    assert res.exit_code == 0, res.output
    lines = (workdir / "runs" / "r2" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["epoch"] for x in lines] == [0, 1]
    ckpt = torch.load(workdir / "runs" / "r2" / "checkpoints" / "last.pt", weights_only=True)
    assert ckpt["epoch"] == 2 and ckpt["finished"]
    res = invoke(*base, "--force", "train.epochs=1")  # --force starts over
    assert res.exit_code == 0, res.output
    assert len((workdir / "runs" / "r2" / "metrics.jsonl").read_text().splitlines()) == 1


@needs_retrieval
def test_train_and_eval_retrieval(workdir):
    res = invoke("train", "retrieval", "--model", "popularity", "--data", DATA, "--name", "p1",
                 "train.progress=false")
    assert res.exit_code == 0, res.output
    cfg = yaml.safe_load((workdir / "runs" / "p1" / "config.yaml").read_text())
    assert cfg["train"]["metric"] == "recall@50"  # the retrieval default
    res = invoke("eval", workdir / "runs" / "p1", "--split", "test", "--json")
    assert res.exit_code == 0, res.output
    assert "recall@50" in json.loads(res.stdout.strip().splitlines()[-1])["metrics"]


@pytest.mark.parametrize("args, needle", [
    (["train", "fusion", "--model", "x", "--data", DATA], "unknown stage 'fusion'"),
    (["train", "ranking", "--data", DATA, "train.epoks=1"], "unknown key 'train.epoks'"),
    (["train", "ranking", "--data", DATA, "train.epochs=zero"], "expected an integer"),
    (["train", "ranking", "--resume"], "--resume needs --name"),
    (["train", "ranking", "--config", "nope.yaml"], "nope.yaml: no such config file"),
    (["eval", "no/such/run"], "not a run folder"),
    (["eval", ".", "--split", "holdout"], "split must be"),
])
def test_bad_input_is_one_line_and_exit_2(workdir, args, needle):
    res = invoke(*args)
    assert res.exit_code == 2, res.output
    lines = [x for x in res.stderr.splitlines() if x.strip()]
    assert len(lines) == 1 and needle in lines[0], res.stderr


@needs_ranking
def test_config_file_and_flags(workdir):
    path = ROOT / "configs" / "train" / "ranking-shared_bottom-small.yaml"
    assert path.is_file()
    res = invoke("train", "ranking", "--config", path, "--data", DATA, "--name", "c1", "train.epochs=1", *FAST)
    assert res.exit_code == 0, res.output
    cfg = yaml.safe_load((workdir / "runs" / "c1" / "config.yaml").read_text())
    file_cfg = yaml.safe_load(path.read_text())
    assert cfg["data"] == DATA and cfg["train"]["lr"] == file_cfg["train"]["lr"]


@pytest.mark.slow
@needs_ranking
def test_torchrun_cli_matches_one_process(workdir):
    """`torchrun --nproc_per_node=2 -m funnelrec train ...` ends with the parameters of a 1-process run."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    args = ["train", "ranking", "--model", "shared_bottom", "--data", DATA, "train.epochs=1",
            "train.batch_size=64", *FAST[:1], *FAST[2:]]
    torchrun = Path(sys.executable).parent / "torchrun"
    subprocess.run([str(torchrun), "--standalone", "--nproc_per_node=2", "-m", "funnelrec", *args, "--name", "d2"],
                   check=True, env=env, cwd=workdir, capture_output=True)
    subprocess.run([sys.executable, "-m", "funnelrec", *args, "--name", "d1"], check=True, env=env, cwd=workdir,
                   capture_output=True)
    a = torch.load(workdir / "runs" / "d1" / "checkpoints" / "last.pt", weights_only=True)
    b = torch.load(workdir / "runs" / "d2" / "checkpoints" / "last.pt", weights_only=True)
    assert b["world_size"] == 2 and a["global_step"] == b["global_step"]
    for k, v in a["model"].items():
        torch.testing.assert_close(b["model"][k].float(), v.float(), atol=1e-5, rtol=0)
