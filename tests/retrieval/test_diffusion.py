"""Gaussian diffusion: schedule properties (exponential vs linear, ᾱ monotone, T-invariant end point), the forward
closed form, reverse-chain shapes and seeded determinism, DDIM with T steps = the DDPM chain, the MLP U-Net, and
bad input."""

from __future__ import annotations

import math

import pytest
import torch

from funnelrec.errors import ConfigError, DataError
from funnelrec.retrieval.diffusion import (DiffusionConfig, GaussianDiffusion, MLPDenoiser, beta_rate, beta_schedule,
                                           ddim_timesteps, integrated_beta, timestep_embedding)


def _net(dim: int = 6, cond: int = 5, seed: int = 0) -> MLPDenoiser:
    torch.manual_seed(seed)
    return MLPDenoiser(dim, cond, hidden=16, time_dim=8)


# ------------------------------------------------------------------------------------------------ schedules


@pytest.mark.parametrize("schedule", ["exponential", "linear"])
@pytest.mark.parametrize("steps", [1, 10, 50])
def test_schedule_is_increasing_and_alpha_bar_monotone(schedule, steps):
    betas = beta_schedule(steps, schedule)
    assert betas.shape == (steps,) and betas.dtype == torch.float64
    assert ((betas > 0) & (betas < 1)).all()
    if steps > 1:
        assert (betas[1:] > betas[:-1]).all()  # noise grows along the chain
    abar = torch.cumprod(1 - betas, 0)
    assert (abar[1:] < abar[:-1]).all() and 0 < abar[-1] <= abar[0] < 1
    diff = GaussianDiffusion(DiffusionConfig(steps=steps, schedule=schedule))
    assert torch.allclose(diff.alpha_bar, abar)
    assert diff.alpha_bar_prev[0] == 1.0 and torch.allclose(diff.alpha_bar_prev[1:], abar[:-1])


