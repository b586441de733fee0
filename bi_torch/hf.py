"""bi_torch.patch_model: a Hugging Face transformers model's RMSNorm modules become bi_torch.RMSNorm, in place.

Which classes are replaced, and with what mode, offset and eps attribute, is bi_torch/hf_table.py's
TABLE, keyed by the class; a class is never guessed from its name or its shape. Each replacement
takes the old module's `weight` Parameter object itself (no copy, no dtype change), so optimizer
state, tied weights and state_dict keys stay as they were.

Also here: `KernelsRMSNorm`, a layer for the `kernels` package's hub-layer mechanism (the one
transformers' `@use_kernel_forward_from_hub("RMSNorm")` uses), which dispatches on the same table.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple, Union

import torch

from .hf_table import EXCLUDED, TABLE, Entry
from .module import RMSNorm
from .ops import rms_norm


class PatchedRMSNorm(RMSNorm):
    """bi_torch.RMSNorm as patch_model installs it: the same norm and bits, except that an input whose
    rows have no single stride is copied first (Gemma 3's q/k norms get (batch, heads, seq, head_dim)
    views of transposed projections, a layout the HF code chooses, not the caller). A copy changes
    no bit, and autograd carries the gradient through it."""

    def forward(self, x: torch.Tensor, residual: Optional[torch.Tensor] = None
                ) -> Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]:
        if not _one_row_stride(x):
            x = x.contiguous()
        return super().forward(x, residual)


def _one_row_stride(x: torch.Tensor) -> bool:
    """Whether x's last dimension is contiguous and its rows are one stride apart (what
    bi_torch.rms_norm takes without a copy); from sizes and strides only, so torch.compile traces it."""
    dims = [(size, stride) for size, stride in zip(x.shape[:-1], x.stride()[:-1]) if size != 1]
    if x.shape[-1] > 1 and x.stride(-1) != 1:
        return False
    return all(outer[1] == inner[0] * inner[1] for outer, inner in zip(dims, dims[1:]))


def _key(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def _defined_there(cls: type) -> bool:
    """Whether cls is the very class its module defines under its name (not a look-alike or a copy)."""
    return getattr(sys.modules.get(cls.__module__), cls.__qualname__, None) is cls


def table_entry(cls: type) -> Optional[Entry]:
    """TABLE's entry for exactly this class, else None: a subclass (which may override forward) or a
    class that only shares the module path and name does not match."""
    entry = TABLE.get(_key(cls))
    return entry if entry is not None and _defined_there(cls) else None


@dataclass(frozen=True)
class PatchReport:
    """What patch_model did. replaced: module name -> (class name, mode, weight_offset, eps).
    skipped: module name -> (class name, why it was left alone)."""

    replaced: Dict[str, Tuple[str, str, float, float]] = field(default_factory=dict)
    skipped: Dict[str, Tuple[str, str]] = field(default_factory=dict)


def _why_not(module: torch.nn.Module) -> Optional[str]:
    """None when the module can be replaced by its table entry; else the reason it is left alone."""
    cls = type(module)
    if table_entry(cls) is None:
        if _key(cls) in TABLE:
            return "shares a table class's module and name but is not that class"
        base = _table_base(cls)
        if base is not None:
            return f"a subclass of {base}: the table describes that class's forward only"
        return EXCLUDED.get(_key(cls), "not in bi_torch.hf_table.TABLE")
    if "forward" in vars(module):
        # kernels.kernelize and accelerate's hooks replace forward on the instance: the table
        # describes the class's forward, not theirs.
        return "its forward was replaced on the instance (kernels.kernelize, accelerate hooks)"
    if module._forward_hooks or module._forward_pre_hooks or module._backward_hooks:
        return "has hooks registered on it, which a new module would not carry over"
    weight = getattr(module, "weight", None)
    if not isinstance(weight, torch.nn.Parameter) or weight.dim() != 1:
        return "has no 1-D weight Parameter"
    eps = getattr(module, table_entry(cls).eps_attr, None)
    if isinstance(eps, bool) or not isinstance(eps, (int, float)):
        return f"its {table_entry(cls).eps_attr} is not a float"
    return None


def _table_base(cls: type) -> Optional[str]:
    """The first base class of cls (cls excluded) that is in TABLE or EXCLUDED, by key."""
    return next((_key(base) for base in cls.__mro__[1:] if _key(base) in TABLE or _key(base) in EXCLUDED), None)


def _is_candidate(module: torch.nn.Module) -> bool:
    """An RMSNorm that patch_model reports when it leaves it alone (bi_torch's own are done already):
    a class named *RMSNorm*, a table or excluded class, or a subclass of one."""
    cls = type(module)
    if isinstance(module, RMSNorm):
        return False
    return "RMSNorm" in cls.__name__ or _key(cls) in TABLE or _key(cls) in EXCLUDED or _table_base(cls) is not None


def patch_model(model: torch.nn.Module, *, unknown: str = "skip") -> PatchReport:
    """Replace every RMSNorm module of `model` whose class is in bi_torch.hf_table.TABLE by a
    bi_torch.RMSNorm (a PatchedRMSNorm) with that entry's mode and weight_offset, the module's own eps, and the module's
    own weight Parameter (the same object). Returns a PatchReport.

    unknown="skip" (default): RMSNorm modules that cannot be replaced (a class not in the table or
    excluded from it, a subclass, a module with hooks or a replaced forward) are left as they are
    and listed in the report's `skipped`. unknown="raise": such a module raises ValueError before
    anything is replaced. Dtypes are never changed: a norm whose weight's dtype differs from its
    input's raises TypeError at its first forward (bi-norm computes in one dtype; see README).
    """
    if unknown not in ("skip", "raise"):
        raise ValueError(f"unknown: expected 'skip' or 'raise'; got {unknown!r}")
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module; got {type(model).__name__}")
    plan: List[Tuple[torch.nn.Module, str, str, torch.nn.Module]] = []  # (parent, child name, full name, old)
    skipped: Dict[str, Tuple[str, str]] = {}
    if _is_candidate(model):
        skipped[""] = (type(model).__name__, "is the model itself: patch_model replaces submodules in their parents")
    for parent_name, parent in model.named_modules():
        for child_name, child in parent.named_children():
            if not _is_candidate(child):
                continue
            full_name = f"{parent_name}.{child_name}" if parent_name else child_name
            why = _why_not(child)
            if why is None:
                plan.append((parent, child_name, full_name, child))
            else:
                skipped[full_name] = (type(child).__name__, why)
    if skipped and unknown == "raise":
        lines = "; ".join(f"{name or '<model>'} ({cls}): {why}" for name, (cls, why) in skipped.items())
        raise ValueError(f"model: {len(skipped)} RMSNorm module(s) cannot be replaced: {lines}. Nothing was "
                         f"replaced; pass unknown='skip' to replace the others and get these in the report.")
    replaced: Dict[str, Tuple[str, str, float, float]] = {}
    new_of: Dict[int, RMSNorm] = {}  # a module shared by several parents gets one replacement
    for parent, child_name, full_name, old in plan:
        entry = table_entry(type(old))
        eps = float(getattr(old, entry.eps_attr))
        if id(old) not in new_of:
            # Built on the meta device: its own weight is never allocated, the old Parameter replaces it.
            new = PatchedRMSNorm(old.weight.shape[0], eps, mode=entry.mode, weight_offset=entry.weight_offset,
                                 device="meta")
            new.weight = old.weight
            new.train(old.training)
            new_of[id(old)] = new
        setattr(parent, child_name, new_of[id(old)])
        replaced[full_name] = (type(old).__name__, entry.mode, entry.weight_offset, eps)
    return PatchReport(replaced, skipped)


class KernelsRMSNorm(torch.nn.Module):
    """A `kernels` hub layer for transformers' `@use_kernel_forward_from_hub("RMSNorm")` classes.

    kernels binds this forward to each HF module instance (self is the HF module), so it reads the
    module's own `weight` and eps, with the mode and offset of TABLE's entry for its class. That
    layer name covers llama-mode and fp32-mode classes alike (LlamaRMSNorm, Olmo2RMSNorm, ...), which
    is why it dispatches on the class; a class not in the table raises rather than being guessed.
    kernels' rules: no __init__, no members but forward and the two flags below.
    """

    can_torch_compile = True
    has_backward = True

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        entry = table_entry(type(self))
        if entry is None:
            raise TypeError(f"hidden_states: bi_torch.hf.KernelsRMSNorm has no table entry for "
                            f"{_key(type(self))}; map it to another layer or add the class to "
                            f"bi_torch/hf_table.py after checking its forward")
        return rms_norm(hidden_states, self.weight, getattr(self, entry.eps_attr), mode=entry.mode,
                        weight_offset=entry.weight_offset)
