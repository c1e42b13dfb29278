"""Start xMTF's inner stage from a randomly served log: least squares on realised watch time + monotonicity.

The paper trains the inner stage "by supervised learning" and distils the outer stage into it (BPR transfer);
it does not say what the supervised target is before the outer stage has learned anything. Ours, a selectable
start (``FusionPlan.inner_start = "random_log"`` in ``funnelrec.bench.fusion``):

1. **A randomly exposed slice.** Sessions of the training pool are served at random
   (:func:`collect_request_log`), as KuaiRand's ``is_rand`` traffic is: the served items then cover the
   candidate sets instead of a formula's top items, so the fit does not extrapolate from them.
2. **Least squares, with the paper's monotonicity loss.** The cells' sum, through a positive scale and a bias
   (dropped afterwards: they do not change the ranking), is fitted to the served items' realised watch
   seconds (standardised), L = λ·Σ_k L_k^mono + (1 − λ)·MSE, with the monotonicity hinge over each request's
   whole candidate set (λ = xMTF's λ; the "λ = 0" ablation fits without it). Early stopping on a hold-out of
   requests.

Why (``docs/results/fusion-headroom.md``, ``sim:bench-v1`` with the trained ranker's predictions): cells fitted
this way, without the monotonicity loss and served as they are, earn +5.3 % watch time per session over the
best formula RL, where the BPR warm start from a CEM formula earns about +1.8 % after RL. The hinge is applied
to scale·q, so that λ weighs it against the squared error in the same units; on the q scale (5× smaller) the
fitted cells kept 4.4 % violating pairs, against 0.5 % this way with 12 epochs (noisy-oracle predictions,
seed 0).

Example:
    >>> from funnelrec.fusion.xmtf import MonotonicFusionCells
    >>> log = RequestLog(pxtr=torch.rand(64, 8, 2), mask=torch.ones(64, 8, dtype=torch.bool),
    ...                  state=torch.randn(64, 3), served=torch.randint(0, 8, (64, 2)),
    ...                  watch_s=torch.rand(64, 2) * 30)
    >>> cells = MonotonicFusionCells(num_tasks=2, state_dim=3, hidden=4)
    >>> fig = fit_cells_to_log(cells, log, lam=0.4, config=LogFitConfig(epochs=2, batch=16))
    >>> sorted(fig)
    ['epochs', 'holdout_r2', 'mono', 'requests', 'scale']
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from funnelrec.config import check_positive_ints
from funnelrec.errors import ConfigError
from funnelrec.fusion.xmtf import MonotonicFusionCells, monotonicity_loss

__all__ = ["RequestLog", "LogFitConfig", "collect_request_log", "fit_cells_to_log"]


@dataclass
class RequestLog:
    """Logged requests: what was shown and what the served items earned.

    Args:
        pxtr: [N, C, T] predictions of every candidate.  mask: [N, C] valid candidates.
        state: [N, S] user state at the request.
        served: [N, P] candidate positions served (−1: no item served in that slot).
        watch_s: [N, P] realised watch seconds of the served items.
    """

    pxtr: Tensor
    mask: Tensor
    state: Tensor
    served: Tensor
    watch_s: Tensor

    def __len__(self) -> int:
        return self.pxtr.shape[0]

    def validate(self) -> "RequestLog":
        n, c = self.pxtr.shape[:2]
        shapes = {"mask": (self.mask, (n, c)), "state": (self.state, (n,)), "served": (self.served, (n,)),
                  "watch_s": (self.watch_s, (n, self.served.shape[-1]))}
        for name, (tensor, lead) in shapes.items():
            if tuple(tensor.shape[: len(lead)]) != lead:
                raise ConfigError(f"RequestLog.{name}: shape {tuple(tensor.shape)} does not start with "
                                  f"{lead} (pxtr is {tuple(self.pxtr.shape)})")
        if int((self.served >= c).sum()):
            raise ConfigError(f"RequestLog.served: positions must be < C={c} (or −1 for an empty slot)")
        if not bool((self.served >= 0).any()):
            raise ConfigError("RequestLog: no served item to fit on")
        return self


@torch.no_grad()
def collect_request_log(env, steps: int, seed: int) -> RequestLog:
    """Serve ``steps`` requests of every session of ``env`` (an autoreset ``SessionEnv``) in random order and
    log them (:class:`RequestLog`, N = steps × sessions)."""
    if steps < 1:
        raise ConfigError(f"collect_request_log: steps={steps!r} must be >= 1")
    if not env.cfg.autoreset:
        raise ConfigError("collect_request_log needs an env with autoreset=True (every row a live session)")
    g = torch.Generator().manual_seed(seed + 1)
    obs, _ = env.reset(seed=seed)
    rows = []
    for _ in range(steps):
        scores = torch.rand(obs["mask"].shape, generator=g)
        next_obs, _, _, _, info = env.step(scores)
        rows.append((obs["pxtr"], obs["mask"], obs["user_state"], info["served"], info["served_watch_s"]))
        obs = next_obs
    return RequestLog(*(torch.cat(parts) for parts in zip(*rows))).validate()


@dataclass
class LogFitConfig:
    """Settings of :func:`fit_cells_to_log`.

    Args:
        epochs: passes over the training requests (the epoch with the lowest hold-out loss is kept).
        batch: requests per Adam step.
        lr: Adam learning rate.
        holdout: share of requests held out for early stopping.
        max_start_scale: cap of the starting scale 1/std(Σ q) (a steeper start is unstable on noisy labels).
        mono_requests: requests of each batch whose whole candidate set enters the monotonicity hinge (the
            regression reads only the served items, so the hinge's C² pairs would otherwise dominate the
            cost).
    """

    epochs: int = 12
    batch: int = 1024
    lr: float = 2e-3
    holdout: float = 0.1
    max_start_scale: float = 5.0
    mono_requests: int = 256

    def validate(self) -> "LogFitConfig":
        check_positive_ints(self, ("epochs", "batch", "mono_requests"), "log-fit config")
        if self.lr <= 0 or self.max_start_scale <= 0:
            raise ConfigError(f"log-fit config: lr={self.lr!r} and max_start_scale={self.max_start_scale!r} "
                              "must be > 0")
        if not 0 < self.holdout < 1:
            raise ConfigError(f"log-fit config: holdout={self.holdout!r} must be in (0, 1)")
        return self


def fit_cells_to_log(cells: MonotonicFusionCells, log: RequestLog, lam: float,
                     config: LogFitConfig | None = None, seed: int = 0) -> dict[str, float]:
    """Fit ``cells`` in place: scale·Σ_k q_k + bias ≈ standardised watch seconds of the served items, plus
    λ·the monotonicity hinge over each request's candidates. Returns the fit's figures (hold-out R² of the kept
    epoch, its monotonicity loss, the scale, epochs, requests)."""
    cfg = (config or LogFitConfig()).validate()
    log.validate()
    if not 0 <= lam <= 1:
        raise ConfigError(f"fit_cells_to_log: lam={lam!r} must be in [0, 1]")
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(len(log), generator=g)
    cut = max(1, int(len(log) * cfg.holdout))
    hold, train = perm[:cut], perm[cut:]
    if len(train) == 0:
        raise ConfigError(f"fit_cells_to_log: {len(log)} requests leave none to train on")
    hit = log.served >= 0
    y_train = log.watch_s[train][hit[train]]
    mu, sd = y_train.mean(), y_train.std().clamp(min=1e-6)

    def predict(idx: Tensor, log_scale: Tensor, bias: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(squared error, monotonicity loss, z of the served items) of requests ``idx``: the cells read only
        the served items for the regression, and every candidate of the first ``mono_requests`` for the hinge."""
        served = log.served[idx].clamp(min=0)
        pxtr_served = log.pxtr[idx].gather(1, served.unsqueeze(-1).expand(-1, -1, log.pxtr.shape[-1]))
        z = cells(pxtr_served, log.state[idx]).sum(-1)
        sel = hit[idx]
        err = (log_scale.exp() * z + bias - (log.watch_s[idx] - mu) / sd)[sel]
        mono = torch.zeros(())
        if lam > 0:
            sub = idx[: cfg.mono_requests]
            # in the regression's units (scale·q), so that λ weighs the hinge against the squared error as the
            # paper's L_I weighs it against the transfer loss; the scale itself is left to the regression
            q = log_scale.detach().exp() * cells(log.pxtr[sub], log.state[sub])
            mono = monotonicity_loss(log.pxtr[sub], q, log.mask[sub])
        return err.pow(2).mean(), mono, z[sel]

    with torch.no_grad():  # start with standardised outputs, as the targets are
        z0 = predict(train[: cfg.batch], torch.zeros(()), torch.zeros(()))[2]
        scale0 = (1 / z0.std().clamp(min=1e-6)).clamp(max=cfg.max_start_scale)
    log_scale = torch.nn.Parameter(scale0.log())
    bias = torch.nn.Parameter(-z0.mean() * scale0)
    opt = torch.optim.Adam([*cells.parameters(), log_scale, bias], lr=cfg.lr)
    best: dict = {"loss": float("inf")}
    for epoch in range(cfg.epochs):
        cells.train()
        for idx in train[torch.randperm(len(train), generator=g)].split(cfg.batch):
            mse, mono, _ = predict(idx, log_scale, bias)
            loss = lam * mono + (1 - lam) * mse
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        cells.eval()
        with torch.no_grad():
            parts = [predict(idx, log_scale, bias) for idx in hold.split(cfg.batch)]
            mse = float(sum(p[0] * len(p[2]) for p in parts) / max(1, sum(len(p[2]) for p in parts)))
            mono = float(sum(p[1] for p in parts) / len(parts))
        loss = lam * mono + (1 - lam) * mse  # the kept epoch is the best by the loss the fit minimises
        if loss < best["loss"]:
            state = {k: v.detach().clone() for k, v in cells.state_dict().items()}
            best = {"loss": loss, "mse": mse, "mono": mono, "scale": float(log_scale.detach().exp()),
                    "epoch": epoch + 1, "state": state}
    cells.load_state_dict(best["state"])
    y_hold = (log.watch_s[hold][hit[hold]] - mu) / sd
    return {"holdout_r2": 1.0 - best["mse"] / float(y_hold.var().clamp(min=1e-12)), "mono": best["mono"],
            "scale": best["scale"], "epochs": float(best["epoch"]), "requests": float(len(log))}
