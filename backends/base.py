"""The device interface: what the torch model and the training loop need from an accelerator.

A backend is one file in this folder. It describes its device as data (`Capabilities`), owns every
device-specific call (memory, seeding, autocast, loss scaling), and supplies the `Kernels` the model
runs on. Nothing outside `backends/` touches `torch.cuda`, `torch.npu` or `torch_npu`.
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional, Protocol

if TYPE_CHECKING:  # annotations only: importing the device interface (and the registry) loads no torch
    import torch

from ..core.errors import BackendUnavailable, MethodUnavailable  # noqa: F401  (re-exported)


# What to try when a collective does not start across processes (`tuneport doctor --nproc N`), by
# torch.distributed backend.
COLLECTIVE_FIXES = {
    "gloo": "check that this host's name resolves (hostname -i) and that no firewall blocks local ports; set "
            "GLOO_SOCKET_IFNAME to the interface to use",
    "nccl": "run with NCCL_DEBUG=INFO to see why; NCCL_P2P_DISABLE=1 works around broken peer-to-peer links; set "
            "NCCL_SOCKET_IFNAME for multi-node jobs",
    "hccl": "check the cards with npu-smi info and that ASCEND_RT_VISIBLE_DEVICES lists N of them; raise "
            "HCCL_CONNECT_TIMEOUT (seconds) on slow starts; set HCCL_IF_IP for multi-node jobs",
    "mccl": "MindSpore's CPU collective: check that msrun is on PATH (it comes with mindspore) with the "
            "environment's python first, and that no firewall blocks msrun's --master_port",
}


def collective_verdict(name: str, nproc: int, workers: str, returncode: Optional[int], output: str,
                       errors: list[str], label: str = "") -> tuple[bool, list[str]]:
    """`tuneport doctor --nproc N`'s verdict on a launched check whose rank 0 printed `{"sum": ...}` (the ranks
    1..N added up) in `output`: whether the collective `name` worked, and the report's line, with the fix
    when it did not (`returncode` None: the launch timed out; `errors`: the most telling error lines first;
    `label`: how to name the collective, `name` by default)."""
    label = label or name
    if returncode is None:
        return False, [f"  NOT USABLE: {label} across {nproc} {workers} did not start in time; {COLLECTIVE_FIXES[name]}"]
    result = next((json.loads(line) for line in output.splitlines() if line.startswith('{"sum"')), None)
    if returncode != 0 or result is None or result["sum"] != nproc * (nproc + 1) // 2:
        why = errors[0].strip()[:300] if errors else f"exit status {returncode}"
        return False, [f"  NOT USABLE: {label} across {nproc} {workers} failed ({why}); {COLLECTIVE_FIXES[name]}"]
    return True, [f"  collective: {label} across {nproc} {workers}: ok (all-reduce of the ranks 1..{nproc} = "
                  f"{result['sum']:g})"]


@dataclass(frozen=True)
class Capabilities:
    """What a device can do, read from the running hardware.

    Attributes:
        device_name: Human-readable name of device 0 ("cpu", "NVIDIA H200", "Ascend910B3").
        device_count: Number of visible devices of this kind.
        memory_total: Bytes of memory on device 0 (0 when unknown).
        bf16: bfloat16 compute is supported and fast enough to train in.
        fp16: float16 compute is supported (training in it needs loss scaling).
        dist_backend: torch.distributed backend for this device: "gloo", "nccl" or "hccl".
        visible_devices_env: Environment variable that selects visible devices, or None.
        bnb_4bit: bitsandbytes 4-bit (NF4/FP4) layers run here, so QLoRA can.
        prefers_fp32: `precision: auto` means fp32 here (bf16 compute is slower than fp32 on most CPUs).
        peak_flops: device 0's dense 16-bit matrix peak in FLOP/s, from its maker's data sheet (0: unknown;
            runs then show no model FLOP utilisation).
    """

    device_name: str
    device_count: int
    memory_total: int
    bf16: bool
    fp16: bool
    dist_backend: str
    visible_devices_env: Optional[str]
    bnb_4bit: bool = False
    prefers_fp32: bool = False
    peak_flops: float = 0.0


@dataclass(frozen=True)
class MemoryStats:
    """Memory use in bytes: currently allocated, reserved by the allocator, and peak allocated."""

    allocated: int
    reserved: int
    peak: int


class RmsNormFn(Protocol):
    def __call__(self, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        """RMSNorm over the last dimension, computed in float32, returned in x's dtype."""


