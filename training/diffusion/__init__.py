"""The diffusion math: schedules, the forward process, the DDPM-IP loss, samplers and
guidance. Imports only torch and numpy, so it runs anywhere a model runs."""

from training.diffusion.gaussian_diffusion import GaussianDiffusion, SamplerName
from training.diffusion.guidance import (
    classifier_free_eps,
    classifier_log_prob_grad,
    drop_labels,
    guided_eps,
)
from training.diffusion.schedules import (
    BetaScheduleName,
    get_named_beta_schedule,
    space_timesteps,
)

__all__ = [
    "BetaScheduleName",
    "GaussianDiffusion",
    "SamplerName",
    "classifier_free_eps",
    "classifier_log_prob_grad",
    "drop_labels",
    "get_named_beta_schedule",
    "guided_eps",
    "space_timesteps",
]
