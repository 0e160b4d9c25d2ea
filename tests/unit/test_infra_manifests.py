"""The deployment files agree with the code and with each other: the Dockerfile installs
what pyproject.toml and the constraints say, entrypoints and Serve apps exist, GPU
requests match what Ray is told, one image everywhere, and no secret in any file."""

from __future__ import annotations

import importlib
import importlib.util
import json
import re
import shlex
import tomllib
from functools import cache
from pathlib import Path
from urllib.parse import urlparse

import yaml
from packaging.specifiers import SpecifierSet

from serving.config import AppConfig

ROOT = Path(__file__).resolve().parents[2]
INFRA = ROOT / "infra"
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
PACKAGES = {p.rstrip("*") for p in PYPROJECT["tool"]["setuptools"]["packages"]["find"]["include"]}
THIRD_PARTY_IMAGES = {"chrislusf/seaweedfs", "postgres", "prefecthq/prefect"}
SECRET_NAME = re.compile(r"SECRET|PASSWORD|KEY")
REQUIRED_SUBSTITUTION = re.compile(r"^\$\{\w+:\?[^}]+\}$")  # ${VAR:?message}
CREDENTIALS_IN_URL = re.compile(r"://[^/\s:@]+:[^/\s@]+@")
PYTHON_MODULE_RUN = re.compile(r"\bpython[\d.]*\s+-m\s+([A-Za-z_][\w.]*)")


@cache
def _load(relative: str) -> dict:
    return yaml.safe_load((INFRA / relative).read_text())


def _pins() -> dict[str, str]:
    lines = (ROOT / "requirements" / "constraints.txt").read_text().splitlines()
    return dict(line.lower().split("==", 1) for line in lines if "==" in line)


