"""A transformers decoder as an ONNX graph that generates: one step of the model with its KV cache as inputs and
outputs, the same interface as ChatGLM3's (models/chatglm3/onnx.py), which `tuneport.core.onnx_generate` drives.

Inputs: `input_ids` [batch, seq], `attention_mask` [batch, past + seq] (0 at left padding), `position_ids`
[batch, seq], and per layer `past_key_values.N.key` / `.value` [batch, kv_heads, past, head_dim] (past may be 0).
Outputs: `logits` [batch, seq, vocab] and per layer `present.N.key` / `.value`. The step runs the model's own
forward with a transformers `DynamicCache` filled from the inputs; torch's dynamo exporter traces it. Model types
whose cache is not one plain tensor pair a layer (sliding-window layers) or whose experts route by data (MoE)
do not export this way; their entries say so (`Entry.onnx`).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from transformers.cache_utils import DynamicCache

from ..onnx_export import export_step


class OnnxStep(nn.Module):
    """One generation step of an eval-mode decoder, with the cache as plain tensors."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask, position_ids, *past):
        cache = DynamicCache(config=self.model.config)
        for layer in range(len(past) // 2):
            cache.update(past[2 * layer], past[2 * layer + 1], layer)
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, cache=cache,
                         use_cache=True)
        return (out.logits, *[t for layer in out.cache.layers for t in (layer.keys, layer.values)])


def export_onnx(model: nn.Module, path: Path) -> None:
    """Write `model` (merged, on the CPU) as the ONNX file `path`, its weights beside it in `path`.data, and its
    config.json in the same folder."""
    model.eval()
    config = model.config
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    dtype = model.get_output_embeddings().weight.dtype
    past = [torch.zeros(2, config.num_key_value_heads, 3, head_dim, dtype=dtype)
            for _ in range(2 * config.num_hidden_layers)]
    export_step(OnnxStep(model), past, path)
    config.to_json_file(path.parent / "config.json")
