"""bi_torch.patch_model's rules on hand-built modules: the report, the skip/raise paths, shared and
hooked modules, the arguments, inputs of other strides; and the `kernels` layer (KernelsRMSNorm),
by hand and through kernels.kernelize.
Real models of every table family: test_hf_patch.py.
"""

from __future__ import annotations

import importlib
import inspect
from types import MethodType

import pytest
import torch

transformers = pytest.importorskip("transformers", reason="the hf extra (transformers) is not installed")

from bi_torch import ops  # noqa: E402
from bi_torch.rows import as_rows  # noqa: E402
from bi_torch.hf import KernelsRMSNorm, PatchedRMSNorm, _one_row_stride, patch_model  # noqa: E402
from bi_torch.hf_table import EXCLUDED, TABLE  # noqa: E402
from hf_helpers import hf_class  # noqa: E402
from hf_models import build, outputs  # noqa: E402
from torch_helpers import assert_bits  # noqa: E402


class _Toy(torch.nn.Module):
    def __init__(self, **children):  # a parent: patch_model replaces children in their parents
        super().__init__()
        for name, child in children.items():
            self.add_module(name, child)


class MyRMSNorm(torch.nn.Module):
    def __init__(self, n):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(n))


def _llama_norm():
    return transformers.models.llama.modeling_llama.LlamaRMSNorm(16, eps=1e-6)


def test_skip_reports_and_raise_refuses():
    subclass = type("LlamaRMSNormVariant", (transformers.models.llama.modeling_llama.LlamaRMSNorm,), {})
    hooked = _llama_norm()
    hooked.register_forward_hook(lambda *a: None)
    t5 = importlib.import_module("transformers.models.t5.modeling_t5").T5LayerNorm(16)
    children = dict(ok=_llama_norm(), mine=MyRMSNorm(16), sub=subclass(16), hooked=hooked, t5=t5,
                    torch_norm=torch.nn.RMSNorm(16), linear=torch.nn.Linear(16, 16))
    model = _Toy(**children)
    with pytest.raises(ValueError, match=r"^model: 5 RMSNorm module\(s\) cannot be replaced: mine \(MyRMSNorm\): not "
                                         r"in bi_torch.hf_table.TABLE;.*unknown='skip'"):
        patch_model(model, unknown="raise")
    assert all(getattr(model, name) is child for name, child in children.items()), "raise replaced something"

    report = patch_model(model)
    assert list(report.replaced) == ["ok"] and isinstance(model.ok, PatchedRMSNorm)
    assert report.skipped == {
        "mine": ("MyRMSNorm", "not in bi_torch.hf_table.TABLE"),
        "sub": ("LlamaRMSNormVariant", "a subclass of transformers.models.llama.modeling_llama.LlamaRMSNorm: "
                                       "the table describes that class's forward only"),
        "hooked": ("LlamaRMSNorm", "has hooks registered on it, which a new module would not carry over"),
        "t5": ("T5LayerNorm", EXCLUDED["transformers.models.t5.modeling_t5.T5LayerNorm"]),
        "torch_norm": ("RMSNorm", "not in bi_torch.hf_table.TABLE"),
    }
    assert model.linear is children["linear"]
    # Patching again finds bi_torch's own modules done, and reports the same skips.
    assert patch_model(model).replaced == {} and patch_model(model).skipped == report.skipped


def test_shared_module_gets_one_replacement():
    norm = _llama_norm()
    model = _Toy(a=norm, b=_Toy(c=norm))
    report = patch_model(model)
    assert sorted(report.replaced) == ["a", "b.c"] and model.a is model.b.c and model.a.weight is norm.weight


def test_arguments_are_checked():
    with pytest.raises(ValueError, match=r"^unknown: expected 'skip' or 'raise'; got 'ignore'"):
        patch_model(_Toy(), unknown="ignore")
    with pytest.raises(TypeError, match=r"^model: expected a torch.nn.Module; got dict"):
        patch_model({})
    root = _llama_norm()
    assert patch_model(root).skipped == {"": ("LlamaRMSNorm", "is the model itself: patch_model replaces submodules "
                                                              "in their parents")}


