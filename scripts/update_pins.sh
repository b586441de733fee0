#!/usr/bin/env bash
# Move the test set-up's pins (scripts/constraints-cpu.txt) to what the registry serves today, and
# check the Hugging Face table against the new transformers. Run by hand, never by CI: a new release
# is a step someone takes and reviews. Needs python3 and the network; about 3 minutes on 2 cores.
#
#   bash scripts/update_pins.sh        # torch stays at its pin
#   TORCH_SPEC='torch==2.14.*' bash scripts/update_pins.sh   # move torch too ('torch' for the newest)
#
# 1. installs `.[all]` unpinned into a new virtual environment in a temporary directory (torch
#    constrained by TORCH_SPEC, default its current pin: pip then takes the machine's CPU build of it,
#    as scripts/setup.sh does; elsewhere set PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu);
# 2. rewrites scripts/constraints-cpu.txt from that environment's `pip freeze` and prints the diff;
# 3. lists the RMSNorm classes the new transformers adds, changes or removes against the pinned one
#    (downloaded, not installed), each with what bi_torch/hf_table.py says of it;
# 4. runs the table's tests (tests/test_hf_patch.py, test_hf_patch_rules.py, test_pins.py) there.
# Then: classify every class listed NOT CLASSIFIED (hf_table.py's rules), set hf_table.TRANSFORMERS and
# README's versions, run the whole suite (bash scripts/setup.sh && .venv/bin/python -m pytest -q),
# commit. `git checkout scripts/constraints-cpu.txt` undoes step 2. Exit status: the tests'.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
lock=scripts/constraints-cpu.txt
pin_of() { sed -n "s/^$1==//p" "$lock"; }
old_transformers=$(pin_of transformers)
torch_spec=${TORCH_SPEC:-torch==$(pin_of torch)}

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
python3 -m venv "$tmp/venv"
py="$tmp/venv/bin/python"
echo "$torch_spec" > "$tmp/torch.txt"
echo "installing .[all] unpinned ($torch_spec) into $tmp/venv ..."
"$py" -m pip install -q -e ".[all]" -c "$tmp/torch.txt"

# Local version labels (2.13.0+cpu) dropped: `==2.13.0` still takes the CPU build where one is on offer.
{
    sed -n '/^#/p' "$lock"
    "$py" -m pip freeze --exclude-editable | sed 's/+[A-Za-z0-9.]*$//'
} > "$tmp/new.txt"
echo
echo "== pins that moved (scripts/constraints-cpu.txt, - before, + now)"
{ diff -u "$lock" "$tmp/new.txt" || true; } | grep '^[-+][^-+#]' || echo "  none"
cp "$tmp/new.txt" "$lock"

echo
echo "== RMSNorm classes, transformers $old_transformers -> $(pin_of transformers)"
"$py" -m pip download -q --no-deps "transformers==$old_transformers" -d "$tmp/old"
"$py" -m zipfile -e "$tmp"/old/transformers-*.whl "$tmp/old/unpacked"
"$py" -m bi_torch.hf_audit --old "$tmp/old/unpacked/transformers" || true

echo
echo "== the table's tests against transformers $(pin_of transformers)"
"$py" -m pytest -q -p no:cacheprovider tests/test_hf_patch.py tests/test_hf_patch_rules.py tests/test_pins.py
