"""The Trainer: exact resume mid-epoch, weights-only checkpoints, early stopping with the best weights restored,
the run folder, and the embedding-optimiser options."""

from __future__ import annotations

import json

import pytest
import torch
import yaml

import funnelrec.train.trainer as trainer_mod
from funnelrec.config import from_dict
from funnelrec.errors import ConfigError
from funnelrec.train import Trainer, TrainConfig, load_checkpoint, request_batches
from train_tiny import TinyRequests, full_loss, tiny_model

DATA = TinyRequests(q=42)  # batch_size 8 -> 6 global batches an epoch (5 of 8 requests, 1 of 2)


class Crash(RuntimeError):
    pass


def crashing(make, at: int):
    """A ``train_batches`` that raises when asked for global step ``at`` (0-based, counted over epochs)."""
    done = {"n": 0}

    def batches(epoch, seed):
        def gen():
            for b in make(epoch, seed):
                if done["n"] == at:
                    raise Crash(f"crash before step {at}")
                done["n"] += 1
                yield b
        return gen()

    return batches


def config(**kw) -> TrainConfig:
    base = dict(epochs=3, batch_size=8, lr=5e-3, sparse_lr=0.05, clip_norm=1.0, patience=5, metric="loss",
                metric_mode="min", seed=11, progress=False, device="cpu", checkpoint_every_steps=4)
    return TrainConfig(**{**base, **kw})


def make_trainer(run_dir, cfg, model_seed=0, batches=None, dropout=0.2, evaluate=True):
    model = tiny_model(model_seed, dropout=dropout)
    return Trainer(model, batches or request_batches(DATA, cfg.batch_size),
                   (lambda m: {"loss": full_loss(m, DATA)}) if evaluate else None, cfg, run_dir)


def _state(trainer):
    return {k: v.clone() for k, v in trainer.model.state_dict().items()}


def _assert_same_optimizers(a, b):
    for oa, ob in zip(a.optimizers, b.optimizers, strict=True):
        sa, sb = oa.state_dict(), ob.state_dict()
        assert sa["param_groups"] == sb["param_groups"]
        assert sa["state"].keys() == sb["state"].keys()
        for k in sa["state"]:
            for name, value in sa["state"][k].items():
                other = sb["state"][k][name]
                assert torch.equal(value, other) if torch.is_tensor(value) else value == other, (k, name)


@pytest.mark.parametrize("optimizer", ["adamw", "rowwise_adagrad"])
@pytest.mark.parametrize("stop", ["crash", "max_steps"])
def test_resume_mid_epoch_gives_the_uninterrupted_parameters(tmp_path, optimizer, stop):
    """18 steps uninterrupted vs. stopped at step 10 (epoch 2, step 4 of 6; last.pt from step 8 after a crash, from
    step 10 with max_steps), resumed in a fresh trainer from a differently initialised model with other RNG
    states: bit-identical parameters, optimiser states and history (dropout is on, so the RNGs matter)."""
    cfg = config(embedding_optimizer=optimizer)
    full = make_trainer(tmp_path / "full", cfg)
    full_result = full.fit()
    assert full_result.global_step == 18 and full_result.finished

    if stop == "crash":
        first = make_trainer(tmp_path / "cut", cfg, batches=crashing(request_batches(DATA, 8), at=10))
        with pytest.raises(Crash):
            first.fit()
        saved_step = 8
    else:
        first = make_trainer(tmp_path / "cut", config(embedding_optimizer=optimizer, max_steps=10))
        cut = first.fit()
        assert not cut.finished and cut.global_step == 10
        saved_step = 10
    ckpt = load_checkpoint(tmp_path / "cut" / "checkpoints" / "last.pt")
    assert (ckpt["epoch"], ckpt["step_in_epoch"], ckpt["global_step"]) == (1, saved_step - 6, saved_step)

    torch.manual_seed(12345)  # other RNG states and another initialisation: the checkpoint must restore both
    resumed = make_trainer(tmp_path / "cut", cfg, model_seed=7)
    result = resumed.fit(resume=True)
    assert result.global_step == 18 and result.finished
    final_full, final_resumed = _state(full), _state(resumed)
    for name in final_full:
        assert torch.equal(final_full[name], final_resumed[name]), name
    _assert_same_optimizers(full, resumed)
    timing = ("samples_per_s", "time_s")
    strip = lambda hist: [{k: v for k, v in h.items() if k not in timing} for h in hist]  # noqa: E731
    assert strip(result.history) == strip(full_result.history)  # the same losses and metrics, bit for bit
    assert result.best_epoch == full_result.best_epoch


