#!/usr/bin/env bash
# Asymmetric activations (act_symmetric: false) on the device machine (H100, no registry): the
# whole GPU test suite (the symmetric kernels share the changed code), then the sym/asym linear
# timings of bench_kernels.py --asym.
#   device run:  bash bench/device/asym_activations.sh      (results under $OUT)
source "$(dirname "$0")/setup.sh"
timeout "${SUITE_S:-300}" python -m pytest -m gpu tests/gpu -q -p no:cacheprovider -n 8 2>&1 | tail -15 | tee "$OUT/pytest_gpu_all.log"
timeout "${BENCH_S:-240}" python bench/bench_kernels.py --asym --no-table --ms 1,16,512,8192 --out "$OUT" 2>&1 \
    | tee "$OUT/bench_asym.log" | grep -v "^  (" | tail -40