def _dockerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with comments dropped and continuation lines joined."""
    lines = (INFRA / "docker" / "Dockerfile").read_text().splitlines()
    text = "\n".join(line for line in lines if not line.lstrip().startswith("#"))
    joined = re.sub(r"\\\n\s*", " ", text)
    return [tuple(line.split(None, 1)) for line in joined.splitlines() if line.strip()]


def _dockerfile_args(instructions: list[tuple[str, str]]) -> dict[str, str]:
    return dict(a.split("=", 1) for i, a in instructions if i == "ARG" and "=" in a)


def _cluster_specs() -> dict[str, dict]:
    return {
        "raycluster": _load("kuberay/raycluster.yaml")["spec"],
        "rayservice": _load("kuberay/rayservice.yaml")["spec"]["rayClusterConfig"],
    }


def _kuberay_containers() -> list[tuple[str, dict]]:
    found = []
    for name, spec in _cluster_specs().items():
        for group in [spec["headGroupSpec"], *spec["workerGroupSpecs"]]:
            found += [(name, c) for c in group["template"]["spec"]["containers"]]
    return found


def _command(service: dict) -> str:
    command = service.get("command", "")
    return " ".join(command) if isinstance(command, list) else command


def test_kuberay_manifests_are_ray_io_v1_resources_for_the_pinned_ray():
    kinds = {"raycluster": "RayCluster", "rayjob": "RayJob", "rayservice": "RayService"}
    for name, kind in kinds.items():
        document = _load(f"kuberay/{name}.yaml")
        assert (document["apiVersion"], document["kind"]) == ("ray.io/v1", kind)
    for name, spec in _cluster_specs().items():
        assert spec["rayVersion"] == _pins()["ray"], name
        assert spec["enableInTreeAutoscaling"] is True, name


def test_kuberay_names_match_the_prefect_deployments():
    prefect = _load("prefect/prefect.yaml")
    pool_env = prefect["definitions"]["work_pools"]["ldm"]["job_variables"]["env"]
    retrain = prefect["definitions"]["config"]
    cluster = _load("kuberay/raycluster.yaml")["metadata"]["name"]
    assert urlparse(pool_env["RAY_ADDRESS"]).hostname == f"{cluster}-head-svc"
    job = _load("kuberay/rayjob.yaml")["spec"]
    assert job["clusterSelector"] == {"ray.io/cluster": cluster}
    assert job["submissionMode"] == "K8sJobMode"
    config_url = shlex.split(job["entrypoint"])[3]
    assert config_url.startswith(retrain["train"]["storage_url"] + "/")
    served = yaml.safe_load(_load("kuberay/rayservice.yaml")["spec"]["serveConfigV2"])
    assert served["applications"][0]["args"]["tracking_uri"] == retrain["train"]["tracking_uri"]


def _gpu_groups(spec: dict) -> list[tuple[dict, int, int]]:
    """(group, GPUs, CPUs) per pod of each group whose containers request GPUs."""
    found = []
    for group in [spec["headGroupSpec"], *spec["workerGroupSpecs"]]:
        limits = [c["resources"]["limits"] for c in group["template"]["spec"]["containers"]]
        gpus = sum(int(limit.get("nvidia.com/gpu", 0)) for limit in limits)
        if gpus:
            found.append((group, gpus, sum(int(limit["cpu"]) for limit in limits)))
    return found


def test_gpu_worker_groups_request_the_gpus_ray_is_told_about():
    for name, spec in _cluster_specs().items():
        assert spec["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0", name
        groups = _gpu_groups(spec)
        assert [group["groupName"] for group, _, _ in groups] == ["gpu"], name
        for group in [spec["headGroupSpec"], *spec["workerGroupSpecs"]]:
            gpus = next((n for g, n, _ in groups if g is group), 0)
            assert int(group["rayStartParams"].get("num-gpus", 0)) == gpus, name
        for group, _, _ in groups:
            images = [c["image"] for c in group["template"]["spec"]["containers"]]
            assert all(image.endswith("-gpu") for image in images), name
            assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]


def test_training_cluster_holds_the_retrain_workers_without_scaling_up():
    retrain = _load("prefect/prefect.yaml")["definitions"]["config"]
    ((group, gpus, cpus),) = _gpu_groups(_cluster_specs()["raycluster"])
    scaling = retrain["train"]["scaling"]
    assert scaling["use_gpu"] and group["replicas"] * gpus >= scaling["num_workers"]
    assert cpus >= gpus * scaling["cpus_per_worker"]


def test_kuberay_pods_read_credentials_from_the_secret_only():
    for name, container in _kuberay_containers():
        sources = [source["secretRef"]["name"] for source in container["envFrom"]]
        assert sources == ["ldm-s3-credentials"], name
        for variable in container.get("env", []):
            if SECRET_NAME.search(variable["name"]):
                assert "secretKeyRef" in variable.get("valueFrom", {}), variable["name"]


def test_every_serve_app_imports_a_builder_and_its_args_are_an_app_config():
    from ray.serve.schema import ServeDeploySchema

    documents = {
        "serve/serve_config.yaml": _load("serve/serve_config.yaml"),
        "kuberay/rayservice.yaml": yaml.safe_load(
            _load("kuberay/rayservice.yaml")["spec"]["serveConfigV2"]
        ),
    }
    for source, document in documents.items():
        for app in ServeDeploySchema.model_validate(document).applications:
            module, attribute = app.import_path.split(":")
            assert callable(getattr(importlib.import_module(module), attribute)), source
            config = AppConfig.model_validate(app.args)
            if source.startswith("kuberay"):
                assert config.resolved_device == "cuda" and config.autoscaling_config


def test_every_python_m_entrypoint_names_a_module_with_a_main():
    files = [
        *INFRA.glob("kuberay/*.yaml"),
        INFRA / "ray" / "cluster.yaml",
        INFRA / "compose" / "compose.yaml",
        ROOT / "docs" / "operations.md",
    ]
    modules = {m[1]: path for path in files for m in PYTHON_MODULE_RUN.finditer(path.read_text())}
    assert "training.ray.driver" in modules
    for module, path in modules.items():
        assert importlib.util.find_spec(module) is not None, f"{path.name}: no module {module}"
        if module.split(".")[0] in PACKAGES:
            main = getattr(importlib.import_module(module), "main", None)
            assert callable(main), f"{path.name}: {module} has no main()"


def _ldm_images() -> list[tuple[str, str]]:
    images = [(name, c["image"]) for name, c in _kuberay_containers()]
    docker = _load("ray/cluster.yaml")["docker"]
    keys = ("image", "head_image", "worker_image")
    images += [("cluster.yaml", docker[key]) for key in keys if key in docker]
    for name, service in _load("compose/compose.yaml")["services"].items():
        if service["image"].rsplit(":", 1)[0] not in THIRD_PARTY_IMAGES:
            images.append((f"compose {name}", service["image"]))
    return images


def test_every_ldm_image_is_one_repository_tagged_with_the_project_version():
    version = PYPROJECT["project"]["version"]
    images = _ldm_images()
    assert len(images) >= 8
    assert len({image.rsplit(":", 1)[0] for _, image in images}) == 1, images
    for source, image in images:
        assert image.rsplit(":", 1)[1] in {f"{version}-cpu", f"{version}-gpu"}, source
    for service in _load("compose/compose.yaml")["services"].values():
        if "build" in service:
            context = (INFRA / "compose" / service["build"]["context"]).resolve()
            assert context == ROOT and (context / service["build"]["dockerfile"]).is_file()


def test_cluster_launcher_config_fits_rays_schema_and_uses_instance_roles():
    import jsonschema
    import ray.autoscaler

    schema_path = Path(ray.autoscaler.__file__).parent / "ray-schema.json"
    config = _load("ray/cluster.yaml")
    jsonschema.validate(config, json.loads(schema_path.read_text()))
    assert config["cluster_name"] == "ldm"
    node_types = config["available_node_types"]
    assert node_types[config["head_node_type"]]["resources"].get("GPU", 0) == 0
    gpu_types = [t for t in node_types.values() if t["resources"].get("GPU", 0) > 0]
    assert gpu_types and all(t["min_workers"] == 0 for t in gpu_types)
    assert all("IamInstanceProfile" in t["node_config"] for t in node_types.values())
    assert not re.search(
        r"(?i)aws_(access_key_id|secret_access_key)|AKIA[0-9A-Z]{16}",
        (INFRA / "ray" / "cluster.yaml").read_text(),
    )


def test_compose_listens_on_loopback_and_takes_secrets_from_the_environment():
    for name, service in _load("compose/compose.yaml")["services"].items():
        for port in service.get("ports", []):
            host = port.get("host_ip") if isinstance(port, dict) else str(port).split(":")[0]
            assert host == "127.0.0.1", f"{name}: {port}"
        if service.get("network_mode") == "host":
            assert "0.0.0.0" not in _command(service), name
        environment = service.get("environment", {})
        if isinstance(environment, list):
            environment = dict(item.split("=", 1) for item in environment)
        for key, value in environment.items():
            if SECRET_NAME.search(key):
                assert REQUIRED_SUBSTITUTION.match(str(value)), f"{name}: {key} is literal"
        assert not CREDENTIALS_IN_URL.search(_command(service)), name


def test_compose_mlflow_keeps_runs_in_postgres_and_artifacts_in_s3():
    services = _load("compose/compose.yaml")["services"]
    mlflow = services["mlflow"]
    words = shlex.split(_command(mlflow))
    backend = urlparse(words[words.index("--backend-store-uri") + 1])
    assert backend.scheme == "postgresql+psycopg2" and backend.hostname in services
    assert mlflow["depends_on"][backend.hostname]["condition"] == "service_healthy"
    assert words[words.index("--artifacts-destination") + 1].startswith("s3://")
    assert urlparse(mlflow["environment"]["MLFLOW_S3_ENDPOINT_URL"]).hostname in services


def test_dockerfile_installs_pinned_torch_first_then_the_package_with_constraints():
    instructions = _dockerfile()
    runs = [a for i, a in instructions if i == "RUN"]
    assert _dockerfile_args(instructions)["TORCH_VERSION"] == _pins()["torch"]
    torch_step = next(n for n, run in enumerate(runs) if '"torch==${TORCH_VERSION}"' in run)
    package_step = next(n for n, run in enumerate(runs) if "/opt/ldm-pipeline[server]" in run)
    assert torch_step < package_step
    assert (
        'pip install -c requirements/constraints.txt "/opt/ldm-pipeline[server]"'
        in (runs[package_step])
    )
    assert not re.search(r"\s(-e|--editable)\s", runs[package_step])
    assert "server" in PYPROJECT["project"]["optional-dependencies"]


def test_dockerfile_python_user_and_workdir():
    instructions = _dockerfile()
    version = _dockerfile_args(instructions)["PYTHON_VERSION"]
    assert version == "3.11"
    assert SpecifierSet(PYPROJECT["project"]["requires-python"]).contains(version)
    froms = [a for i, a in instructions if i == "FROM"]
    assert "python:${PYTHON_VERSION}-slim-bookworm AS base-cpu" in froms
    assert any(a.startswith("nvidia/cuda:") and a.endswith("AS base-gpu") for a in froms)
    pull_step = _load("prefect/prefect.yaml")["pull"][0]
    workdir = pull_step["prefect.deployments.steps.set_working_directory"]["directory"]
    assert ("WORKDIR", workdir) in instructions
    assert [a for i, a in instructions if i == "USER"][-1] not in ("root", "0")


def test_dockerfile_copies_what_the_package_build_needs_and_dockerignore_keeps_it():
    copied = set()
    for instruction, arguments in _dockerfile():
        if instruction == "COPY":
            copied |= {source.rstrip("/") for source in arguments.split()[:-1]}
    needed = {"pyproject.toml", PYPROJECT["project"]["readme"], "requirements", *PACKAGES}
    assert needed <= copied, needed - copied
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    ignored = {line.strip().rstrip("/") for line in lines if line.strip() and line[0] != "#"}
    assert {".venv", "outputs", ".git", "mlruns"} <= ignored
    assert not ignored & needed