def test_resume_needs_the_rng_states(tmp_path, monkeypatch):
    """Without restoring the RNG states (dropout masks) the resumed run ends elsewhere: the test above is real."""
    cfg = config()
    full = make_trainer(tmp_path / "full", cfg)
    full.fit()
    make_trainer(tmp_path / "cut", config(max_steps=10)).fit()
    monkeypatch.setattr(trainer_mod, "_set_rng_state", lambda s: None)
    torch.manual_seed(12345)
    resumed = make_trainer(tmp_path / "cut", cfg)
    resumed.fit(resume=True)
    assert any(not torch.equal(a, b) for a, b in zip(full.model.state_dict().values(),
                                                     resumed.model.state_dict().values()))


def test_checkpoints_load_with_weights_only(tmp_path):
    cfg = config(epochs=1, embedding_optimizer="rowwise_adagrad")
    trainer = make_trainer(tmp_path / "run", cfg)
    trainer.fit()
    for name in ("last.pt", "best.pt"):
        ckpt = torch.load(tmp_path / "run" / "checkpoints" / name, map_location="cpu", weights_only=True)
        assert set(ckpt) >= {"model", "optimizers", "rng", "epoch", "step_in_epoch", "global_step", "best_metric",
                             "history", "config"}
        assert ckpt["optimizer_names"] == ["AdamW", "RowWiseAdagrad"]
        rng = ckpt["rng"][0]
        assert rng["torch"].dtype == torch.uint8 and rng["numpy"]["keys"].shape == (624,)
        assert len(rng["python"]["state"]) == 625
        assert from_dict(TrainConfig, ckpt["config"]) == cfg
    assert not list((tmp_path / "run" / "checkpoints").glob(".*"))  # atomic writes leave no temporary file
    bad = tmp_path / "bad.pt"
    torch.save({"x": 1}, bad)
    with pytest.raises(ConfigError, match="not a funnelrec trainer checkpoint"):
        load_checkpoint(bad)
    bad.write_bytes(b"not a zip")
    with pytest.raises(ConfigError, match="bad.pt: not a readable checkpoint"):
        load_checkpoint(bad)
    with pytest.raises(ConfigError, match="no such checkpoint"):
        load_checkpoint(tmp_path / "none.pt")


