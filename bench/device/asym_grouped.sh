#!/usr/bin/env bash
# The whole GPU test suite, then asymmetric against symmetric activations with group-wise weight
# scales (group 128), the configuration of DartQuant's released scripts.
#   device run:  bash bench/device/asym_grouped.sh      (results under $OUT)
source "$(dirname "$0")/setup.sh"
timeout "${SUITE_S:-300}" python -m pytest -m gpu tests/gpu -q -p no:cacheprovider -n 8 2>&1 | tail -15 | tee "$OUT/pytest_gpu_all.log"
timeout "${BENCH_S:-240}" python bench/bench_kernels.py --asym --asym-group 128 --no-table --ms 1,16,128,512,8192 --out "$OUT" 2>&1 \
    | tee "$OUT/bench_asym_g128.log" | grep -v "^  (" | tail -40
