#!/usr/bin/env bash
# Make the wheels the GPU machine lacks (it has torch, transformers, peft, accelerate, safetensors but no network),
# for its Python 3.12 on x86-64, at the versions installed here. Run here, with network:
#   benchmarks/gpu_wheels.sh .whl        then: benchmarks/gpu_check.sh --wheels .whl   (there)
# transformers and peft are carried too, so the check runs the versions the tests ran. DeepSpeed publishes only a
# source archive: `pip wheel` builds its pure-Python wheel here (no ops compiled).
set -euo pipefail
out=${1:-.whl}
python=${FLUXTUNE_PYTHON:-python3}
mkdir -p "$out"
pins=$("$python" - <<'PY'
from importlib.metadata import version
for name in ("diffusers", "transformers", "peft", "pydantic", "pydantic-core", "annotated-types",
             "typing-inspection", "typing-extensions", "hjson", "ruamel.yaml", "importlib-metadata", "pluggy"):
    print(f"{name}=={version(name)}")
PY
)
platforms=()
for n in 17 24 27 28 31 34; do platforms+=(--platform "manylinux_2_${n}_x86_64"); done
# shellcheck disable=SC2086
"$python" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux2014_x86_64 "${platforms[@]}" -d "$out" $pins
"$python" -m pip wheel -q --no-deps --no-build-isolation -w "$out" \
  "deepspeed==$("$python" -c 'from importlib.metadata import version; print(version("deepspeed"))')"
ls -l "$out"
