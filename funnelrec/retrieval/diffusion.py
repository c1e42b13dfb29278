"""Gaussian diffusion over vectors: β schedules, forward noising, the DDPM reverse chain, DDIM, an MLP U-Net.

Generic (nothing here knows about users or items); :mod:`funnelrec.retrieval.t2diff` diffuses next-item drift with
it. Shapes: ``[..., D]`` data (any leading dims, D the width), ``[..., C]`` condition, ``[...]`` integer step
index; T the number of diffusion steps, S the number of reverse steps a sampler takes (S = T for DDPM).

**Steps.** Step indices are 0-based, ``t = 0 .. T-1`` (the papers' ``r = t + 1``). ``ᾱ_t = Π_{s ≤ t} (1 − β_s)``;
``ᾱ_{-1} = 1`` (clean data).

**Schedules** (:func:`beta_schedule`). From DDPM: the forward process ``q(z_t | z_{t-1}) = N(√(1−β_t) z_{t-1},
β_t I)`` and its closed form ``q(z_t | z_0) = N(√ᾱ_t z_0, (1 − ᾱ_t) I)``. From T2Diff: the *exponential* β schedule
(its paper found exponential > linear > log). Ours: the schedules are defined in continuous time, as in the
variance-preserving SDE (Song et al. 2021), by a rate ``β(u)`` on ``u ∈ [0, 1]``:

* ``"exponential"``: ``β(u) = β_min · (β_max / β_min)^u`` (geometric growth: slow noising first, fast at the end);
* ``"linear"``: ``β(u) = β_min + u · (β_max − β_min)``;

and ``ᾱ(u) = exp(−∫_0^u β)`` (closed form) is sampled at ``u = (t + 1) / T``, so ``β_t = 1 − ᾱ_t / ᾱ_{t−1}``
(capped at 0.999). ``ᾱ`` at the last step is then the same for every T: changing T changes only how finely the
same noising path is cut, which is what the T ablation should vary. With the same ``β_min, β_max`` the exponential
rate lies below the linear one everywhere (a convex curve under its chord), so ``ᾱ_exp ≥ ᾱ_lin`` at every step.

**Training** (:meth:`GaussianDiffusion.training_loss`): a uniform step t, ``z_t = √ᾱ_t z_0 + √(1−ᾱ_t) ε``, and the
MSE between the denoiser's output and ``ε`` (``predict="eps"``, the simplified VLB of DDPM, T2Diff's Eq. 23
reading) or ``z_0`` (``predict="x0"``, as DiffuRec / DreamRec do).

**Sampling** (:meth:`GaussianDiffusion.sample`), from pure noise ``z_{T−1} ~ N(0, I)``:

* ``"ddpm"``: ancestral sampling through all T steps, ``z_{t−1} = μ̃_t(ẑ_0, z_t) + σ_t ξ`` with the posterior mean
  ``μ̃_t = √ᾱ_{t−1} β_t / (1−ᾱ_t) · ẑ_0 + √α_t (1−ᾱ_{t−1}) / (1−ᾱ_t) · z_t`` and ``σ_t² = β̃_t =
  (1−ᾱ_{t−1}) / (1−ᾱ_t) · β_t`` (DDPM, Ho et al. 2020);
* ``"ddim"``: S evenly spaced steps ``τ_S > … > τ_1`` (:func:`ddim_timesteps`), ``z_{τ'} = √ᾱ_{τ'} ẑ_0 +
  √(1 − ᾱ_{τ'} − σ²) ε̂ + σ ξ`` with ``σ = η √((1−ᾱ_{τ'}) / (1−ᾱ_τ)) √(1 − ᾱ_τ / ᾱ_{τ'})`` (Song et al. 2021).
  ``η = 0`` is deterministic; with ``S = T`` and ``η = 1`` DDIM *is* the DDPM chain (tested: the same noise gives
  the same sample).

Both samplers draw the start noise and then one noise per step (also at the last step, where σ = 0), in that order,
so one generator gives both the same stream. ``noise_shape`` draws smaller noise and broadcasts it (e.g. ``(1, D)``
for a noise sequence shared by every row of a batch, which makes a row's sample independent of its batch).

Example:
    >>> import torch
    >>> diff = GaussianDiffusion(DiffusionConfig(steps=10))
    >>> net = MLPDenoiser(dim=4, cond_dim=3, hidden=16)
    >>> z0, cond = torch.randn(8, 4), torch.randn(8, 3)
    >>> diff.training_loss(net, z0, cond).shape
    torch.Size([])
    >>> diff.sample(net, cond, dim=4, generator=torch.Generator().manual_seed(0)).shape
    torch.Size([8, 4])
    >>> diff.sample(net, cond, dim=4, sampler="ddim", steps=3, eta=0.0).shape
    torch.Size([8, 4])
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from funnelrec.errors import ConfigError, DataError

__all__ = ["SCHEDULES", "SAMPLERS", "PREDICTS", "DiffusionConfig", "GaussianDiffusion", "MLPDenoiser",
           "beta_schedule", "beta_rate", "integrated_beta", "ddim_timesteps", "timestep_embedding"]

SCHEDULES = ("exponential", "linear")
SAMPLERS = ("ddpm", "ddim")
PREDICTS = ("eps", "x0")
#: The largest β a discretised schedule may take (β = 1 would erase the data in one step).
MAX_BETA = 0.999

#: ``denoiser(z_t [..., D], t [...] int64, cond [..., C]) -> [..., D]`` (ε or z_0, by ``predict``); ``t`` may be a
#: 0-d tensor shared by every row (the reverse chain passes one).
Denoiser = Callable[[Tensor, Tensor, Tensor], Tensor]


def _check_rates(schedule: str, beta_min: float, beta_max: float) -> None:
    if schedule not in SCHEDULES:
        raise ConfigError(f"diffusion: schedule must be one of {', '.join(SCHEDULES)}, got {schedule!r}")
    if not (isinstance(beta_min, (int, float)) and isinstance(beta_max, (int, float)) and 0 < beta_min < beta_max
            and math.isfinite(beta_max)):
        raise ConfigError(f"diffusion: need 0 < beta_min < beta_max (finite), got {beta_min!r} and {beta_max!r}")


def beta_rate(u: Tensor, schedule: str = "exponential", beta_min: float = 0.1, beta_max: float = 40.0) -> Tensor:
    """The continuous noise rate ``β(u)`` at times ``u ∈ [0, 1]`` (see the module doc).

    Example:
        >>> r = beta_rate(torch.tensor([0.0, 0.5, 1.0]), "exponential", 1.0, 4.0)
        >>> r.tolist()
        [1.0, 2.0, 4.0]
    """
    _check_rates(schedule, beta_min, beta_max)
    u = u.to(torch.float64)
    if schedule == "exponential":
        return beta_min * (beta_max / beta_min) ** u
    return beta_min + u * (beta_max - beta_min)


def integrated_beta(u: Tensor, schedule: str = "exponential", beta_min: float = 0.1, beta_max: float = 40.0
                    ) -> Tensor:
    """``∫_0^u β(s) ds`` in closed form (float64), so ``ᾱ(u) = exp(−integrated_beta(u))``.

    Example:
        >>> integrated_beta(torch.tensor([1.0]), "linear", 1.0, 3.0).tolist()
        [2.0]
    """
    _check_rates(schedule, beta_min, beta_max)
    u = u.to(torch.float64)
    if schedule == "exponential":
        log_r = math.log(beta_max / beta_min)
        return beta_min * (torch.exp(u * log_r) - 1.0) / log_r
    return beta_min * u + 0.5 * (beta_max - beta_min) * u * u


def beta_schedule(steps: int, schedule: str = "exponential", beta_min: float = 0.1, beta_max: float = 40.0
                  ) -> Tensor:
    """[T] float64 ``β_t`` of a T-step discretisation of a continuous schedule (see the module doc).

    Args:
        steps: T ≥ 1.
        schedule: ``"exponential"`` or ``"linear"``.
        beta_min / beta_max: the rate ``β(u)`` at ``u = 0`` and ``u = 1``.

    Example:
        >>> b = beta_schedule(50)
        >>> bool((b[1:] > b[:-1]).all()), b.shape
        (True, torch.Size([50]))
    """
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ConfigError(f"diffusion: steps must be an integer >= 1, got {steps!r}")
    u = torch.arange(steps + 1, dtype=torch.float64) / steps
    log_abar = -integrated_beta(u, schedule, beta_min, beta_max)  # [T + 1], index 0 = clean data
    return (1.0 - torch.exp(log_abar[1:] - log_abar[:-1])).clamp(max=MAX_BETA)


def ddim_timesteps(num_steps: int, steps: int) -> Tensor:
    """[S] int64 the step indices a S-step DDIM sampler visits, descending from ``num_steps − 1`` to 0, evenly
    spaced (S = ``steps`` ≤ T = ``num_steps``; S = T visits every step).

    Example:
        >>> ddim_timesteps(50, 5).tolist()
        [49, 37, 24, 12, 0]
    """
    if isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps <= num_steps:
        raise ConfigError(f"diffusion: sampling steps must be an integer in [1, {num_steps}], got {steps!r}")
    if steps == 1:
        return torch.tensor([num_steps - 1], dtype=torch.int64)
    return torch.linspace(num_steps - 1, 0, steps, dtype=torch.float64).round().to(torch.int64)


def timestep_embedding(t: Tensor, dim: int, max_period: float = 10_000.0) -> Tensor:
    """[..., dim] sinusoidal embedding of integer steps ``t`` [...] (the Transformer / DDPM one).

    Example:
        >>> timestep_embedding(torch.tensor([0, 5]), 8).shape
        torch.Size([2, 8])
    """
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / max(half, 1))
    args = t.to(torch.float32).unsqueeze(-1) * freqs
    emb = torch.cat([torch.cos(args), torch.sin(args)], -1)
    return F.pad(emb, (0, dim - 2 * half))


@dataclass
class DiffusionConfig:
    """A Gaussian diffusion.

    Args:
        steps: T, diffusion steps.
        schedule: ``"exponential"`` (T2Diff) or ``"linear"``.
        beta_min / beta_max: the continuous rate at the start and the end (see the module doc); the defaults give
            ``ᾱ`` ≈ 1.3e-3 at the last step of the exponential schedule (≈ 2e-9 for the linear one).
        predict: what the denoiser outputs: ``"eps"`` (the added noise) or ``"x0"`` (the clean data).
        clip_x0: clamp the estimated ``ẑ_0`` to ``[-clip_x0, clip_x0]`` while sampling (None: no clamp).
    """

    steps: int = 50
    schedule: str = "exponential"
    beta_min: float = 0.1
    beta_max: float = 40.0
    predict: str = "eps"
    clip_x0: float | None = None

    def __post_init__(self) -> None:
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 1:
            raise ConfigError(f"diffusion: steps must be an integer >= 1, got {self.steps!r}")
        _check_rates(self.schedule, self.beta_min, self.beta_max)
        if self.predict not in PREDICTS:
            raise ConfigError(f"diffusion: predict must be one of {', '.join(PREDICTS)}, got {self.predict!r}")
        if self.clip_x0 is not None and not (isinstance(self.clip_x0, (int, float)) and self.clip_x0 > 0):
            raise ConfigError(f"diffusion: clip_x0 must be > 0 or None, got {self.clip_x0!r}")


def _at(values: Tensor, t: Tensor, like: Tensor) -> Tensor:
    """``values[t]`` as ``like``'s dtype, shaped to broadcast over ``like`` [..., D] (t [...] or a scalar)."""
    v = values.to(like.device)[t].to(like.dtype)
    return v.reshape(*v.shape, *([1] * (like.dim() - v.dim())))