@pytest.mark.parametrize("shape,perm", [((2, 3, 4, 8), (0, 2, 1, 3)), ((2, 3, 4, 8), (1, 0, 2, 3)),
                                        ((1, 3, 1, 8), (2, 1, 0, 3)), ((5, 8), (1, 0)), ((4, 1, 8), (0, 1, 2)),
                                        ((3, 8), (0, 1))])
def test_one_row_stride_agrees_with_rms_norm(shape, perm):
    """PatchedRMSNorm copies exactly the inputs rms_norm refuses; the copy gives rms_norm's bits."""
    x = torch.randn(shape).permute(perm)
    try:
        takes = as_rows(x, "x") is not None
    except ValueError:
        takes = False
    assert _one_row_stride(x) == takes
    norm = PatchedRMSNorm(x.shape[-1])
    assert_bits(ops.rms_norm(x.contiguous(), norm.weight.detach()), norm(x))


def test_kernels_layer_follows_the_kernels_rules():
    """kernels' layer validation (kernels/layer/layer.py, _validate_layer, 0.17): no constructor of
    its own, no members beyond nn.Module's but the two flags, forward's parameters of the same kinds
    as the forward it replaces. Bound to a class outside the table, it raises."""
    assert KernelsRMSNorm.__init__ is torch.nn.Module.__init__
    extra = {n for n, _ in inspect.getmembers(KernelsRMSNorm)} - {n for n, _ in inspect.getmembers(torch.nn.Module)}
    assert extra <= {"can_torch_compile", "has_backward"}
    ours = list(inspect.signature(KernelsRMSNorm.forward).parameters.values())
    for key in TABLE:
        theirs = list(inspect.signature(hf_class(key).forward).parameters.values())
        assert [p.kind for p in ours] == [p.kind for p in theirs], key
    module = MyRMSNorm(8)
    module.forward = MethodType(KernelsRMSNorm.forward, module)
    with pytest.raises(TypeError, match=r"^hidden_states: .*no table entry for .*MyRMSNorm"):
        module(torch.randn(2, 8))


@pytest.mark.parametrize("key", ["transformers.models.llama.modeling_llama.LlamaRMSNorm",
                                 "transformers.models.olmo2.modeling_olmo2.Olmo2RMSNorm",
                                 "transformers.models.gemma3.modeling_gemma3.Gemma3RMSNorm"])
def test_kernels_layer_bound_like_kernelize(key):
    """kernels binds the layer's forward to the HF instance (MethodType); it must then give the
    bits patch_model's module gives, per the instance's class, in bfloat16 where the modes differ."""
    module = hf_class(key)(64, eps=1e-5).to(torch.bfloat16)
    with torch.no_grad():
        module.weight.copy_(torch.linspace(-1, 2, 64))
    x = torch.randn(3, 5, 64).to(torch.bfloat16)
    patched = _Toy(norm=module)
    patch_model(patched)
    expected = patched.norm(x)
    module.forward = MethodType(KernelsRMSNorm.forward, module)
    assert_bits(expected, module(x))


@pytest.mark.parametrize("family,layer", [("llama.LlamaRMSNorm", "RMSNorm"),
                                          ("qwen3_5.Qwen3_5RMSNorm", "RMSNormZeroCentered")])
def test_kernelize_with_the_layer_gives_patch_models_bits(family, layer):
    """kernels.kernelize itself (the pinned kernels, on CPU) binds the layer to every norm of the hub
    layer name transformers gives the class (Qwen3.5's 1 + w norms have their own); the model's
    logits are then patch_model's, bit for bit, in bfloat16 where the modes differ."""
    kernels = pytest.importorskip("kernels", reason="kernels (a transformers dependency) is not installed")

    class BiNorm:  # a kernels repository: load() returns the layer class
        def load(self):
            return KernelsRMSNorm

    patched, kernelized = build(family, torch.bfloat16), build(family, torch.bfloat16)
    patch_model(patched)
    with kernels.use_kernel_mapping({layer: {"cpu": BiNorm()}}):
        kernelized = kernels.kernelize(kernelized, mode=kernels.Mode.TRAINING | kernels.Mode.TORCH_COMPILE,
                                       device="cpu")
    norms = [m for m in kernelized.modules() if type(m).__name__ == family.split(".")[1]]
    assert norms and all("forward" in vars(m) for m in norms), "kernelize left a norm's forward alone"
    assert_bits(outputs(patched, family)[0], outputs(kernelized, family)[0])
