"""Eager reference kernels: the definition of the model's math that every backend is tested against.

They follow the official ChatGLM3 `modeling_chatglm.py` (THUDM/chatglm3-6b): RMSNorm in float32,
rotary embedding on interleaved pairs of the first half of each head, grouped-query attention with a
float32 softmax, and SwiGLU over a fused [gate, up] projection. `rotary_half` is the rotate-half form of
transformers' `apply_rotary_pos_emb` (Llama, Qwen2); `packed_attention` is `attention` with a block-diagonal
causal mask, one block per sample packed into a row.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F

from .base import Kernels


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    variance = x.float().pow(2).mean(-1, keepdim=True)
    return (weight * (x * torch.rsqrt(variance + eps))).to(x.dtype)


def rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    rot = cos.shape[-1] * 2
    x_rot, x_pass = x[..., :rot], x[..., rot:]
    pairs = x_rot.unflatten(-1, (-1, 2))
    even, odd = pairs[..., 0], pairs[..., 1]
    cos, sin = cos.unsqueeze(2).to(x.dtype), sin.unsqueeze(2).to(x.dtype)  # broadcast over heads
    rotated = torch.stack((even * cos - odd * sin, odd * cos + even * sin), dim=-1).flatten(-2)
    return torch.cat((rotated, x_pass), dim=-1)


def rotary_half(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    rot = cos.shape[-1]
    x_rot, x_pass = x[..., :rot], x[..., rot:]
    x1, x2 = x_rot.chunk(2, dim=-1)
    cos, sin = cos.unsqueeze(2).to(x.dtype), sin.unsqueeze(2).to(x.dtype)  # broadcast over heads
    rotated = x_rot * cos + torch.cat((-x2, x1), dim=-1) * sin
    return rotated if rot == x.shape[-1] else torch.cat((rotated, x_pass), dim=-1)


def causal_mask(q_len: int, kv_len: int, device: torch.device) -> torch.Tensor:
    """[q_len, kv_len] boolean mask, True where query i may see key j (aligned to the end)."""
    return torch.ones(q_len, kv_len, dtype=torch.bool, device=device).tril(kv_len - q_len)


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: Optional[torch.Tensor] = None,
    causal: bool = False,
) -> torch.Tensor:
    groups = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(groups, dim=1)
    v = v.repeat_interleave(groups, dim=1)
    scores = torch.matmul(q.float(), k.float().transpose(-1, -2)) / math.sqrt(q.shape[-1])
    allowed = mask
    if causal:
        tri = causal_mask(q.shape[2], k.shape[2], q.device)
        allowed = tri if allowed is None else allowed & tri
    if allowed is not None:
        # A finite fill keeps rows with no allowed key finite (uniform) instead of NaN.
        scores = scores.masked_fill(~allowed, torch.finfo(scores.dtype).min)
    probs = torch.softmax(scores, dim=-1)
    return torch.matmul(probs.to(v.dtype), v).to(q.dtype)


def packed_mask(cu_seqlens: torch.Tensor, batch: int, seq: int, device: torch.device) -> torch.Tensor:
    """[batch, 1, seq, seq] boolean mask, True where a query and a key belong to the same packed sample
    (`cu_seqlens` as `Kernels.packed_attention` takes them); the causal triangle is left to the caller."""
    ends = cu_seqlens[1:].to(device=device, dtype=torch.int64)
    sample = torch.bucketize(torch.arange(batch * seq, device=device), ends, right=True).view(batch, seq)
    return (sample[:, :, None] == sample[:, None, :]).unsqueeze(1)


def packed_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor) -> torch.Tensor:
    return attention(q, k, v, mask=packed_mask(cu_seqlens, q.shape[0], q.shape[2], q.device), causal=True)


def swiglu(x: torch.Tensor) -> torch.Tensor:
    gate, up = x.chunk(2, dim=-1)
    return F.silu(gate) * up


def lean_swiglu(x: torch.Tensor) -> torch.Tensor:
    """`swiglu` that keeps only its input for backward, with the same values and, bit for bit, the same
    gradients. Autograd through `swiglu` also keeps silu(gate), half the input's size: after the input, in a
    ChatGLM3 layer the largest activation there is. It is recomputed in backward instead,
    one elementwise pass beside the layer's matmuls, and the gradient's halves are written in place."""
    return _LeanSwiglu.apply(x)


class _LeanSwiglu(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return swiglu(x)

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        gate, up = x.chunk(2, dim=-1)
        grad_x = torch.empty_like(x)  # its halves are written in place: no separate gate and up gradients
        grad_gate, grad_up = grad_x.chunk(2, dim=-1)
        torch.mul(grad, F.silu(gate), out=grad_up)
        torch.mul(grad, up, out=grad_gate)
        grad_gate.copy_(torch.ops.aten.silu_backward(grad_gate, gate))  # the kernel autograd runs for F.silu
        return grad_x


REFERENCE_KERNELS = Kernels(rms_norm=rms_norm, rotary=rotary, attention=attention, swiglu=swiglu,
                            rotary_half=rotary_half, packed_attention=packed_attention)
