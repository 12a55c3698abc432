"""ELBO weights against an independent KL computation; DDPM/DDIM schedule settings."""

import torch
from torch.distributions import Normal, kl_divergence

from lightning_modules.diffusion import build_schedulers, elbo_weights


def test_elbo_weights_equal_the_per_timestep_kl():
    ddpm, _ = build_schedulers()
    w = elbo_weights(ddpm, normalize=False).double()
    betas = ddpm.betas.double()
    abar = torch.cumprod(1 - betas, 0)
    torch.manual_seed(0)
    x0, eps = torch.randn(64, dtype=torch.float64), torch.randn(64, dtype=torch.float64)
    eps_hat = eps + 0.1 * torch.randn(64, dtype=torch.float64)
    ratios = []
    for t in range(len(betas)):
        xt = abar[t].sqrt() * x0 + (1 - abar[t]).sqrt() * eps
        abar_prev = abar[t - 1] if t > 0 else torch.tensor(1.0, dtype=torch.float64)
        # true posterior q(x_{t-1} | x_t, x_0) and the model's Gaussian with the same variance
        mean_q = (abar_prev.sqrt() * betas[t] / (1 - abar[t])) * x0 + \
                 ((1 - betas[t]).sqrt() * (1 - abar_prev) / (1 - abar[t])) * xt
        x0_hat = (xt - (1 - abar[t]).sqrt() * eps_hat) / abar[t].sqrt()
        mean_p = (abar_prev.sqrt() * betas[t] / (1 - abar[t])) * x0_hat + \
                 ((1 - betas[t]).sqrt() * (1 - abar_prev) / (1 - abar[t])) * xt
        var = betas[t] * (1 - abar_prev) / (1 - abar[t]) if t > 0 else betas[0]
        kl = kl_divergence(Normal(mean_q, var.sqrt()), Normal(mean_p, var.sqrt())).sum()
        ratios.append(kl / ((eps - eps_hat) ** 2).sum())
    torch.testing.assert_close(torch.stack(ratios), w, rtol=1e-6, atol=1e-9)


def test_elbo_weights_are_normalised_and_follow_the_snr_ratio():
    ddpm, _ = build_schedulers()
    w = elbo_weights(ddpm)
    assert w.shape == (100,) and torch.isfinite(w).all() and (w > 0).all()
    assert abs(float(w.mean()) - 1.0) < 1e-5
    abar = torch.cumprod(1 - ddpm.betas.double(), 0)
    snr = abar / (1 - abar)
    ratio = snr[:-1] / snr[1:] - 1  # t = 1 .. T-1
    raw = elbo_weights(ddpm, normalize=False).double()[1:]
    proportional = raw / ratio
    torch.testing.assert_close(proportional, proportional.mean().expand_as(proportional), rtol=1e-6, atol=0)


def test_schedulers_follow_the_paper_table():
    ddpm, ddim = build_schedulers()
    c = ddpm.config
    assert (c.num_train_timesteps, c.beta_schedule, c.variance_type, c.clip_sample, c.prediction_type) == \
        (100, "squaredcos_cap_v2", "fixed_small", True, "epsilon")
    torch.testing.assert_close(ddim.alphas_cumprod, ddpm.alphas_cumprod)
    ddim.set_timesteps(10)
    assert len(ddim.timesteps) == 10 and int(ddim.timesteps[0]) == 90
