"""The CPU backend: the reference kernels (attention through torch's fused SDPA), fp32 or bf16, gloo.

This is the backend CI, laptops and the built-in demo run on.
"""

from __future__ import annotations

import contextlib
import ctypes
import importlib.util
import os
import resource
import sys
from dataclasses import replace
from typing import Optional

import torch
import torch.nn.functional as F

from .base import Capabilities, MemoryStats
from .reference import REFERENCE_KERNELS, causal_mask, lean_swiglu, packed_mask

M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number


def sdpa_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: Optional[torch.Tensor] = None,
    causal: bool = False,
) -> torch.Tensor:
    """The attention kernel through `torch.nn.functional.scaled_dot_product_attention`.

    torch's own `is_causal` aligns the triangle to the start, so a causal call with a KV cache
    (q_len < kv_len) passes the end-aligned triangle as an explicit mask instead.
    """
    q_len, kv_len = q.shape[2], k.shape[2]
    if causal and (mask is not None or q_len != kv_len):
        tri = causal_mask(q_len, kv_len, q.device)
        mask = tri if mask is None else mask & tri
        causal = False
    return F.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, is_causal=causal, enable_gqa=k.shape[1] != q.shape[1]
    )


def sdpa_packed_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor) -> torch.Tensor:
    """Attention within packed samples through SDPA with the block-diagonal causal mask."""
    return sdpa_attention(q, k, v, mask=packed_mask(cu_seqlens, q.shape[0], q.shape[2], q.device), causal=True)


def set_mmap_threshold(size: int) -> bool:
    """Have glibc give every block of `size` bytes or more its own memory mapping; False where the C
    library is not glibc (nothing changes there). For measurements of resident memory (tests, benches):
    tuneport itself leaves glibc's setting alone.

    glibc's default threshold moves: each mapped block freed raises it to that block's size (up to 32 MiB),
    so from the first training step on, activations come from the heap, and the holes they leave when
    freed stay resident. A fixed threshold makes resident memory follow what is allocated, but fresh pages
    for each large tensor cost speed: on the 'small' bench model (bench/train_throughput.py --malloc, 3 rounds
    each, 2026-12-03), 1 MiB gave 222.7 tokens/s and 1,108 MiB against glibc's own 241.6 tokens/s and
    1,204 MiB; 4 MiB 217.3 and 1,154; 32 MiB 245.8 and 1,201; malloc_trim after every step 243.5 and 1,196.
    No setting saved memory for less than 2% of speed, so none is made.
    """
    try:
        mallopt = ctypes.CDLL(None).mallopt  # the process's C library
    except (OSError, AttributeError):
        return False
    return os.uname().sysname == "Linux" and bool(mallopt(M_MMAP_THRESHOLD, size))


def _proc_status_bytes(field: str) -> Optional[int]:
    """A memory field ("VmRSS", "VmHWM") of /proc/self/status in bytes, or None off Linux."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


class CPUBackend:
    """Process memory stands in for device memory: resident set size, and its high-water mark."""

    name = "cpu"
    kernels = replace(REFERENCE_KERNELS, attention=sdpa_attention, swiglu=lean_swiglu,
                      packed_attention=sdpa_packed_attention)

    @property
    def capabilities(self) -> Capabilities:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") if hasattr(os, "sysconf") else 0
        return Capabilities(
            device_name="cpu",
            device_count=1,
            memory_total=total,
            bf16=True,
            fp16=False,  # fp16 matmuls on CPU are slow and gain nothing over bf16
            dist_backend="gloo",
            visible_devices_env=None,
            bnb_4bit=importlib.util.find_spec("bitsandbytes") is not None,  # CPU kernels since 0.45
            prefers_fp32=True,
        )

    def setup(self) -> None:
        pass  # nothing to set: glibc's own allocator settings measured fastest (see set_mmap_threshold)

    def device(self, index: int = 0) -> torch.device:
        return torch.device("cpu")

    def set_device(self, index: int) -> None:
        pass  # one CPU device

    def synchronize(self) -> None:
        pass

    def manual_seed(self, seed: int) -> None:
        torch.manual_seed(seed)

    def rng_state(self) -> Optional[torch.Tensor]:
        return None  # the CPU generator is torch's default one, saved by the caller

    def set_rng_state(self, state: Optional[torch.Tensor]) -> None:
        pass

    def memory_stats(self) -> MemoryStats:
        rss = _proc_status_bytes("VmRSS") or 0
        peak = _proc_status_bytes("VmHWM")
        if peak is None:  # ru_maxrss is KiB on Linux, bytes on macOS
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)
        return MemoryStats(allocated=rss, reserved=rss, peak=peak)

    def reset_peak_memory(self) -> None:
        # Linux resets the VmHWM high-water mark when "5" is written to clear_refs.
        with contextlib.suppress(OSError):
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")

    def empty_cache(self) -> None:
        pass

    def autocast(self, dtype: torch.dtype) -> contextlib.AbstractContextManager:
        if dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast("cpu", dtype=dtype)

    def grad_scaler(self, dtype: torch.dtype) -> Optional[torch.amp.GradScaler]:
        return torch.amp.GradScaler("cpu") if dtype == torch.float16 else None