class GaussianDiffusion(nn.Module):
    """The schedule's constants (float64 buffers) and the forward, training and reverse processes.

    Args:
        config: :class:`DiffusionConfig`.

    Buffers ([T] float64): ``betas``, ``alphas`` (1 − β), ``alpha_bar`` (ᾱ_t), ``alpha_bar_prev`` (ᾱ_{t−1}, 1 at
    t = 0), ``posterior_variance`` (β̃_t).
    """

    def __init__(self, config: DiffusionConfig | None = None):
        super().__init__()
        c = self.config = config or DiffusionConfig()
        betas = beta_schedule(c.steps, c.schedule, c.beta_min, c.beta_max)
        alphas = 1.0 - betas
        abar = torch.cumprod(alphas, 0)
        abar_prev = torch.cat([torch.ones(1, dtype=torch.float64), abar[:-1]])
        self.register_buffer("betas", betas, persistent=False)
        self.register_buffer("alphas", alphas, persistent=False)
        self.register_buffer("alpha_bar", abar, persistent=False)
        self.register_buffer("alpha_bar_prev", abar_prev, persistent=False)
        self.register_buffer("posterior_variance", betas * (1.0 - abar_prev) / (1.0 - abar), persistent=False)
        # the same constants as Python floats: the reverse chain reads a few per step, without tensor round trips
        self._abar = abar.tolist()
        self._abar_prev = abar_prev.tolist()
        self._beta = betas.tolist()
        self._post_var = (betas * (1.0 - abar_prev) / (1.0 - abar)).tolist()

    @property
    def num_steps(self) -> int:
        """T."""
        return self.config.steps

    # ------------------------------------------------------------------ forward process
    def _check_t(self, t: Tensor) -> Tensor:
        t = torch.as_tensor(t, dtype=torch.int64)
        if t.numel() and (int(t.min()) < 0 or int(t.max()) >= self.num_steps):
            raise DataError(f"step indices must lie in [0, {self.num_steps}), got {int(t.min())}..{int(t.max())}",
                            column="t")
        return t

    def q_sample(self, z0: Tensor, t: Tensor, noise: Tensor | None = None) -> Tensor:
        """Draw ``z_t ~ q(z_t | z_0)``: ``√ᾱ_t z_0 + √(1−ᾱ_t) ε`` (the closed form).

        Args:
            z0: [..., D] clean data.
            t: [...] (or scalar) step indices in [0, T).
            noise: [..., D] ε (default: ``torch.randn_like(z0)``).
        """
        t = self._check_t(t)
        noise = torch.randn_like(z0) if noise is None else noise
        return _at(self.alpha_bar, t, z0).sqrt() * z0 + (1.0 - _at(self.alpha_bar, t, z0)).sqrt() * noise

    def q_step(self, z_prev: Tensor, t: Tensor, noise: Tensor | None = None) -> Tensor:
        """One forward step ``z_t ~ q(z_t | z_{t−1}) = N(√(1−β_t) z_{t−1}, β_t I)`` (z_prev [..., D], t [...])."""
        t = self._check_t(t)
        noise = torch.randn_like(z_prev) if noise is None else noise
        return _at(self.alphas, t, z_prev).sqrt() * z_prev + _at(self.betas, t, z_prev).sqrt() * noise

    # ------------------------------------------------------------------ training
    def training_loss(self, denoiser: Denoiser, z0: Tensor, cond: Tensor, t: Tensor | None = None,
                      noise: Tensor | None = None) -> Tensor:
        """Scalar MSE of the denoiser's prediction (ε or z_0, by ``config.predict``) at uniform random steps.

        Args:
            denoiser: ``fn(z_t [P, D], t [P], cond [P, C]) -> [P, D]``.
            z0: [P, D] clean data.
            cond: [P, C] conditions.
            t: [P] step indices (default: uniform in [0, T)).
            noise: [P, D] ε (default: standard normal).
        """
        if z0.dim() != 2 or cond.dim() != 2 or cond.shape[0] != z0.shape[0]:
            raise DataError(f"z0 must be [P, D] and cond [P, C], got {list(z0.shape)} and {list(cond.shape)}",
                            column="z0")
        if t is None:
            t = torch.randint(0, self.num_steps, (z0.shape[0],), device=z0.device)
        noise = torch.randn_like(z0) if noise is None else noise
        zt = self.q_sample(z0, t, noise)
        target = noise if self.config.predict == "eps" else z0
        return F.mse_loss(denoiser(zt, t, cond), target)

    # ------------------------------------------------------------------ reverse process
    def predict_x0_eps(self, denoiser: Denoiser, zt: Tensor, t: int, cond: Tensor) -> tuple[Tensor, Tensor]:
        """``(ẑ_0, ε̂)`` at step ``t`` (an int, shared by the batch) from the denoiser's output (either kind);
        ẑ_0 is clamped by ``config.clip_x0`` and ε̂ recomputed from it. The denoiser gets ``t`` as a 0-d tensor
        (it broadcasts over the rows)."""
        out = denoiser(zt, torch.tensor(t, dtype=torch.int64, device=zt.device), cond)
        abar = self._abar[t]
        if self.config.predict == "eps":
            x0 = (zt - math.sqrt(1.0 - abar) * out) / math.sqrt(abar)
        else:
            x0 = out
        if self.config.clip_x0 is not None:
            x0 = x0.clamp(-self.config.clip_x0, self.config.clip_x0)
        eps = (zt - math.sqrt(abar) * x0) / math.sqrt(1.0 - abar)
        return x0, eps

    def _draw(self, shape: Sequence[int], noise_shape: Sequence[int] | None, like: Tensor,
              generator: torch.Generator | None) -> Tensor:
        draw = tuple(noise_shape) if noise_shape is not None else tuple(shape)
        z = torch.randn(draw, generator=generator, device=like.device, dtype=like.dtype)
        return z.expand(*shape) if draw != tuple(shape) else z

    @torch.no_grad()
    def sample(self, denoiser: Denoiser, cond: Tensor, dim: int | None = None, sampler: str = "ddpm",
               steps: int | None = None, eta: float = 1.0, generator: torch.Generator | None = None,
               noise_shape: Sequence[int] | None = None) -> Tensor:
        """Run a reverse chain from pure noise; returns ẑ_0 [..., D] (no gradient).

        Args:
            denoiser: ``fn(z_t [..., D], t [...], cond [..., C]) -> [..., D]``.
            cond: [..., C] conditions (one chain per row).
            dim: D (default: C, the condition's width).
            sampler: ``"ddpm"`` (all T steps, ancestral) or ``"ddim"``.
            steps: S, the reverse steps of DDIM (default T; ignored by DDPM).
            eta: η of DDIM (0 deterministic, 1 = DDPM's variance).
            generator: the noise source (default: torch's global one).
            noise_shape: the shape of each noise draw, broadcast to ``[..., D]`` (default: the full shape).

        Returns:
            [..., D] the sample.
        """
        if sampler not in SAMPLERS:
            raise ConfigError(f"diffusion: sampler must be one of {', '.join(SAMPLERS)}, got {sampler!r}")
        if not (isinstance(eta, (int, float)) and eta >= 0):
            raise ConfigError(f"diffusion: eta must be >= 0, got {eta!r}")
        shape = (*cond.shape[:-1], int(dim if dim is not None else cond.shape[-1]))
        if sampler == "ddpm":
            ts = list(range(self.num_steps - 1, -1, -1))
        else:
            ts = ddim_timesteps(self.num_steps, self.num_steps if steps is None else steps).tolist()
        z = self._draw(shape, noise_shape, cond, generator)
        for j, t in enumerate(ts):
            x0, eps = self.predict_x0_eps(denoiser, z, t, cond)
            xi = self._draw(shape, noise_shape, cond, generator)
            if sampler == "ddpm":
                abar, abar_prev, beta = self._abar[t], self._abar_prev[t], self._beta[t]
                c0 = math.sqrt(abar_prev) * beta / (1.0 - abar)
                ct = math.sqrt(1.0 - beta) * (1.0 - abar_prev) / (1.0 - abar)
                z = c0 * x0 + ct * z + math.sqrt(self._post_var[t]) * xi
            else:
                abar = self._abar[t]
                abar_prev = self._abar[ts[j + 1]] if j + 1 < len(ts) else 1.0
                sigma = eta * math.sqrt((1.0 - abar_prev) / (1.0 - abar)) * math.sqrt(max(0.0, 1.0 - abar / abar_prev))
                dir_coef = math.sqrt(max(0.0, 1.0 - abar_prev - sigma * sigma))
                z = math.sqrt(abar_prev) * x0 + dir_coef * eps + sigma * xi
        return z


