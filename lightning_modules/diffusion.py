"""Diffusion schedule of the low-level policy (paper 4.3 and Appendix E.2) and ELBO weights.

DDPM with 100 training steps, ``squaredcos_cap_v2`` betas, epsilon prediction, ``fixed_small``
posterior variance and sample clipping (paper's table); DDIM with the same betas samples in 10
steps (Appendix E.4).
"""

from __future__ import annotations

import torch
from diffusers import DDIMScheduler, DDPMScheduler

from configs.errors import ConfigError

PAPER_SCHEDULE = dict(num_train_timesteps=100, beta_start=0.0001, beta_end=0.02,
                      beta_schedule="squaredcos_cap_v2", variance_type="fixed_small",
                      clip_sample=True, prediction_type="epsilon")


def build_schedulers(**overrides) -> tuple[DDPMScheduler, DDIMScheduler]:
    """The training (DDPM) scheduler and a DDIM sampler sharing its betas."""
    cfg = {**PAPER_SCHEDULE, **overrides}
    ddpm = DDPMScheduler(**cfg)
    ddim = DDIMScheduler(num_train_timesteps=cfg["num_train_timesteps"], beta_start=cfg["beta_start"],
                         beta_end=cfg["beta_end"], beta_schedule=cfg["beta_schedule"],
                         clip_sample=cfg["clip_sample"], prediction_type=cfg["prediction_type"],
                         set_alpha_to_one=True, steps_offset=0)
    return ddpm, ddim


def elbo_weights(scheduler: DDPMScheduler, normalize: bool = True) -> torch.Tensor:
    """Per-timestep weight of the epsilon-MSE that makes it the variational bound (T,).

    For t >= 1 the bound's term is KL(q(x_{t-1} | x_t, x_0) || p(x_{t-1} | x_t)), which for
    epsilon prediction with the posterior variance s_t^2 (``fixed_small``) equals
    beta_t^2 / (2 s_t^2 alpha_t (1 - alphabar_t)) * ||eps - eps_hat||^2, i.e. proportional to
    SNR(t-1)/SNR(t) - 1 (Kingma & Gao 2023). At t = 0 the posterior variance is 0; that term is
    the decoder likelihood, which DDPM models with variance beta_0 (Ho et al. 2020), giving
    1 / (2 alpha_0). Normalised to mean 1 over the timesteps.
    """
    betas = scheduler.betas.double()
    alphas = 1.0 - betas
    abar = torch.cumprod(alphas, 0)
    abar_prev = torch.cat([torch.ones(1, dtype=abar.dtype), abar[:-1]])
    post_var = betas * (1.0 - abar_prev) / (1.0 - abar)
    post_var[0] = betas[0]  # decoder variance at t = 0
    w = betas ** 2 / (2.0 * post_var * alphas * (1.0 - abar))
    if normalize:
        w = w / w.mean()
    return w.float()


def loss_weights(scheduler: DDPMScheduler, weighting: str) -> torch.Tensor:
    """Per-timestep loss weights (T,), mean 1.

    ``elbo``: :func:`elbo_weights` as written (paper 4.3). With ``squaredcos_cap_v2`` the last
    beta is capped at 0.999, which makes the last timestep's weight ~500x the others: it then
    carries most of the loss although predicting the noise from pure noise is trivial.
    ``elbo_clipped``: the same weights with that capped last term clipped to the largest of the
    others (our option, not in the paper). ``uniform``: Diffusion Policy's plain epsilon MSE.
    """
    if weighting == "uniform":
        return torch.ones(len(scheduler.betas))
    if weighting not in ("elbo", "elbo_clipped"):
        raise ConfigError(f"unknown loss_weighting {weighting!r}; use elbo, elbo_clipped or uniform")
    w = elbo_weights(scheduler, normalize=False)
    if weighting == "elbo_clipped":
        w[-1] = min(w[-1], w[:-1].max())
    return w / w.mean()