class RotaryFn(Protocol):
    def __call__(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """ChatGLM rotary embedding.

        x is [batch, seq, heads, head_dim]; cos and sin are [batch or 1, seq, rot/2]. The first `rot`
        channels of each head are rotated as interleaved pairs (x0, x1), (x2, x3), ...; the rest pass.
        """


class RotaryHalfFn(Protocol):
    def __call__(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """Rotate-half rotary embedding (Llama, Qwen2 and transformers' `apply_rotary_pos_emb`).

        x is [batch, seq, heads, head_dim]; cos and sin are [batch or 1, seq, rot], each half of the last
        dim holding the same angles, as transformers' rotary embeddings give them. The first `rot`
        channels of each head are rotated as the halves (x1, x2) -> (x1 cos - x2 sin, x2 cos + x1 sin);
        the rest pass.
        """


class AttentionFn(Protocol):
    def __call__(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        mask: Optional[torch.Tensor] = None,
        causal: bool = False,
    ) -> torch.Tensor:
        """Scaled dot-product attention with grouped KV heads.

        q is [batch, heads, q_len, dim]; k and v are [batch, kv_heads, kv_len, dim] with heads a
        multiple of kv_heads (query head i reads KV head i // (heads // kv_heads)). `mask` is a boolean
        tensor broadcastable to [batch, heads, q_len, kv_len], True where attention is allowed.
        `causal` lets query i see keys up to kv_len - q_len + i (aligned to the end, as with a KV
        cache). Scale 1/sqrt(dim); softmax in float32; result in q's dtype, [batch, heads, q_len, dim].
        """


class PackedAttentionFn(Protocol):
    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor) -> torch.Tensor:
        """Causal attention within the samples packed into each row (no query sees another sample's keys).

        q is [batch, heads, seq, dim]; k and v are [batch, kv_heads, seq, dim] (grouped KV heads, as
        `attention`). The rows laid end to end are cut into samples at `cu_seqlens`: int32, [samples + 1],
        0 first and batch * seq last, every row's end among them (a row's padding is a sample of its own).
        A query sees the keys of its own sample up to itself. Scale, softmax and result as `attention`.
        """


class SwigluFn(Protocol):
    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """silu(first half of the last dim) * second half."""


@dataclass(frozen=True)
class Kernels:
    """The model's device-sensitive math. `backends/reference.py` holds the eager reference of each.

    `rotary_half` (for the transformers-native families) and `packed_attention` (for packed rows, `data.packing`)
    may be left out (None): the model then runs the reference's.
    """

    rms_norm: RmsNormFn
    rotary: RotaryFn
    attention: AttentionFn
    swiglu: SwigluFn
    rotary_half: Optional[RotaryHalfFn] = None
    packed_attention: Optional[PackedAttentionFn] = None


class Backend(Protocol):
    """One accelerator family. Every method is safe to call after `setup()`."""

    name: str
    kernels: Kernels

    @property
    def capabilities(self) -> Capabilities:
        """The device described as data; callers check it rather than catching failures."""

    def setup(self) -> None:
        """One-time process setup (compile mode, allocator settings). Logs what it changes."""

    def device(self, index: int = 0) -> torch.device:
        """The torch device for local device `index`."""

    def set_device(self, index: int) -> None:
        """Make local device `index` this process's current device (one process per device)."""

    def synchronize(self) -> None:
        """Wait for all queued work on the device (for timing)."""

    def manual_seed(self, seed: int) -> None:
        """Seed the device's random generators (the CPU generator is seeded by the caller)."""

    def rng_state(self) -> Optional[torch.Tensor]:
        """The device's random generator state (for exact resume); None when the device has none."""

    def set_rng_state(self, state: Optional[torch.Tensor]) -> None:
        """Restore a state from `rng_state()`."""

    def memory_stats(self) -> MemoryStats:
        """Current, reserved and peak memory of this process on the device."""

    def reset_peak_memory(self) -> None:
        """Start a new peak-memory window."""

    def empty_cache(self) -> None:
        """Return cached, unused memory to the device."""

    def autocast(self, dtype: torch.dtype) -> contextlib.AbstractContextManager:
        """Mixed-precision context for `dtype`; a no-op context for float32."""

    def grad_scaler(self, dtype: torch.dtype) -> Optional[torch.amp.GradScaler]:
        """A dynamic loss scaler when training in float16, else None."""