class MLPDenoiser(nn.Module):
    """A small MLP U-Net for vector data: an encoder path (H → H/2), a decoder path back to H with a skip
    connection from the encoder, and an output layer with a skip from the input, each block told the step by a
    sinusoidal embedding (the denoiser T2Diff's summary calls a U-Net; its exact form is not public).

    Args:
        dim: D, the data width.
        cond_dim: C, the condition width.
        hidden: H (the bottleneck is H // 2).
        time_dim: width of the sinusoidal step embedding.

    ``forward(z [..., D], t [...] int64 (or 0-d, shared by the rows), cond [..., C]) -> [..., D]``.

    Example:
        >>> net = MLPDenoiser(dim=4, cond_dim=6, hidden=16)
        >>> net(torch.randn(3, 4), torch.tensor([0, 1, 2]), torch.randn(3, 6)).shape
        torch.Size([3, 4])
    """

    def __init__(self, dim: int, cond_dim: int, hidden: int = 128, time_dim: int = 32):
        super().__init__()
        for name, value in (("dim", dim), ("cond_dim", cond_dim), ("hidden", hidden), ("time_dim", time_dim)):
            if isinstance(value, bool) or not isinstance(value, int) or value < (2 if name == "hidden" else 1):
                raise ConfigError(f"MLPDenoiser: {name} must be an integer >= {2 if name == 'hidden' else 1}, "
                                  f"got {value!r}")
        h, hb = hidden, hidden // 2
        self.time_dim = time_dim
        self.time = nn.Sequential(nn.Linear(time_dim, h), nn.SiLU(), nn.Linear(h, h + hb + h))
        self.inp = nn.Linear(dim + cond_dim, h)
        self.down = nn.Linear(h, hb)
        self.up = nn.Linear(hb + h, h)
        self.out = nn.Linear(h + dim, dim)
        self.act = nn.SiLU()
        self._split = (h, hb, h)

    def forward(self, z: Tensor, t: Tensor, cond: Tensor) -> Tensor:
        te1, te2, te3 = self.time(timestep_embedding(t, self.time_dim)).split(self._split, dim=-1)
        e1 = self.act(self.inp(torch.cat([z, cond], -1)) + te1)  # [..., H]
        e2 = self.act(self.down(e1) + te2)  # [..., H/2] bottleneck
        d1 = self.act(self.up(torch.cat([e2, e1], -1)) + te3)  # [..., H] with the encoder skip
        return self.out(torch.cat([d1, z], -1))  # [..., D] with the input skip
