"""ChatGLM3 in PyTorch, numerically the official implementation.

Matches `modeling_chatglm.py` of THUDM/chatglm3-6b (https://huggingface.co/THUDM/chatglm3-6b), paper
GLM-130B (https://arxiv.org/abs/2210.02414): pre-norm blocks with RMSNorm, grouped-query attention with
a bias on the fused query_key_value projection, rotary embedding on interleaved pairs of the first half
of each head, SwiGLU MLP, untied output layer, and P-tuning v2 prefixes fed as past keys and values.
Parameter names are the official ones, so official checkpoints and PEFT adapters load unchanged.

Differences of layout only: activations are [batch, seq, hidden] (the official code is seq-first) and
the KV cache is a transformers `Cache` holding [batch, kv_heads, seq, head_dim].
All device-sensitive math goes through a `Kernels` table, set with `set_kernels`.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer, GenerationMixin, PreTrainedModel
from transformers.cache_utils import Cache, DynamicCache
from transformers.modeling_outputs import CausalLMOutputWithPast

from ...backends.base import Kernels
from ...backends.reference import REFERENCE_KERNELS, packed_attention
from ..family import older_cache_name
from ..loss import label_logps, label_loss, shifted_loss

from .config import ChatGLM3Config
from .tokenizer import ChatGLM3Tokenizer


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps
        self.kernels = REFERENCE_KERNELS

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.kernels.rms_norm(x, self.weight, self.eps)


def make_norm(config: ChatGLM3Config) -> nn.Module:
    if config.rmsnorm:
        return RMSNorm(config.hidden_size, config.layernorm_epsilon)
    return nn.LayerNorm(config.hidden_size, eps=config.layernorm_epsilon)


class RotaryEmbedding(nn.Module):
    """cos/sin of position * theta for the rotated half of each head.

    `inv_freq` is kept only because the official checkpoints store it; like the official code, the
    angles are recomputed in float32 from the base (10000 * rope_ratio).
    """

    def __init__(self, config: ChatGLM3Config):
        super().__init__()
        self.rot_dim = config.kv_channels // 2
        self.base = 10000.0 * config.rope_ratio
        exponents = torch.arange(0, self.rot_dim, 2, dtype=torch.float) / self.rot_dim
        self.register_buffer("inv_freq", 1.0 / (10000.0 ** exponents), persistent=True)

    def forward(self, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        exponents = torch.arange(0, self.rot_dim, 2, dtype=torch.float, device=position_ids.device) / self.rot_dim
        theta = 1.0 / (self.base ** exponents)
        angles = position_ids.float()[..., None] * theta
        return angles.cos(), angles.sin()


class SelfAttention(nn.Module):
    def __init__(self, config: ChatGLM3Config, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.heads = config.num_attention_heads
        self.kv_heads = config.kv_heads
        self.head_dim = config.kv_channels
        self.grouped = config.multi_query_attention
        qkv_size = self.head_dim * (self.heads + 2 * self.kv_heads)
        self.query_key_value = nn.Linear(
            config.hidden_size, qkv_size, bias=config.add_bias_linear or config.add_qkv_bias
        )
        self.dense = nn.Linear(self.head_dim * self.heads, config.hidden_size, bias=config.add_bias_linear)
        self.kernels = REFERENCE_KERNELS

    def forward(self, x, cos, sin, mask, causal, cache: Optional[Cache], prefix_kv, packed=None):
        batch, seq, _ = x.shape
        qkv = self.query_key_value(x)
        if self.grouped:  # [q heads | k groups | v groups]
            q, k, v = qkv.split([self.heads * self.head_dim, self.kv_heads * self.head_dim,
                                 self.kv_heads * self.head_dim], dim=-1)
            q = q.view(batch, seq, self.heads, self.head_dim)
            k = k.view(batch, seq, self.kv_heads, self.head_dim)
            v = v.view(batch, seq, self.kv_heads, self.head_dim)
        else:  # per head [q | k | v], as the official non-MQA layout
            q, k, v = qkv.view(batch, seq, self.heads, 3 * self.head_dim).chunk(3, dim=-1)
        q = self.kernels.rotary(q, cos, sin).transpose(1, 2)
        k = self.kernels.rotary(k, cos, sin).transpose(1, 2)
        v = v.transpose(1, 2)
        if prefix_kv is not None:
            k = torch.cat((prefix_kv[0], k), dim=2)
            v = torch.cat((prefix_kv[1], v), dim=2)
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx)
        if packed is not None:  # packed rows: cu_seqlens of the samples (Kernels.packed_attention)
            out = (self.kernels.packed_attention or packed_attention)(q, k, v, packed)
        else:
            out = self.kernels.attention(q, k, v, mask=mask, causal=causal)
        return self.dense(out.transpose(1, 2).reshape(batch, seq, -1))


class MLP(nn.Module):
    def __init__(self, config: ChatGLM3Config):
        super().__init__()
        self.dense_h_to_4h = nn.Linear(config.hidden_size, 2 * config.ffn_hidden_size, bias=config.add_bias_linear)
        self.dense_4h_to_h = nn.Linear(config.ffn_hidden_size, config.hidden_size, bias=config.add_bias_linear)
        self.kernels = REFERENCE_KERNELS

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dense_4h_to_h(self.kernels.swiglu(self.dense_h_to_4h(x)))


class GLMBlock(nn.Module):
    def __init__(self, config: ChatGLM3Config, layer_idx: int):
        super().__init__()
        self.input_layernorm = make_norm(config)
        self.self_attention = SelfAttention(config, layer_idx)
        self.post_attention_layernorm = make_norm(config)
        self.mlp = MLP(config)
        self.dropout = config.hidden_dropout
        self.residual_from_norm = config.apply_residual_connection_post_layernorm

    def forward(self, x, cos, sin, mask, causal, cache, prefix_kv, packed=None):
        normed = self.input_layernorm(x)
        attn = self.self_attention(normed, cos, sin, mask, causal, cache, prefix_kv, packed)
        residual = normed if self.residual_from_norm else x
        x = residual + F.dropout(attn, p=self.dropout, training=self.training)
        normed = self.post_attention_layernorm(x)
        residual = normed if self.residual_from_norm else x
        return residual + F.dropout(self.mlp(normed), p=self.dropout, training=self.training)


class GLMTransformer(nn.Module):
    def __init__(self, config: ChatGLM3Config):
        super().__init__()
        self.layers = nn.ModuleList(GLMBlock(config, i) for i in range(config.num_layers))
        self.final_layernorm = make_norm(config) if config.post_layer_norm else None
        self.gradient_checkpointing = False

    def forward(self, x, cos, sin, mask, causal, cache, prefix_kvs, packed=None):
        recompute = self.gradient_checkpointing and self.training and torch.is_grad_enabled()
        for layer, prefix_kv in zip(self.layers, prefix_kvs):
            if recompute:
                x = checkpoint(layer, x, cos, sin, mask, causal, None, prefix_kv, packed, use_reentrant=False)
            else:
                x = layer(x, cos, sin, mask, causal, cache, prefix_kv, packed)
        return self.final_layernorm(x) if self.final_layernorm is not None else x


class Embedding(nn.Module):
    def __init__(self, config: ChatGLM3Config):
        super().__init__()
        self.word_embeddings = nn.Embedding(config.padded_vocab_size, config.hidden_size)
        self.fp32_residual = config.fp32_residual_connection

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        x = self.word_embeddings(input_ids)
        return x.float() if self.fp32_residual else x


class PrefixEncoder(nn.Module):
    """P-tuning v2: `pre_seq_len` virtual tokens mapped to every layer's keys and values."""

    def __init__(self, config: ChatGLM3Config):
        super().__init__()
        kv_size = config.num_layers * config.kv_channels * config.kv_heads * 2
        self.embedding = nn.Embedding(config.pre_seq_len, kv_size)
        self.trans = (
            nn.Sequential(nn.Linear(kv_size, config.hidden_size), nn.Tanh(), nn.Linear(config.hidden_size, kv_size))
            if config.prefix_projection
            else None
        )

    def forward(self, prefix_tokens: torch.Tensor) -> torch.Tensor:
        x = self.embedding(prefix_tokens)
        return self.trans(x) if self.trans is not None else x


