"""Data parallel: 2 gloo processes under torchrun train to the same parameters as 1 process on the same global
batches; sharding, epoch order and skipping."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from funnelrec.errors import ConfigError
from funnelrec.train import request_batches
from funnelrec.train.distributed import init_distributed, shard
from funnelrec.train.trainer import load_checkpoint

HERE = Path(__file__).resolve().parent
WORKER = HERE / "ddp_worker.py"
ROOT = HERE.parents[1]


def _torchrun() -> list[str]:
    exe = Path(sys.executable).parent / "torchrun"
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "torch.distributed.run"]


def _clean_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "PYTEST_XDIST_WORKER")}
    env["OMP_NUM_THREADS"] = "1"
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    return env


@pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                    reason="this torch build has no torch.distributed gloo backend")
def test_two_gloo_processes_match_one_process(tmp_path):
    """The worker trains the tiny ranker for 2 epochs × 6 global batches of 7 requests (shards of 4 + 3 requests
    with different numbers of real candidates) with AdamW + clipping, and again with row-wise Adagrad tables."""
    two = tmp_path / "two"
    two.mkdir()
    proc = subprocess.Popen([*_torchrun(), "--standalone", "--nproc_per_node=2", str(WORKER), str(two)],
                            cwd=tmp_path, env=_clean_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    # meanwhile, the same training in this process (world size 1, no process group)
    one = tmp_path / "one"
    one.mkdir()
    sys.path.insert(0, str(HERE))
    try:
        import ddp_worker

        ddp_worker.main(one)
    finally:
        sys.path.remove(str(HERE))
    try:
        out, _ = proc.communicate(timeout=180)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
        pytest.fail(f"torchrun timed out:\n{out[-3000:]}")
    assert proc.returncode == 0, out[-3000:]
    for opt in ("adamw", "rowwise_adagrad"):
        a = torch.load(one / f"result_{opt}.pt", weights_only=True)
        b = torch.load(two / f"result_{opt}.pt", weights_only=True)
        assert (a["world"], a["backend"]) == (1, None) and (b["world"], b["backend"]) == (2, "gloo")
        assert a["steps"] == b["steps"] == 12
        for name, value in a["params"].items():
            torch.testing.assert_close(b["params"][name], value, atol=1e-5, rtol=0, msg=f"{opt}: {name}")
        for ha, hb in zip(a["history"], b["history"], strict=True):
            assert hb["train_loss"] == pytest.approx(ha["train_loss"], abs=1e-5)
            assert hb["loss"] == pytest.approx(ha["loss"], abs=1e-5)
        # rank 0 alone wrote the run folder; the checkpoint holds both ranks' RNG states
        ckpt = load_checkpoint(two / f"run_{opt}" / "checkpoints" / "last.pt")
        assert ckpt["world_size"] == 2 and len(ckpt["rng"]) == 2 and ckpt["global_step"] == 12
        assert len((two / f"run_{opt}" / "metrics.jsonl").read_text().splitlines()) == 2


def test_world_size_one_runs_without_a_process_group(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    info = init_distributed("cpu")
    assert (info.rank, info.world_size, info.backend, info.distributed) == (0, 1, None, False)
    assert not dist.is_initialized()
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setenv("RANK", "0")
    assert init_distributed("cpu").backend is None and not dist.is_initialized()
    monkeypatch.setenv("RANK", "3")
    with pytest.raises(ConfigError, match="RANK=3"):
        init_distributed("cpu")


def test_shard_takes_contiguous_slices_of_every_global_batch():
    idx = list(range(10))
    parts = [shard(idx, r, 3) for r in range(3)]
    assert parts == [[0, 1, 2, 3], [4, 5, 6], [7, 8, 9]]
    assert torch.equal(shard(torch.arange(5), 1, 2), torch.tensor([3, 4]))
    with pytest.raises(ConfigError):
        shard(idx, 2, 2)


class _Ids:
    def __init__(self, n):
        self.n = n

    def __len__(self):
        return self.n

    def batch(self, idx):
        return torch.as_tensor(idx).tolist()


def test_epoch_batches_order_sharding_and_skip():
    ds = _Ids(23)
    one = list(request_batches(ds, 6, rank=0, world=1)(2, 5))
    assert len(one) == 4 and sorted(sum(one, [])) == list(range(23))
    # the order depends on (seed, epoch) only, and matches RequestDataset.iter_batches(seed=seed + epoch)
    assert one == list(request_batches(ds, 6, rank=0, world=1)(2, 5))
    assert one != list(request_batches(ds, 6, rank=0, world=1)(3, 5))
    expect = torch.randperm(23, generator=torch.Generator().manual_seed(7))
    assert one[0] == expect[:6].tolist()
    # two ranks: the concatenation of their shards is the global batch, rank 0 first
    r0 = list(request_batches(ds, 6, rank=0, world=2)(2, 5))
    r1 = list(request_batches(ds, 6, rank=1, world=2)(2, 5))
    assert [a + b for a, b in zip(r0, r1)] == one
    # skip resumes from a global batch without building the skipped ones
    epoch = request_batches(ds, 6, rank=0, world=1)(2, 5)
    assert len(epoch) == 4 and len(epoch.skip(3)) == 1 and list(epoch.skip(3)) == one[3:]
    # a last global batch smaller than the world is dropped under DDP (23 = 3 × 7 + 2, and 2 < 3 ranks)
    assert len(request_batches(ds, 7, rank=0, world=3)(0, 0)) == 3
    with pytest.raises(ConfigError, match="global batch size"):
        request_batches(ds, 2, rank=0, world=3)(0, 0)
