"""One tiny, randomly initialised transformers model per table entry, for test_hf_patch.py.

Built from configs: nothing is downloaded. MODELS is keyed like the table ('family.Class', see
short()); each names the config class, its arguments over _BASE, and the class that builds the model
(an Auto class, or the model class itself where no Auto class takes that config).
"""

from __future__ import annotations

import warnings
from typing import NamedTuple, Optional, Tuple

import torch
import transformers

from bi_torch.hf import table_entry

_BASE = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             vocab_size=128, head_dim=16)
_TOKENS = dict(pad_token_id=0, bos_token_id=1, eos_token_id=2)  # defaults outside a 128-token vocabulary
_MOE = dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32)
_DS_MOE = dict(n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, first_k_dense_replace=1, n_group=1,
               topk_group=1)
_NO_HEAD_DIM = {k: v for k, v in _BASE.items() if k != "head_dim"}
_LINEAR_ATTN = dict(layer_types=["linear_attention", "full_attention"], linear_num_value_heads=4,
                    linear_num_key_heads=2, linear_key_head_dim=16, linear_value_head_dim=16)
_INKLING = dict(_TOKENS, n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, swa_num_attention_heads=4,
                swa_num_key_value_heads=2, swa_head_dim=16, sliding_window_size=8, rel_extent=8,
                unpadded_vocab_size=128)
_CAUSAL, _SEQ2SEQ = "AutoModelForCausalLM", "AutoModelForSeq2SeqLM"


class Model(NamedTuple):
    config: str              # the config class's name in transformers
    kwargs: Optional[dict]   # over _BASE (None: built by config())
    builder: str = _CAUSAL   # the class whose from_config (Auto) or _from_config builds the model


