"""What each stage of a retrain returns, and the run as a page (the Prefect artifact)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict

from data.frozen import FrozenConfig
from data.manifest import Manifest
from training.evaluation.promotion import PromotionResult
from training.job import TrainedVersion


class DatasetSummary(FrozenConfig):
    """The dataset a retrain trained on."""

    url: str
    counts: dict[str, int]  # images per split
    resharded: bool  # False: it was up to date (or published elsewhere) and used as it is
    num_classes: int
    fingerprint: str

    @classmethod
    def of(cls, url: str, manifest: Manifest, resharded: bool) -> DatasetSummary:
        return cls(
            url=url,
            counts=manifest.counts,
            resharded=resharded,
            num_classes=manifest.num_classes,
            fingerprint=manifest.fingerprint,
        )


class Endpoint(FrozenConfig):
    """The deployed endpoint and the grid of every class it answered with."""

    url: str
    grid: str  # path of the PNG


class RetrainReport(BaseModel):
    """One retrain, stage by stage."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    dataset: DatasetSummary
    training: TrainedVersion
    promotion: PromotionResult
    tracking_uri: str
    endpoint: Endpoint | None = None  # None: serving was off

    @property
    def model_name(self) -> str:
        return self.training.model_name

    @property
    def metrics(self) -> dict[str, float]:
        """The evaluation of the trained version."""
        return self.promotion.metrics.get(self.training.version, {})


def report_markdown(report: RetrainReport) -> str:
    """The run as a page: dataset, MLflow run, metrics, the decision, the endpoint."""
    dataset, training, promotion = report.dataset, report.training, report.promotion
    endpoint = report.endpoint
    lines = [
        f"# Retrain: {report.model_name} v{training.version}",
        "",
        f"- **Dataset**: `{dataset.url}` ({dataset.counts}; "
        f"{'re-sharded' if dataset.resharded else 're-sharding skipped'})",
        f"- **MLflow run**: `{training.run_id}` at `{report.tracking_uri}`",
        f"- **Started from**: {training.parent_version or 'scratch'}",
        f"- **Decision**: {'promoted to @champion' if promotion.promoted else 'kept'} "
        f"— {promotion.reason}",
        f"- **Endpoint**: {endpoint.url if endpoint else 'not deployed'}",
        f"- **Sample grid**: `{endpoint.grid if endpoint else 'none'}`",
        "",
        "| version | class consistency | fd | psnr | s / image |",
        "|---|---:|---:|---:|---:|",
    ]
    for v, m in promotion.metrics.items():
        lines.append(
            f"| v{v} | {m['class_consistency']:.3f} | {m['fd']:.3f} | {m['psnr']:.2f} | "
            f"{m['seconds_per_image']:.3f} |"
        )
    return "\n".join(lines) + "\n"
