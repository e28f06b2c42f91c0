"""Qwen2 (Qwen2.5) in PyTorch: transformers' own `Qwen2ForCausalLM`, its math run on a backend's kernels.

The architecture is transformers' (https://github.com/huggingface/transformers, models/qwen2, which
matches QwenLM's release; report https://arxiv.org/abs/2412.15115): pre-norm blocks with RMSNorm,
grouped-query attention with biased q/k/v projections, rotate-half rotary embedding, SwiGLU MLP.
Parameter names are transformers', so Hugging Face checkpoints and PEFT adapters load unchanged.

What this file adds, at construction: every RMSNorm and every attention module is switched to a
subclass whose forward calls the model's `Kernels` (`rms_norm`; `rotary_half` and, through the
"tuneport" attention function registered with transformers, `attention`), set with `set_kernels`.
The causal-LM head keeps transformers' outputs and adds `loss_only` and `num_items_in_batch`.
"""

from __future__ import annotations

from typing import Optional

import torch
import transformers
from transformers.cache_utils import Cache
from transformers.modeling_outputs import CausalLMOutputWithPast
from transformers.models.qwen2 import modeling_qwen2

from ...backends.base import Kernels
from ...backends.reference import REFERENCE_KERNELS, rotary_half
from ..family import older_cache_name
from ..loss import label_loss, shifted_loss
from ..transformers_attention import ATTENTION


class RMSNorm(modeling_qwen2.Qwen2RMSNorm):
    """transformers' Qwen2RMSNorm, through the backend's `rms_norm` kernel."""

    kernels: Kernels = REFERENCE_KERNELS

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.kernels.rms_norm(hidden_states, self.weight, self.variance_epsilon)


class Attention(modeling_qwen2.Qwen2Attention):
    """transformers' Qwen2Attention with the rotary embedding through the backend's `rotary_half` kernel
    (on [batch, seq, heads, dim], before the heads move forward) and attention through the function
    `config._attn_implementation` names ("tuneport": the backend's `attention` kernel)."""

    kernels: Kernels = REFERENCE_KERNELS

    def forward(self, hidden_states, position_embeddings, attention_mask, cache: Optional[Cache] = None, **kwargs):
        input_shape = hidden_states.shape[:-1]
        shape = (*input_shape, -1, self.head_dim)
        cos, sin = position_embeddings
        rotate = self.kernels.rotary_half or rotary_half  # a table without it: the reference's
        query = rotate(self.q_proj(hidden_states).view(shape), cos, sin).transpose(1, 2)
        key = rotate(self.k_proj(hidden_states).view(shape), cos, sin).transpose(1, 2)
        value = self.v_proj(hidden_states).view(shape).transpose(1, 2)
        if cache is not None:
            key, value = cache.update(key, value, self.layer_idx, kwargs=kwargs)
        attention = modeling_qwen2.ALL_ATTENTION_FUNCTIONS.get_interface(
            self.config._attn_implementation, modeling_qwen2.eager_attention_forward)
        out, weights = attention(self, query, key, value, attention_mask, scaling=self.scaling,
                                 dropout=self.attention_dropout if self.training else 0.0,
                                 sliding_window=self.sliding_window, **kwargs)
        return self.o_proj(out.reshape(*input_shape, -1).contiguous()), weights


class Qwen2ForCausalLM(modeling_qwen2.Qwen2ForCausalLM):
    """Qwen2 causal LM on a backend's kernels; `forward` adds `loss_only` and `num_items_in_batch`.

    The class keeps transformers' name, so `save_pretrained` writes `architectures: ["Qwen2ForCausalLM"]`
    and a fully fine-tuned model loads in plain transformers.
    """

    def __init__(self, config: transformers.Qwen2Config):
        config._attn_implementation = ATTENTION
        super().__init__(config)
        # transformers' decoder layer builds its norms and attention itself; the subclasses (same parameters,
        # another forward) take their place here, so weights load and save under the same names.
        for module in self.modules():
            if type(module) is modeling_qwen2.Qwen2RMSNorm:
                module.__class__ = RMSNorm
            elif type(module) is modeling_qwen2.Qwen2Attention:
                module.__class__ = Attention

    def set_kernels(self, kernels: Kernels) -> None:
        """Run this model's math through `kernels` (a backend's table; the reference by default)."""
        for module in self.modules():
            if isinstance(module, (RMSNorm, Attention)):
                module.kernels = kernels

    def prepare_inputs_for_generation(self, *args, **kwargs):
        return older_cache_name(super().prepare_inputs_for_generation(*args, **kwargs))

    def forward(
        self,
        input_ids: Optional[torch.Tensor] = None,
        attention_mask: Optional[torch.Tensor] = None,
        position_ids: Optional[torch.Tensor] = None,
        cache: Optional[Cache] = None,
        inputs_embeds: Optional[torch.Tensor] = None,
        labels: Optional[torch.Tensor] = None,
        use_cache: Optional[bool] = None,
        logits_to_keep: int | torch.Tensor = 0,
        num_items_in_batch: Optional[int | torch.Tensor] = None,
        loss_only: bool = False,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        """transformers' forward (its arguments in its order), with the standard shifted causal-LM loss
        of `models/loss.py`.

        Args:
            input_ids: [batch, seq] token ids (or pass `inputs_embeds`).
            attention_mask: [batch, cached + seq], 0 at padding (left or right).
            position_ids, cache, inputs_embeds, use_cache, logits_to_keep: as transformers' (`cache` is
                extended in place; `past_key_values` is its older name).
            labels: [batch, seq] targets, -100 to ignore. Loss is logits[:, :-1] against labels[:, 1:] in
                float32: the mean over counted tokens, or their sum divided by `num_items_in_batch`.
            loss_only: with `labels`, the loss from the label positions alone (`label_loss`), no logits:
                the same loss and gradients without the [batch, seq, vocab] logits.

        Returns:
            `CausalLMOutputWithPast` (loss, logits, cache).
        """
        if cache is None:  # transformers' (and peft's) older name
            cache = kwargs.pop("past_key_values", None)
        inputs = dict(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, cache=cache,
                      inputs_embeds=inputs_embeds, use_cache=use_cache, **kwargs)
        if labels is None:
            return super().forward(**inputs, logits_to_keep=logits_to_keep)
        outputs = self.model(**inputs)
        hidden = outputs.last_hidden_state
        if loss_only:
            # transformers' mean stays in float32 (ChatGLM3's comes back in the activations' dtype)
            if num_items_in_batch is not None:
                loss = label_loss(hidden, self.lm_head.weight, labels, num_items_in_batch)
            else:
                count = (labels[:, 1:] != -100).sum()
                loss = label_loss(hidden, self.lm_head.weight, labels, count.clamp(min=1))
                loss = loss if count else loss * float("nan")  # as cross_entropy's mean over no tokens
            return CausalLMOutputWithPast(loss=loss, logits=None, cache=outputs.cache)
        logits = self.lm_head(hidden)  # every position: the loss needs them all
        loss = shifted_loss(logits, labels, num_items_in_batch)
        return CausalLMOutputWithPast(loss=loss, logits=logits, cache=outputs.cache)