MODELS = {
    "llama.LlamaRMSNorm": Model("LlamaConfig", {}), "mistral.MistralRMSNorm": Model("MistralConfig", {}),
    "mixtral.MixtralRMSNorm": Model("MixtralConfig", dict(num_local_experts=4, num_experts_per_tok=2)),
    "qwen2.Qwen2RMSNorm": Model("Qwen2Config", {}),
    "qwen2_moe.Qwen2MoeRMSNorm": Model("Qwen2MoeConfig", dict(_MOE, shared_expert_intermediate_size=32)),
    "qwen3.Qwen3RMSNorm": Model("Qwen3Config", {}), "qwen3_moe.Qwen3MoeRMSNorm": Model("Qwen3MoeConfig", _MOE),
    "phi3.Phi3RMSNorm": Model("Phi3Config", _TOKENS),
    "deepseek_v3.DeepseekV3RMSNorm": Model("DeepseekV3Config", dict(_DS_MOE, q_lora_rank=32, kv_lora_rank=16,
                                                                    qk_rope_head_dim=8, qk_nope_head_dim=8,
                                                                    v_head_dim=16)),
    "granite.GraniteRMSNorm": Model("GraniteConfig", {}),
    "granitemoe.GraniteMoeRMSNorm": Model("GraniteMoeConfig", dict(num_local_experts=4, num_experts_per_tok=2)),
    "glm.GlmRMSNorm": Model("GlmConfig", _TOKENS), "glm4.Glm4RMSNorm": Model("Glm4Config", _TOKENS),
    "glm4_moe.Glm4MoeRMSNorm": Model("Glm4MoeConfig", _DS_MOE),
    "smollm3.SmolLM3RMSNorm": Model("SmolLM3Config", _TOKENS),
    "olmoe.OlmoeRMSNorm": Model("OlmoeConfig", dict(num_experts=4, num_experts_per_tok=2)),
    "mamba2.Mamba2RMSNorm": Model("Mamba2Config", dict(num_heads=8, head_dim=16, state_size=16, n_groups=1,
                                                       chunk_size=8)),
    "zamba.ZambaRMSNorm": Model("ZambaConfig", dict(num_hidden_layers=3, n_mamba_heads=2, mamba_d_state=16,
                                                    layers_block_type=["mamba", "hybrid", "hybrid"])),
    "zamba2.Zamba2RMSNorm": Model("Zamba2Config", dict(layers_block_type=["mamba", "hybrid"], n_mamba_heads=2,
                                                       mamba_d_state=16, chunk_size=8, adapter_rank=8)),
    "eurobert.EuroBertRMSNorm": Model("EuroBertConfig", dict(_TOKENS, mask_token_id=3), "AutoModelForMaskedLM"),
    "kolibri1_1.Kolibri1_1RMSNorm": Model("Kolibri1_1Config", dict(
        num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, shared_expert_intermediate_size=32,
        index_num_heads=2, index_topk=8, index_pool_size=64, index_compression=16, mlp_only_intermediate_size=64,
        sliding_window=8)),
    "minicpm5_moe.MiniCPM5MoeRMSNorm": Model("MiniCPM5MoeConfig", {}),
    "llama4.Llama4TextRMSNorm": Model("Llama4TextConfig", dict(num_local_experts=4, num_experts_per_tok=1,
                                                               intermediate_size_mlp=128)),
    "olmo2.Olmo2RMSNorm": Model("Olmo2Config", {}), "olmo3.Olmo3RMSNorm": Model("Olmo3Config", {}),
    "gpt_oss.GptOssRMSNorm": Model("GptOssConfig", dict(num_local_experts=4, num_experts_per_tok=2,
                                                        intermediate_size=64)),
    "helium.HeliumRMSNorm": Model("HeliumConfig", {}),
    "nemotron_h.NemotronHRMSNorm": Model("NemotronHConfig", dict(hybrid_override_pattern="M*", mamba_num_heads=4,
                                                                 mamba_head_dim=16, ssm_state_size=16, n_groups=1)),
    "flex_olmo.FlexOlmoRMSNorm": Model("FlexOlmoConfig", dict(_TOKENS, num_experts=4, num_experts_per_tok=2)),
    "olmo_hybrid.OlmoHybridRMSNorm": Model("OlmoHybridConfig", _TOKENS),
    "beam.BeamRMSNorm": Model("BeamConfig", {}),
    "deepseek_v4.DeepseekV4RMSNorm": Model("DeepseekV4Config", {}),
    "inkling2.Inkling2RMSNorm": Model("Inkling2TextConfig", _INKLING),
    "inkling2_loop.Inkling2LoopRMSNorm": Model("Inkling2LoopTextConfig", dict(
        _INKLING, num_hidden_layers=3, n_layers_per_attn_res_block=1, loop_layer_index_start=1,
        loop_layer_index_end=2, loop_num_passes=2, loop_gate_rank=8)),
    "moshi.MoshiRMSNorm": Model("MoshiConfig", {}),
    "kyutai_speech_to_text.KyutaiSpeechToTextRMSNorm": Model("KyutaiSpeechToTextConfig", dict(
        _TOKENS, ffn_dim=128, num_codebooks=2, codebook_vocab_size=32, audio_bos_token_id=30, audio_pad_token_id=31,
        sliding_window=8, codec_config=dict(hidden_size=32, num_filters=8, num_hidden_layers=1, intermediate_size=64,
                                            num_attention_heads=2, num_key_value_heads=2, codebook_dim=16,
                                            vector_quantization_hidden_dimension=16, num_quantizers=2,
                                            upsample_groups=32, codebook_size=32)),
        "KyutaiSpeechToTextForConditionalGeneration"),
    "gemma.GemmaRMSNorm": Model("GemmaConfig", {}), "gemma2.Gemma2RMSNorm": Model("Gemma2Config", {}),
    "gemma3.Gemma3RMSNorm": Model("Gemma3TextConfig", {}),
    "qwen3_next.Qwen3NextRMSNorm": Model("Qwen3NextConfig", {**_MOE, **_LINEAR_ATTN,
                                                             "shared_expert_intermediate_size": 32}),
    "t5gemma.T5GemmaRMSNorm": Model("T5GemmaConfig", None, _SEQ2SEQ),
    "t5gemma2.T5Gemma2RMSNorm": Model("T5Gemma2Config", None, _SEQ2SEQ),
    "vaultgemma.VaultGemmaRMSNorm": Model("VaultGemmaConfig", {}),
    "recurrent_gemma.RecurrentGemmaRMSNorm": Model("RecurrentGemmaConfig", dict(
        block_types=["recurrent", "attention"], lru_width=64, attention_window_size=16)),
    "qwen3_5.Qwen3_5RMSNorm": Model("Qwen3_5TextConfig", _LINEAR_ATTN),
    "qwen3_5_moe.Qwen3_5MoeRMSNorm": Model("Qwen3_5MoeTextConfig", {**_MOE, **_LINEAR_ATTN,
                                                                    "shared_expert_intermediate_size": 32}),
    "minimax_m3_vl.MiniMaxM3VLRMSNorm": Model("MiniMaxM3VLTextConfig", _TOKENS),
    "step3p7.Step3p7RMSNorm": Model("Step3p7TextConfig", dict(
        _TOKENS, num_local_experts=4, n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
        share_expert_dim=32, sliding_window=8, num_sliding_attention_heads=4), "Step3p7TextModel"),
    "muse_glimmer.MuseGlimmerTextCenteredRMSNorm": Model("MuseGlimmerTextConfig", dict(_TOKENS, sliding_window=8),
                                                         "MuseGlimmerTextModel"),
}

