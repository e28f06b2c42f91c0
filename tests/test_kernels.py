"""Each reference kernel against an independent, straightforward formulation, and every backend
override against the reference."""

import math

import pytest
import torch
import torch.nn.functional as F

from tuneport.backends import available_backends, get_backend
from tuneport.backends.reference import REFERENCE_KERNELS as ref
from tuneport.backends.reference import lean_swiglu, swiglu


def loop_attention(q, k, v, allowed):
    """Per batch, head and query: softmax over the allowed keys of that head's KV group."""
    batch, heads, q_len, dim = q.shape
    groups = heads // k.shape[1]
    out = torch.zeros_like(q)
    for b in range(batch):
        for h in range(heads):
            kv = h // groups
            for i in range(q_len):
                keys = [j for j in range(k.shape[2]) if allowed[b, i, j]]
                scores = torch.stack([q[b, h, i] @ k[b, kv, j] for j in keys]) / math.sqrt(dim)
                weights = torch.softmax(scores, dim=0)
                out[b, h, i] = sum(w * v[b, kv, j] for w, j in zip(weights, keys))
    return out


@pytest.fixture
def qkv():
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 4, 5, 8, generator=g)
    k = torch.randn(2, 2, 7, 8, generator=g)  # 2 KV groups for 4 heads; 2 cached keys before 5 new
    v = torch.randn(2, 2, 7, 8, generator=g)
    return q, k, v


def test_attention_causal_with_cache_and_gqa(qkv):
    q, k, v = qkv
    allowed = torch.tensor([[j <= i + 2 for j in range(7)] for i in range(5)]).expand(2, 5, 7)
    torch.testing.assert_close(ref.attention(q, k, v, causal=True), loop_attention(q, k, v, allowed))


def test_attention_padding_mask(qkv):
    q, k, v = qkv
    padding = torch.tensor([[0, 0, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1, 1]], dtype=torch.bool)
    causal = torch.tensor([[j <= i + 2 for j in range(7)] for i in range(5)])
    allowed = causal & padding[:, None, :]
    out = ref.attention(q, k, v, mask=padding[:, None, None, :], causal=True)
    torch.testing.assert_close(out, loop_attention(q, k, v, allowed))


def packed_inputs(dim: int = 16):
    """Two rows of 6 tokens: samples of 2 and 4 tokens, then of 3, 1 and 2 (grouped KV heads)."""
    g = torch.Generator().manual_seed(5)
    q, k, v = torch.randn(2, 4, 6, dim, generator=g), torch.randn(2, 2, 6, dim, generator=g), \
        torch.randn(2, 2, 6, dim, generator=g)
    return q, k, v, torch.tensor([0, 2, 6, 9, 10, 12], dtype=torch.int32)


def test_packed_attention_attends_within_each_sample_causally():
    q, k, v, cu = packed_inputs()
    sample = torch.tensor([[0, 0, 1, 1, 1, 1], [2, 2, 2, 3, 4, 4]])
    allowed = (sample[:, :, None] == sample[:, None, :]) & torch.ones(6, 6, dtype=torch.bool).tril()
    torch.testing.assert_close(ref.packed_attention(q, k, v, cu), loop_attention(q, k, v, allowed))


def test_rms_norm():
    x = torch.randn(3, 4, 16, generator=torch.Generator().manual_seed(1))
    w = torch.rand(16) + 0.5
    expected = torch.stack([w * row / torch.sqrt((row**2).mean() + 1e-5) for row in x.reshape(-1, 16)])
    torch.testing.assert_close(ref.rms_norm(x, w, 1e-5), expected.reshape(3, 4, 16))


def test_rotary_rotates_interleaved_pairs_of_first_half():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(1, 3, 2, 8, generator=g)  # [batch, seq, heads, head_dim 8]: 4 channels rotate
    angles = torch.rand(1, 3, 2, generator=g) * 6
    out = ref.rotary(x, angles.cos(), angles.sin())
    for s in range(3):
        for h in range(2):
            for p in range(2):  # pair p is channels (2p, 2p+1), rotated by angle p
                a = angles[0, s, p]
                x0, x1 = x[0, s, h, 2 * p], x[0, s, h, 2 * p + 1]
                expected = torch.stack([x0 * a.cos() - x1 * a.sin(), x1 * a.cos() + x0 * a.sin()])
                torch.testing.assert_close(out[0, s, h, 2 * p: 2 * p + 2], expected)
    torch.testing.assert_close(out[..., 4:], x[..., 4:])


