"""Shared by the transformers tests (test_hf_patch.py, test_hf_patch_rules.py)."""

from __future__ import annotations

import importlib


def hf_class(key: str) -> type:
    """The class a table key names: 'transformers.models.llama.modeling_llama.LlamaRMSNorm' -> that class."""
    module, name = key.rsplit(".", 1)
    return getattr(importlib.import_module(module), name)
