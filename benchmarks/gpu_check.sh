#!/usr/bin/env bash
# Denoiser-stage images/s and model FLOPs utilisation of the `base` preset on one
# NVIDIA GPU, with bf16, in under five minutes; downloads nothing. Not part of CI.
#
#   bash benchmarks/gpu_check.sh [--steps 300] [--batch-size N] [--modes eager,compile]
#
# Needs python3 with a CUDA build of torch, numpy and pydantic. When pydantic is
# missing it is installed offline from the wheels in $LDM_WHEELS (default: .whl/ at
# the repository root). PYTHON picks the interpreter.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
python=${PYTHON:-python3}

if ! "$python" -c "import pydantic" 2>/dev/null; then
  wheels=${LDM_WHEELS:-$here/../.whl}
  if ! compgen -G "$wheels/*.whl" >/dev/null; then
    echo "gpu_check: pydantic is not installed and $wheels holds no wheels;" \
      "pip install pydantic, or set LDM_WHEELS to a folder with its wheels" >&2
    exit 2
  fi
  site=$(mktemp -d)
  "$python" -m pip install -q --no-index --no-deps --no-compile --target "$site" "$wheels"/*.whl
  export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
fi

nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader \
  2>/dev/null || true
exec timeout --signal=INT 300 "$python" "$here/gpu_check.py" "$@"