def test_rotary_half_rotates_the_halves_of_the_first_rot_channels():
    g = torch.Generator().manual_seed(5)
    x = torch.randn(2, 3, 2, 8, generator=g)  # [batch, seq, heads, head_dim 8]: 6 channels rotate
    angles = torch.rand(1, 3, 3, generator=g) * 6
    cos, sin = torch.cat((angles, angles), -1).cos(), torch.cat((angles, angles), -1).sin()  # as transformers'
    out = ref.rotary_half(x, cos, sin)
    for b in range(2):
        for s in range(3):
            for h in range(2):
                for p in range(3):  # channel p pairs with channel p + 3, rotated by angle p
                    a = angles[0, s, p]
                    x1, x2 = x[b, s, h, p], x[b, s, h, p + 3]
                    expected = torch.stack([x1 * a.cos() - x2 * a.sin(), x2 * a.cos() + x1 * a.sin()])
                    torch.testing.assert_close(out[b, s, h, [p, p + 3]], expected)
    torch.testing.assert_close(out[..., 6:], x[..., 6:])


def test_swiglu():
    x = torch.randn(2, 6, generator=torch.Generator().manual_seed(3))
    gate, up = x[:, :3], x[:, 3:]
    torch.testing.assert_close(ref.swiglu(x), gate * torch.sigmoid(gate) * up)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_lean_swiglu_keeps_only_its_input_and_gives_the_same_gradients(dtype):
    """Values and gradients bit for bit those of autograd through the reference, which also keeps
    silu(gate) (half the input's size) for backward."""
    g = torch.Generator().manual_seed(5)
    x = torch.randn(3, 5, 16, generator=g).to(dtype)
    grad = torch.randn(3, 5, 8, generator=g).to(dtype)
    results = {}
    for fn in (swiglu, lean_swiglu):
        leaf = x.clone().requires_grad_(True)
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
            out = fn(leaf * 1)  # through one op, as the projection's output reaches it
        out.backward(grad)
        kept = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in saved}
        results[fn.__name__] = out, leaf.grad, sum(kept.values())
    (out, dx, kept), (lean_out, lean_dx, lean_kept) = results["swiglu"], results["lean_swiglu"]
    assert torch.equal(lean_out, out) and torch.equal(lean_dx, dx)
    assert lean_kept == x.numel() * x.element_size() and kept == lean_kept * 3 // 2


def kernel_tables():
    """Every backend kernel table that runs on CPU tensors (the NPU's is tested against a fake in test_npu)."""
    from tuneport.backends.cpu import CPUBackend
    from tuneport.backends.cuda import CUDA_KERNELS  # device-agnostic functions: SDPA and torch's fused RMSNorm

    return {"cpu": CPUBackend.kernels, "cuda": CUDA_KERNELS}


def kernel_inputs(kernel: str, qkv) -> list[tuple[tuple, dict]]:
    """Seeded inputs for one kernel, covering its options (causal, padding, KV cache, partial rotary)."""
    g = torch.Generator().manual_seed(4)
    q, k, v = qkv
    if kernel == "attention":
        padding = torch.tensor([[0, 1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1, 1]], dtype=torch.bool)[:, None, None, :]
        cases = [((q, k, v), dict(mask=mask, causal=causal))
                 for mask, causal in [(None, True), (padding, True), (padding, False), (None, False)]]
        return cases + [((q, k[:, :, :5], v[:, :, :5]), dict(causal=True))]
    x = torch.randn(2, 3, 4, 16, generator=g)
    if kernel == "rotary":
        angles = torch.rand(2, 3, 4, generator=g) * 6  # 8 of 16 channels rotate
        return [((x, angles.cos(), angles.sin()), {})]
    if kernel == "rotary_half":  # all 16 channels, then 8 of them; angles per batch row, then shared
        full, part = torch.rand(2, 3, 8, generator=g) * 6, torch.rand(1, 3, 4, generator=g) * 6
        full, part = torch.cat((full, full), -1), torch.cat((part, part), -1)
        return [((x, full.cos(), full.sin()), {}), ((x, part.cos(), part.sin()), {})]
    if kernel == "rms_norm":
        return [((x, torch.rand(16, generator=g) + 0.5, 1e-5), {})]
    if kernel == "packed_attention":
        return [(packed_inputs(), {})]
    return [((x,), {})]  # swiglu


KERNELS = ("attention", "packed_attention", "rotary", "rotary_half", "rms_norm", "swiglu")
# Only the kernels a table overrides: one that uses the reference itself has nothing to compare.
OVERRIDES = [(name, kernel) for name, table in sorted(kernel_tables().items())
             for kernel in KERNELS
             if getattr(table, kernel) is not getattr(ref, kernel)]


