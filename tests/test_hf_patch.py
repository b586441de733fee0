"""bi_torch.patch_model on tiny, randomly initialised transformers models (CPU: the Triton interpreter).

Per table entry: the entry against its class's own forward (the check that catches a transformers
release changing a class), and a model of that family (hf_models.py) patched, forward and backward,
against the same model unpatched; then optimizers and tied weights, a gated norm outside the table,
and a float32 model under autocast. Models are built from configs: nothing is downloaded.
patch_model's rules on hand-built modules, and the `kernels` layer: test_hf_patch_rules.py.
"""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers", reason="the hf extra (transformers) is not installed")

from bi_torch import ops  # noqa: E402
from bi_torch.hf import PatchedRMSNorm, patch_model, table_entry  # noqa: E402
from bi_torch.hf_table import EXCLUDED, TABLE, TRANSFORMERS  # noqa: E402
from bi_torch.module import RMSNorm  # noqa: E402
from hf_helpers import hf_class  # noqa: E402
from hf_models import MIXED_IN_BF16, MODELS, build, outputs, short  # noqa: E402

TD = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _ordered(t: torch.Tensor) -> torch.Tensor:
    """t's bits as integers that order like the values (sign-magnitude to two's complement): the
    difference of two is their distance in ulps."""
    i = t.view({2: torch.int16, 4: torch.int32}[t.element_size()]).long()
    return torch.where(i < 0, -(i & (2 ** (8 * t.element_size() - 1) - 1)), i)