def test_exponential_rate_is_geometric_and_below_linear():
    u = torch.linspace(0, 1, 11)
    exp_rate = beta_rate(u, "exponential", 0.1, 40.0)
    lin_rate = beta_rate(u, "linear", 0.1, 40.0)
    ratios = exp_rate[1:] / exp_rate[:-1]
    assert torch.allclose(ratios, ratios[0].expand_as(ratios))  # a constant growth factor: exponential
    assert torch.allclose(lin_rate[1:] - lin_rate[:-1], (lin_rate[1] - lin_rate[0]).expand(10))  # constant step
    assert torch.allclose(exp_rate[[0, -1]], lin_rate[[0, -1]])  # same end points
    assert (exp_rate[1:-1] < lin_rate[1:-1]).all()  # convex curve under its chord
    # so the exponential schedule noises more slowly: ᾱ_exp ≥ ᾱ_lin at every step, strictly inside
    for steps in (10, 50):
        a_exp = GaussianDiffusion(DiffusionConfig(steps=steps, schedule="exponential")).alpha_bar
        a_lin = GaussianDiffusion(DiffusionConfig(steps=steps, schedule="linear")).alpha_bar
        assert (a_exp > a_lin).all()
        assert (beta_schedule(steps, "exponential")[:steps // 2] < beta_schedule(steps, "linear")[:steps // 2]).all()


def test_integrated_rate_matches_numerical_integral_and_end_point_is_T_invariant():
    for schedule in ("exponential", "linear"):
        u = torch.linspace(0, 1, 20001, dtype=torch.float64)
        numeric = torch.trapezoid(beta_rate(u, schedule), u)
        assert float(integrated_beta(torch.tensor([1.0]), schedule)) == pytest.approx(float(numeric), rel=1e-6)
        # T only changes the discretisation (while no β hits the 0.999 cap: the linear rate's last step does for
        # T ≤ 5)
        ends = [float(GaussianDiffusion(DiffusionConfig(steps=t, schedule=schedule)).alpha_bar[-1])
                for t in (10, 50, 200)]
        assert ends == pytest.approx([ends[0]] * 3, rel=1e-9)
    end = math.exp(-float(integrated_beta(torch.tensor([1.0]), "exponential")))
    assert 1e-4 < end < 1e-2  # the default exponential schedule ends close to pure noise


def test_ddim_timesteps():
    assert ddim_timesteps(50, 50).tolist() == list(range(49, -1, -1))
    t = ddim_timesteps(50, 10)
    assert t[0] == 49 and t[-1] == 0 and len(t) == 10 and (t[:-1] > t[1:]).all()
    assert ddim_timesteps(7, 1).tolist() == [6]


# ------------------------------------------------------------------------------------------------ forward process


def test_q_sample_closed_form():
    diff = GaussianDiffusion(DiffusionConfig(steps=20))
    z0 = torch.randn(4, 3)
    noise = torch.randn(4, 3)
    t = torch.tensor([0, 5, 10, 19])
    out = diff.q_sample(z0, t, noise)
    abar = diff.alpha_bar[t].float().unsqueeze(1)
    assert torch.allclose(out, abar.sqrt() * z0 + (1 - abar).sqrt() * noise)


def test_chained_single_steps_match_the_closed_form():
    """Monte Carlo: t + 1 steps of q(z_t | z_{t-1}) from a fixed z_0 give mean √ᾱ_t z_0 and variance 1 − ᾱ_t."""
    torch.manual_seed(0)
    diff = GaussianDiffusion(DiffusionConfig(steps=10, schedule="exponential"))
    z0 = torch.tensor([1.5, -0.5, 0.0])
    z = z0.expand(200_000, 3).clone()
    for t in range(7):
        z = diff.q_step(z, torch.tensor(t))
    abar = float(diff.alpha_bar[6])
    assert torch.allclose(z.mean(0), math.sqrt(abar) * z0, atol=0.01)
    assert torch.allclose(z.var(0), torch.full((3,), 1 - abar), atol=0.01)


def test_training_loss_targets():
    diff = GaussianDiffusion(DiffusionConfig(steps=10, predict="eps"))
    z0, cond, noise = torch.randn(6, 4), torch.randn(6, 2), torch.randn(6, 4)
    t = torch.arange(6)
    oracle = lambda zt, tt, c: noise  # noqa: E731 - predicts the true noise
    assert float(diff.training_loss(oracle, z0, cond, t, noise)) == 0.0
    diff_x0 = GaussianDiffusion(DiffusionConfig(steps=10, predict="x0"))
    assert float(diff_x0.training_loss(lambda zt, tt, c: z0, z0, cond, t, noise)) == 0.0
    net = _net(4, 2)
    loss = diff.training_loss(net, z0, cond)
    loss.backward()
    assert loss.shape == () and all(p.grad is not None for p in net.parameters())


# ------------------------------------------------------------------------------------------------ reverse process


@pytest.mark.parametrize("predict", ["eps", "x0"])
def test_reverse_chain_shapes_and_seeded_determinism(predict):
    diff = GaussianDiffusion(DiffusionConfig(steps=12, predict=predict))
    net = _net()
    cond = torch.randn(7, 5)
    g = lambda: torch.Generator().manual_seed(3)  # noqa: E731
    for kw in ({}, {"sampler": "ddim", "steps": 4, "eta": 0.0}, {"sampler": "ddim", "steps": 4, "eta": 1.0}):
        a = diff.sample(net, cond, dim=6, generator=g(), **kw)
        b = diff.sample(net, cond, dim=6, generator=g(), **kw)
        assert a.shape == (7, 6) and torch.equal(a, b) and torch.isfinite(a).all()
        c = diff.sample(net, cond, dim=6, generator=torch.Generator().manual_seed(4), **kw)
        assert not torch.equal(a, c)
    # leading dims are free
    assert diff.sample(net, torch.randn(2, 3, 5), dim=6).shape == (2, 3, 6)
    # the global generator is used when none is given: seeding it reproduces the sample
    torch.manual_seed(9)
    a = diff.sample(net, cond, dim=6)
    torch.manual_seed(9)
    assert torch.equal(a, diff.sample(net, cond, dim=6))


def test_ddim_eta0_does_not_use_step_noise():
    diff = GaussianDiffusion(DiffusionConfig(steps=10))
    net = _net()
    cond = torch.randn(3, 5)
    # same start noise (the first draw), different step noise afterwards: η = 0 ignores the step noise
    g1, g2 = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    a = diff.sample(net, cond, dim=6, sampler="ddim", steps=5, eta=0.0, generator=g1)

    start = torch.randn((3, 6), generator=g2)
    calls = {"n": 0}

    def _draw(shape, noise_shape, like, generator):
        calls["n"] += 1
        return start if calls["n"] == 1 else torch.randn(tuple(shape)) * 100.0

    diff._draw = _draw  # type: ignore[method-assign]
    b = diff.sample(net, cond, dim=6, sampler="ddim", steps=5, eta=0.0)
    assert calls["n"] == 6 and torch.allclose(a, b, atol=1e-6)


def test_ddim_with_all_steps_and_eta1_is_the_ddpm_chain():
    for predict, schedule in (("eps", "exponential"), ("x0", "linear"), ("eps", "linear")):
        diff = GaussianDiffusion(DiffusionConfig(steps=25, predict=predict, schedule=schedule))
        net = _net(seed=1)
        cond = torch.randn(5, 5)
        ddpm = diff.sample(net, cond, dim=6, sampler="ddpm", generator=torch.Generator().manual_seed(0))
        ddim = diff.sample(net, cond, dim=6, sampler="ddim", steps=25, eta=1.0,
                           generator=torch.Generator().manual_seed(0))
        assert torch.allclose(ddpm, ddim, atol=1e-4, rtol=1e-4), (predict, schedule)
        fewer = diff.sample(net, cond, dim=6, sampler="ddim", steps=5, eta=1.0,
                            generator=torch.Generator().manual_seed(0))
        assert not torch.allclose(ddpm, fewer, atol=1e-3)


def test_shared_noise_makes_rows_independent_of_the_batch():
    diff = GaussianDiffusion(DiffusionConfig(steps=8))
    net = _net()
    cond = torch.randn(6, 5)
    full = diff.sample(net, cond, dim=6, generator=torch.Generator().manual_seed(0), noise_shape=(1, 6))
    part = diff.sample(net, cond[3:5], dim=6, generator=torch.Generator().manual_seed(0), noise_shape=(1, 6))
    assert torch.allclose(full[3:5], part, atol=1e-6)


def test_a_trained_denoiser_recovers_the_data_distribution():
    """A conditional two-point distribution: z_0 = ±cond. After training, samples land near one of the points."""
    torch.manual_seed(0)
    diff = GaussianDiffusion(DiffusionConfig(steps=20, predict="x0"))
    net = MLPDenoiser(2, 2, hidden=64, time_dim=16)
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    for _ in range(600):
        cond = torch.nn.functional.normalize(torch.randn(256, 2), dim=1) * 2
        sign = torch.randint(0, 2, (256, 1)) * 2 - 1
        loss = diff.training_loss(net, cond * sign, cond)
        opt.zero_grad()
        loss.backward()
        opt.step()
    cond = torch.nn.functional.normalize(torch.randn(500, 2), dim=1) * 2
    z = diff.sample(net, cond, generator=torch.Generator().manual_seed(0))
    dist = torch.minimum((z - cond).norm(dim=1), (z + cond).norm(dim=1))
    assert float(dist.median()) < 0.5  # near one of the two modes (pure noise: ~2)
    before = diff.sample(MLPDenoiser(2, 2, hidden=64, time_dim=16), cond, generator=torch.Generator().manual_seed(0))
    assert float(torch.minimum((before - cond).norm(dim=1), (before + cond).norm(dim=1)).median()) > 0.5


# ------------------------------------------------------------------------------------------------ pieces, bad input


def test_denoiser_and_time_embedding():
    emb = timestep_embedding(torch.tensor([0, 1, 49]), 9)
    assert emb.shape == (3, 9) and torch.allclose(emb[0, :4], torch.ones(4))
    net = _net()
    out = net(torch.randn(2, 4, 6), torch.zeros(2, 4, dtype=torch.int64), torch.randn(2, 4, 5))
    assert out.shape == (2, 4, 6)


@pytest.mark.parametrize("kw, match", [({"steps": 0}, "steps"), ({"steps": 2.5}, "steps"),
                                       ({"schedule": "cosine"}, "schedule"), ({"beta_min": 0.0}, "beta_min"),
                                       ({"beta_min": 5.0, "beta_max": 1.0}, "beta_min"),
                                       ({"predict": "v"}, "predict"), ({"clip_x0": -1.0}, "clip_x0")])
def test_bad_config(kw, match):
    with pytest.raises(ConfigError, match=match):
        DiffusionConfig(**kw)


def test_bad_calls():
    diff = GaussianDiffusion(DiffusionConfig(steps=5))
    net = _net()
    with pytest.raises(ConfigError, match="sampler"):
        diff.sample(net, torch.randn(2, 5), dim=6, sampler="euler")
    with pytest.raises(ConfigError, match="sampling steps"):
        diff.sample(net, torch.randn(2, 5), dim=6, sampler="ddim", steps=6)
    with pytest.raises(ConfigError, match="eta"):
        diff.sample(net, torch.randn(2, 5), dim=6, sampler="ddim", eta=-1.0)
    with pytest.raises(DataError, match="step indices"):
        diff.q_sample(torch.randn(2, 3), torch.tensor([0, 5]))
    with pytest.raises(DataError, match="z0 must be"):
        diff.training_loss(net, torch.randn(2, 3, 6), torch.randn(2, 5))
    with pytest.raises(ConfigError, match="hidden"):
        MLPDenoiser(4, 4, hidden=1)


def test_docstring_examples_run():
    import doctest

    import funnelrec.retrieval.diffusion as module

    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0