def test_each_table_overrides_something():
    assert {name for name, _ in OVERRIDES} == set(kernel_tables())


@pytest.mark.parametrize("name,kernel", OVERRIDES)
def test_backend_kernels_match_reference(name, kernel, qkv):
    fn = getattr(kernel_tables()[name], kernel)
    for args, kwargs in kernel_inputs(kernel, qkv):
        torch.testing.assert_close(fn(*args, **kwargs), getattr(ref, kernel)(*args, **kwargs), atol=1e-5, rtol=1e-5)


# Every registered device (a new backend is compared as soon as it is registered); each runs only where usable.
ON_DEVICE = [pytest.param(d, marks=pytest.mark.device(d)) for d in available_backends()]


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.bfloat16, 2e-2)], ids=["fp32", "bf16"])
@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("device", ON_DEVICE)
def test_kernels_on_the_device_match_the_cpu_reference(device, kernel, dtype, tol, qkv):
    """Hardware truth (`pytest -m device`): each kernel of the device's table, on the device, against the
    reference in float32 on the CPU, from the same inputs rounded to `dtype`. bf16 keeps 8 bits of
    mantissa, so 2e-2 is a few of its rounding steps at these magnitudes."""
    backend = get_backend(device)
    for args, kwargs in kernel_inputs(kernel, qkv):
        rounded = [a.to(dtype) if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args]
        on_device = [a.to(backend.device()) if isinstance(a, torch.Tensor) else a for a in rounded]
        moved = {k: v.to(backend.device()) if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}
        got = getattr(backend.kernels, kernel)(*on_device, **moved)
        expected = getattr(ref, kernel)(*[a.float() if isinstance(a, torch.Tensor) and a.is_floating_point()
                                          else a for a in rounded], **kwargs)
        torch.testing.assert_close(got.float().cpu(), expected, atol=tol, rtol=tol)


MAPPED_AFTER_A_LARGER_FREE = """
import ctypes, sys, torch
from tuneport.backends.cpu import CPUBackend, set_mmap_threshold
class Info(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks "
                                                "fordblks keepcost").split()]
mallinfo2 = ctypes.CDLL(None).mallinfo2
mallinfo2.restype = Info
if sys.argv[1] == "setup":
    CPUBackend().setup()
elif sys.argv[1] == "fixed":
    set_mmap_threshold(1 << 20)
big = torch.ones(8 << 20, dtype=torch.uint8)  # a mapped block, freed: glibc's own threshold rises to its size
del big
before = mallinfo2().hblkhd
activation = torch.ones(3 << 20, dtype=torch.uint8)
print("own mapping:", mallinfo2().hblkhd - before >= 3 << 20)
"""


def test_cpu_setup_leaves_glibcs_moving_threshold_and_a_fixed_one_maps_large_tensors():
    """glibc moves its mmap threshold up as mapped blocks are freed, so later activations land in the heap; a
    threshold fixed at 1 MiB (what tests and benches measuring resident memory set) gives a 3 MiB tensor its own
    mapping still. The CPU backend's setup leaves glibc's own, which measured faster (backends/cpu.py). Fresh
    processes, as the setting is process-wide."""
    import ctypes
    import subprocess
    import sys

    if not hasattr(ctypes.CDLL(None), "mallinfo2"):
        pytest.skip("glibc >= 2.33 only (mallinfo2 reads where blocks live)")
    seen = {}
    for mode in ("default", "setup", "fixed"):
        done = subprocess.run([sys.executable, "-c", MAPPED_AFTER_A_LARGER_FREE, mode], capture_output=True,
                              text=True, timeout=120)
        assert done.returncode == 0, done.stderr[-2000:]
        seen[mode] = done.stdout.split()[-1]
    assert seen == {"default": "False", "setup": "False", "fixed": "True"}


def test_cpu_backend_basics():
    backend = get_backend("cpu")
    caps = backend.capabilities
    assert caps.dist_backend == "gloo" and caps.bf16 and caps.device_count == 1
    assert backend.device() == torch.device("cpu")
    stats = backend.memory_stats()
    assert stats.peak >= stats.allocated > 0
    with backend.autocast(torch.bfloat16):
        assert F.linear(torch.randn(2, 2), torch.randn(2, 2)).dtype == torch.bfloat16
    assert backend.grad_scaler(torch.float32) is None


def test_unknown_backend_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown device .tpu.; expected one of: auto, cpu"):
        get_backend("tpu")
