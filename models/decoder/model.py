"""Any transformers decoder on a backend's kernels: transformers' own causal-LM class, with its RMSNorm, rotary
embedding and attention run by the backend's `Kernels` where its math is known to equal theirs.

`kernel_model(cls, entry)` makes, once per class, a subclass of transformers' `XForCausalLM` that keeps its
name (so `save_pretrained` writes the official `architectures` and a fully tuned model loads in plain
transformers) and that, at construction:
- names the "tuneport" attention function (models/transformers_attention.py) in the config, so every
  attention module of the model calls the backend's `attention` kernel through transformers' registry; a
  model whose attention caps its scores (Gemma 2's `attn_logit_softcapping`) keeps transformers' eager
  attention, which the kernels do not compute;
- switches the entry's RMSNorm modules to a subclass whose forward is `rms_norm` (with Gemma's `1 + weight`),
  and its attention modules to one whose forward rotates query and key with the entry's rotary kernel. The
  forward is transformers' standard one (projections, optional per-head q/k norm, rotary, cache, attention
  function, output projection), which every entry's attention shares.

A model type without an entry runs transformers' own modules with the backend's attention only.
The causal-LM head keeps transformers' outputs and adds `loss_only` and `num_items_in_batch`.
"""

from __future__ import annotations

import functools
from typing import Optional

import torch
from transformers.cache_utils import Cache
from transformers.modeling_outputs import CausalLMOutputWithPast
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from ...backends.base import Kernels
from ...backends.reference import REFERENCE_KERNELS, rotary_half
from ..family import older_cache_name
from ..loss import label_logps, label_loss, logits_logps, shifted_loss
from ..transformers_attention import ATTENTION

EAGER = "eager"


