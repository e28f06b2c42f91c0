"""The Huawei Ascend NPU backend: torch_npu's `torch.npu` namespace for memory, seeding and AMP,
bf16 only where the chip has it (910B yes; 910A and 310P no, so fp16 with loss scaling there), hccl,
and the model's kernels through torch_npu's fused operators, each checked against what the running
chip and torch_npu support and falling back to `backends/reference.py` when they do not.

torch_npu is imported only when the backend is created (`get_backend("npu")`), never when this file
is imported: installing or importing it on a machine without the Ascend CANN toolkit fails, and the
failure is turned into a `BackendUnavailable` that names the fix.

Version pairing (torch, torch_npu, CANN) follows the Ascend/pytorch version table; see
`compatibility`. `stack_versions`, `compatibility` and `unavailable_reason` serve `tuneport doctor`.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import importlib.metadata
import logging
import math
import os
import re
from pathlib import Path
from types import ModuleType
from typing import Optional

import torch

from . import reference
from .base import BackendUnavailable, Capabilities, Kernels, MemoryStats

log = logging.getLogger(__name__)

VISIBLE_DEVICES_ENV = "ASCEND_RT_VISIBLE_DEVICES"
ALLOC_CONF_ENV = "PYTORCH_NPU_ALLOC_CONF"
ALLOC_CONF_DEFAULT = "expandable_segments:True"
CANN_SET_ENV = "/usr/local/Ascend/ascend-toolkit/set_env.sh"
CANN_VERSION_CFG = Path("/usr/local/Ascend/ascend-toolkit/latest/version.cfg")

# Atlas A2 (910B) and A3 (910_93) training chips. npu_fusion_attention and npu_swiglu exist only there;
# first-generation 910 parts ("Ascend910A", "Ascend910ProA", "Ascend910ProB", ...) do not have them.
A2_A3_PREFIXES = ("Ascend910B", "Ascend910_93")


def is_atlas_a2_or_a3(device_name: str) -> bool:
    """True for Atlas A2/A3 chips (device names "Ascend910B*", "Ascend910_93*")."""
    return device_name.startswith(A2_A3_PREFIXES)


# --------------------------------------------------------------------------------------------------
# Loading torch_npu
# --------------------------------------------------------------------------------------------------


def _base_version(version: str) -> Optional[str]:
    """"2.1.0.post12" / "2.13.0+cpu" / "2.10.0rc2" -> "2.1.0" / "2.13.0" / "2.10.0"; None if unparsable."""
    m = re.match(r"\s*(\d+)\.(\d+)(?:\.(\d+))?", version or "")
    if not m:
        return None
    return f"{m.group(1)}.{m.group(2)}.{m.group(3) or 0}"


def _torch_version() -> str:
    return _base_version(torch.__version__) or torch.__version__


def _install_hint() -> str:
    v = _torch_version()
    return (f"install the Ascend CANN toolkit for your chip (https://www.hiascend.com/cann), then "
            f"`pip install torch=={v} torch-npu=={v}` (torch_npu must be the same version as torch: "
            f"torch-npu X.Y.Z pins torch X.Y.Z and pairs with one CANN release, see the Ascend/pytorch README)")


def _import_torch_npu() -> tuple[Optional[ModuleType], Optional[str], Optional[BaseException]]:
    """Import torch_npu: (module, None, None), or (None, reason with the fix, the original error)."""
    try:
        return importlib.import_module("torch_npu"), None, None
    except ModuleNotFoundError as e:
        if e.name == "torch_npu":
            return None, f"torch_npu is not installed ({e}); {_install_hint()}", e
        # torch_npu itself is there but one of its own imports is not: a broken install, case (b).
        error = e
    except (ImportError, OSError, RuntimeError) as e:
        error = e
    return None, (
        f"torch_npu is installed but cannot be loaded ({type(error).__name__}: {error}). This usually means "
        f"the Ascend CANN toolkit is missing or its environment is not sourced: install CANN and run "
        f"`source {CANN_SET_ENV}` in this shell before starting (and check that torch_npu is the same "
        f"version as torch, {torch.__version__})"
    ), error


def _load_torch_npu() -> tuple[Optional[ModuleType], Optional[str], Optional[BaseException]]:
    """Import torch_npu and check that it sees a device: (module, None, None) or (None, reason, error)."""
    torch_npu, reason, error = _import_torch_npu()
    if torch_npu is None:
        return None, reason, error
    npu = getattr(torch, "npu", None)
    if npu is None:
        return None, (f"torch_npu {getattr(torch_npu, '__version__', '?')} imported but did not register "
                      f"torch.npu; reinstall it to match torch {torch.__version__}"), None
    try:
        available, count = bool(npu.is_available()), int(npu.device_count())
    except (RuntimeError, OSError) as e:  # driver-level failures surface here
        available, count, error = False, 0, e
    if not available or count == 0:
        visible = os.environ.get(VISIBLE_DEVICES_ENV)
        shown = "unset" if visible is None else repr(visible)
        detail = f"; {type(error).__name__}: {error}" if error else ""
        return None, (
            f"torch_npu {getattr(torch_npu, '__version__', '?')} loaded but sees no NPU "
            f"(torch.npu.is_available() is {available}, device_count {count}{detail}): check that "
            f"`npu-smi info` lists a device, that the Ascend driver is installed and loaded (in a container: "
            f"/dev/davinci* and /usr/local/Ascend/driver mounted), and that {VISIBLE_DEVICES_ENV} "
            f"(now {shown}) names existing devices"
        ), error
    return torch_npu, None, None


def unavailable_reason() -> Optional[str]:
    """Why the NPU backend cannot be used here, with the fix; None when it can.

    Imports torch_npu (which, on a machine with CANN, initialises it); never raises for a missing stack.
    """
    return _load_torch_npu()[1]


# --------------------------------------------------------------------------------------------------
# Fused kernels
# --------------------------------------------------------------------------------------------------

_FUSED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


class NPUKernels:
    """The model's kernels through torch_npu fused operators, each exactly the reference semantics.

    Every wrapper checks, per call, that the op exists on this chip and torch_npu and that the inputs
    are inside the op's documented constraints; otherwise it runs the reference kernel. The decision
    per chip is made once, here (and for `npu_rotary_mul`, by a probe on first use).

    Args:
        torch_npu: The imported torch_npu module.
        device_name: `torch.npu.get_device_name(0)`, e.g. "Ascend910B3" or "Ascend910A".
    """

    def __init__(self, torch_npu: ModuleType, device_name: str):
        self._ops = torch_npu
        self.device_name = device_name
        a2 = is_atlas_a2_or_a3(device_name)
        self.rms_norm_fused = hasattr(torch_npu, "npu_rms_norm")
        self.attention_fused = a2 and hasattr(torch_npu, "npu_fusion_attention")
        self.swiglu_fused = a2 and hasattr(torch_npu, "npu_swiglu")
        # None until probed on first use: older torch_npu has no rotary_mode argument.
        self.rotary_fused: Optional[bool] = None if hasattr(torch_npu, "npu_rotary_mul") else False
        # Rotate-half is npu_rotary_mul's original mode, the default of every release: nothing to probe.
        self.rotary_half_fused = hasattr(torch_npu, "npu_rotary_mul")
        self.a2 = a2
        why = "" if a2 else f" ({device_name} is not an Atlas A2/A3 chip)"
        log.info("npu kernels on %s: npu_rms_norm %s, npu_rotary_mul %s (interleave), %s (half), "
                 "npu_fusion_attention %s, npu_swiglu %s%s", device_name, _yes(self.rms_norm_fused),
                 "probed on first use" if self.rotary_fused is None else "no", _yes(self.rotary_half_fused),
                 _yes(self.attention_fused), _yes(self.swiglu_fused), why)

    def table(self) -> Kernels:
        return Kernels(rms_norm=self.rms_norm, rotary=self.rotary, attention=self.attention, swiglu=self.swiglu,
                       rotary_half=self.rotary_half, packed_attention=self.packed_attention)

    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        """RMSNorm through `torch_npu.npu_rms_norm(x, gamma, epsilon) -> (y, rstd)`, using y.

        Follows https://www.hiascend.com/document/detail/zh/Pytorch/700/apiref/apilist/ptaoplist_000860.html
        (fp16/bf16/fp32, 2-8 dims, gamma the same dtype as x). Computed in float32 like the reference and
        returned in x's dtype.
        """
        if not (self.rms_norm_fused and 2 <= x.dim() <= 8 and x.dtype in _FUSED_DTYPES):
            return reference.rms_norm(x, weight, eps)
        y, _rstd = self._ops.npu_rms_norm(x.float(), weight.float(), epsilon=eps)
        return y.to(x.dtype)

    def rotary(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """ChatGLM rotary embedding through `torch_npu.npu_rotary_mul(x, r1, r2, rotary_mode="interleave")`.

        Follows https://www.hiascend.com/document/detail/zh/Pytorch/700/apiref/apilist/ptaoplist_000141.html:
        output = r1 * x + r2 * rotate(x), with interleave rotate(x) = stack((-x[..., 1::2], x[..., ::2]), -1)
        flattened. So r1/r2 are cos/sin repeated per pair ([c0, c0, c1, c1, ...]) shaped [B or 1, S, 1, rot]
        (the BS1D/1S1D forms for a BSND input), applied to the first `rot` channels; the rest pass.
        Constraints: 4-D input, rot even and < 896, B * N < 1000; outside them, the reference.
        """
        rot = cos.shape[-1] * 2
        batch, seq, heads, _ = x.shape if x.dim() == 4 else (0, 0, 0, 0)
        if not (x.dim() == 4 and rot % 2 == 0 and 0 < rot < 896 and rot <= x.shape[-1]
                and batch * heads < 1000 and x.dtype in _FUSED_DTYPES
                and cos.dim() == 3 and cos.shape[0] in (1, batch) and cos.shape[1] == seq
                and sin.shape == cos.shape and self._rotary_usable(x.device)):
            return reference.rotary(x, cos, sin)
        return self._fused_rotary(x, cos, sin)

    def _fused_rotary(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        rot = cos.shape[-1] * 2
        r1 = cos.to(x.dtype).repeat_interleave(2, dim=-1).unsqueeze(2)  # [B or 1, S, 1, rot]
        r2 = sin.to(x.dtype).repeat_interleave(2, dim=-1).unsqueeze(2)
        rotated = self._ops.npu_rotary_mul(x[..., :rot].contiguous(), r1, r2, rotary_mode="interleave")
        if rot == x.shape[-1]:
            return rotated
        return torch.cat((rotated, x[..., rot:]), dim=-1)

    def rotary_half(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """Rotate-half rotary embedding through `torch_npu.npu_rotary_mul(x, r1, r2)` (rotary_mode "half").

        Follows https://www.hiascend.com/document/detail/zh/Pytorch/700/apiref/apilist/ptaoplist_000141.html:
        output = r1 * x + r2 * cat((-x2, x1), -1) for the halves x1, x2 of x. So r1/r2 are cos/sin shaped
        [B or 1, S, 1, rot] (the BS1D/1S1D forms for a BSND input), applied to the first `rot` channels; the
        rest pass. Constraints: 4-D input, rot even and < 896, B and N < 1000 (B * N <= 1024 when cos or sin
        needs a gradient); on chips before Atlas A2 (910A) also rot a multiple of 128, as the earlier
        documentation (Pytorch/600 ptaoplist_000486) states. Outside them, the reference. The mode is not
        passed: half is the default of every release, and older ones have no rotary_mode argument.
        The documentation gives r1/r2 the range [-1, 1]: true of cos and sin, not of rope variants that
        scale them (YaRN's attention factor), which this wrapper cannot see without a device sync.
        """
        rot = cos.shape[-1]
        batch, seq, heads, _ = x.shape if x.dim() == 4 else (0, 0, 0, 0)
        grads = cos.requires_grad or sin.requires_grad
        if not (self.rotary_half_fused and x.dim() == 4 and rot % 2 == 0 and 0 < rot < 896 and rot <= x.shape[-1]
                and batch < 1000 and heads < 1000 and not (grads and batch * heads > 1024)
                and (self.a2 or rot % 128 == 0) and x.dtype in _FUSED_DTYPES
                and cos.dim() == 3 and cos.shape[0] in (1, batch) and cos.shape[1] == seq and sin.shape == cos.shape):
            return reference.rotary_half(x, cos, sin)
        r1, r2 = cos.to(x.dtype).unsqueeze(2), sin.to(x.dtype).unsqueeze(2)  # [B or 1, S, 1, rot]
        rotated = self._ops.npu_rotary_mul(x[..., :rot].contiguous(), r1, r2)
        return rotated if rot == x.shape[-1] else torch.cat((rotated, x[..., rot:]), dim=-1)

    def _rotary_usable(self, device: torch.device) -> bool:
        if self.rotary_fused is None:
            self.rotary_fused = self._probe_rotary(device)
        return self.rotary_fused

    def _probe_rotary(self, device: torch.device) -> bool:
        """One tiny call on `device`, compared with the reference: does this torch_npu on this chip have
        `rotary_mode="interleave"` and honour it? (Older releases have no such argument.)"""
        x = torch.linspace(-1.0, 1.0, 8, device=device).reshape(1, 1, 1, 8)
        angles = torch.tensor([0.3, 1.1, 2.0, -0.7], device=device).reshape(1, 1, 4)
        cos, sin = angles.cos(), angles.sin()
        try:
            with torch.no_grad():
                got = self._fused_rotary(x, cos, sin)
                ok = torch.allclose(got.float().cpu(), reference.rotary(x, cos, sin).float().cpu(), atol=1e-3)
        except (TypeError, RuntimeError, ValueError) as e:
            log.warning("npu_rotary_mul(rotary_mode='interleave') is not usable with torch_npu %s on %s "
                        "(%s: %s); using the eager rotary kernel", getattr(self._ops, "__version__", "?"),
                        self.device_name, type(e).__name__, e)
            return False
        if not ok:
            log.warning("npu_rotary_mul(rotary_mode='interleave') disagrees with the reference rotary on %s; "
                        "using the eager rotary kernel", self.device_name)
            return False
        log.info("npu kernels: npu_rotary_mul(rotary_mode='interleave') in use")
        return True

    def attention(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        mask: Optional[torch.Tensor] = None,
        causal: bool = False,
    ) -> torch.Tensor:
        """Attention through `torch_npu.npu_fusion_attention(q, k, v, head_num, input_layout="BNSD", ...)[0]`.

        Follows https://www.hiascend.com/document/detail/zh/Pytorch/600/apiref/apilist/ptaoplist_000850.html:
        `atten_mask` is bool with True = masked (the opposite of our mask), shaped BNSS/B1SS/11SS/SS; key and
        value may have fewer heads (N2 divides N1), so grouped KV heads need no repeat; scale = 1/sqrt(D).
        Only on Atlas A2/A3, with D a multiple of 16 and <= 512 (and B <= 2048, N1 <= 256, the kernel's
        ranges); otherwise the reference. The mask passed is exactly ours: the end-aligned causal triangle
        AND `mask`; with neither, no mask.

        A query row with no allowed key is a NaN or an undefined value for a fused softmax; the reference
        gives it uniform weights (the mean of v over keys), so such rows are unmasked for the op and their
        output replaced by that mean.
        """
        if not self._attention_fits(q, k, v):
            return reference.attention(q, k, v, mask=mask, causal=causal)
        batch, heads, q_len, dim = q.shape
        kv_heads, kv_len = k.shape[1], k.shape[2]
        allowed = None if mask is None else mask.to(torch.bool)
        if causal:
            tri = reference.causal_mask(q_len, kv_len, q.device)
            allowed = tri if allowed is None else allowed & tri
        atten_mask = dead = None
        if allowed is not None:
            allowed = _mask_4d(allowed, batch, heads, q_len, kv_len)
            dead = ~allowed.any(dim=-1, keepdim=True)  # [b, n, S, 1]: rows with no key to attend
            atten_mask = ~(allowed | dead)
        out = self._ops.npu_fusion_attention(
            q, k, v, heads, input_layout="BNSD", atten_mask=atten_mask, scale=1.0 / math.sqrt(dim),
            keep_prob=1.0, sparse_mode=0,
        )[0]
        if dead is not None:
            mean_v = v.float().mean(dim=2, keepdim=True).repeat_interleave(heads // kv_heads, dim=1)
            out = torch.where(dead, mean_v.to(out.dtype), out)
        return out.to(q.dtype)

    def packed_attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor) -> torch.Tensor:
        """Attention within packed samples through `npu_fusion_attention` in its variable-length layout.

        Follows https://www.hiascend.com/document/detail/zh/Pytorch/600/apiref/apilist/ptaoplist_000850.html:
        input_layout "TND" takes the rows as one sequence of tokens, [T, N, D], cut into samples at
        `actual_seq_qlen`/`actual_seq_kvlen`, the host-side cumulative ends (cu_seqlens without its leading 0);
        sparse_mode 3 (rightDownCausal) makes each sample causal and takes the optimised compressed mask, the
        2048 x 2048 upper triangle (True = masked). The same chips and shapes as `attention`; otherwise the
        reference.
        """
        if not self._attention_fits(q, k, v):
            return reference.packed_attention(q, k, v, cu_seqlens)
        batch, heads, seq, dim = q.shape

        def tokens(x: torch.Tensor) -> torch.Tensor:
            return x.transpose(1, 2).reshape(batch * seq, x.shape[1], dim)

        ends = cu_seqlens[1:].tolist()
        out = self._ops.npu_fusion_attention(
            tokens(q), tokens(k), tokens(v), heads, input_layout="TND", atten_mask=_compressed_causal(q.device),
            scale=1.0 / math.sqrt(dim), keep_prob=1.0, sparse_mode=3, actual_seq_qlen=ends, actual_seq_kvlen=ends,
        )[0]
        return out.view(batch, seq, heads, dim).transpose(1, 2).to(q.dtype)

    def _attention_fits(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
        if not (self.attention_fused and q.dim() == 4 and k.dim() == 4 and k.shape == v.shape):
            return False
        batch, heads, _, dim = q.shape
        return (k.shape[0] == batch and k.shape[3] == dim and heads % k.shape[1] == 0
                and dim % 16 == 0 and dim <= 512 and batch <= 2048 and heads <= 256
                and q.dtype in _FUSED_DTYPES and k.dtype == q.dtype and v.dtype == q.dtype)

    def swiglu(self, x: torch.Tensor) -> torch.Tensor:
        """silu(first half) * second half through `torch_npu.npu_swiglu(x, dim=-1)`.

        Follows https://www.hiascend.com/document/detail/zh/Pytorch/600/apiref/apilist/ptaoplist_000834.html
        (out = A * sigmoid(A) * B for the halves A, B of x along dim; 1-8 dims, fp16/bf16/fp32, contiguous;
        Atlas A2/A3 only).
        """
        if not (self.swiglu_fused and 1 <= x.dim() <= 8 and x.shape[-1] % 2 == 0 and x.dtype in _FUSED_DTYPES):
            return reference.lean_swiglu(x)
        return self._ops.npu_swiglu(x.contiguous(), dim=-1)


def _mask_4d(allowed: torch.Tensor, batch: int, heads: int, q_len: int, kv_len: int) -> torch.Tensor:
    """Our mask (broadcastable to [B, H, S, T]) as one of the shapes npu_fusion_attention takes:
    [1|B, 1, S, T] or [B, H, S, T] (1NSS is not among them, so per-head masks get the batch too)."""
    while allowed.dim() < 4:
        allowed = allowed.unsqueeze(0)
    per_head = allowed.shape[1] != 1
    per_batch = per_head or allowed.shape[0] != 1
    return allowed.expand(batch if per_batch else 1, heads if per_head else 1, q_len, kv_len).contiguous()


@functools.cache
def _compressed_causal(device: torch.device) -> torch.Tensor:
    """npu_fusion_attention's compressed causal mask for sparse_mode 2-4: 2048 x 2048, True above the diagonal."""
    return torch.ones(2048, 2048, dtype=torch.bool, device=device).triu(1)


def _yes(flag: bool) -> str:
    return "yes" if flag else "no"


# --------------------------------------------------------------------------------------------------
# The backend
# --------------------------------------------------------------------------------------------------


class NPUBackend:
    """Ascend NPUs through torch_npu. Creating one imports torch_npu and checks that a device is visible.

    Raises:
        BackendUnavailable: torch_npu is not installed, cannot load (CANN missing or not sourced), or sees
            no device; the message says which, with the original error and the fix.
    """

    name = "npu"

    def __init__(self):
        torch_npu, reason, error = _load_torch_npu()
        if reason:
            raise BackendUnavailable(f"device npu: {reason}") from error
        self._torch_npu = torch_npu
        npu_version = getattr(torch_npu, "__version__", None)
        if npu_version and _base_version(npu_version) != _torch_version():
            log.warning("torch_npu %s does not match torch %s; torch-npu X.Y.Z is built for torch X.Y.Z only: %s",
                        npu_version, torch.__version__, _install_hint())
        self.kernels: Kernels = NPUKernels(torch_npu, torch.npu.get_device_name(0)).table()

    @property
    def capabilities(self) -> Capabilities:
        npu = torch.npu
        bf16_check = getattr(npu, "is_bf16_supported", None)
        return Capabilities(
            device_name=npu.get_device_name(0),
            device_count=npu.device_count(),
            memory_total=self._memory_total(),
            # 910B yes; 910A and 310P no. Ask the chip, never assume (accelerate says True on any NPU).
            bf16=bool(bf16_check()) if bf16_check is not None else False,
            fp16=True,
            dist_backend="hccl",
            visible_devices_env=VISIBLE_DEVICES_ENV,
            bnb_4bit=False,  # bitsandbytes has no Ascend kernels
            # Huawei's figure for the Ascend 910 (Hot Chips 2019): 256 TFLOP/s fp16; none published here for others
            peak_flops=256e12 if npu.get_device_name(0).startswith("Ascend910A") else 0.0,
        )

    @staticmethod
    def _memory_total() -> int:
        npu = torch.npu
        with contextlib.suppress(AttributeError, RuntimeError, TypeError):
            return int(npu.mem_get_info()[1])
        with contextlib.suppress(AttributeError, RuntimeError):
            return int(npu.get_device_properties(0).total_memory)
        return 0

    def setup(self) -> None:
        """Turn JIT compilation off and default the allocator to expandable segments.

        Call before the first tensor is placed on the NPU (the allocator reads its setting once).
        """
        torch.npu.set_compile_mode(jit_compile=False)
        log.info("npu setup: torch.npu.set_compile_mode(jit_compile=False) (JIT compilation is ~10x slower "
                 "on 910A, LLaMA-Factory #1444)")
        if ALLOC_CONF_ENV in os.environ:
            log.info("npu setup: left %s=%r as set by the user", ALLOC_CONF_ENV, os.environ[ALLOC_CONF_ENV])
        else:
            os.environ[ALLOC_CONF_ENV] = ALLOC_CONF_DEFAULT
            log.info("npu setup: set %s=%s (it was unset)", ALLOC_CONF_ENV, ALLOC_CONF_DEFAULT)

    def device(self, index: int = 0) -> torch.device:
        return torch.device("npu", index)

    def set_device(self, index: int) -> None:
        torch.npu.set_device(index)

    def synchronize(self) -> None:
        torch.npu.synchronize()

    def manual_seed(self, seed: int) -> None:
        torch.npu.manual_seed_all(seed)

    def rng_state(self) -> Optional[torch.Tensor]:
        return torch.npu.get_rng_state()

    def set_rng_state(self, state: Optional[torch.Tensor]) -> None:
        if state is not None:
            torch.npu.set_rng_state(state)

    def memory_stats(self) -> MemoryStats:
        npu = torch.npu
        return MemoryStats(allocated=npu.memory_allocated(), reserved=npu.memory_reserved(),
                           peak=npu.max_memory_allocated())

    def reset_peak_memory(self) -> None:
        torch.npu.reset_peak_memory_stats()

    def empty_cache(self) -> None:
        torch.npu.empty_cache()

    def autocast(self, dtype: torch.dtype) -> contextlib.AbstractContextManager:
        if dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast("npu", dtype=dtype)

    def grad_scaler(self, dtype: torch.dtype) -> Optional[torch.amp.GradScaler]:
        if dtype != torch.float16:
            return None
        try:
            return torch.amp.GradScaler("npu")
        except (RuntimeError, AssertionError, TypeError, ValueError) as e:  # a torch_npu predating torch.amp("npu")
            log.info("npu: torch.amp.GradScaler('npu') failed (%s); using torch.npu.amp.GradScaler", e)
            return torch.npu.amp.GradScaler()


# --------------------------------------------------------------------------------------------------
# Versions, for `tuneport doctor`
# --------------------------------------------------------------------------------------------------

# Known-good (torch_npu release -> CANN release) pairs; torch_npu X.Y.Z[.postN] pairs with torch X.Y.Z.
# Sources, read 2025:
#   Ascend/pytorch README "Ascend Auxiliary Software" table (github.com/Ascend/pytorch, README.md) and the
#     "Version Matching Table" of the current README (https://gitcode.com/Ascend/pytorch, master);
#   hiascend.com release notes (version tables):
#     https://www.hiascend.com/document/detail/zh/Pytorch/720/releasenote/releasenote_0003.html
#     https://www.hiascend.com/document/detail/zh/Pytorch/600/quickstart/releasenote
KNOWN_GOOD: dict[str, str] = {
    # CANN 9.0.0 (Ascend/pytorch README, gitcode master)
    "2.10.0": "9.0.0", "2.9.0.post2": "9.0.0", "2.8.0.post4": "9.0.0", "2.7.1.post4": "9.0.0",
    # CANN 8.5.0 (same table)
    "2.9.0": "8.5.0", "2.8.0.post2": "8.5.0", "2.7.1.post2": "8.5.0", "2.6.0.post5": "8.5.0",
    # CANN 8.3.RC1 (release notes 7.2.0)
    "2.1.0.post17": "8.3.RC1", "2.6.0.post3": "8.3.RC1", "2.7.1": "8.3.RC1", "2.8.0": "8.3.RC1",
    # CANN 8.2.RC1
    "2.1.0.post13": "8.2.RC1", "2.5.1.post1": "8.2.RC1", "2.6.0": "8.2.RC1",
    # CANN 8.1.RC1
    "2.1.0.post12": "8.1.RC1", "2.3.1.post6": "8.1.RC1", "2.4.0.post4": "8.1.RC1", "2.5.1": "8.1.RC1",
    # CANN 8.0.0
    "2.1.0.post10": "8.0.0", "2.3.1.post4": "8.0.0", "2.4.0.post2": "8.0.0",
    # CANN 8.0.RC3
    "2.1.0.post8": "8.0.RC3", "2.3.1.post2": "8.0.RC3", "2.4.0": "8.0.RC3",
    # CANN 8.0.RC2 (also in the github README table)
    "2.1.0.post6": "8.0.RC2", "2.2.0.post2": "8.0.RC2", "2.3.1": "8.0.RC2",
    # CANN 8.0.RC1
    "2.1.0.post3": "8.0.RC1", "2.2.0": "8.0.RC1",
    # CANN 7.0.0
    "2.1.0": "7.0.0",
}


def _normalize_cann(version: str) -> str:
    """"CANN 8.0.RC2.beta1" / "8.0.rc2" -> "8.0.RC2" (community "beta"/"alpha" builds match their release)."""
    v = re.sub(r"^\s*cann[\s_-]*", "", version.strip(), flags=re.IGNORECASE).upper()
    return re.sub(r"\.(ALPHA|BETA)\d*$", "", v)


def _cann_from_version_cfg(path: Path) -> Optional[str]:
    """The CANN release in a toolkit's version.cfg (lines like `runtime_running_version=[7.3.0.1.231:8.0.RC2]`)."""
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return None
    found = dict(re.findall(r"^\s*(\w+?)_running_version\s*=\s*\[([^\]]*)\]", text, flags=re.MULTILINE))
    for key in ("toolkit", "runtime", *found):
        if found.get(key):
            return found[key].split(":")[-1].strip() or None
    m = re.search(r"^\s*version\s*=\s*(\S+)", text, flags=re.MULTILINE | re.IGNORECASE)
    return m.group(1) if m else None


def stack_versions() -> dict:
    """The installed Ascend stack: {"torch": str, "torch_npu": str | None, "cann": str | None}.

    torch_npu's version comes from the module if it imports, else from its installed metadata. CANN's from
    `torch_npu.version.cann` when torch_npu is loaded, else from `$ASCEND_TOOLKIT_HOME/version.cfg` or
    /usr/local/Ascend/ascend-toolkit/latest/version.cfg.
    """
    torch_npu, _, _ = _import_torch_npu()
    npu_version = getattr(torch_npu, "__version__", None) if torch_npu is not None else None
    if npu_version is None:
        for dist in ("torch-npu", "torch_npu"):
            with contextlib.suppress(importlib.metadata.PackageNotFoundError):
                npu_version = importlib.metadata.version(dist)
                break
    cann = None
    if torch_npu is not None:
        cann = getattr(getattr(torch_npu, "version", None), "cann", None)
    if not cann:
        paths = [CANN_VERSION_CFG]
        if os.environ.get("ASCEND_TOOLKIT_HOME"):
            paths.insert(0, Path(os.environ["ASCEND_TOOLKIT_HOME"]) / "version.cfg")
        for path in paths:
            cann = _cann_from_version_cfg(path)
            if cann:
                break
    return {"torch": torch.__version__, "torch_npu": npu_version, "cann": cann or None}


def compatibility(
    torch_version: str, torch_npu_version: Optional[str], cann_version: Optional[str]
) -> tuple[bool, str]:
    """Whether (torch, torch_npu, CANN) is a pairing the Ascend/pytorch version table lists.

    Returns:
        (ok, message). ok is True only for a known-good triple. The message starts with "known-good:",
        "known-bad:" (torch_npu X.Y.Z with a torch other than X.Y.Z, always broken) or "unknown:" (not in
        the table kept here, or a version missing), and says what the table expects.
    """
    if not torch_npu_version:
        return False, "unknown: torch_npu is not installed, so there is no pairing to check"
    torch_base, npu_base = _base_version(torch_version), _base_version(torch_npu_version)
    if torch_base is None or npu_base is None:
        return False, f"unknown: cannot parse torch {torch_version!r} / torch_npu {torch_npu_version!r}"
    if torch_base != npu_base:
        return False, (f"known-bad: torch_npu {torch_npu_version} is built for torch {npu_base}, but torch is "
                       f"{torch_version}; install torch=={npu_base} (or torch-npu=={torch_base}): "
                       "torch_npu must be the same version as torch")
    listed = KNOWN_GOOD.get(torch_npu_version.strip())
    if not cann_version:
        where = f"; the table pairs it with CANN {listed}" if listed else ""
        return False, f"unknown: CANN version not found (is the toolkit installed and set_env.sh sourced?){where}"
    cann = _normalize_cann(cann_version)
    if listed is None:
        return False, (f"unknown: torch {torch_version} + torch_npu {torch_npu_version} + CANN {cann_version} "
                       "is not in the Ascend/pytorch version table kept here; check the table in the "
                       "Ascend/pytorch README for this torch_npu release")
    if listed != cann:
        return False, (f"unknown: the Ascend/pytorch table pairs torch_npu {torch_npu_version} with CANN {listed}, "
                       f"not CANN {cann_version}; mismatched CANN is a common cause of `aclnn... failed` errors")
    return True, f"known-good: torch {torch_version} + torch_npu {torch_npu_version} + CANN {cann_version}"


def doctor_lines() -> list[str]:
    """For `tuneport doctor`: the torch / torch_npu / CANN triple and whether it is a known-compatible one."""
    versions = stack_versions()
    ok, message = compatibility(versions.get("torch"), versions.get("torch_npu"), versions.get("cann"))
    return [f"  torch_npu: {versions.get('torch_npu') or 'not installed'}",
            f"  CANN: {versions.get('cann') or 'not found'}",
            f"  version triple: {'ok' if ok else 'PROBLEM'}: {message}"]
