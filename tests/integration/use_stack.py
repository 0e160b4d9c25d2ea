"""``python -m tests.integration.use_stack TRACKING_URI DASHBOARD_URL PORT``: what a user
of ``ldm up`` does with its services from a shell that sourced ``env.sh``: register a
model in its MLflow (artifacts in its S3), deploy the endpoint on its Ray cluster
through the Serve REST API, and ask the endpoint for samples."""

from __future__ import annotations

import sys

from mlflow import MlflowClient

from serving.client import request_samples
from serving.config import AppConfig
from serving.deploy import deploy_app
from training.latent_diffusion import LatentDiffusion
from training.mlflow.registry import log_model_version
from training.presets import get_preset


def main(tracking_uri: str, dashboard: str, port: int) -> None:
    client = MlflowClient(tracking_uri)
    run_id = client.create_run(client.create_experiment("stack")).info.run_id
    model = LatentDiffusion.build(get_preset("tiny").for_data(32, 1, 10)).eval()
    log_model_version(model, tracking_uri, run_id, "ldm", alias="champion")
    config = AppConfig(model_uri="models:/ldm@champion", tracking_uri=tracking_uri, num_cpus=0.5)
    url = deploy_app(config, "ldm", port, dashboard)
    print(request_samples(url, {"label": 3, "steps": 5}).summary)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]))
