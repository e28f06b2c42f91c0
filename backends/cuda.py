"""The CUDA backend: torch.cuda memory and seeding, bf16 autocast where the card has it (else fp16 with
GradScaler), attention through scaled_dot_product_attention (flash / memory-efficient kernels, grouped
KV heads, padding masks), torch's fused RMSNorm, and nccl. Packed rows (`data.packing`) run FlashAttention's
variable-length kernel when the `flash-attn` package is installed (the `flash` extra), else SDPA with the
block-diagonal mask."""

from __future__ import annotations

import contextlib
import importlib.util
import logging
from typing import Optional

import torch
import torch.nn.functional as F

from .base import BackendUnavailable, Capabilities, Kernels, MemoryStats
from .cpu import sdpa_attention, sdpa_packed_attention
from .reference import REFERENCE_KERNELS, lean_swiglu

log = logging.getLogger(__name__)

# Dense bf16 tensor-core peaks (TFLOP/s) from NVIDIA's data sheets; matched by device-name substring.
PEAK_BF16_TFLOPS = {"H200": 989.0, "H100": 989.0, "H800": 989.0, "A100": 312.0, "A800": 312.0, "L40S": 362.0}


def fused_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm through torch's fused kernel, in float32 like the reference, returned in x's dtype."""
    return F.rms_norm(x.float(), (x.shape[-1],), weight.float(), eps).to(x.dtype)


FLASH_ATTN = importlib.util.find_spec("flash_attn") is not None


def varlen_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor) -> torch.Tensor:
    """Attention within packed samples through `flash_attn.flash_attn_varlen_func` (the rows as one sequence
    of tokens, [tokens, heads, dim], cut at `cu_seqlens`; grouped KV heads and causal alignment are its own),
    in fp16 and bf16; otherwise, or without the package, SDPA with the block-diagonal mask."""
    if q.dtype not in (torch.float16, torch.bfloat16) or not FLASH_ATTN:
        return sdpa_packed_attention(q, k, v, cu_seqlens)
    from flash_attn import flash_attn_varlen_func

    batch, heads, seq, dim = q.shape
    cu = cu_seqlens.to(device=q.device, dtype=torch.int32)
    longest = int((cu_seqlens[1:] - cu_seqlens[:-1]).max())  # cu_seqlens arrive on the host: no device sync

    def tokens(x: torch.Tensor) -> torch.Tensor:
        return x.transpose(1, 2).reshape(batch * seq, x.shape[1], dim)

    out = flash_attn_varlen_func(tokens(q), tokens(k), tokens(v), cu, cu, longest, longest, causal=True)
    return out.view(batch, seq, heads, dim).transpose(1, 2)


CUDA_KERNELS = Kernels(rms_norm=fused_rms_norm, rotary=REFERENCE_KERNELS.rotary, attention=sdpa_attention,
                       swiglu=lean_swiglu, rotary_half=REFERENCE_KERNELS.rotary_half, packed_attention=varlen_attention)


def unavailable_reason() -> Optional[str]:
    """Why CUDA cannot be used here, with the fix; None when it can."""
    if torch.version.cuda is None:
        return (f"this torch ({torch.__version__}) is a CPU-only build; install a CUDA build, e.g. "
                f"pip install torch=={torch.__version__.split('+')[0]} --index-url https://download.pytorch.org/whl/cu128")
    if not torch.cuda.is_available():
        return (f"torch was built for CUDA {torch.version.cuda} but sees no GPU: check that `nvidia-smi` lists one, "
                "that the driver supports that CUDA version, and that CUDA_VISIBLE_DEVICES is not empty")
    return None


class CUDABackend:
    name = "cuda"
    kernels = CUDA_KERNELS

    def __init__(self):
        reason = unavailable_reason()
        if reason:
            raise BackendUnavailable(f"device cuda: {reason}")

    @property
    def capabilities(self) -> Capabilities:
        props = torch.cuda.get_device_properties(0)
        return Capabilities(
            device_name=props.name,
            device_count=torch.cuda.device_count(),
            memory_total=props.total_memory,
            bf16=torch.cuda.is_bf16_supported(),
            fp16=True,
            dist_backend="nccl",
            visible_devices_env="CUDA_VISIBLE_DEVICES",
            bnb_4bit=importlib.util.find_spec("bitsandbytes") is not None,
            peak_flops=next((v * 1e12 for k, v in PEAK_BF16_TFLOPS.items() if k in props.name), 0.0),
        )

    def setup(self) -> None:
        torch.backends.cuda.matmul.allow_tf32 = True  # fp32 matmuls on tensor cores; logged, not hidden
        log.info("cuda setup: TF32 matmuls enabled")

    def device(self, index: int = 0) -> torch.device:
        return torch.device("cuda", index)

    def set_device(self, index: int) -> None:
        torch.cuda.set_device(index)

    def synchronize(self) -> None:
        torch.cuda.synchronize()

    def manual_seed(self, seed: int) -> None:
        torch.cuda.manual_seed_all(seed)

    def rng_state(self) -> Optional[torch.Tensor]:
        return torch.cuda.get_rng_state()

    def set_rng_state(self, state: Optional[torch.Tensor]) -> None:
        if state is not None:
            torch.cuda.set_rng_state(state)

    def memory_stats(self) -> MemoryStats:
        return MemoryStats(allocated=torch.cuda.memory_allocated(), reserved=torch.cuda.memory_reserved(),
                           peak=torch.cuda.max_memory_allocated())

    def reset_peak_memory(self) -> None:
        torch.cuda.reset_peak_memory_stats()

    def empty_cache(self) -> None:
        torch.cuda.empty_cache()

    def autocast(self, dtype: torch.dtype) -> contextlib.AbstractContextManager:
        if dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast("cuda", dtype=dtype)

    def grad_scaler(self, dtype: torch.dtype) -> Optional[torch.amp.GradScaler]:
        return torch.amp.GradScaler("cuda") if dtype == torch.float16 else None
