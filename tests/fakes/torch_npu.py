"""A FAKE torch_npu: it stands in for Ascend hardware (and the CANN stack) that the test machines do not
have, and is used only by tests. It is never installed; nothing outside tests/ imports it.

It implements, on CPU tensors, exactly the slice of torch_npu that `backends/npu.py` uses:

- module attributes `__version__` and `version.cann`;
- the `torch.npu` namespace (is_available, device_count, get_device_name, get_device_properties,
  is_bf16_supported, set_compile_mode, mem_get_info, memory_allocated / max_memory_allocated /
  memory_reserved / reset_peak_memory_stats / empty_cache with plausible numbers, manual_seed_all,
  get_rng_state / set_rng_state, synchronize, get_amp_supported_dtype for torch.autocast, amp.GradScaler);
- the four fused operators, written from their documentation (cited on each) and independently of
  backends/reference.py, which they are compared against: a fake must never stand in for the reference.

`install(monkeypatch, chip="910B")` builds a fresh fake configured as a 910B (Atlas A2: "Ascend910B3", bf16,
all four ops) or a 910A ("Ascend910A": no bf16; npu_fusion_attention and npu_swiglu raise as on a chip that
lacks them; npu_rotary_mul only in "half" mode), puts it in sys.modules["torch_npu"] and sets torch.npu,
both undone by monkeypatch after the test. It does not rename torch's PrivateUse1 backend to "npu" as the
real torch_npu does: that cannot be undone and turns "npu" into torch's current accelerator for the rest
of the process (torch.optim then looks for torch.npu). `install_for_process` does it, for a child process
that checks torch.device("npu") and torch.autocast("npu").
"""

from __future__ import annotations

import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType, SimpleNamespace
from typing import Optional

import torch

GiB = 1 << 30


@dataclass(frozen=True)
class Chip:
    name: str  # what torch.npu.get_device_name returns
    bf16: bool
    atlas_a2: bool  # Atlas A2/A3: npu_fusion_attention, npu_swiglu, npu_rotary_mul interleave mode
    memory: int


CHIPS = {
    "910A": Chip(name="Ascend910A", bf16=False, atlas_a2=False, memory=32 * GiB),
    "910B": Chip(name="Ascend910B3", bf16=True, atlas_a2=True, memory=64 * GiB),
}


@dataclass
class State:
    """What the fake records, for tests to inspect."""

    calls: Counter = field(default_factory=Counter)  # fused-op name -> number of calls
    compile_mode: Optional[dict] = None
    seed: Optional[int] = None
    synchronized: int = 0
    allocated: int = 3 * (1 << 20)
    reserved: int = 8 * (1 << 20)
    peak: int = 5 * (1 << 20)
    generator: torch.Generator = field(default_factory=torch.Generator)


def _unsupported(op: str, chip: Chip) -> RuntimeError:
    # The real torch_npu fails inside the op on a chip without the kernel; the message varies by release.
    return RuntimeError(f"{op}: EZ9999 the operator is not supported on {chip.name} (Atlas A2/A3 training series only)")


