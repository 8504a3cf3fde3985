#!/usr/bin/env bash
# Issue 4 on the device machine (H100, no registry): the whole GPU test suite (kernels and the
# calibrator's CUDA path), then the cost of DartQuant + RTN with scored starts (the RTN default)
# on a Llama-2-7B-shaped random model (128 x 2048 tokens).
#   device run:  bash bench/device/issue4_rtn_starts.sh      (results under $OUT)
source "$(dirname "$0")/setup.sh"
timeout "${SUITE_S:-280}" python -m pytest -m gpu tests/gpu -q -p no:cacheprovider -n 8 2>&1 | tail -8 | tee "$OUT/pytest_gpu_all.log"
timeout "${BUDGET_S:-420}" python bench/bench_calibration.py --preset llama2-7b-random --device cuda --tf32 --rotation dartquant \
    --weights rtn --calib-tokens 262144 --calib-seq-len 2048 --name llama2-7b-random-rtn --out "$OUT" 2>&1 \
    | grep -v "it/s\]$" | tee "$OUT/calibration_llama2-7b-random-rtn.log" | tail -30
