# Sourced by the device scripts: results folder, the project installed without the registry,
# and the GPU recorded.
set -uo pipefail
OUT=${OUT:-runs/device}
mkdir -p "$OUT"
python -m pip install --no-deps --no-build-isolation -e . -q 2>&1 | tail -2
nvidia-smi --query-gpu=name,driver_version,clocks.max.sm,power.limit --format=csv | tee "$OUT/gpu.txt"