def rotate_half(kernels: Kernels, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """transformers' `apply_rotary_pos_emb` (Llama, Qwen, Mistral, Gemma): x [batch, seq, heads, dim], cos and
    sin [batch, seq, rot] with each half holding the same angles."""
    return (kernels.rotary_half or rotary_half)(x, cos, sin)


def rotate_pairs(kernels: Kernels, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """GLM's `apply_rotary_pos_emb`: interleaved pairs of the first `rot` channels (ChatGLM3's form, the
    `rotary` kernel), from the first half of transformers' duplicated angles."""
    half = cos.shape[-1] // 2
    return kernels.rotary(x, cos[..., :half], sin[..., :half])


class KernelNorm(torch.nn.Module):
    """An RMSNorm through the backend's `rms_norm` kernel (float32 inside, the input's dtype out)."""

    kernels: Kernels = REFERENCE_KERNELS
    entry = None  # the model type's Entry: whether the weight is Gemma's 1 + weight (in float32)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        eps = getattr(self, "variance_epsilon", None) or self.eps
        weight = 1.0 + self.weight.float() if self.entry.norm_plus_one else self.weight
        return self.kernels.rms_norm(hidden_states, weight, eps)


class KernelAttention(torch.nn.Module):
    """transformers' standard attention forward with the rotary embedding through a backend kernel (on
    [batch, seq, heads, dim], before the heads move forward) and attention through the function
    `config._attn_implementation` names."""

    kernels: Kernels = REFERENCE_KERNELS
    entry = None  # the model type's Entry: its rotary form and eager attention

    def forward(self, hidden_states, position_embeddings, attention_mask, cache: Optional[Cache] = None, **kwargs):
        input_shape = hidden_states.shape[:-1]
        shape = (*input_shape, -1, self.head_dim)
        query, key = self.q_proj(hidden_states).view(shape), self.k_proj(hidden_states).view(shape)
        if getattr(self, "q_norm", None) is not None:  # Qwen3, Gemma 3: RMSNorm per head before the rotary
            query, key = self.q_norm(query), self.k_norm(key)
        cos, sin = position_embeddings
        query = self.entry.rotary(self.kernels, query, cos, sin).transpose(1, 2)
        key = self.entry.rotary(self.kernels, key, cos, sin).transpose(1, 2)
        value = self.v_proj(hidden_states).view(shape).transpose(1, 2)
        if cache is not None:
            key, value = cache.update(key, value, self.layer_idx, kwargs=kwargs)
        attention = ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation, self.entry.eager)
        softcap = getattr(self, "attn_logit_softcapping", None)
        # per layer where the module has its own (Gemma, Qwen); else the config's, for every layer (Mistral)
        window = self.sliding_window if hasattr(self, "sliding_window") else getattr(self.config, "sliding_window", None)
        out, weights = attention(self, query, key, value, attention_mask, scaling=self.scaling,
                                 dropout=self.attention_dropout if self.training else 0.0, sliding_window=window,
                                 **({"softcap": softcap} if softcap is not None else {}), **kwargs)
        return self.o_proj(out.reshape(*input_shape, -1).contiguous()), weights


class KernelCausalLM:
    """The causal-LM head's additions, mixed in before transformers' class (see `kernel_model`)."""

    entry = None  # the model type's Entry (models/decoder/entries.py), or None: transformers' modules

    def __init__(self, config, *args, **kwargs):
        # Scores capped before the softmax (Gemma 2) are not what the attention kernels compute.
        capped = getattr(config, "attn_logit_softcapping", None) is not None
        config._attn_implementation = EAGER if capped else ATTENTION
        super().__init__(config, *args, **kwargs)
        if self.entry is None:
            return
        # The decoder layers build their norms and attention themselves; the subclasses (same parameters,
        # another forward) take their place here, so weights load and save under the same names.
        for module in self.modules():
            if type(module) is self.entry.norm:
                module.__class__ = _kernel_class(self.entry.norm, KernelNorm, self.entry)
            elif type(module) is self.entry.attention:
                module.__class__ = _kernel_class(self.entry.attention, KernelAttention, self.entry)

    def set_kernels(self, kernels: Kernels) -> None:
        """Run this model's math through `kernels` (a backend's table; the reference by default)."""
        for module in self.modules():
            if isinstance(module, KernelNorm) or hasattr(module, "layer_idx"):
                module.kernels = kernels  # attention modules (of transformers' own class too) read it

    def prepare_inputs_for_generation(self, *args, **kwargs):
        return older_cache_name(super().prepare_inputs_for_generation(*args, **kwargs))

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, cache=None, inputs_embeds=None,
                labels=None, use_cache=None, logits_to_keep=0, num_items_in_batch=None, loss_only: bool = False,
                return_logps: bool = False, **kwargs) -> CausalLMOutputWithPast:
        """transformers' forward (its arguments in its order), with the standard shifted causal-LM loss
        of `models/loss.py`.

        Args:
            input_ids: [batch, seq] token ids (or pass `inputs_embeds`).
            attention_mask: [batch, cached + seq], 0 at padding (left or right).
            position_ids, cache, inputs_embeds, use_cache, logits_to_keep: as transformers' (`cache` is
                extended in place; `past_key_values` is its older name).
            labels: [batch, seq] targets, -100 to ignore. Loss is logits[:, :-1] against labels[:, 1:] in
                float32: the mean over counted tokens, or their sum divided by `num_items_in_batch`.
            loss_only: with `labels`, the loss from the label positions alone (`label_loss`), no logits: the
                same loss and gradients without the [batch, seq, vocab] logits (a model that caps its logits,
                Gemma's `final_logit_softcapping`, forms them).
            return_logps: with `labels`, each row's summed label log-probability and label count
                (`models.loss.LogpsOutput`) instead of a loss.
            kwargs: transformers' own, and `cu_seq_lens` for packed rows (as ChatGLM3's forward takes them):
                `attention_mask` is then not used; transformers makes block-diagonal masks from the position ids,
                and the attention function runs the packed kernel (models/transformers_attention.py).

        Returns:
            `CausalLMOutputWithPast` (loss, logits, cache).
        """
        if cache is None:  # transformers' (and peft's) older name
            cache = kwargs.pop("past_key_values", None)
        if kwargs.get("cu_seq_lens") is not None:  # packed rows: masks from the position ids, restarting at 0
            attention_mask = None
        inputs = dict(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, cache=cache,
                      inputs_embeds=inputs_embeds, use_cache=use_cache, **kwargs)
        if labels is None:
            return super().forward(**inputs, logits_to_keep=logits_to_keep)
        outputs = self.model(**inputs)
        hidden = outputs.last_hidden_state
        cap = getattr(self.config, "final_logit_softcapping", None)
        if return_logps and cap is None:
            return label_logps(hidden, self.lm_head.weight, labels)
        if loss_only and cap is None:
            # transformers' mean stays in float32 (ChatGLM3's comes back in the activations' dtype)
            if num_items_in_batch is not None:
                loss = label_loss(hidden, self.lm_head.weight, labels, num_items_in_batch)
            else:
                count = (labels[:, 1:] != -100).sum()
                loss = label_loss(hidden, self.lm_head.weight, labels, count.clamp(min=1))
                loss = loss if count else loss * float("nan")  # as cross_entropy's mean over no tokens
            return CausalLMOutputWithPast(loss=loss, logits=None, cache=outputs.cache)
        logits = self.lm_head(hidden)  # every position: the loss needs them all
        if cap is not None:
            logits = torch.tanh(logits / cap) * cap
        if return_logps:
            return logits_logps(logits, labels)
        loss = shifted_loss(logits, labels, num_items_in_batch)
        return CausalLMOutputWithPast(loss=loss, logits=None if loss_only else logits, cache=outputs.cache)


@functools.cache
def _kernel_class(base: type, mixin: type, entry) -> type:
    """`base` with `mixin`'s forward, under `base`'s name (one class per base and entry)."""
    return type(base.__name__, (mixin, base), {"__module__": mixin.__module__, "entry": entry})


@functools.cache
def kernel_model(cls: type, entry=None) -> type:
    """transformers' causal-LM class `cls` on the kernels, for `entry` (None: its own modules, the backend's
    attention only); one class per pair, keeping `cls`'s name."""
    return type(cls.__name__, (KernelCausalLM, cls), {"__module__": cls.__module__, "entry": entry})
