#!/usr/bin/env bash
# Install everything the tests need, then run the CPU test suite (GPU tests: `pytest -m gpu` on a GPU host).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh offline,cpu,test
python -m pytest -q -ra tests "$@"