def attention_mask_for(padding_mask: Optional[torch.Tensor], q_len: int, past_len: int):
    """The official ChatGLM3 mask rules, as `(mask, causal)` for the attention kernel.

    `padding_mask` is [batch, past_len + q_len] with 0 at padding. Without padding, attention is
    causal (aligned to the end when a cache or prefix precedes). With padding, real queries see the
    non-padded keys up to themselves; when nothing precedes the input, a padded query sees every key,
    as the official `get_masks` does (those positions carry no loss and are never sampled from).
    """
    if padding_mask is None or bool(padding_mask.all()):
        return None, True
    batch = padding_mask.shape[0]
    keys = padding_mask.shape[1]
    if keys != past_len + q_len:
        raise ValueError(
            f"attention_mask has {keys} columns; expected {past_len + q_len} "
            f"(cached tokens {past_len} + new tokens {q_len})"
        )
    device = padding_mask.device
    allowed = torch.ones(q_len, keys, dtype=torch.bool, device=device).tril(past_len)
    allowed = allowed.unsqueeze(0) & padding_mask.bool().unsqueeze(1)
    if past_len == 0:
        allowed = allowed | ~padding_mask.bool().view(batch, q_len, 1)
    return allowed.unsqueeze(1), False


class ChatGLMPreTrainedModel(PreTrainedModel):
    config_class = ChatGLM3Config
    base_model_prefix = "transformer"
    main_input_name = "input_ids"
    supports_gradient_checkpointing = True
    _no_split_modules = ["GLMBlock"]

    def set_kernels(self, kernels: Kernels) -> None:
        """Run this model's math through `kernels` (a backend's table; the reference by default)."""
        for module in self.modules():
            if hasattr(module, "kernels"):
                module.kernels = kernels