def test_early_stopping_restores_the_best_checkpoint_and_writes_the_run_folder(tmp_path):
    """Scripted validation scores: best at epoch 1, two worse epochs -> stop after epoch 3 with epoch 1's weights
    (read back from best.pt); metrics.jsonl, learning_curve.png and config.yaml are written."""
    scores = iter([0.60, 0.90, 0.70, 0.65, 0.99])
    snapshots = []

    def scripted(model):
        snapshots.append({k: v.detach().clone() for k, v in model.state_dict().items()})
        return {"auc_mean": next(scores), "auc_other": 0.5}

    cfg = config(epochs=5, patience=2, metric="auc_mean", metric_mode="max", checkpoint_every_steps=0)
    model = tiny_model(0, dropout=0.0)
    trainer = Trainer(model, request_batches(DATA, cfg.batch_size), scripted, cfg, tmp_path / "run")
    result = trainer.fit()
    assert result.stopped_early and result.finished and result.best_epoch == 1 and len(result.history) == 4
    assert result.best_valid["auc_mean"] == 0.90 and result.global_step == 24
    for name, value in snapshots[1].items():
        assert torch.equal(model.state_dict()[name], value), name
    best = load_checkpoint(tmp_path / "run" / "checkpoints" / "best.pt")
    assert best["best_epoch"] == 1 and best["epoch"] == 2 and best["best_metric"] == 0.90
    last = load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")
    assert last["epoch"] == 4 and last["stopped_early"] and last["finished"]
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [x["epoch"] for x in lines] == [0, 1, 2, 3] and [x["best"] for x in lines] == [True, True, False, False]
    assert {"train_loss", "samples_per_s", "step", "auc_mean"} <= set(lines[0])
    assert (tmp_path / "run" / "learning_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["patience"] == 2
    # resuming a finished run trains nothing more
    again = Trainer(tiny_model(3), request_batches(DATA, cfg.batch_size), scripted, cfg, tmp_path / "run")
    assert again.fit(resume=True).global_step == 24


def test_min_mode_missing_metric_and_no_evaluation(tmp_path):
    cfg = config(epochs=2, metric="auc_mean")
    with pytest.raises(ConfigError, match="'auc_mean' is not among the evaluation metrics"):
        make_trainer(None, cfg).fit()
    result = make_trainer(None, config(epochs=2), evaluate=False).fit()  # no evaluation: all epochs, last kept
    assert result.best_epoch == 1 and len(result.history) == 2 and result.finished


def test_sparse_adam_and_sparse_tables_train(tmp_path):
    cfg = config(epochs=1, embedding_optimizer="sparse_adam", checkpoint_every_steps=0)
    trainer = make_trainer(None, cfg, dropout=0.0)
    for m in trainer.model.modules():
        if isinstance(m, torch.nn.Embedding):
            m.sparse = True  # sparse gradients straight from the lookups
    before = full_loss(trainer.model, DATA)
    trainer.fit()
    assert full_loss(trainer.model, DATA) < before


def test_a_model_without_parameters_is_only_evaluated(tmp_path):
    class Constant(torch.nn.Module):
        trainable = False

        def predict(self, batch):
            return torch.full((*batch.cand_items.shape, 6), 0.5)

    calls = []
    cfg = config(epochs=3)
    t = Trainer(Constant(), request_batches(DATA, 8), lambda m: calls.append(1) or {"loss": 1.0}, cfg,
                tmp_path / "run")
    result = t.fit()
    assert calls == [1] and result.global_step == 0 and result.finished
    assert (tmp_path / "run" / "checkpoints" / "best.pt").is_file()


def test_fit_without_a_run_folder_keeps_the_best_in_memory():
    scores = iter([0.2, 0.1, 0.3])
    cfg = config(epochs=3, patience=1, checkpoint_every_steps=0)
    trainer = make_trainer(None, cfg, dropout=0.0)
    seen = []

    def evaluate(model):
        seen.append({k: v.clone() for k, v in model.state_dict().items()})
        return {"loss": next(scores)}

    trainer.evaluate = evaluate
    result = trainer.fit()
    assert result.best_epoch == 1 and result.stopped_early and len(result.history) == 3
    assert all(torch.equal(trainer.model.state_dict()[k], v) for k, v in seen[1].items())


def test_a_nan_metric_is_best_only_until_a_finite_one(tmp_path):
    scores = iter([float("nan"), 0.3, float("nan"), 0.2])
    cfg = config(epochs=4, patience=3, metric="auc", metric_mode="max", checkpoint_every_steps=0)
    trainer = make_trainer(tmp_path / "run", cfg, dropout=0.0)
    trainer.evaluate = lambda m: {"auc": next(scores)}
    result = trainer.fit()
    assert [h["best"] for h in result.history] == [True, True, False, False] and result.best_epoch == 1
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert lines[0]["auc"] is None  # NaN is written as null
