#!/usr/bin/env bash
# Issue 4 on the device machine (H100, no registry): the calibrator's CUDA path tests, then the
# whole pipeline's cost on a Llama-2-7B-shaped random model (128 x 2048 tokens).
#   device run:  bash bench/device/issue4_calibration.sh      (results under $OUT)
source "$(dirname "$0")/setup.sh"
python -m pytest -m gpu tests/gpu/test_pipeline_cuda.py -q -p no:cacheprovider 2>&1 | tail -15 | tee "$OUT/pytest_pipeline_cuda.log"
python bench/bench_calibration.py --preset tiny-random --device cuda --rotation dartquant --calib-tokens 8192 --calib-seq-len 512 \
    --out "$OUT/tiny" > "$OUT/tiny.log" 2>&1 || { tail -30 "$OUT/tiny.log"; exit 1; }
timeout "${BUDGET_S:-500}" python bench/bench_calibration.py --preset llama2-7b-random --device cuda --tf32 --rotation dartquant --probe \
    --calib-tokens 262144 --calib-seq-len 2048 --out "$OUT" 2>&1 | grep -v "it/s\]$" | tee "$OUT/calibration_llama2-7b-random.log" | tail -40
# the whole GPU suite last, with what time is left (kernels + calibrator on CUDA)
timeout "${SUITE_S:-100}" python -m pytest -m gpu tests/gpu -q -p no:cacheprovider -n 8 2>&1 | tail -5 | tee "$OUT/pytest_gpu_all.log"
