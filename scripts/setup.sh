#!/usr/bin/env bash
# Create .venv (if missing) and install bi-norm editable with every extra. Idempotent: run it again
# and pip finds everything installed. Needs only python3 (3.11 for the pinned set). Run from anywhere.
# Without an NVIDIA GPU (CI, the README's test command): every distribution at its version in
# scripts/constraints-cpu.txt, the lock scripts/update_pins.sh writes. With one, nothing is pinned
# (pip's newest CUDA builds); scripts/gpu_suite.sh runs on the GPU image's python3 and its versions.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

if [[ ! -x .venv/bin/python ]]; then
    python3 -m venv .venv
fi

constraints=()
# No working NVIDIA driver: the pinned set (and its CPU build of torch, where the machine offers one).
if ! command -v nvidia-smi >/dev/null 2>&1 || ! nvidia-smi >/dev/null 2>&1; then
    constraints=(-c scripts/constraints-cpu.txt)
fi

# ${a[@]+...}: an empty array under set -u needs this on bash < 4.4.
.venv/bin/python -m pip install -q -e ".[all]" ${constraints[@]+"${constraints[@]}"}

echo "bi-norm installed in .venv ($(.venv/bin/python --version 2>&1)${constraints:+, the versions of scripts/constraints-cpu.txt}); try .venv/bin/bi-norm verify"
