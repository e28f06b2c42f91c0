"""ChatGLM3 as an ONNX graph that generates: one step of the model with its KV cache as inputs and outputs.

Inputs: `input_ids` [batch, seq] (int64), `attention_mask` [batch, past + seq] (int64, 0 at left
padding), `position_ids` [batch, seq] (int64; ChatGLM3 counts from 0 on every row, padding included),
and per layer `past_key_values.N.key` / `.value` [batch, kv_heads, past, head_dim] (past may be 0).
Outputs: `logits` [batch, seq, vocab] and per layer `present.N.key` / `.value` [batch, kv_heads,
past + seq, head_dim]. A P-tuning v2 prefix is a constant of the graph, put before the past keys at
every step, so the cache holds real tokens only and callers never see it.

The mask rule is the official one (see `model.attention_mask_for`), written without data-dependent
branches so the exporter can trace it: a real query sees the non-padded keys up to itself, a padded
query sees every key (its output is never sampled from).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from ..onnx_export import export_step
from .files import official_config
from .model import ChatGLMForConditionalGeneration

class _StepCache:
    """Enough of a transformers `Cache` for `SelfAttention`: extends each layer's past and keeps the result."""

    def __init__(self, past: list[torch.Tensor], prefix: list[torch.Tensor]):
        self.past = past  # [key0, value0, key1, value1, ...]
        self.prefix = prefix  # the same, [1, kv_heads, pre_seq_len, head_dim] each; empty without P-tuning
        self.present: list[torch.Tensor] = [None] * len(past)

    def update(self, key: torch.Tensor, value: torch.Tensor, layer: int):
        key = torch.cat((self.past[2 * layer], key), dim=2)
        value = torch.cat((self.past[2 * layer + 1], value), dim=2)
        self.present[2 * layer], self.present[2 * layer + 1] = key, value
        if self.prefix:
            batch = key.shape[0]
            key = torch.cat((self.prefix[2 * layer].expand(batch, -1, -1, -1), key), dim=2)
            value = torch.cat((self.prefix[2 * layer + 1].expand(batch, -1, -1, -1), value), dim=2)
        return key, value


class OnnxStep(nn.Module):
    """One generation step of an eval-mode ChatGLM3 model, with the cache as plain tensors."""

    def __init__(self, model: ChatGLMForConditionalGeneration):
        super().__init__()
        self.model = model
        glm = model.transformer
        self.pre_seq_len = glm.pre_seq_len
        if self.pre_seq_len:  # computed once: in eval mode the prefix is a constant
            with torch.no_grad():
                pairs = glm.get_prompt(1, glm.embedding.word_embeddings.weight.dtype)
            self.register_buffer("prefix", torch.stack([t for pair in pairs for t in pair]), persistent=False)

    def forward(self, input_ids, attention_mask, position_ids, *past):
        glm = self.model.transformer
        batch, seq = input_ids.shape
        past_len = past[0].shape[2]
        x = glm.embedding(input_ids)
        cos, sin = glm.rotary_pos_emb(position_ids)
        keys = attention_mask.bool()  # [batch, past + seq]
        query_pos = torch.arange(seq, device=x.device) + past_len
        causal = torch.arange(past_len + seq, device=x.device)[None, :] <= query_pos[:, None]
        query_is_pad = ~keys[:, past_len:]
        allowed = (causal[None] & keys[:, None, :]) | query_is_pad[:, :, None]
        if self.pre_seq_len:
            allowed = torch.cat((allowed.new_ones(batch, seq, self.pre_seq_len), allowed), dim=2)
        cache = _StepCache(list(past), list(self.prefix.unbind(0)) if self.pre_seq_len else [])
        hidden = glm.encoder(x, cos, sin, mask=allowed[:, None], causal=False, cache=cache,
                             prefix_kvs=[None] * glm.num_layers)
        return (glm.output_layer(hidden), *cache.present)


def export_onnx(model: ChatGLMForConditionalGeneration, path: Path) -> None:
    """Write `model` (merged, on the CPU) as the ONNX file `path`, its weights beside it in `path`.data,
    and config.json with the official keys in the same folder.

    The exporter traces batch 2, past 3 and seq 5; all three are dynamic axes.
    """
    model.eval()
    config = model.config
    dtype = model.transformer.output_layer.weight.dtype
    past = [torch.zeros(2, config.kv_heads, 3, config.kv_channels, dtype=dtype) for _ in range(2 * config.num_layers)]
    export_step(OnnxStep(model).eval(), past, path)
    (path.parent / "config.json").write_text(json.dumps(official_config(config, str(dtype).replace("torch.", "")), indent=2))
