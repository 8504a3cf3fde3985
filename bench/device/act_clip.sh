#!/usr/bin/env bash
# `--act-clip auto` on the device machine (H100, no registry): the GPU test suite (kernels and the
# calibrator's CUDA path, incl. the clip search through the Triton kernels), then the cost of the
# search on a Llama-2-7B-shaped random model (Hadamard + RTN: the cheapest pipeline around it;
# WHOLE=1 runs DartQuant + GPTQ on 128 x 2048 tokens instead, the issue-4 setting).
#   device run:  bash bench/device/act_clip.sh      (results under $OUT)
source "$(dirname "$0")/setup.sh"
if [ "${WHOLE:-0}" = 1 ]; then
    timeout "${BUDGET_S:-560}" python bench/bench_calibration.py --preset llama2-7b-random --device cuda --tf32 --rotation dartquant \
        --calib-tokens 262144 --calib-seq-len 2048 --name llama2-7b-random-dq-gptq-autoclip --out "$OUT" 2>&1 \
        | grep -v "it/s\]$" | tee "$OUT/calibration_llama2-7b-random-dq-gptq-autoclip.log" | tail -30
    exit 0
fi
timeout "${SUITE_S:-280}" python -m pytest -m gpu tests/gpu -q -p no:cacheprovider -n 8 2>&1 | tail -8 | tee "$OUT/pytest_gpu_all.log"
timeout "${BUDGET_S:-280}" python bench/bench_calibration.py --preset llama2-7b-random --device cuda --tf32 --rotation dartquant \
    --rotation hadamard --weights rtn --calib-tokens 16384 --calib-seq-len 2048 \
    --name llama2-7b-random-had-rtn-autoclip --out "$OUT" 2>&1 \
    | grep -v "it/s\]$" | tee "$OUT/calibration_llama2-7b-random-had-rtn-autoclip.log" | tail -30
