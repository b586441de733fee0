"""bi_torch.patch_model on tiny, randomly initialised transformers models (CPU: the Triton interpreter).

Per table entry: the entry against its class's own forward (the check that catches a transformers
release changing a class), and a model of that family patched, forward and backward, against the
same model unpatched; then optimizers and tied weights, a gated norm outside the table, and a
float32 model under autocast. Models are built from configs: nothing is downloaded. patch_model's
rules on hand-built modules, and the `kernels` layer: test_hf_patch_rules.py.
"""

from __future__ import annotations

import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers", reason="the hf extra (transformers) is not installed")

from bi_torch import ops  # noqa: E402
from bi_torch.hf import PatchedRMSNorm, patch_model, table_entry  # noqa: E402
from bi_torch.hf_table import EXCLUDED, TABLE  # noqa: E402
from bi_torch.module import RMSNorm  # noqa: E402
from hf_helpers import hf_class  # noqa: E402

TD = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_BASE = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             vocab_size=128, head_dim=16)
_TOKENS = dict(pad_token_id=0, bos_token_id=1, eos_token_id=2)  # defaults outside a 128-token vocabulary
_MOE = dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32)
_DS_MOE = dict(n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, first_k_dense_replace=1, n_group=1,
               topk_group=1)
_NO_HEAD_DIM = {k: v for k, v in _BASE.items() if k != "head_dim"}

# One tiny config per table entry, keyed like TABLE: (config class, config kwargs).
CONFIGS = {
    "llama.LlamaRMSNorm": ("LlamaConfig", {}), "mistral.MistralRMSNorm": ("MistralConfig", {}),
    "mixtral.MixtralRMSNorm": ("MixtralConfig", dict(num_local_experts=4, num_experts_per_tok=2)),
    "qwen2.Qwen2RMSNorm": ("Qwen2Config", {}),
    "qwen2_moe.Qwen2MoeRMSNorm": ("Qwen2MoeConfig", dict(_MOE, shared_expert_intermediate_size=32)),
    "qwen3.Qwen3RMSNorm": ("Qwen3Config", {}), "qwen3_moe.Qwen3MoeRMSNorm": ("Qwen3MoeConfig", _MOE),
    "phi3.Phi3RMSNorm": ("Phi3Config", _TOKENS),
    "deepseek_v3.DeepseekV3RMSNorm": ("DeepseekV3Config", dict(_DS_MOE, q_lora_rank=32, kv_lora_rank=16,
                                                               qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16)),
    "granite.GraniteRMSNorm": ("GraniteConfig", {}),
    "granitemoe.GraniteMoeRMSNorm": ("GraniteMoeConfig", dict(num_local_experts=4, num_experts_per_tok=2)),
    "glm.GlmRMSNorm": ("GlmConfig", _TOKENS), "glm4.Glm4RMSNorm": ("Glm4Config", _TOKENS),
    "glm4_moe.Glm4MoeRMSNorm": ("Glm4MoeConfig", _DS_MOE),
    "smollm3.SmolLM3RMSNorm": ("SmolLM3Config", _TOKENS),
    "olmoe.OlmoeRMSNorm": ("OlmoeConfig", dict(num_experts=4, num_experts_per_tok=2)),
    "olmo2.Olmo2RMSNorm": ("Olmo2Config", {}), "olmo3.Olmo3RMSNorm": ("Olmo3Config", {}),
    "gpt_oss.GptOssRMSNorm": ("GptOssConfig", dict(num_local_experts=4, num_experts_per_tok=2, intermediate_size=64)),
    "helium.HeliumRMSNorm": ("HeliumConfig", {}),
    "nemotron_h.NemotronHRMSNorm": ("NemotronHConfig", dict(hybrid_override_pattern="M*", mamba_num_heads=4,
                                                            mamba_head_dim=16, ssm_state_size=16, n_groups=1)),
    "gemma.GemmaRMSNorm": ("GemmaConfig", {}), "gemma2.Gemma2RMSNorm": ("Gemma2Config", {}),
    "gemma3.Gemma3RMSNorm": ("Gemma3TextConfig", {}),
    "qwen3_next.Qwen3NextRMSNorm": ("Qwen3NextConfig", dict(_MOE, shared_expert_intermediate_size=32,
                                                            layer_types=["linear_attention", "full_attention"],
                                                            linear_num_value_heads=4, linear_num_key_heads=2,
                                                            linear_key_head_dim=16, linear_value_head_dim=16)),
    "t5gemma.T5GemmaRMSNorm": ("T5GemmaConfig", None),  # encoder-decoder: built by _config
}


def _short(key: str) -> str:
    """'transformers.models.llama.modeling_llama.LlamaRMSNorm' -> 'llama.LlamaRMSNorm'."""
    parts = key.split(".")
    return f"{parts[2]}.{parts[-1]}"


def _config(short: str):
    name, kwargs = CONFIGS[short]
    if kwargs is None:
        return transformers.T5GemmaConfig(encoder=_BASE, decoder=_BASE, vocab_size=_BASE["vocab_size"])
    return getattr(transformers, name)(**{**(_NO_HEAD_DIM if short.startswith("deepseek") else _BASE), **kwargs})


def _ordered(t: torch.Tensor) -> torch.Tensor:
    """t's bits as integers that order like the values (sign-magnitude to two's complement): the
    difference of two is their distance in ulps."""
    i = t.view({2: torch.int16, 4: torch.int32}[t.element_size()]).long()
    return torch.where(i < 0, -(i & (2 ** (8 * t.element_size() - 1) - 1)), i)