class ChatGLMModel(ChatGLMPreTrainedModel):
    """The transformer without the loss: embedding, blocks, final norm and output layer."""

    def __init__(self, config: ChatGLM3Config):
        super().__init__(config)
        self.embedding = Embedding(config)
        self.num_layers = config.num_layers
        self.kv_heads = config.kv_heads
        self.head_dim = config.kv_channels
        self.rotary_pos_emb = RotaryEmbedding(config)
        self.encoder = GLMTransformer(config)
        self.output_layer = nn.Linear(config.hidden_size, config.padded_vocab_size, bias=False)
        self.pre_seq_len = config.pre_seq_len or 0
        if self.pre_seq_len:
            self.prefix_encoder = PrefixEncoder(config)
            self.prefix_dropout = nn.Dropout(0.1)  # hard-coded in the official code
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.embedding.word_embeddings

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.embedding.word_embeddings = value

    def get_prompt(self, batch: int, dtype: torch.dtype) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per layer (key, value) of the P-tuning v2 prefix, each [batch, kv_heads, pre_seq_len, head_dim]."""
        device = self.prefix_encoder.embedding.weight.device
        tokens = torch.arange(self.pre_seq_len, device=device).unsqueeze(0).expand(batch, -1)
        kv = self.prefix_encoder(tokens).to(dtype)
        kv = kv.view(batch, self.pre_seq_len, self.num_layers * 2, self.kv_heads, self.head_dim)
        kv = self.prefix_dropout(kv).permute(2, 0, 3, 1, 4)  # [2 * layers, batch, kv_heads, prefix, dim]
        return [(kv[2 * i], kv[2 * i + 1]) for i in range(self.num_layers)]

    def forward(
        self,
        input_ids: Optional[torch.Tensor] = None,
        attention_mask: Optional[torch.Tensor] = None,
        position_ids: Optional[torch.Tensor] = None,
        cache: Optional[Cache] = None,
        inputs_embeds: Optional[torch.Tensor] = None,
        past_kvs: Optional[list[tuple[torch.Tensor, torch.Tensor]]] = None,
        cu_seq_lens: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """Hidden states after the final norm, [batch, seq, hidden]; `cache` (if given) is extended.
        `past_kvs` are per-layer keys and values to attend to before the input without extending them
        (peft's prefix tuning in training). `cu_seq_lens`: packed rows (see the causal LM's forward)."""
        x = self.embedding(input_ids) if inputs_embeds is None else inputs_embeds
        batch, seq = x.shape[:2]
        cached = cache.get_seq_length() if cache is not None else 0
        prefix_kvs = [None] * self.num_layers
        if past_kvs is not None:
            prefix_kvs, cached = past_kvs, past_kvs[0][0].shape[2]
        elif self.pre_seq_len and cached == 0:
            prefix_kvs = self.get_prompt(batch, x.dtype)
        prefix = self.pre_seq_len  # keys before the first real token: the prefix, new or cached
        past_tokens = cached - prefix if self.pre_seq_len and cached else cached
        if position_ids is None:  # official: positions count real tokens only, never padding
            position_ids = torch.arange(past_tokens, past_tokens + seq, device=x.device).expand(batch, seq)
        if attention_mask is not None and prefix:
            attention_mask = torch.cat((attention_mask.new_ones(batch, prefix), attention_mask), dim=1)
        if cu_seq_lens is not None:
            if cached or prefix or position_ids is None:
                raise ValueError("packed rows (cu_seq_lens) need their position_ids and no cache or prefix")
            mask, causal = None, True  # each sample's own causal block: the packed attention kernel
        else:
            mask, causal = attention_mask_for(attention_mask, seq, past_tokens + prefix)
        cos, sin = self.rotary_pos_emb(position_ids)
        return self.encoder(x, cos, sin, mask, causal, cache, prefix_kvs, cu_seq_lens)


class ChatGLMForConditionalGeneration(ChatGLMPreTrainedModel, GenerationMixin):
    """ChatGLM3 causal LM: `forward` gives logits and the official shifted float32 loss."""

    keeps_prefix_when_checkpointing = True  # past keys and values given in training stay a fixed prefix

    def __init__(self, config: ChatGLM3Config):
        super().__init__(config)
        self.transformer = ChatGLMModel(config)
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.transformer.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.transformer.set_input_embeddings(value)

    def get_output_embeddings(self) -> nn.Module:
        return self.transformer.output_layer

    def set_output_embeddings(self, value: nn.Module) -> None:
        self.transformer.output_layer = value

    def forward(
        self,
        input_ids: Optional[torch.Tensor] = None,
        attention_mask: Optional[torch.Tensor] = None,
        position_ids: Optional[torch.Tensor] = None,
        past_key_values: Optional[Cache] = None,
        inputs_embeds: Optional[torch.Tensor] = None,
        labels: Optional[torch.Tensor] = None,
        use_cache: Optional[bool] = None,
        return_dict: Optional[bool] = None,
        logits_to_keep: int = 0,
        cache: Optional[Cache] = None,
        num_items_in_batch: Optional[int | torch.Tensor] = None,
        loss_only: bool = False,
        cu_seq_lens: Optional[torch.Tensor] = None,
        return_logps: bool = False,
        **kwargs,
    ):
        """Run the model.

        Args:
            input_ids: [batch, seq] token ids (or pass `inputs_embeds`).
            attention_mask: [batch, cached + seq], 0 at (left) padding. Positions are not shifted for
                padding, as in the official code.
            position_ids: [batch, seq]; by default the count of tokens before each one.
            past_key_values: a transformers `Cache` (or legacy per-layer (key, value) pairs) to extend;
                `cache` is the same argument under its transformers 5 name.
            labels: [batch, seq] targets, -100 to ignore. Loss is logits[:, :-1] against
                labels[:, 1:] in float32: the mean over counted tokens, or their sum divided by
                `num_items_in_batch` when given (token-normalised gradient accumulation).
            use_cache: return the extended cache (a new `DynamicCache` when none was given).
            logits_to_keep: if > 0, compute logits for only the last this many positions.
            loss_only: with `labels`, compute the loss from the positions that carry a label only, a
                chunk of them at a time (`label_loss`), and return no logits: the same loss and
                gradients without the [batch, seq, vocab] logits, the step's largest tensor.
            cu_seq_lens: packed rows (`data.packing`): int32 [samples + 1], where the samples laid end to end
                start (`Kernels.packed_attention`); each attends only to itself, `position_ids` restart at 0
                in each, and `attention_mask` is not used. Training only: no cache, no prefix.
            return_logps: with `labels`, return each row's summed label log-probability and label count
                (`models.loss.LogpsOutput`, the preference objectives' input) instead of a loss.

        Returns:
            `CausalLMOutputWithPast` (loss, logits, cache), or a tuple when `return_dict=False`.
        """
        cache = past_key_values if past_key_values is not None else cache
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if self.transformer.encoder.gradient_checkpointing and self.training:
            use_cache = False  # recomputed layers would extend the cache twice
        if cache is not None and not isinstance(cache, Cache):
            cache = DynamicCache(cache)
        past_kvs = None
        if cache is not None and not use_cache and cache.get_seq_length():
            # keys and values to attend to, not to extend (peft's prefix tuning in training): a fixed prefix
            past_kvs = [(layer.keys, layer.values) for layer in cache.layers]
        if use_cache and cache is None:
            cache = DynamicCache()
        hidden = self.transformer(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache if use_cache else None,
            inputs_embeds=inputs_embeds,
            past_kvs=past_kvs,
            cu_seq_lens=cu_seq_lens,
        )
        return_dict = self.config.return_dict if return_dict is None else return_dict
        if return_logps and labels is not None:
            return label_logps(hidden, self.transformer.output_layer.weight, labels)
        if loss_only and labels is not None:
            loss = label_loss(hidden, self.transformer.output_layer.weight, labels, num_items_in_batch)
            out = CausalLMOutputWithPast(loss=loss, logits=None, cache=cache if use_cache else None)
            return out if return_dict else out.to_tuple()
        if logits_to_keep:
            hidden = hidden[:, -logits_to_keep:]
        logits = self.transformer.output_layer(hidden)
        loss = None
        if labels is not None:
            loss = shifted_loss(logits, labels, num_items_in_batch)
            if num_items_in_batch is None:  # the official mean loss comes back in the activations' dtype
                loss = loss.to(hidden.dtype)
        out = CausalLMOutputWithPast(loss=loss, logits=logits, cache=cache if use_cache else None)
        return out if return_dict else out.to_tuple()

    def prepare_inputs_for_generation(self, *args, **kwargs):
        inputs = super().prepare_inputs_for_generation(*args, **kwargs)
        # generate() derives position ids from the padding mask; ChatGLM3 counts from 0 on every row.
        inputs.pop("position_ids", None)
        return older_cache_name(inputs)


# Registered with transformers' Auto classes: `AutoModelForCausalLM.from_pretrained(folder)` of a ChatGLM3
# folder uses this code, never the folder's own.
AutoConfig.register("chatglm", ChatGLM3Config, exist_ok=True)
AutoModel.register(ChatGLM3Config, ChatGLMForConditionalGeneration, exist_ok=True)
AutoModelForCausalLM.register(ChatGLM3Config, ChatGLMForConditionalGeneration, exist_ok=True)
AutoTokenizer.register(ChatGLM3Config, slow_tokenizer_class=ChatGLM3Tokenizer, exist_ok=True)
