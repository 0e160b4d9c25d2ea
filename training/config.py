"""The configuration of a whole latent-diffusion model and how each stage trains it.

One :class:`LDMConfig` travels with every checkpoint and registered model; the
networks are rebuilt from it, never from flags of the process that loads them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

from pydantic import Field, model_validator

from data.dealing import ShardSampling
from training.diffusion import BetaScheduleName, GaussianDiffusion, get_named_beta_schedule
from training.models.configs import (
    AutoencoderConfig,
    ClassifierConfig,
    FrozenConfig,
    UNetConfig,
)


class DiffusionConfig(FrozenConfig):
    num_timesteps: int = Field(1000, ge=2)
    beta_schedule: BetaScheduleName = "linear"
    # DDPM-IP γ: x_t is built from ε + γξ while the target stays ε. 0 disables;
    # Ning et al. 2023 found 0.1 best and values above ~0.2 harmful.
    input_perturbation: float = Field(0.1, ge=0.0, le=1.0)
    # Min-SNR-g loss weighting (Hang et al. 2023): each sample's loss times
    # min(SNR_t, g) / SNR_t. 0 weights every timestep equally (the DDPM loss).
    min_snr_gamma: float = Field(0.0, ge=0.0)
    # Probability of replacing the label by the null class while training (CFG).
    p_uncond: float = Field(0.1, ge=0.0, le=1.0)

    def build(self) -> GaussianDiffusion:
        return GaussianDiffusion(get_named_beta_schedule(self.beta_schedule, self.num_timesteps))


Precision = Literal["auto", "fp32", "bf16"]
LRDecay = Literal["constant", "cosine"]


class StageConfig(FrozenConfig):
    """Optimisation of one stage: AdamW with a linear warm-up, then a constant or a
    cosine-decayed rate, in the precision the stage asks for."""

    steps: int = Field(ge=1)
    batch_size: int = Field(ge=1)
    learning_rate: float = Field(gt=0.0)
    warmup_steps: int = Field(0, ge=0)
    weight_decay: float = Field(0.0, ge=0.0)
    grad_clip: float = Field(1.0, gt=0.0)
    ema_decay: float = Field(0.0, ge=0.0, lt=1.0)  # 0 = no EMA
    log_every: int = Field(50, ge=1)
    channels_last: bool = Field(
        False,
        description="train with 4-D weights and batches in channels-last memory format "
        "(faster convolutions for some networks and hardware; measure it with "
        "benchmarks/bench_train_levers.py)",
    )
    compile: bool = Field(
        False,
        description="run the stage's network through torch.compile (inductor): fewer, "
        "fused kernels per step after a compile of a minute or so when the stage starts; "
        "pays on a GPU, not on small CPU runs (benchmarks/RESULTS.md)",
    )
    cuda_graph: bool = Field(
        False,
        description="on one CUDA GPU (a single worker), capture the whole step (loss, "
        "backward, clipping, AdamW, EMA) as a CUDA graph after three eager steps and "
        "replay it: one launch per step where the host would queue thousands of kernels; "
        "ignored on CPUs and with several workers",
    )
    precision: Precision = Field(
        "auto",
        description="auto: bf16 autocast on a GPU, fp32 on a CPU; bf16: bf16 autocast on a "
        "GPU and on a CPU with native bf16 instructions (AVX512-BF16 or AMX; fp32 on other "
        "CPUs, where emulated bf16 is slower); fp32: no autocast anywhere",
    )
    lr_decay: LRDecay = Field(
        "constant",
        description="after the warm-up: hold the learning rate (constant) or take it to "
        "zero at the last step along a half cosine (cosine)",
    )
    shard_sampling: ShardSampling = Field(
        "partitioned",
        description="partitioned: every shard once per epoch, dealt to ranks (needs at "
        "least as many shards as ranks); resampled: each rank draws shards with "
        "replacement (any shard count, a dataset that grows between epochs)",
    )


class LDMConfig(FrozenConfig):
    """Everything needed to build and train the three networks for one dataset."""

    preset: str = "custom"
    image_size: int = Field(32, ge=4)
    image_channels: Literal[1, 3] = 1
    num_classes: int = Field(10, ge=1)
    class_names: tuple[str, ...] = ()  # one per class id when the dataset names them
    seed: int = 0
    autoencoder: AutoencoderConfig
    denoiser: UNetConfig
    classifier: ClassifierConfig
    diffusion: DiffusionConfig = DiffusionConfig()
    autoencoder_training: StageConfig
    denoiser_training: StageConfig
    classifier_training: StageConfig

    @property
    def latent_size(self) -> int:
        return self.image_size // self.autoencoder.downsample_factor

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        return (self.autoencoder.latent_channels, self.latent_size, self.latent_size)

    @model_validator(mode="after")
    def _consistent(self) -> LDMConfig:
        ae, f = self.autoencoder, self.autoencoder.downsample_factor
        if self.class_names and len(self.class_names) != self.num_classes:
            raise ValueError(
                f"class_names has {len(self.class_names)} entries, "
                f"num_classes is {self.num_classes}"
            )
        if ae.image_channels != self.image_channels:
            raise ValueError(
                f"autoencoder.image_channels ({ae.image_channels}) must equal "
                f"image_channels ({self.image_channels})"
            )
        if self.image_size % f:
            raise ValueError(f"image_size {self.image_size} is not divisible by {f}")
        for name, net in (("denoiser", self.denoiser), ("classifier", self.classifier)):
            if net.in_channels != ae.latent_channels:
                raise ValueError(
                    f"{name}.in_channels ({net.in_channels}) must equal "
                    f"autoencoder.latent_channels ({ae.latent_channels})"
                )
            if net.num_classes != self.num_classes:
                raise ValueError(
                    f"{name}.num_classes ({net.num_classes}) must equal "
                    f"num_classes ({self.num_classes})"
                )
        down = 2 ** (len(self.denoiser.channel_mult) - 1)
        if self.latent_size % down:
            raise ValueError(
                f"latent size {self.latent_size} is not divisible by the denoiser's "
                f"downsampling {down}; use fewer denoiser.channel_mult levels"
            )
        return self

    def for_data(
        self,
        image_size: int,
        image_channels: int,
        num_classes: int,
        class_names: Sequence[str] = (),
    ) -> LDMConfig:
        """This config adapted to a dataset's image size, channels and classes."""
        data = self.model_dump()
        data.update(
            image_size=image_size,
            image_channels=image_channels,
            num_classes=num_classes,
            class_names=tuple(class_names),
        )
        data["autoencoder"]["image_channels"] = image_channels
        data["denoiser"]["num_classes"] = num_classes
        data["classifier"]["num_classes"] = num_classes
        return LDMConfig.model_validate(data)