def _ulps(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (_ordered(a) - _ordered(b)).abs()


def test_every_entry_has_a_model_config():
    """A table entry without a model test would go unchecked against its family's model."""
    assert sorted(_short(k) for k in TABLE) == sorted(CONFIGS)


@pytest.mark.parametrize("key", list(EXCLUDED), ids=_short)
def test_excluded_classes_exist(key):
    """An excluded class renamed in a release would silently become 'not in the table'."""
    assert isinstance(hf_class(key), type)


@pytest.mark.parametrize("key", list(TABLE), ids=_short)
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


def _build(short: str, dtype: torch.dtype, device: str = "cpu"):
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # configs warn about unused defaults; not ours
        cfg = _config(short)
        auto = transformers.AutoModelForSeq2SeqLM if short.startswith("t5gemma") else transformers.AutoModelForCausalLM
        model = auto.from_config(cfg, dtype=dtype).to(device)
    with torch.no_grad():  # HF initialises norm weights to 1 (or 0 with 1 + w): make them matter
        for module in model.modules():
            if table_entry(type(module)) is not None:
                module.weight.add_(torch.randn_like(module.weight) * 0.1)
    return model


def _loss(model, short: str):
    ids = (torch.arange(16).reshape(2, 8) * 7 % 128).to(model.device)
    kw = dict(decoder_input_ids=ids[:, :4]) if short.startswith("t5gemma") else {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # kernel fallbacks (mamba, causal_conv1d) warn on CPU
        logits = model(ids, **kw).logits
    return logits, logits.float().logsumexp(-1).mean()


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("short", sorted(CONFIGS))
def test_patched_model_matches_unpatched(short, dtype, device):
    model = _build(short, TD[dtype], device)
    norms = {name: m for name, m in model.named_modules() if table_entry(type(m)) is not None}
    assert norms, "the config built no module of the table's class"
    weights = {name: m.weight for name, m in norms.items()}
    ref_logits, ref_loss = _loss(model, short)
    ref_loss.backward()
    ref_grads = {name: w.grad.clone() for name, w in weights.items()}
    model.zero_grad()

    report = patch_model(model)
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

    logits, loss = _loss(model, short)
    loss.backward()
    # float32: the norms differ by a few ulps (test_entry_matches_the_class_forward), which the model
    # carries to the logits at ~1e-7. bfloat16: the norms are (nearly always) the same bits; HF's
    # backward runs in bfloat16 arithmetic, ours accumulates in float32, so the weight gradients
    # differ by a few bfloat16 ulps (measured <= 1.3%).
    scale, tol = ref_logits.float().abs().max().item(), (1e-5 if dtype == "float32" else 2e-2)
    torch.testing.assert_close(logits.float(), ref_logits.float(), rtol=0, atol=tol * scale)
    for name, w in weights.items():
        g, ref = w.grad.float(), ref_grads[name].float()
        g_tol = (1e-5 if dtype == "float32" else 5e-2) * ref.abs().max().item() + 1e-30
        torch.testing.assert_close(g, ref, rtol=0, atol=g_tol, msg=lambda m: f"{name} grad: {m}")


def test_optimizer_and_tied_weights_stay_valid():
    """The optimizer built before patching steps the weights the new modules use; a weight tied to
    two norms stays one Parameter."""
    model = _build("qwen3.Qwen3RMSNorm", torch.float32)
    layer = model.model.layers[0]
    layer.post_attention_layernorm.weight = layer.input_layernorm.weight  # tie two norms
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    patch_model(model)
    before = layer.input_layernorm.weight.detach().clone()
    _loss(model, "qwen3")[1].backward()
    opt.step()
    assert layer.input_layernorm.weight is layer.post_attention_layernorm.weight
    assert not torch.equal(layer.input_layernorm.weight.detach(), before), "the optimizer's step missed the norm"


def test_model_patch_gated_norm_is_skipped():
    """A real model with a class outside the table: Nemotron-H's gated norm (forward takes a gate)."""
    model = _build("nemotron_h.NemotronHRMSNorm", torch.float32)
    report = patch_model(model)
    assert report.skipped == {"model.layers.0.mixer.norm": ("NemotronHRMSNormGated", "takes a gate")}
    assert type(model.model.layers[0].mixer.norm).__name__ == "NemotronHRMSNormGated"
    with pytest.raises(ValueError, match=r"model.layers.0.mixer.norm \(NemotronHRMSNormGated\): takes a gate"):
        patch_model(_build("nemotron_h.NemotronHRMSNorm", torch.float32), unknown="raise")


def test_float32_model_under_autocast_names_the_fix():
    """Under autocast a float32 Qwen3's q_norm gets bfloat16 projections with its float32 weight:
    bi-norm computes in one dtype, so the patched model raises, naming the cast (README)."""
    model = _build("qwen3.Qwen3RMSNorm", torch.float32)
    patch_model(model)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with pytest.raises(TypeError, match=r"^weight: expected dtype bfloat16 \(x's dtype\); got float32.*"
                                            r"torch.autocast.*model.to\(torch.bfloat16\)"):
            _loss(model, "qwen3")
    model.to(torch.bfloat16)  # the fix the message names
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert _loss(model, "qwen3")[0].dtype == torch.bfloat16
