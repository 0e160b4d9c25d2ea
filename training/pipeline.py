"""Former home of :class:`training.latent_diffusion.LatentDiffusion`. The pyfunc entry of
model versions registered before the move imports it from here, so it stays loadable."""

from training.latent_diffusion import LatentDiffusion

__all__ = ["LatentDiffusion"]