def _ulps(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (_ordered(a) - _ordered(b)).abs()


def test_every_entry_has_a_model_config():
    """A table entry without a model test would go unchecked against its family's model."""
    assert sorted(short(k) for k in TABLE) == sorted(MODELS)


@pytest.mark.parametrize("key", list(EXCLUDED), ids=short)
def test_excluded_classes_exist(key):
    """An excluded class renamed in a release would silently become 'not in the table'."""
    assert isinstance(hf_class(key), type)


@pytest.mark.parametrize("key", list(TABLE), ids=short)
def test_entry_matches_the_class_forward(key):
    """The class's own forward vs bi_torch.rms_norm with the entry's mode, offset and eps.

    Not bitwise in float32: HF takes torch's mean (its own reduction order) and rsqrt, the contract a
    pairwise tree, IEEE sqrt and a division; measured: up to 4 ulps, 5-30% of elements. In 16-bit
    dtypes the final rounding hides that: measured bitwise or one element off, bounded here by
    <= 1% of elements and 2 ulps (in mode "llama" a flipped rounding of the intermediate, times
    |w| < 2.5, can move the output by 2). The other mode differs by 1 ulp in ~25% of 16-bit
    elements (in float32 the modes are the same bits, NUMERICS.md), the other offset everywhere:
    either fails these bounds.
    """
    entry, cls = TABLE[key], hf_class(key)
    assert table_entry(cls) is entry
    gen = torch.Generator().manual_seed(len(key))
    n = 256
    module = cls(n, eps=1e-5)
    assert getattr(module, entry.eps_attr) == 1e-5, f"eps is not in {entry.eps_attr}"
    weight = torch.randn(n, generator=gen) * 0.5 + (0.0 if entry.weight_offset else 1.0)
    for name, dtype in TD.items():
        module = module.to(dtype)
        with torch.no_grad():
            module.weight.copy_(weight.to(dtype))
        x = (torch.randn(32, n, generator=gen) * 3).to(dtype)
        with torch.no_grad():
            hf = module(x)

        def distance(mode, offset):
            return _ulps(hf, ops.rms_norm(x, module.weight.detach(), 1e-5, mode=mode, weight_offset=offset))

        d = distance(entry.mode, entry.weight_offset)
        if dtype == torch.float32:
            assert d.max() <= 8, f"{name}: {d.max()} ulps from the class's forward"
        else:
            assert d.max() <= 2 and (d > 0).float().mean() <= 0.01, f"{name}: {(d > 0).sum()} elements differ"
            other = distance("fp32" if entry.mode == "llama" else "llama", entry.weight_offset)
            assert (other > 0).float().mean() >= 0.1, f"{name}: the other mode is as close; the entry proves nothing"
        wrong_offset = distance(entry.mode, 1.0 - entry.weight_offset)
        assert (wrong_offset > 8).float().mean() >= 0.9, f"{name}: the other offset is as close"


def _build_with_the_pinned_release(family: str, dtype: torch.dtype, device: str) -> torch.nn.Module:
    """build(), where the installed transformers is the table's release; under another one (the GPU
    image's own, README "Set-up") a family that release cannot build, or builds with norms of
    another class (or, below, norms patch_model leaves alone), is skipped with the reason. With the
    pinned release each stays a failure."""
    pinned = transformers.__version__ == TRANSFORMERS
    try:
        model = build(family, dtype, device)
    except (AttributeError, TypeError, ValueError, ImportError) as e:
        if pinned:
            raise
        pytest.skip(f"transformers {transformers.__version__}, not the table's {TRANSFORMERS}: {family} "
                    f"does not build ({type(e).__name__}: {str(e)[:120]})")
    if not pinned and not any(table_entry(type(m)) is not None for m in model.modules()):
        pytest.skip(f"transformers {transformers.__version__}, not the table's {TRANSFORMERS}: {family}'s "
                    f"model has no module of the table's class")
    return model


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("family,dtype", [(f, d) for f in sorted(MODELS) for d in ("float32", "bfloat16")
                                          if not (d == "bfloat16" and f in MIXED_IN_BF16)])
def test_patched_model_matches_unpatched(family, dtype, device):
    model = _build_with_the_pinned_release(family, TD[dtype], device)
    norms = {name: m for name, m in model.named_modules() if table_entry(type(m)) is not None}
    assert norms, "the config built no module of the table's class"
    weights = {name: m.weight for name, m in norms.items()}
    ref_logits, ref_loss = outputs(model, family)
    ref_loss.backward()
    # Norms these inputs do not reach (DeepSeek-V4's compressor, T5Gemma 2's image projector) get no gradient.
    ref_grads = {name: w.grad.clone() for name, w in weights.items() if w.grad is not None}
    assert ref_grads, "no norm got a gradient"
    model.zero_grad()

    report = patch_model(model)
    if transformers.__version__ != TRANSFORMERS and set(report.replaced) != set(norms):
        pytest.skip(f"transformers {transformers.__version__}, not the table's {TRANSFORMERS}: patch_model left "
                    f"{family}'s norms alone: {sorted(set(why for _, why in report.skipped.values()))}")
    assert set(report.replaced) == set(norms)
    for name, old in norms.items():
        new = model.get_submodule(name)
        entry = table_entry(type(old))
        eps = getattr(old, entry.eps_attr)
        assert isinstance(new, PatchedRMSNorm) and isinstance(new, RMSNorm)
        assert report.replaced[name] == (type(old).__name__, entry.mode, entry.weight_offset, eps)
        assert (new.mode, new.weight_offset, new.eps) == (entry.mode, entry.weight_offset, eps)
        assert new.weight is weights[name], f"{name}: the weight Parameter was not shared"
    assert not any(table_entry(type(m)) for m in model.modules())

    logits, loss = outputs(model, family)
    loss.backward()
    # float32: the norms differ by a few ulps (test_entry_matches_the_class_forward), which the model
    # carries to the logits at ~1e-7. bfloat16: the norms are (nearly always) the same bits; HF's
    # backward runs in bfloat16 arithmetic, ours accumulates in float32, so the weight gradients
    # differ by a few bfloat16 ulps (measured <= 1.3%).
    scale, tol = ref_logits.float().abs().max().item(), (1e-5 if dtype == "float32" else 2e-2)
    torch.testing.assert_close(logits.float(), ref_logits.float(), rtol=0, atol=tol * scale)
    for name, w in weights.items():
        if name not in ref_grads:
            assert w.grad is None, f"{name}: a gradient after patching, none before"
            continue
        g, ref = w.grad.float(), ref_grads[name].float()
        g_tol = (1e-5 if dtype == "float32" else 5e-2) * ref.abs().max().item() + 1e-30
        torch.testing.assert_close(g, ref, rtol=0, atol=g_tol, msg=lambda m: f"{name} grad: {m}")


@pytest.mark.parametrize("family", sorted(MIXED_IN_BF16))
def test_mixed_dtype_model_raises_naming_the_cast(family):
    """In these bfloat16 models a table norm gets an input of another dtype than its weight's (README,
    "Dtypes are never changed"): patched, the model raises at that norm's forward, naming the cast."""
    model = build(family, torch.bfloat16)
    assert patch_model(model).replaced
    with pytest.raises(TypeError, match=r"^weight: expected dtype (float32|bfloat16) \(x's dtype\); got "
                                        r"(bfloat16|float32)\. bi-norm computes in one dtype"):
        outputs(model, family)


def test_optimizer_and_tied_weights_stay_valid():
    """The optimizer built before patching steps the weights the new modules use; a weight tied to
    two norms stays one Parameter."""
    model = build("qwen3.Qwen3RMSNorm", torch.float32)
    layer = model.model.layers[0]
    layer.post_attention_layernorm.weight = layer.input_layernorm.weight  # tie two norms
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    patch_model(model)
    before = layer.input_layernorm.weight.detach().clone()
    outputs(model, "qwen3.Qwen3RMSNorm")[1].backward()
    opt.step()
    assert layer.input_layernorm.weight is layer.post_attention_layernorm.weight
    assert not torch.equal(layer.input_layernorm.weight.detach(), before), "the optimizer's step missed the norm"


def test_model_patch_gated_norm_is_skipped():
    """A real model with a class outside the table: Nemotron-H's gated norm (forward takes a gate)."""
    model = build("nemotron_h.NemotronHRMSNorm", torch.float32)
    report = patch_model(model)
    assert report.skipped == {"model.layers.0.mixer.norm": ("NemotronHRMSNormGated", "takes a gate")}
    assert type(model.model.layers[0].mixer.norm).__name__ == "NemotronHRMSNormGated"
    with pytest.raises(ValueError, match=r"model.layers.0.mixer.norm \(NemotronHRMSNormGated\): takes a gate"):
        patch_model(build("nemotron_h.NemotronHRMSNorm", torch.float32), unknown="raise")


def test_float32_model_under_autocast_names_the_fix():
    """Under autocast a float32 Qwen3's q_norm gets bfloat16 projections with its float32 weight:
    bi-norm computes in one dtype, so the patched model raises, naming the cast (README)."""
    model = build("qwen3.Qwen3RMSNorm", torch.float32)
    patch_model(model)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with pytest.raises(TypeError, match=r"^weight: expected dtype bfloat16 \(x's dtype\); got float32.*"
                                            r"torch.autocast.*model.to\(torch.bfloat16\)"):
            outputs(model, "qwen3.Qwen3RMSNorm")
    model.to(torch.bfloat16)  # the fix the message names
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert outputs(model, "qwen3.Qwen3RMSNorm")[0].dtype == torch.bfloat16
