"""Which Hugging Face transformers norm classes bi_torch.RMSNorm reproduces, and with what mode and offset.

One entry per class, keyed by the class's module and name, written from that class's `forward`
(`transformers/models/<family>/modeling_<family>.py`) in transformers 5.24, or 5.25 for the entries
added with it, and checked against TRANSFORMERS (5.25.0, the release scripts/constraints-cpu.txt
pins); each entry quotes the line of `forward` that decides the mode (NUMERICS.md step 6) and the
offset (step 5). All other lines of these forwards
are the same: `hidden_states.to(torch.float32)` (or `x.float()`), `pow(2).mean(-1)`,
`hidden_states * torch.rsqrt(variance + eps)`. tests/test_hf_patch.py runs every entry against an
instance of its class, so a release that changes a class's math fails there. A class a release adds
is not in the table until someone reads it: scripts/update_pins.sh lists the RMSNorm classes a new
release adds or changes.

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

# The transformers release the table was last checked against; tests/test_pins.py holds the lock to it.
TRANSFORMERS = "5.25.0"


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
_FP32_FLOAT = "output = output * self.weight.float(); return output.type_as(x)"
_GEMMA = "output = output * (1.0 + self.weight.float()); return output.type_as(x)"
# Llama 4 rounds first too (type_as(x) is .to(input_dtype); a product's bits do not depend on its order).
_LLAMA4 = "output = self._norm(x.float()).type_as(x); return output * self.weight"


def _llama(family: str, cls: str, source: str = _LLAMA) -> tuple:
    return f"{_M}.{family}.modeling_{family}.{cls}", Entry("llama", 0.0, "variance_epsilon", source)


def _fp32(family: str, cls: str, source: str, eps_attr: str = "variance_epsilon") -> tuple:
    return f"{_M}.{family}.modeling_{family}.{cls}", Entry("fp32", 0.0, eps_attr, source)


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
    _llama("olmoe", "OlmoeRMSNorm"),              # Llama's code; also q_norm / k_norm
    _llama("mamba2", "Mamba2RMSNorm"),
    _llama("zamba", "ZambaRMSNorm"),
    _llama("zamba2", "Zamba2RMSNorm"),
    _llama("eurobert", "EuroBertRMSNorm"),
    _llama("kolibri1_1", "Kolibri1_1RMSNorm"),    # new in 5.25
    _llama("minicpm5_moe", "MiniCPM5MoeRMSNorm"), # new in 5.25
    _llama("llama4", "Llama4TextRMSNorm", _LLAMA4),
    _fp32("olmo2", "Olmo2RMSNorm", _FP32),        # also q_norm / k_norm over the full width
    _fp32("olmo3", "Olmo3RMSNorm", _FP32),
    _fp32("gpt_oss", "GptOssRMSNorm", _FP32),
    _fp32("helium", "HeliumRMSNorm", _FP32_CAST),
    _fp32("nemotron_h", "NemotronHRMSNorm", _FP32_CAST),
    _fp32("flex_olmo", "FlexOlmoRMSNorm", _FP32),
    _fp32("olmo_hybrid", "OlmoHybridRMSNorm", _FP32),
    _fp32("beam", "BeamRMSNorm", _FP32),
    _fp32("deepseek_v4", "DeepseekV4RMSNorm", _FP32),
    _fp32("inkling2", "Inkling2RMSNorm", _FP32),
    _fp32("inkling2_loop", "Inkling2LoopRMSNorm", _FP32),
    _fp32("moshi", "MoshiRMSNorm", _FP32_FLOAT, "eps"),
    _fp32("kyutai_speech_to_text", "KyutaiSpeechToTextRMSNorm", _FP32_FLOAT, "eps"),
    _gemma("gemma", "GemmaRMSNorm"),
    _gemma("gemma2", "Gemma2RMSNorm"),
    _gemma("gemma3", "Gemma3RMSNorm"),            # also q_norm / k_norm
    _gemma("qwen3_next", "Qwen3NextRMSNorm"),
    _gemma("t5gemma", "T5GemmaRMSNorm"),
    _gemma("t5gemma2", "T5Gemma2RMSNorm"),
    _gemma("vaultgemma", "VaultGemmaRMSNorm"),
    _gemma("recurrent_gemma", "RecurrentGemmaRMSNorm"),
    _gemma("qwen3_5", "Qwen3_5RMSNorm"),
    _gemma("qwen3_5_moe", "Qwen3_5MoeRMSNorm"),
    _gemma("minimax_m3_vl", "MiniMaxM3VLRMSNorm"),
    _gemma("step3p7", "Step3p7RMSNorm"),
    _gemma("muse_glimmer", "MuseGlimmerTextCenteredRMSNorm"),
])

# RMS-style classes left alone on purpose: patch_model reports them with this reason. Any other
# class whose name contains "RMSNorm" is reported as not in the table.
_GATE = "takes a gate"
_POW = "torch.pow(mean + eps, -0.5): not the contract's sqrt then 1/r"
_NO_WEIGHT = "has no weight Parameter (patch_model hands the module's own to bi_torch.RMSNorm)"


def _excluded(reason: str, *keys: str) -> Dict[str, str]:
    """'family.Class' keys (the module is modeling_<family>) -> reason."""
    return {f"{_M}.{k.split('.')[0]}.modeling_{k.split('.')[0]}.{k.split('.')[1]}": reason for k in keys}


EXCLUDED: Dict[str, str] = {
    f"{_M}.t5.modeling_t5.T5LayerNorm":
        "casts to the weight's dtype, not the input's (hidden_states.to(self.weight.dtype))",
    **_excluded(_POW, "gemma3n.Gemma3nRMSNorm", "gemma4.Gemma4RMSNorm", "gemma4_unified.Gemma4UnifiedRMSNorm",
                "diffusion_gemma.DiffusionGemmaRMSNorm", "embedding_gemma2.EmbeddingGemma2RMSNorm",
                "muse_glimmer.MuseGlimmerRMSNorm", "muse_spark.MuseSparkRMSNorm", "neomme.NeoMMERMSNorm"),
    **_excluded(_GATE, "nemotron_h.NemotronHRMSNormGated", "qwen3_next.Qwen3NextRMSNormGated",
                "mamba2.Mamba2RMSNormGated", "zamba2.Zamba2RMSNormGated", "olmo_hybrid.OlmoHybridRMSNormGated",
                "qwen3_5.Qwen3_5RMSNormGated", "qwen3_5_moe.Qwen3_5MoeRMSNormGated"),
    **_excluded(_NO_WEIGHT, "llama4.Llama4TextWeightlessRMSNorm", "inkling2.Inkling2UnweightedRMSNorm",
                "inkling2_loop.Inkling2LoopUnweightedRMSNorm", "deepseek_v4.DeepseekV4UnweightedRMSNorm",
                "glm5_next.Glm5NextTextUnweightedRMSNorm", "esmfold2.EsmFold2RMSNorm", "hrm_text.HrmTextRMSNorm",
                "nanochat.NanoChatRMSNorm", "falcon_mamba.FalconMambaWeightlessRMSNorm"),
    **_excluded("returns rsqrt(mean + eps) itself, not the input times it", "hy_v4.HYV4UnweightedRMSNorm",
                "hy_v4_vl.HYV4VLUnweightedRMSNorm"),
    **_excluded("(1.0 + self.weight).float(): 1 + w is rounded to the weight's dtype first",
                "muse_spark.MuseSparkTextCenteredRMSNorm"),
    **_excluded("multiplies by 1 + w before it normalises", "muse_spark.MuseSparkTextInputScaledRMSNorm"),
    **_excluded("with group_size, normalises groups of columns on their own", "qwen4_exp.Qwen4ExpTextRMSNorm"),
    **_excluded("torch.nn.functional.rms_norm on float32: torch's kernel, not the lines the modes are read from",
                "ergo.ErgoRMSNorm"),
    **_excluded("scale, shift and gate come from its timestep_embeds argument", "pi05.PI05AdaptiveRMSNorm"),
}
