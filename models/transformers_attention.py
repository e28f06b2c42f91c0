"""The backends' attention as a transformers attention function, for transformers-native model families.

Importing this module registers `ATTENTION` ("tuneport") with transformers' `AttentionInterface`, and
transformers' boolean SDPA-style masks for it with `AttentionMaskInterface`, so that any model built
with `attn_implementation="tuneport"` calls `attention_forward`. That adapts transformers' call to
`Kernels.attention` (backends/base.py). The kernel table is the calling module's `kernels` attribute,
set by the family when it builds the model: a table per model, so models on different backends can run
in one process.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from ..backends.reference import packed_attention

ATTENTION = "tuneport"

# Arguments of other attention functions that change the result, which the kernels do not compute.
UNSUPPORTED = ("softcap", "s_aux")


def attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: Optional[torch.Tensor],
    scaling: Optional[float] = None,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """transformers' attention-function call, run by `module.kernels.attention`.

    Args:
        module: the calling attention module; its `kernels` is the backend's table, and its `is_causal`
            (default True) says whether attention without a mask is causal.
        query: [batch, heads, q_len, dim]; key, value: [batch, kv_heads, kv_len, dim] (grouped KV heads).
        attention_mask: None (plainly causal, aligned to the end with a cache), or a 4-D mask broadcastable
            to [batch, heads, q_len, kv_len]: boolean (True = attend), or additive float (0 = attend,
            a large negative number = masked, as transformers' eager masks).
        scaling: the softmax scale; the kernels use 1/sqrt(dim), so another scale is folded into query.
        dropout: must be 0 (the kernels have no attention dropout).
        kwargs: `cu_seq_lens` for packed rows (`Kernels.packed_attention`); the packed kernel then runs unless
            a sliding window shorter than the rows limits attention, where transformers' mask (block-diagonal
            from the position ids, and windowed) is used.

    Returns:
        (output [batch, q_len, heads, dim], None): transformers' layout; attention weights are not formed.

    Raises:
        ValueError: attention dropout or a score modifier (softcap, sinks) the kernels do not compute.
        RuntimeError: the module has no kernel table.
    """
    kernels = getattr(module, "kernels", None)
    if kernels is None:
        raise RuntimeError(f"{type(module).__name__} has no backend kernel table (`kernels`); build the model "
                           "through its tuneport model family, which sets it")
    if dropout:
        raise ValueError(f"attention dropout {dropout} is not supported by the backends' attention kernels; "
                         "set config.json attention_dropout to 0.0")
    for name in UNSUPPORTED:
        if kwargs.get(name) is not None:
            raise ValueError(f"attention with {name} is not supported by the backends' attention kernels")
    dim = query.shape[-1]
    if scaling is not None and scaling != dim ** -0.5:
        query = query * (scaling * math.sqrt(dim))
    packed, window = kwargs.get("cu_seq_lens"), kwargs.get("sliding_window")
    if packed is not None and (window is None or window >= query.shape[2]) and query.shape[2] == key.shape[2]:
        out = (kernels.packed_attention or packed_attention)(query, key, value, packed)
        return out.transpose(1, 2).contiguous(), None
    mask = attention_mask
    if mask is not None:
        mask = mask[..., : key.shape[2]]  # a static cache's mask may be longer than the keys so far
        if mask.dtype != torch.bool:
            mask = mask > torch.finfo(mask.dtype).min / 2
    causal = mask is None and getattr(module, "is_causal", True)
    out = kernels.attention(query, key, value, mask=mask, causal=causal)
    return out.transpose(1, 2).contiguous(), None


AttentionInterface.register(ATTENTION, attention_forward)
# The masks transformers makes for SDPA: boolean, True = attend, or None when plainly causal.
AttentionMaskInterface.register(ATTENTION, sdpa_mask)
