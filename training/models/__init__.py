"""The networks: KL autoencoder, UNet denoiser, noisy-latent classifier, and EMA."""

from training.models.autoencoder import ENCODE_BATCH, Autoencoder, autoencoder_loss, encode_batch
from training.models.classifier import NoisyLatentClassifier
from training.models.configs import AutoencoderConfig, ClassifierConfig, UNetConfig
from training.models.ema import EMA
from training.models.unet import UNet

__all__ = [
    "ENCODE_BATCH",
    "EMA",
    "Autoencoder",
    "AutoencoderConfig",
    "ClassifierConfig",
    "NoisyLatentClassifier",
    "UNet",
    "UNetConfig",
    "autoencoder_loss",
    "encode_batch",
]
