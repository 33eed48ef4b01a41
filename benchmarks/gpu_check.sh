#!/usr/bin/env bash
# The GPU check, one command, ≤ 8 minutes on one H100/H200: step time, samples/s, MFU and peak GPU memory of the
# real-width proxies (full stage under DeepSpeed ZeRO-2 bf16, LoRA stage; 512 and 1024 px) beside `fluxtune plan`.
#
#   benchmarks/gpu_check.sh --wheels .whl     on the GPU machine: its own Python and torch, plus the wheels it lacks
#                                             (make them here, with network: benchmarks/gpu_wheels.sh .whl)
#   benchmarks/gpu_check.sh --smoke           on a CPU: tiny-fill at 32 px, the same code path (tests run this)
#
# Other arguments go to benchmarks/gpu_check.py (--only NAME, --json FILE). The wheels are installed with
# `pip --target` into a folder put first on PYTHONPATH, not into a venv: a venv made from the machine's own venv would
# not see that venv's packages (torch among them), and nothing may be fetched there.
set -euo pipefail
cd "$(dirname "$0")/.."
python=${FLUXTUNE_PYTHON:-python3}
wheels=""
args=()
while [ $# -gt 0 ]; do
  case "$1" in
    --wheels) wheels=$2; shift 2 ;;
    *) args+=("$1"); shift ;;
  esac
done
if [ -n "$wheels" ]; then
  site=${TMPDIR:-/tmp}/fluxtune-gpu-check-site
  "$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" \
    "$wheels"/*.whl
  export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
exec "$python" benchmarks/gpu_check.py ${args[@]+"${args[@]}"}
