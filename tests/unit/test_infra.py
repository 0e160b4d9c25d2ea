"""The infra files parse, and what they name exists: entrypoints, parameters, events."""

from __future__ import annotations

import importlib
import inspect
from pathlib import Path

import yaml
from prefect.cli.deploy._models import PrefectYamlModel
from prefect.client.schemas.schedules import CronSchedule
from prefect.events import DeploymentEventTrigger

from flows.events import DATASET_EVENT
from flows.retrain_config import RetrainConfig

ROOT = Path(__file__).resolve().parents[2]


def _flow(entrypoint: str):
    path, name = entrypoint.split(":")
    assert (ROOT / path).is_file(), f"{path} does not exist"
    module = importlib.import_module(path.removesuffix(".py").replace("/", "."))
    return getattr(module, name)


def test_prefect_yaml_deployments_name_real_flows_and_valid_configs():
    raw = yaml.safe_load((ROOT / "infra" / "prefect" / "prefect.yaml").read_text())
    project = PrefectYamlModel.model_validate(raw)
    assert {d.name for d in project.deployments} == {"weekly", "on-new-dataset"}
    for deployment in project.deployments:
        flow = _flow(deployment.entrypoint)
        assert flow.name == "retrain"
        accepted = set(inspect.signature(flow.fn).parameters)
        assert set(deployment.parameters) <= accepted
        RetrainConfig.model_validate(deployment.parameters["config"])
        assert deployment.work_pool.name == "ldm"
        for schedule in deployment.schedules or []:
            CronSchedule(cron=schedule.cron, timezone=schedule.timezone)
        for trigger in deployment.triggers or []:
            fields = {k: v for k, v in trigger.items() if k != "type"}
            parsed = DeploymentEventTrigger.model_validate(fields)
            assert parsed.expect == {DATASET_EVENT}
            assert set(parsed.parameters) <= accepted
    weekly = next(d for d in project.deployments if d.name == "weekly")
    assert [s.cron for s in weekly.schedules] == ["0 3 * * 1"]
