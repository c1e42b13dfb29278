"""Train the tiny ranker with the ``Trainer`` — under ``torchrun`` (gloo, N processes) or as a plain process.

    torchrun --standalone --nproc_per_node=2 tests/train/ddp_worker.py OUT_DIR
    python tests/train/ddp_worker.py OUT_DIR

For each embedding optimiser it trains a fresh model for 2 epochs of global batches of 7 requests (uneven shards:
4 + 3 requests, holding different numbers of real candidates) and rank 0 saves the final parameters,
the history and the world size to ``OUT_DIR/result_<optimiser>.pt``; the run folders go to ``OUT_DIR/run_<opt>``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from train_tiny import TinyRequests, full_loss, tiny_model  # noqa: E402

from funnelrec.train import Trainer, TrainConfig, request_batches  # noqa: E402
from funnelrec.train.distributed import destroy_distributed, init_distributed  # noqa: E402

OPTIMIZERS = ("adamw", "rowwise_adagrad")


def main(out: Path) -> None:
    torch.set_num_threads(1)
    info = init_distributed("cpu")
    data = TinyRequests(q=42)
    for opt in OPTIMIZERS:
        model = tiny_model(seed=0)
        cfg = TrainConfig(epochs=2, batch_size=7, lr=1e-2, sparse_lr=0.05, clip_norm=1.0, embedding_optimizer=opt,
                          metric="loss", metric_mode="min", patience=5, seed=3, progress=False, device="cpu")
        trainer = Trainer(model, request_batches(data, cfg.batch_size), lambda m: {"loss": full_loss(m, data)},
                          cfg, out / f"run_{opt}")
        result = trainer.fit()
        if info.rank == 0:
            torch.save({"params": {k: v.detach().clone() for k, v in model.state_dict().items()},
                        "history": result.history, "world": info.world_size, "backend": info.backend,
                        "steps": result.global_step}, out / f"result_{opt}.pt")
    destroy_distributed()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