# Families whose bfloat16 model feeds some table norm an input of another dtype than its weight's,
# which bi-norm refuses (README): float32 norm weights (DeepSeek-V4's _keep_in_fp32_modules_strict),
# a float32 residual stream (Inkling 2), Mamba-2's residual_in_fp32 (into its final norm).
MIXED_IN_BF16 = {"deepseek_v4.DeepseekV4RMSNorm", "inkling2.Inkling2RMSNorm", "inkling2_loop.Inkling2LoopRMSNorm",
                 "mamba2.Mamba2RMSNorm"}


def short(key: str) -> str:
    """'transformers.models.llama.modeling_llama.LlamaRMSNorm' -> 'llama.LlamaRMSNorm'."""
    parts = key.split(".")
    return f"{parts[2]}.{parts[-1]}"


def config(name: str):
    spec = MODELS[name]
    if name == "t5gemma.T5GemmaRMSNorm":  # encoder-decoder: two text configs
        return transformers.T5GemmaConfig(encoder=_BASE, decoder=_BASE, vocab_size=_BASE["vocab_size"])
    if name == "t5gemma2.T5Gemma2RMSNorm":  # and an image encoder, unused by text inputs
        vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=32,
                      patch_size=16)
        return transformers.T5Gemma2Config(encoder=dict(text_config=_BASE, vision_config=vision, mm_tokens_per_image=4),
                                           decoder=_BASE, vocab_size=_BASE["vocab_size"])
    return getattr(transformers, spec.config)(**{**(_NO_HEAD_DIM if name.startswith("deepseek_v3") else _BASE),
                                                  **spec.kwargs})


def build(name: str, dtype: torch.dtype, device: str = "cpu") -> torch.nn.Module:
    torch.manual_seed(0)
    builder = getattr(transformers, MODELS[name].builder)
    make = builder.from_config if MODELS[name].builder.startswith("Auto") else builder._from_config
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # configs warn about unused defaults; not ours
        model = make(config(name), dtype=dtype).to(device)
    with torch.no_grad():  # HF initialises norm weights to 1 (or 0 with 1 + w): make them matter
        for module in model.modules():
            if table_entry(type(module)) is not None:
                module.weight.add_(torch.randn_like(module.weight) * 0.1)
    return model


def outputs(model: torch.nn.Module, name: str) -> Tuple[torch.Tensor, torch.Tensor]:
    """The model's logits (its last hidden state where it has no head) on fixed tokens, and a loss."""
    ids = (torch.arange(16).reshape(2, 8) * 7 % 128).to(model.device)
    kw = dict(decoder_input_ids=ids[:, :4]) if MODELS[name].builder == _SEQ2SEQ else {}
    if name.startswith("kyutai"):  # a text token and one per codebook at each step, each < codebook_vocab_size
        ids = torch.stack([ids % 30] * 3, dim=-1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # kernel fallbacks (mamba, causal_conv1d) warn on CPU
        out = model(ids, **kw)
    logits = out.logits if "logits" in out else out.last_hidden_state
    return logits, logits.float().logsumexp(-1).mean()
