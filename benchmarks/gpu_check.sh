#!/usr/bin/env bash
# Everything the project measures on one NVIDIA GPU, in one run of under ten minutes;
# downloads nothing. Not part of CI.
#
#   bash benchmarks/gpu_check.sh [gpu_check.py options]
#
# 1. benchmarks/gpu_serve_check.py: the sampling engine's images/s at 1, 32 and 128
#    concurrent requests and how reproducible its images are (the `demo` model), in a
#    GPU replica's default (batch-invariant, denoiser and decoder as CUDA graphs), the
#    same decoding one image a call (what batched decoding saves) and plain float32
#    with deterministic kernels; and, in the default, short requests' latency in a
#    mixed load of 32 clients against the same short requests from one client and
#    from 32. --modes in SERVE_ARGS picks other modes.
# 2. benchmarks/gpu_check.py with the options given: training-step throughput and MFU
#    of the `base` denoiser and autoencoder stages and the latent encoding, eager,
#    channels-last, compiled and with CUDA graphs.
# 3. job (only when named in GPU_CHECK_PARTS): benchmarks/gpu_job_check.py, a real
#    `ldm shard` and `ldm train` of the `base` preset on the GPU with short step budgets
#    (Ray Train on a local Ray, MLflow in sqlite), and what its MLflow run logged: the
#    CUDA graph and bf16 in use, images/s, losses, checkpoints, the registered version.
#    JOB_ARGS passes it options.
#
# GPU_CHECK_PARTS picks the parts (default: "serve train"). Each part runs under its
# own time limit (SERVE_TIMEOUT, TRAIN_TIMEOUT, JOB_TIMEOUT seconds) and
# writes its log and JSON into GPU_CHECK_OUT (default: gpu-check/) as it goes, so a part
# cut short keeps what it measured. Needs python3 with a CUDA build of torch, numpy and
# pydantic; the job part needs the project's other requirements too. A machine without
# them gets them offline: from $LDM_JOB_BUNDLE (default: .whl/job-site.tar.xz, packed
# by benchmarks/gpu_bundle.py) when it exists, else pydantic from the wheels in
# $LDM_WHEELS (default: .whl/). PYTHON picks the interpreter.
set -uo pipefail
here=$(cd "$(dirname "$0")" && pwd)
python=${PYTHON:-python3}
out=${GPU_CHECK_OUT:-gpu-check}
mkdir -p "$out"
export PYTHONUNBUFFERED=1

bundle=${LDM_JOB_BUNDLE:-$here/../.whl/job-site.tar.xz}
if [[ -f $bundle ]] && ! "$python" -c "import ray, mlflow, pydantic" 2>/dev/null; then
  site=$(mktemp -d)
  "$python" -c 'import sys, tarfile; tarfile.open(sys.argv[1]).extractall(sys.argv[2], filter="data")' \
    "$bundle" "$site" || exit 2
  export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
fi
if ! "$python" -c "import pydantic" 2>/dev/null; then
  wheels=${LDM_WHEELS:-$here/../.whl}
  if ! compgen -G "$wheels/*.whl" >/dev/null; then
    echo "gpu_check: pydantic is not installed and $wheels holds no wheels;" \
      "pip install pydantic, or set LDM_WHEELS to a folder with its wheels" >&2
    exit 2
  fi
  site=$(mktemp -d)
  "$python" -m pip install -q --no-index --no-deps --no-compile --target "$site" \
    "$wheels"/*.whl || exit 2
  export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
fi

{
  date -u +%FT%TZ
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader
  echo "cpus: $(nproc)"
} 2>&1 | tee "$out/machine.txt"

status=0
parts=" ${GPU_CHECK_PARTS:-serve train} "
if [[ $parts == *" serve "* ]]; then
  timeout --signal=INT "${SERVE_TIMEOUT:-300}" "$python" "$here/gpu_serve_check.py" \
    --json "$out/serve.json" ${SERVE_ARGS:-} 2>&1 | tee "$out/serve.log" || status=1
fi
if [[ $parts == *" train "* ]]; then
  timeout --signal=INT "${TRAIN_TIMEOUT:-360}" "$python" "$here/gpu_check.py" \
    --json "$out/train.json" "$@" >"$out/train.log" 2>&1 || status=1
  grep '^{' "$out/train.log" | cut -c1-400
  tail -n 3 "$out/train.log"
fi
if [[ $parts == *" job "* ]]; then
  if ! "$python" -c "import ray.train, mlflow, webdataset" 2>/dev/null; then
    echo "gpu_check: the job part needs Ray, MLflow and webdataset; pack them here with" \
      "'.venv/bin/python benchmarks/gpu_bundle.py' (writes $bundle)" >&2
    status=1
  else
    "$python" -m pip check >"$out/pip-check.txt" 2>&1  # what the image's versions conflict with
    timeout --signal=INT "${JOB_TIMEOUT:-480}" "$python" "$here/gpu_job_check.py" \
      --json "$out/job.json" --bare "$out/train.json" ${JOB_ARGS:-} 2>&1 |
      tee "$out/job.log" || status=1
  fi
fi
exit $status
