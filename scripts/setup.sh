#!/usr/bin/env bash
# Create .venv (if missing) and install bi-norm editable with every extra. Idempotent: run it again
# and pip finds everything installed. Needs only python3 (3.10+). Run from the repository root.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

if [[ ! -x .venv/bin/python ]]; then
    python3 -m venv .venv
fi

constraints=()
# Without a working NVIDIA driver a CUDA build of torch is gigabytes of dead weight.
if ! command -v nvidia-smi >/dev/null 2>&1 || ! nvidia-smi >/dev/null 2>&1; then
    constraints=(-c scripts/constraints-cpu.txt)
fi

# ${a[@]+...}: an empty array under set -u needs this on bash < 4.4.
.venv/bin/python -m pip install -q -e ".[all]" ${constraints[@]+"${constraints[@]}"}

echo "bi-norm installed in .venv ($(.venv/bin/python --version 2>&1)${constraints:+, CPU-only torch}); try .venv/bin/bi-norm verify"
