"""The test set-up's pins (scripts/constraints-cpu.txt) and what moves them (scripts/update_pins.sh,
bi_torch.hf_audit): the lock pins every distribution the tests import, exactly, and the transformers
the Hugging Face table was checked against; users keep pyproject.toml's lower bounds.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from bi_torch import hf_audit
from bi_torch.hf_table import EXCLUDED, TABLE, TRANSFORMERS

ROOT = Path(__file__).resolve().parent.parent
# What the tests import (and bi-norm's own dependencies), by distribution name.
IMPORTED = ["torch", "triton", "jax", "jaxlib", "flax", "transformers", "kernels", "numpy", "ml_dtypes", "pytest",
            "hypothesis"]


def _pins() -> dict:
    lines = [line.strip() for line in (ROOT / "scripts/constraints-cpu.txt").read_text().splitlines()]
    pins = {}
    for line in lines:
        if line and not line.startswith("#"):
            match = re.fullmatch(r"([A-Za-z0-9_.-]+)==([0-9][A-Za-z0-9.]*)", line)
            assert match, f"not an exact pin without a local label: {line!r}"
            name = re.sub(r"[-_.]+", "-", match[1]).lower()
            assert name not in pins, f"{name} pinned twice"
            pins[name] = match[2]
    return pins


def test_lock_pins_what_the_tests_import_exactly():
    pins = _pins()
    assert [name for name in IMPORTED if re.sub(r"[-_.]+", "-", name) not in pins] == []
    assert "bi-norm" not in pins, "the project itself is installed editable, not pinned"


def test_lock_pins_the_transformers_the_table_was_checked_against():
    """Moving the pin is a step: classify what the release adds (update_pins.sh lists it), then set TRANSFORMERS."""
    assert _pins()["transformers"] == TRANSFORMERS


def test_users_keep_lower_bounds():
    tomllib = pytest.importorskip("tomllib", reason="tomllib is Python 3.11's")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    requirements = project["dependencies"] + [r for extra in project["optional-dependencies"].values() for r in extra]
    assert [r for r in requirements if "==" in r or "<" in r] == []


def test_audit_reads_every_table_class_from_the_installed_release():
    """hf_audit reads the modeling files, imports nothing: it must find the classes the table names
    (the other tests import them), and only classes, each with its forward."""
    pytest.importorskip("transformers", reason="the hf extra (transformers) is not installed")
    found = hf_audit.rmsnorm_classes(hf_audit.installed_transformers())
    assert set(TABLE) | set(EXCLUDED) <= set(found)
    assert all(source.startswith("class ") and "def forward" in source for source in found.values())
    assert all("RMSNorm" in key.rsplit(".", 1)[1] or key in TABLE or key in EXCLUDED for key in found)


def test_audit_lists_added_changed_and_removed_classes():
    llama, excluded = next(iter(TABLE)), next(iter(EXCLUDED))
    new_key = "transformers.models.new.modeling_new.NewRMSNorm"
    old = {llama: "class A: pass", excluded: "class B: pass", "transformers.models.gone.modeling_gone.GoneRMSNorm": ""}
    new = {llama: "class A: x = 1", excluded: "class B: pass", new_key: "class N: pass"}
    assert hf_audit.changes(old, new) == [
        "removed  gone.GoneRMSNorm",
        "changed  llama.LlamaRMSNorm  [table: mode 'llama', offset 0.0]",
        "added    new.NewRMSNorm  [NOT CLASSIFIED: read its forward (hf_table.py's rules)]",
    ]