def build(
    chip: str = "910B",
    *,
    device_count: int = 1,
    version: Optional[str] = None,
    cann: Optional[str] = "8.5.0",
    rotary_mode_arg: bool = True,
) -> ModuleType:
    """A fresh fake torch_npu module.

    Args:
        chip: "910A" or "910B".
        device_count: Visible devices; 0 makes torch.npu.is_available() False.
        version: torch_npu.__version__; by default the running torch's X.Y.Z (a matched pair).
        cann: torch_npu.version.cann, or None for a build that does not report it.
        rotary_mode_arg: False mimics an older torch_npu whose npu_rotary_mul has no rotary_mode argument.
    """
    spec = CHIPS[chip]
    state = State()
    mod = ModuleType("torch_npu")
    mod.__doc__ = "FAKE torch_npu for tests (see tests/fakes/torch_npu.py)"
    mod.__version__ = version or torch.__version__.split("+")[0]
    mod.fake_state = state
    mod.fake_chip = spec
    mod.version = SimpleNamespace(__version__=mod.__version__, cann=cann)

    # ---- torch.npu -------------------------------------------------------------------------------
    npu = ModuleType("torch_npu.npu")
    npu.is_available = lambda: device_count > 0
    npu.device_count = lambda: device_count
    npu.current_device = lambda: 0
    npu.set_device = lambda index: None

    def _check(index=0):
        if device_count == 0:
            raise RuntimeError("npu: no NPU device is visible")
        index = getattr(index, "index", index) or 0
        if not 0 <= index < device_count:
            raise RuntimeError(f"npu: invalid device ordinal {index}")

    def get_device_name(index=0):
        _check(index)
        return spec.name

    def get_device_properties(index=0):
        _check(index)
        return SimpleNamespace(name=spec.name, total_memory=spec.memory)

    def set_compile_mode(jit_compile: bool = True):
        state.compile_mode = {"jit_compile": jit_compile}

    def mem_get_info(device=None):
        _check(device or 0)
        return spec.memory - state.reserved, spec.memory

    def reset_peak_memory_stats(device=None):
        state.peak = state.allocated

    def empty_cache():
        state.reserved = state.allocated

    def manual_seed_all(seed: int):
        state.seed = seed
        state.generator.manual_seed(seed)

    def synchronize(device=None):
        state.synchronized += 1

    class GradScaler(torch.amp.GradScaler):
        """torch.npu.amp.GradScaler: torch's scaler for device "npu" (as in torch_npu)."""

        def __init__(self, **kwargs):
            super().__init__("npu", **kwargs)

    npu.get_device_name = get_device_name
    npu.get_device_properties = get_device_properties
    npu.is_bf16_supported = lambda: spec.bf16
    npu.set_compile_mode = set_compile_mode
    npu.mem_get_info = mem_get_info
    npu.memory_allocated = lambda device=None: state.allocated
    npu.max_memory_allocated = lambda device=None: state.peak
    npu.memory_reserved = lambda device=None: state.reserved
    npu.reset_peak_memory_stats = reset_peak_memory_stats
    npu.empty_cache = empty_cache
    npu.manual_seed_all = manual_seed_all
    npu.get_rng_state = lambda device=None: state.generator.get_state()
    npu.set_rng_state = lambda new_state, device=None: state.generator.set_state(new_state)
    npu.synchronize = synchronize
    npu.get_amp_supported_dtype = lambda: [torch.float16, torch.bfloat16]  # as torch_npu: all chips list both
    npu.amp = SimpleNamespace(GradScaler=GradScaler)
    mod.npu = npu

    # ---- fused operators -------------------------------------------------------------------------
    def npu_rms_norm(self, gamma, epsilon=1e-6):
        """torch_npu.npu_rms_norm(self, gamma, epsilon=1e-06) -> (y, rstd).

        https://www.hiascend.com/document/detail/zh/Pytorch/700/apiref/apilist/ptaoplist_000860.html:
        fp16/bf16/fp32, 2-8 dims, gamma the same dtype as self; y = x * rstd * gamma, rstd = 1 / Rms(x).
        """
        state.calls["npu_rms_norm"] += 1
        if self.dtype not in (torch.float16, torch.bfloat16, torch.float32) or not 2 <= self.dim() <= 8:
            raise RuntimeError(f"npu_rms_norm: unsupported input {self.dtype} {tuple(self.shape)}")
        if gamma.dtype != self.dtype:
            raise RuntimeError(f"npu_rms_norm: gamma dtype {gamma.dtype} != input dtype {self.dtype}")
        mean_square = (self.float() * self.float()).sum(-1, keepdim=True) / self.shape[-1]
        rstd = 1.0 / torch.sqrt(mean_square + epsilon)
        return (self.float() * rstd * gamma.float()).to(self.dtype), rstd

    def _rotary(input, r1, r2, rotary_mode="half"):
        """torch_npu.npu_rotary_mul(input, r1, r2, rotary_mode='half') -> Tensor.

        https://www.hiascend.com/document/detail/zh/Pytorch/700/apiref/apilist/ptaoplist_000141.html:
        output = r1 * input + r2 * x_new; half: x1, x2 = chunk(input, 2, -1), x_new = cat((-x2, x1), -1);
        interleave: x1 = input[..., ::2], x2 = input[..., 1::2], x_new = stack((-x2, x1), -1) flattened
        ("... d two -> ... (d two)"). 4-D tensors; interleave: D even and < 896, B * N < 1000 (Atlas A2/A3);
        half: D even and < 896, B and N < 1000 on Atlas A2/A3, D a multiple of 128 on earlier Atlas training
        chips (Pytorch/600 ptaoplist_000486). r1 and r2 broadcast to input (for the BSND layout the backend
        uses: 1S1D, BS1D or BSND; this fake reads B and N as dims 0 and 2).
        """
        state.calls["npu_rotary_mul"] += 1
        if input.dim() != 4 or r1.dim() != 4 or r2.dim() != 4:
            raise RuntimeError("npu_rotary_mul: input, r1 and r2 must be 4-D")
        if r1.shape != r2.shape or torch.broadcast_shapes(r1.shape, input.shape) != input.shape:
            raise RuntimeError(f"npu_rotary_mul: r1 {tuple(r1.shape)} and r2 {tuple(r2.shape)} do not broadcast "
                               f"to input {tuple(input.shape)}")
        if rotary_mode == "half":
            b, _, n, d = input.shape
            if d % 2 or d >= 896 or b >= 1000 or n >= 1000 or (not spec.atlas_a2 and d % 128):
                raise RuntimeError(f"npu_rotary_mul: half mode needs D even and < 896 (a multiple of 128 on "
                                   f"{spec.name}) and B, N < 1000, got {tuple(input.shape)}")
            x1, x2 = torch.chunk(input, 2, dim=-1)
            x_new = torch.cat((-x2, x1), dim=-1)
        elif rotary_mode == "interleave":
            if not spec.atlas_a2:
                raise _unsupported("npu_rotary_mul(rotary_mode='interleave')", spec)
            b, s, n, d = input.shape
            if d % 2 or d >= 896 or b * n >= 1000:
                raise RuntimeError(
                    f"npu_rotary_mul: interleave needs D even and < 896 and B*N < 1000, got {tuple(input.shape)}")
            x1, x2 = input[..., ::2], input[..., 1::2]
            x_new = torch.stack((-x2, x1), dim=-1).reshape(input.shape)
        else:
            raise RuntimeError(f"npu_rotary_mul: unknown rotary_mode {rotary_mode!r}")
        return r1 * input + r2 * x_new

    if rotary_mode_arg:
        mod.npu_rotary_mul = _rotary
    else:
        def npu_rotary_mul(x, r1, r2):  # older releases: half mode only, no rotary_mode argument
            return _rotary(x, r1, r2)

        mod.npu_rotary_mul = npu_rotary_mul

    def npu_fusion_attention(query, key, value, head_num, input_layout, pse=None, padding_mask=None,
                             atten_mask=None, scale=1.0, keep_prob=1.0, pre_tockens=2147483647,
                             next_tockens=2147483647, inner_precise=0, prefix=None, actual_seq_qlen=None,
                             actual_seq_kvlen=None, sparse_mode=0, gen_mask_parallel=True, sync=False):
        """torch_npu.npu_fusion_attention(...) -> (Tensor, Tensor, Tensor, Tensor, int, int, int).

        https://www.hiascend.com/document/detail/zh/Pytorch/600/apiref/apilist/ptaoplist_000850.html:
        softmax(mask(scale * q k^T, atten_mask)) v, atten_mask bool with True = not computed (masked), shaped
        BNSS/B1SS/11SS/SS; key/value may have N2 heads with N2 dividing N1; D a multiple of 16, at most 512;
        Atlas A2 only. This fake covers the slice the backend uses: layout BNSD, sparse_mode 0, keep_prob 1.
        """
        state.calls["npu_fusion_attention"] += 1
        if not spec.atlas_a2:
            raise _unsupported("npu_fusion_attention", spec)
        if input_layout == "TND":
            state.calls["npu_fusion_attention TND"] += 1
            return _varlen(query, key, value, head_num, atten_mask, scale, keep_prob, actual_seq_qlen,
                           actual_seq_kvlen, sparse_mode, pse)
        if input_layout != "BNSD" or sparse_mode != 0 or keep_prob != 1.0 or pse is not None:
            raise NotImplementedError("fake npu_fusion_attention: only BNSD and TND, sparse_mode 0 (3 for TND), "
                                      "keep_prob 1, no pse")
        b, n1, s, d = query.shape
        n2, t = key.shape[1], key.shape[2]
        if head_num != n1 or n1 % n2 or value.shape != key.shape:
            raise RuntimeError(f"npu_fusion_attention: head_num {head_num}, query {tuple(query.shape)}, "
                               f"key {tuple(key.shape)}")
        if d % 16 or d > 512:
            raise RuntimeError(f"npu_fusion_attention: D must be a multiple of 16 and <= 512, got {d}")
        groups = n1 // n2
        kv_index = torch.tensor([h // groups for h in range(n1)])
        k = key.index_select(1, kv_index).float()
        v = value.index_select(1, kv_index).float()
        scores = torch.einsum("bnsd,bntd->bnst", query.float(), k) * scale
        if atten_mask is not None:
            if atten_mask.dtype != torch.bool:
                raise RuntimeError("npu_fusion_attention: atten_mask must be bool")
            shape = tuple(atten_mask.shape)
            if shape not in {(b, n1, s, t), (b, 1, s, t), (1, 1, s, t), (s, t)}:
                raise RuntimeError(f"npu_fusion_attention: atten_mask shape {shape} is not BNSS/B1SS/11SS/SS")
            scores = scores.masked_fill(atten_mask, float("-inf"))
        probs = torch.softmax(scores, dim=-1)
        out = torch.einsum("bnst,bntd->bnsd", probs, v).to(query.dtype)
        row_max = scores.amax(-1, keepdim=True).expand(b, n1, s, 8)
        row_sum = probs.sum(-1, keepdim=True).expand(b, n1, s, 8)
        return out, row_max, row_sum, torch.empty(0), 0, 0, 0

    def _varlen(query, key, value, head_num, atten_mask, scale, keep_prob, ends_q, ends_kv, sparse_mode, pse):
        """The TND layout: query [T, N1, D], key and value [T, N2, D], samples ending at the cumulative host
        lists actual_seq_qlen / actual_seq_kvlen (required with TND). This fake covers sparse_mode 3
        (rightDownCausal) with equal query and key lengths, which requires the compressed mask: bool
        2048 x 2048, True strictly above the diagonal."""
        if sparse_mode != 3 or keep_prob != 1.0 or pse is not None:
            raise NotImplementedError("fake npu_fusion_attention TND: only sparse_mode 3, keep_prob 1, no pse")
        if not (isinstance(ends_q, list) and ends_q == ends_kv and all(isinstance(e, int) for e in ends_q)):
            raise RuntimeError("npu_fusion_attention TND: actual_seq_qlen and actual_seq_kvlen must be host int "
                               "lists (equal here)")
        t, n1, d = query.shape
        if not ends_q or ends_q[-1] != t or any(b <= a for a, b in zip([0] + ends_q, ends_q)):
            raise RuntimeError(f"npu_fusion_attention TND: actual_seq_qlen {ends_q} must rise to T={t}")
        if (atten_mask is None or atten_mask.dtype != torch.bool or tuple(atten_mask.shape) != (2048, 2048)
                or not torch.equal(atten_mask, torch.ones(2048, 2048, dtype=torch.bool).triu(1))):
            raise RuntimeError("npu_fusion_attention: sparse_mode 3 needs the compressed 2048 x 2048 causal mask")
        if head_num != n1 or n1 % key.shape[1] or d % 16 or d > 512:
            raise RuntimeError(f"npu_fusion_attention TND: head_num {head_num}, query {tuple(query.shape)}, "
                               f"key {tuple(key.shape)}")
        out = torch.empty_like(query)
        for start, end in zip([0] + ends_q, ends_q):  # each sample: BNSD attention with the causal triangle
            q, k, v = (x[start:end].transpose(0, 1).unsqueeze(0) for x in (query, key, value))
            length = end - start
            causal = torch.ones(length, length, dtype=torch.bool).triu(1)
            out[start:end] = npu_fusion_attention(q, k, v, head_num, "BNSD", atten_mask=causal,
                                                  scale=scale)[0][0].transpose(0, 1)
        return out, None, None, torch.empty(0), 0, 0, 0

    def npu_swiglu(input, dim=-1):
        """torch_npu.npu_swiglu(input, dim=-1) -> Tensor.

        https://www.hiascend.com/document/detail/zh/Pytorch/600/apiref/apilist/ptaoplist_000834.html:
        outputs = swish(A) * B = A * sigmoid(A) * B, A and B the halves of input along dim; contiguous
        input only; Atlas A2 training series.
        """
        state.calls["npu_swiglu"] += 1
        if not spec.atlas_a2:
            raise _unsupported("npu_swiglu", spec)
        if not input.is_contiguous() or input.shape[dim] % 2:
            raise RuntimeError("npu_swiglu: input must be contiguous with an even size along dim")
        half = input.shape[dim] // 2
        a, b = input.narrow(dim, 0, half), input.narrow(dim, half, half)
        return a * torch.sigmoid(a) * b

    mod.npu_rms_norm = npu_rms_norm
    mod.npu_fusion_attention = npu_fusion_attention
    mod.npu_swiglu = npu_swiglu
    return mod


def install(monkeypatch, chip: str = "910B", **options) -> ModuleType:
    """Build a fake (see `build`), make `import torch_npu` return it and set torch.npu, until the test ends."""
    mod = build(chip, **options)
    monkeypatch.setitem(sys.modules, "torch_npu", mod)
    monkeypatch.setitem(sys.modules, "torch_npu.npu", mod.npu)
    monkeypatch.setitem(sys.modules, "torch.npu", mod.npu)
    monkeypatch.setattr(torch, "npu", mod.npu, raising=False)
    return mod


def install_for_process(chip: str = "910B", **options) -> ModuleType:
    """Install a fake for the rest of this process, as importing the real torch_npu would, including the
    PrivateUse1 -> "npu" rename that makes torch.device("npu") and torch.autocast("npu") work. Only for a
    dedicated child process: none of it can be undone."""
    mod = build(chip, **options)
    torch.utils.rename_privateuse1_backend("npu")
    sys.modules["torch_npu"] = mod
    sys.modules["torch_npu.npu"] = mod.npu
    torch._register_device_module("npu", mod.npu)  # sets torch.npu and sys.modules["torch.npu"], as torch_npu does
    return mod


def install_unloadable(monkeypatch, directory: Path, error: str) -> None:
    """Make torch_npu importable as a package whose import raises `error` (source text, e.g.
    'ImportError("libhccl.so: cannot open shared object file")'), as a torch_npu without CANN does."""
    package = directory / "torch_npu"
    package.mkdir(parents=True, exist_ok=True)
    (package / "__init__.py").write_text(f'"""FAKE torch_npu that fails to load."""\nraise {error}\n')
    monkeypatch.delitem(sys.modules, "torch_npu", raising=False)
    monkeypatch.syspath_prepend(str(directory))
