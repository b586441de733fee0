"""Which Hugging Face transformers norm classes bi_torch.RMSNorm reproduces, and with what mode and offset.

One entry per class, keyed by the class's module and name, written from that class's `forward` in
transformers 5.24 (`transformers/models/<family>/modeling_<family>.py`); each entry quotes the line
of `forward` that decides the mode (NUMERICS.md step 6) and the offset (step 5). All other lines of
these forwards are the same: `hidden_states.to(torch.float32)`, `pow(2).mean(-1)`,
`hidden_states * torch.rsqrt(variance + eps)`. tests/test_hf_patch.py runs every entry against an
instance of its class, so a release that changes a class's math fails there.

Two modes are all the math there is:
- "llama": round to the input dtype, then multiply by the weight (in the weight's dtype, which is
  the input's in a model of one dtype): `weight * hidden.to(input_dtype)`.
- "fp32": multiply by the weight in float32, round once: `(weight * hidden).to(input_dtype)`;
  with `1 + w` (Gemma's zero-initialised weights) weight_offset is 1.0.

Nothing importable from transformers is imported here: patch_model matches a module's class by
identity through the module that defined it, which a loaded model has already imported.
"""

from __future__ import annotations

from typing import Dict, NamedTuple


class Entry(NamedTuple):
    mode: str             # "llama" or "fp32"
    weight_offset: float  # 1.0 for `1 + w`
    eps_attr: str         # the attribute that holds eps on an instance
    source: str           # the line of the class's forward that decides mode and offset


_M = "transformers.models"
# The deciding lines, verbatim from the forwards (see the module docstring for the rest).
_LLAMA = "return self.weight * hidden_states.to(input_dtype)"
_FP32 = "return (self.weight * hidden_states).to(input_dtype)"
_FP32_CAST = "return (self.weight.to(torch.float32) * hidden_states).to(input_dtype)"
_GEMMA = "output = output * (1.0 + self.weight.float()); return output.type_as(x)"


def _llama(family: str, cls: str, eps_attr: str = "variance_epsilon") -> tuple:
    return f"{_M}.{family}.modeling_{family}.{cls}", Entry("llama", 0.0, eps_attr, _LLAMA)


def _fp32(family: str, cls: str, source: str) -> tuple:
    return f"{_M}.{family}.modeling_{family}.{cls}", Entry("fp32", 0.0, "variance_epsilon", source)


def _gemma(family: str, cls: str) -> tuple:
    return f"{_M}.{family}.modeling_{family}.{cls}", Entry("fp32", 1.0, "eps", _GEMMA)


TABLE: Dict[str, Entry] = dict([
    _llama("llama", "LlamaRMSNorm"),
    _llama("mistral", "MistralRMSNorm"),
    _llama("mixtral", "MixtralRMSNorm"),
    _llama("qwen2", "Qwen2RMSNorm"),
    _llama("qwen2_moe", "Qwen2MoeRMSNorm"),
    _llama("qwen3", "Qwen3RMSNorm"),              # also q_norm / k_norm over head_dim
    _llama("qwen3_moe", "Qwen3MoeRMSNorm"),       # also q_norm / k_norm
    _llama("phi3", "Phi3RMSNorm"),
    _llama("deepseek_v3", "DeepseekV3RMSNorm"),   # also q_a_layernorm / kv_a_layernorm (MLA)
    _llama("granite", "GraniteRMSNorm"),
    _llama("granitemoe", "GraniteMoeRMSNorm"),
    _llama("glm", "GlmRMSNorm"),
    _llama("glm4", "Glm4RMSNorm"),
    _llama("glm4_moe", "Glm4MoeRMSNorm"),
    _llama("smollm3", "SmolLM3RMSNorm"),
    _llama("olmoe", "OlmoeRMSNorm"),              # Llama's code, eps default 1e-5; also q_norm / k_norm
    _fp32("olmo2", "Olmo2RMSNorm", _FP32),        # also q_norm / k_norm over the full width
    _fp32("olmo3", "Olmo3RMSNorm", _FP32),
    _fp32("gpt_oss", "GptOssRMSNorm", _FP32),
    _fp32("helium", "HeliumRMSNorm", _FP32_CAST),
    _fp32("nemotron_h", "NemotronHRMSNorm", _FP32_CAST),
    _gemma("gemma", "GemmaRMSNorm"),
    _gemma("gemma2", "Gemma2RMSNorm"),
    _gemma("gemma3", "Gemma3RMSNorm"),            # also q_norm / k_norm
    _gemma("qwen3_next", "Qwen3NextRMSNorm"),
    _gemma("t5gemma", "T5GemmaRMSNorm"),
])

# RMS-style classes left alone on purpose: patch_model reports them with this reason. Any other
# class whose name contains "RMSNorm" is reported as not in the table.
EXCLUDED: Dict[str, str] = {
    f"{_M}.t5.modeling_t5.T5LayerNorm":
        "casts to the weight's dtype, not the input's (hidden_states.to(self.weight.dtype))",
    f"{_M}.gemma3n.modeling_gemma3n.Gemma3nRMSNorm":
        "torch.pow(mean + eps, -0.5): not the contract's sqrt then 1/r",
    f"{_M}.gemma4.modeling_gemma4.Gemma4RMSNorm": "torch.pow(mean + eps, -0.5): not the contract's sqrt then 1/r",
    f"{_M}.nemotron_h.modeling_nemotron_h.NemotronHRMSNormGated": "takes a gate",
    f"{_M}.qwen3_next.modeling_qwen3_next.Qwen3NextRMSNormGated": "takes a gate",
    f"{_M}.mamba2.modeling_mamba2.MambaRMSNormGated": "takes a gate",
}
