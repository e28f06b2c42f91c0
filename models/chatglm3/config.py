"""ChatGLM3 configuration: every key of the official `config.json` (THUDM/chatglm3-6b).

Defaults are those of the official `configuration_chatglm.py`, so a config.json that leaves a key
out means what it means to the official code.
"""

from __future__ import annotations

from typing import Optional

from transformers import PretrainedConfig


class ChatGLM3Config(PretrainedConfig):
    model_type = "chatglm"
    attribute_map = {"num_hidden_layers": "num_layers", "max_position_embeddings": "seq_length"}

    def __init__(
        self,
        num_layers: int = 28,  # transformer blocks
        padded_vocab_size: int = 65024,  # rows of the embedding and output layer
        hidden_size: int = 4096,
        ffn_hidden_size: int = 13696,  # SwiGLU inner width; dense_h_to_4h is twice this ([gate, up])
        kv_channels: int = 128,  # per-head dimension
        num_attention_heads: int = 32,
        seq_length: int = 2048,  # longest sequence the model was trained for
        hidden_dropout: float = 0.0,  # after attention and MLP outputs
        classifier_dropout: Optional[float] = None,  # unused by the causal LM
        attention_dropout: float = 0.0,  # unused: the official SDPA path applies none
        layernorm_epsilon: float = 1e-5,
        rmsnorm: bool = True,  # RMSNorm, else LayerNorm with bias
        apply_residual_connection_post_layernorm: bool = False,
        post_layer_norm: bool = True,  # final_layernorm after the last block
        add_bias_linear: bool = False,  # bias on every linear layer
        add_qkv_bias: bool = False,  # bias on query_key_value only
        bias_dropout_fusion: bool = True,  # a Megatron kernel choice; no effect on the math
        multi_query_attention: bool = False,  # grouped KV heads (GQA)
        multi_query_group_num: int = 1,  # KV heads when multi_query_attention
        rope_ratio: float = 1.0,  # RoPE base is 10000 * rope_ratio (the 32k variants use 50)
        apply_query_key_layer_scaling: bool = True,  # cancels out with an fp32 softmax; kept for the file
        attention_softmax_in_fp32: bool = True,
        fp32_residual_connection: bool = False,  # run the residual stream in float32
        quantization_bit: int = 0,  # the official int4/int8 in-place quantization; not supported
        pre_seq_len: Optional[int] = None,  # P-tuning v2 virtual tokens
        prefix_projection: bool = False,  # P-tuning v2 prefix through a 2-layer MLP
        original_rope: bool = True,  # the official flag; ChatGLM3 always uses its original RoPE
        use_cache: bool = True,  # return the KV cache from forward by default
        **kwargs,
    ):
        self.num_layers = num_layers
        self.vocab_size = kwargs.pop("vocab_size", padded_vocab_size)
        self.padded_vocab_size = padded_vocab_size
        self.hidden_size = hidden_size
        self.ffn_hidden_size = ffn_hidden_size
        self.kv_channels = kv_channels
        self.num_attention_heads = num_attention_heads
        self.seq_length = seq_length
        self.hidden_dropout = hidden_dropout
        self.classifier_dropout = classifier_dropout
        self.attention_dropout = attention_dropout
        self.layernorm_epsilon = layernorm_epsilon
        self.rmsnorm = rmsnorm
        self.apply_residual_connection_post_layernorm = apply_residual_connection_post_layernorm
        self.post_layer_norm = post_layer_norm
        self.add_bias_linear = add_bias_linear
        self.add_qkv_bias = add_qkv_bias
        self.bias_dropout_fusion = bias_dropout_fusion
        self.multi_query_attention = multi_query_attention
        self.multi_query_group_num = multi_query_group_num
        self.rope_ratio = rope_ratio
        self.apply_query_key_layer_scaling = apply_query_key_layer_scaling
        self.attention_softmax_in_fp32 = attention_softmax_in_fp32
        self.fp32_residual_connection = fp32_residual_connection
        self.quantization_bit = quantization_bit
        self.pre_seq_len = pre_seq_len
        self.prefix_projection = prefix_projection
        self.original_rope = original_rope
        self.use_cache = use_cache
        self.tie_word_embeddings = kwargs.pop("tie_word_embeddings", False)
        if "torch_dtype" in kwargs:  # the official file's name for what transformers 5 calls dtype
            kwargs.setdefault("dtype", kwargs.pop("torch_dtype"))
        kwargs.setdefault("eos_token_id", 2)
        kwargs.setdefault("pad_token_id", 0)
        super().__init__(**kwargs)

    @property
    def kv_heads(self) -> int:
        """Number of key/value heads."""
        return self.multi_query_group_num if self.multi_query_attention else self.num_attention_heads

    def problems(self) -> list[str]:
        """Every inconsistency in this config, each naming the field and the fix (empty when valid)."""
        found = []
        for field in ("num_layers", "padded_vocab_size", "hidden_size", "ffn_hidden_size", "kv_channels",
                      "num_attention_heads", "seq_length"):
            value = getattr(self, field)
            if not isinstance(value, int) or value <= 0:
                found.append(f"{field}: {value!r} must be a positive integer")
        if self.multi_query_attention and (
            not isinstance(self.multi_query_group_num, int)
            or self.multi_query_group_num <= 0
            or self.num_attention_heads % self.multi_query_group_num
        ):
            found.append(
                f"multi_query_group_num: {self.multi_query_group_num!r} must be a positive divisor of "
                f"num_attention_heads ({self.num_attention_heads})"
            )
        if isinstance(self.kv_channels, int) and self.kv_channels % 2:
            found.append(f"kv_channels: {self.kv_channels} must be even (RoPE rotates pairs)")
        if self.quantization_bit:
            found.append(
                f"quantization_bit: {self.quantization_bit} (the official in-place int{self.quantization_bit} "
                "checkpoints) is not supported; load the unquantized checkpoint and use method qlora to train in 4 bits"
            )
        if self.pre_seq_len is not None and (not isinstance(self.pre_seq_len, int) or self.pre_seq_len <= 0):
            found.append(f"pre_seq_len: {self.pre_seq_len!r} must be a positive integer or null")
        return found


def chatglm3_6b_config(**overrides) -> ChatGLM3Config:
    """The configuration of THUDM/chatglm3-6b (its config.json), with `overrides` applied."""
    values = dict(
        num_layers=28, padded_vocab_size=65024, hidden_size=4096, ffn_hidden_size=13696, kv_channels=128,
        num_attention_heads=32, seq_length=8192, layernorm_epsilon=1e-5, rmsnorm=True, post_layer_norm=True,
        add_bias_linear=False, add_qkv_bias=True, multi_query_attention=True, multi_query_group_num=2,
        apply_residual_connection_post_layernorm=False, attention_softmax_in_fp32=True, original_rope=True,
        dtype="float16", tie_word_embeddings=False, eos_token_id=2, pad_token_id=0,
    )
    return ChatGLM3Config(**{**values, **overrides})


def chatglm3_tiny_config(**overrides) -> ChatGLM3Config:
    """A ChatGLM3-architecture config small enough for tests and the CPU demo (GQA, qkv bias, RoPE)."""
    values = dict(
        num_layers=2, padded_vocab_size=65024, hidden_size=64, ffn_hidden_size=128, kv_channels=16,
        num_attention_heads=4, seq_length=512, add_qkv_bias=True, multi_query_attention=True,
        multi_query_group_num=2, tie_word_embeddings=False, dtype="float32",
    )
    return ChatGLM3Config(**{**values, **overrides})
