"""What tuneport knows of each transformers decoder it runs on its kernels: one `Entry` of data per config.json
`model_type`. A model type transformers implements natively but not listed here still trains (transformers'
own modules with the backend's attention; see `model.py`).

An entry swaps a norm or rotary only where transformers' math for it is the kernel's, which the tests check
against transformers' eager model per entry. Reference sizes are the releases' config.json values on the
Hugging Face hub (for `tuneport methods` and the README's tables, counted on the meta device).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from transformers.models.gemma2 import modeling_gemma2 as gemma2
from transformers.models.gemma3 import modeling_gemma3 as gemma3
from transformers.models.glm import modeling_glm as glm
from transformers.models.glm4 import modeling_glm4 as glm4
from transformers.models.llama import modeling_llama as llama
from transformers.models.mistral import modeling_mistral as mistral
from transformers.models.qwen2 import modeling_qwen2 as qwen2
from transformers.models.qwen3 import modeling_qwen3 as qwen3
from transformers.models.qwen3_moe import modeling_qwen3_moe as qwen3_moe

from .model import rotate_half, rotate_pairs

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
GLM_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_up_proj", "down_proj")  # a fused gate and up


@dataclass(frozen=True)
class Entry:
    """One model type on the kernels.

    Attributes:
        model: transformers' causal-LM class.
        norm: its RMSNorm class, run by the `rms_norm` kernel.
        attention: its attention class, whose forward is transformers' standard one (models/decoder/model.py).
        eager: the modeling module's eager attention (for a config whose attention the kernels cannot compute).
        rotary: (kernels, x, cos, sin) -> x rotated as the model's `apply_rotary_pos_emb` does.
        norm_plus_one: the norm scales by 1 + weight in float32 (Gemma) instead of by weight.
        lora_targets: the linear layers LoRA adapts by default (the releases' fine-tuning examples: all
            projections of attention and MLP).
        ia3_targets, ia3_feedforward: IA3's layers, and those of them scaled on their input (peft's defaults).
        tool_calls: how its chat template writes a tool call, for `tuneport serve` ("" for none).
        onnx: `tuneport export --format onnx` traces it with its cache (not sliding-window caches, nor routed
            experts).
        reference: (name, config.json values) of one released size.
        not_trained: what the default targets leave out, said when a run starts ("" for nothing).
    """

    model: type
    norm: type
    attention: type
    eager: Callable
    rotary: Callable
    reference: tuple[str, Callable[[], dict]]
    norm_plus_one: bool = False
    lora_targets: tuple[str, ...] = PROJECTIONS
    ia3_targets: tuple[str, ...] = ("k_proj", "v_proj", "down_proj")
    ia3_feedforward: tuple[str, ...] = ("down_proj",)
    tool_calls: str = ""
    onnx: bool = True
    not_trained: str = ""


def _llama3_8b() -> dict:  # meta-llama/Llama-3.1-8B-Instruct
    return dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=131072, rope_theta=500000.0,
                rms_norm_eps=1e-5, tie_word_embeddings=False, bos_token_id=128000, eos_token_id=[128001, 128008, 128009],
                rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                              "original_max_position_embeddings": 8192})


def _qwen2_5_7b() -> dict:  # Qwen/Qwen2.5-7B-Instruct
    return dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                num_attention_heads=28, num_key_value_heads=4, max_position_embeddings=32768, rope_theta=1e6,
                rms_norm_eps=1e-6, tie_word_embeddings=False)


def _qwen3_8b() -> dict:  # Qwen/Qwen3-8B
    return dict(vocab_size=151936, hidden_size=4096, intermediate_size=12288, num_hidden_layers=36,
                num_attention_heads=32, num_key_value_heads=8, head_dim=128, max_position_embeddings=40960,
                rope_theta=1e6, rms_norm_eps=1e-6, tie_word_embeddings=False)


def _glm4_9b() -> dict:  # THUDM/GLM-4-9B-0414
    return dict(vocab_size=151552, hidden_size=4096, intermediate_size=13696, num_hidden_layers=40,
                num_attention_heads=32, num_key_value_heads=2, head_dim=128, partial_rotary_factor=0.5,
                attention_bias=True, max_position_embeddings=32768, rope_theta=10000.0, rms_norm_eps=1e-5,
                tie_word_embeddings=False)


def _glm_4_9b_chat() -> dict:  # THUDM/glm-4-9b-chat-hf
    return {**_glm4_9b(), "max_position_embeddings": 131072, "rope_theta": 5e6}


def _mistral_7b() -> dict:  # mistralai/Mistral-7B-Instruct-v0.3
    return dict(vocab_size=32768, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=32768, rope_theta=1e6,
                rms_norm_eps=1e-5, sliding_window=None, tie_word_embeddings=False)


def _gemma2_9b() -> dict:  # google/gemma-2-9b-it
    return dict(vocab_size=256000, hidden_size=3584, intermediate_size=14336, num_hidden_layers=42,
                num_attention_heads=16, num_key_value_heads=8, head_dim=256, query_pre_attn_scalar=256,
                sliding_window=4096, attn_logit_softcapping=50.0, final_logit_softcapping=30.0,
                max_position_embeddings=8192, rms_norm_eps=1e-6, tie_word_embeddings=True)


def _gemma3_1b() -> dict:  # google/gemma-3-1b-it (the text-only Gemma 3)
    return dict(vocab_size=262144, hidden_size=1152, intermediate_size=6912, num_hidden_layers=26,
                num_attention_heads=4, num_key_value_heads=1, head_dim=256, query_pre_attn_scalar=256,
                sliding_window=512, max_position_embeddings=32768, rope_theta=1e6, rms_norm_eps=1e-6,
                tie_word_embeddings=True)


def _qwen3_30b_a3b() -> dict:  # Qwen/Qwen3-30B-A3B
    return dict(vocab_size=151936, hidden_size=2048, intermediate_size=6144, moe_intermediate_size=768,
                num_hidden_layers=48, num_attention_heads=32, num_key_value_heads=4, head_dim=128, num_experts=128,
                num_experts_per_tok=8, norm_topk_prob=True, max_position_embeddings=40960, rope_theta=1e6,
                rms_norm_eps=1e-6, tie_word_embeddings=False)


def _entry(m, model: type, norm: type, attention: type, reference, **rest) -> Entry:
    return Entry(model=model, norm=norm, attention=attention, eager=m.eager_attention_forward, reference=reference,
                 **rest)


QWEN_IA3 = ("q_proj", "v_proj", "down_proj")  # peft's defaults for Qwen2 and Qwen3
# model_type -> Entry. The tool-call forms are those of each release's chat_template (Qwen's <tool_call> JSON,
# Llama 3.1's JSON call, GLM-4's name line and JSON arguments).
ENTRIES: dict[str, Entry] = {
    "llama": _entry(llama, llama.LlamaForCausalLM, llama.LlamaRMSNorm, llama.LlamaAttention,
                    ("Llama-3.1-8B", _llama3_8b), rotary=rotate_half, tool_calls="llama3"),
    "qwen2": _entry(qwen2, qwen2.Qwen2ForCausalLM, qwen2.Qwen2RMSNorm, qwen2.Qwen2Attention,
                    ("Qwen2.5-7B", _qwen2_5_7b), rotary=rotate_half, tool_calls="qwen", ia3_targets=QWEN_IA3),
    "qwen3": _entry(qwen3, qwen3.Qwen3ForCausalLM, qwen3.Qwen3RMSNorm, qwen3.Qwen3Attention,
                    ("Qwen3-8B", _qwen3_8b), rotary=rotate_half, tool_calls="qwen", ia3_targets=QWEN_IA3),
    "glm4": _entry(glm4, glm4.Glm4ForCausalLM, glm4.Glm4RMSNorm, glm4.Glm4Attention,
                   ("GLM-4-9B-0414", _glm4_9b), rotary=rotate_pairs, tool_calls="glm4", lora_targets=GLM_PROJECTIONS),
    "glm": _entry(glm, glm.GlmForCausalLM, glm.GlmRMSNorm, glm.GlmAttention,
                  ("glm-4-9b-chat-hf", _glm_4_9b_chat), rotary=rotate_pairs, tool_calls="glm4",
                  lora_targets=GLM_PROJECTIONS),
    "mistral": _entry(mistral, mistral.MistralForCausalLM, mistral.MistralRMSNorm, mistral.MistralAttention,
                      ("Mistral-7B-v0.3", _mistral_7b), rotary=rotate_half, onnx=False),
    "gemma2": _entry(gemma2, gemma2.Gemma2ForCausalLM, gemma2.Gemma2RMSNorm, gemma2.Gemma2Attention,
                     ("gemma-2-9b", _gemma2_9b), rotary=rotate_half, norm_plus_one=True, onnx=False),
    "gemma3_text": _entry(gemma3, gemma3.Gemma3ForCausalLM, gemma3.Gemma3RMSNorm, gemma3.Gemma3Attention,
                          ("gemma-3-1b", _gemma3_1b), rotary=rotate_half, norm_plus_one=True, onnx=False),
    "qwen3_moe": _entry(qwen3_moe, qwen3_moe.Qwen3MoeForCausalLM, qwen3_moe.Qwen3MoeRMSNorm,
                        qwen3_moe.Qwen3MoeAttention,
                        ("Qwen3-30B-A3B", _qwen3_30b_a3b), rotary=rotate_half, tool_calls="qwen", onnx=False,
                        # peft (0.21) reads gate_proj, up_proj and down_proj on a Qwen3-MoE as the experts' names of
                        # transformers 4 and retargets them to the fused expert tensors: the attention's alone
                        lora_targets=("q_proj", "k_proj", "v_proj", "o_proj"),
                        ia3_targets=("q_proj", "v_proj", "o_proj"), ia3_feedforward=(),
                        not_trained="the MLPs: the routed experts (3-D tensors, not linear layers), the router, and "
                                    "the dense MLP layers (mlp_only_layers), whose names peft takes for the experts'"),
}
