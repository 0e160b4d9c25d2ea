"""What a retrain does, typed from end to end: the dataset, the training job
(:class:`training.job.TrainSettings`), evaluation and promotion, and the endpoint (the
Serve :class:`serving.config.AppConfig` its replicas receive, and the grid requested
from it). ``ldm retrain`` and ``ldm schedule`` build it from their options, a
deployment takes it as its ``config`` parameter."""

from __future__ import annotations

from pydantic import Field, model_validator

from data.frozen import FrozenConfig
from data.manifest import ShardOptions
from data.shard_engines import Engine
from serving.config import AppConfig
from training.evaluation.scoring import EvaluationSettings
from training.job import ScalingSettings, TrainSettings
from training.names import DEFAULT_CPUS_PER_WORKER, PromotionMetric, SamplerName


class GridSettings(FrozenConfig):
    """The request for one sample of every class that a retrain sends its endpoint."""

    guidance_scale: float = Field(2.0, ge=0)
    sampler: SamplerName = "ddpm"
    steps: int = Field(100, ge=1)
    seed: int = 0


class ServeSettings(FrozenConfig):
    """The endpoint a retrain deploys (or updates): it follows ``@champion`` of the
    trained model in the retrain's tracking server."""

    enabled: bool = True
    host: str = Field(
        "127.0.0.1",
        description="HTTP bind address of the endpoint: this machine only by default; "
        "0.0.0.0 behind a proxy (see the README's 'Security and limits')",
    )
    port: int = Field(8000, ge=1, le=65535)
    app: AppConfig = Field(
        AppConfig(num_cpus=0.5, reload_interval_s=5.0),
        description="replicas, batching and request limits; the model and the tracking "
        "server are the retrain's",
    )
    grid: GridSettings = GridSettings()

    @model_validator(mode="after")
    def _model_is_the_retrains(self) -> ServeSettings:
        unset = AppConfig()
        for name in ("model_uri", "tracking_uri"):
            if getattr(self.app, name) != getattr(unset, name):
                raise ValueError(
                    f"serve.app.{name} is the retrain's (models:/MODEL@champion of its "
                    "tracking server): set train.model_name / train.tracking_uri instead"
                )
        return self


class WarmStartSettings(FrozenConfig):
    """Retraining from the current champion instead of from scratch (see ``ldm train
    --init-from``); the first retrain, with no champion yet, starts from scratch."""

    from_champion: bool = Field(
        False, description="start every network from train.model_name@champion"
    )
    reuse_autoencoder: bool = Field(
        False, description="keep the champion's autoencoder and latent scale as they are"
    )


class ShardSettings(ShardOptions):
    """How the dataset is sharded: the options that decide its content, and where the
    work runs (which does not change a byte of it)."""

    engine: Engine = Field(
        "threads",
        description="threads: in the flow's process; ray: Ray tasks on the cluster at "
        "ray_address (a Ray Job when that is a dashboard URL)",
    )
    workers: int | None = Field(
        None, ge=1, description="shards written at once (default: one per CPU)"
    )

    def options(self) -> ShardOptions:
        """The content options alone, as the manifest records them."""
        return ShardOptions(**self.model_dump(exclude={"engine", "workers"}))


class RetrainConfig(FrozenConfig):
    """Everything ``ldm retrain`` does, with embedded defaults for a laptop."""

    source: str = Field("mnist", description="'mnist', an image folder or an .npz, or s3://")
    dataset_url: str | None = Field(None, description="default: LDM_HOME/data/<name>")
    shard: ShardSettings = ShardSettings(channels=1)
    train: TrainSettings = TrainSettings(
        scaling=ScalingSettings(cpus_per_worker=DEFAULT_CPUS_PER_WORKER)
    )
    warm_start: WarmStartSettings = WarmStartSettings()
    ray_address: str | None = Field(
        None,
        description="default: RAY_ADDRESS, else a local Ray. A dashboard URL "
        "(http://head:8265) submits training as a Ray Job and deploys through the Serve "
        "REST API; a GCS address (head:6379) is joined from this process",
    )
    evaluator_cache: str | None = Field(None, description="default: LDM_HOME/evaluators")
    evaluation: EvaluationSettings = EvaluationSettings()
    promote_metric: PromotionMetric = "fd"
    min_improvement: float = Field(0.0, ge=0.0)
    serve: ServeSettings = ServeSettings()
    out_dir: str | None = Field(None, description="default: LDM_HOME/retrain")

    @model_validator(mode="after")
    def _evaluable(self) -> RetrainConfig:
        if self.shard.val_fraction == 0:
            raise ValueError(
                "shard.val_fraction is 0, but evaluation and promotion need a val split: "
                "use --val-fraction 0.1 (or any value above 0)"
            )
        if self.warm_start.from_champion and self.train.init_from:
            raise ValueError(
                "warm_start.from_champion and train.init_from both name where training "
                "starts: keep one"
            )
        if self.warm_start.reuse_autoencoder and not self.warm_start.from_champion:
            raise ValueError(
                "warm_start.reuse_autoencoder keeps the champion's autoencoder: set "
                "warm_start.from_champion too (--warm-start)"
            )
        return self


DEFAULTS = RetrainConfig()
