#!/usr/bin/env bash
# Install everything the tests need, then run the CPU tests: the fast set (what plain `pytest` runs,
# minutes), then the slow set (`pytest -m slow`: real vLLM servers and the real model, ~20 min on
# 2 cores). Both must pass. Extra arguments go to both pytest runs.
# GPU tests: `pytest -m gpu tests/gpu` on a GPU host.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh offline,cpu,test
echo "== tests: fast set (pytest)"
python -m pytest -q -ra tests "$@"
echo "== tests: slow set (pytest -m slow)"
python -m pytest -q -ra -m slow tests "$@"
