"""The real Ascend NPU backend (backends/npu.py) run against a FAKE torch_npu (tests/fakes/torch_npu.py),
because no Ascend hardware or CANN exists here: selection, the three ways torch_npu can be unusable, setup,
capabilities and the precision policy per chip, every fused-kernel wrapper against the reference kernels
(fp32, atol = rtol = 1e-5), the fallbacks on a 910A, and the version table.

The fake's ops follow the torch_npu documentation and are written independently of backends/reference.py;
each kernel test also checks that the fused op really ran (or, on a 910A, really did not)."""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import tuneport.backends
from tuneport.backends import BackendUnavailable, get_backend
from tuneport.backends import npu as npu_backend
from tuneport.backends.npu import NPUBackend, compatibility, stack_versions, unavailable_reason
from tuneport.backends.reference import REFERENCE_KERNELS as ref
from tuneport.core.precision import PrecisionError, resolve_precision


FAKE_PATH = Path(__file__).parent / "fakes" / "torch_npu.py"


def _load_fake():
    spec = importlib.util.spec_from_file_location("tuneport_tests_fake_torch_npu", FAKE_PATH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # under its own name, never as "torch_npu" (install() does that per test)
    spec.loader.exec_module(module)
    return module


fake = _load_fake()
TORCH = torch.__version__.split("+")[0]
TOL = dict(atol=1e-5, rtol=1e-5)
CHIPS = ["910A", "910B"]


@pytest.fixture(params=CHIPS)
def chip(request):
    return request.param


@pytest.fixture
def installed(monkeypatch, chip):
    """(fake torch_npu, backend) for the chip."""
    mod = fake.install(monkeypatch, chip)
    return mod, get_backend("npu")


def randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


# ---- selection and the three unavailable cases -----------------------------------------------------


def test_selected_by_name(installed, chip):
    mod, backend = installed
    assert isinstance(backend, NPUBackend) and backend.name == "npu"
    assert unavailable_reason() is None
    assert get_backend("npu:1").name == "npu"


def test_importing_the_module_does_not_import_torch_npu(monkeypatch):
    monkeypatch.setitem(sys.modules, "torch_npu", None)  # any `import torch_npu` would now raise
    monkeypatch.delitem(sys.modules, "tuneport.backends.npu")
    monkeypatch.setattr(tuneport.backends, "npu", None)  # restored after the test, with sys.modules
    fresh = importlib.import_module("tuneport.backends.npu")
    assert fresh is not npu_backend and hasattr(fresh, "NPUBackend")


def test_torch_npu_not_installed(monkeypatch):
    monkeypatch.setitem(sys.modules, "torch_npu", None)
    with pytest.raises(BackendUnavailable) as e:
        get_backend("npu")
    msg = str(e.value)
    assert "torch_npu is not installed" in msg
    assert f"pip install torch=={TORCH} torch-npu=={TORCH}" in msg
    assert "same version as torch" in msg and "CANN" in msg
    assert unavailable_reason() == msg.removeprefix("device npu: ")


@pytest.mark.parametrize("error, shown", [
    ('ImportError("libhccl.so: cannot open shared object file: No such file or directory")',
     "ImportError: libhccl.so: cannot open shared object file"),
    ('OSError("libascendcl.so: cannot open shared object file")', "OSError: libascendcl.so"),
    ('ModuleNotFoundError("No module named \'decorator\'", name="decorator")', "No module named 'decorator'"),
])
def test_torch_npu_cannot_load(monkeypatch, tmp_path, error, shown):
    fake.install_unloadable(monkeypatch, tmp_path, error)
    with pytest.raises(BackendUnavailable) as e:
        get_backend("npu")
    msg = str(e.value)
    assert "installed but cannot be loaded" in msg and shown in msg
    assert "CANN" in msg and "source /usr/local/Ascend/ascend-toolkit/set_env.sh" in msg
    assert e.value.__cause__ is not None  # the original error stays attached


def test_no_device_visible(monkeypatch):
    fake.install(monkeypatch, "910B", device_count=0)
    monkeypatch.setenv("ASCEND_RT_VISIBLE_DEVICES", "")
    with pytest.raises(BackendUnavailable) as e:
        get_backend("npu")
    msg = str(e.value)
    assert "sees no NPU" in msg and "device_count 0" in msg
    assert "npu-smi info" in msg and "driver" in msg and "ASCEND_RT_VISIBLE_DEVICES (now '')" in msg


# ---- setup, capabilities, device methods -----------------------------------------------------------


def test_setup_sets_allocator_only_when_unset(installed, monkeypatch, caplog):
    mod, backend = installed
    monkeypatch.setenv("PYTORCH_NPU_ALLOC_CONF", "placeholder")
    monkeypatch.delenv("PYTORCH_NPU_ALLOC_CONF")  # registered, so the value setup() writes is undone too
    with caplog.at_level(logging.INFO, logger="tuneport.backends.npu"):
        backend.setup()
    assert mod.fake_state.compile_mode == {"jit_compile": False}
    assert os.environ["PYTORCH_NPU_ALLOC_CONF"] == "expandable_segments:True"
    assert "set PYTORCH_NPU_ALLOC_CONF=expandable_segments:True" in caplog.text
    assert "jit_compile=False" in caplog.text

    caplog.clear()
    monkeypatch.setenv("PYTORCH_NPU_ALLOC_CONF", "max_split_size_mb:128")
    with caplog.at_level(logging.INFO, logger="tuneport.backends.npu"):
        backend.setup()
    assert os.environ["PYTORCH_NPU_ALLOC_CONF"] == "max_split_size_mb:128"
    assert "left PYTORCH_NPU_ALLOC_CONF='max_split_size_mb:128'" in caplog.text


def test_capabilities(installed, chip):
    _, backend = installed
    caps = backend.capabilities
    assert caps.device_name == {"910A": "Ascend910A", "910B": "Ascend910B3"}[chip]
    assert caps.bf16 is (chip == "910B")
    assert caps.fp16 is True and caps.bnb_4bit is False
    assert (caps.device_count, caps.dist_backend, caps.visible_devices_env) == (1, "hccl", "ASCEND_RT_VISIBLE_DEVICES")
    assert caps.memory_total == fake.CHIPS[chip].memory


def test_precision_policy(installed, chip, caplog):
    _, backend = installed
    caps = backend.capabilities
    with caplog.at_level(logging.WARNING, logger="tuneport.core.precision"):
        plan = resolve_precision("auto", "npu", caps)
    if chip == "910B":
        assert (plan.compute, plan.loss_scaling) == ("bf16", False)
        assert resolve_precision("bf16", "npu", caps).compute == "bf16"
    else:
        assert (plan.compute, plan.loss_scaling) == ("fp16", True)
        assert "Ascend910A has no bf16" in caplog.text
        with pytest.raises(PrecisionError, match="bf16 is not supported on Ascend910A"):
            resolve_precision("bf16", "npu", caps)
    assert resolve_precision("fp16", "npu", caps).loss_scaling is True


def test_device_methods(installed):
    mod, backend = installed
    state = mod.fake_state
    backend.synchronize()
    assert state.synchronized == 1
    backend.manual_seed(1234)
    assert state.seed == 1234
    saved = backend.rng_state()
    first = torch.rand(3, generator=state.generator)
    backend.set_rng_state(saved)
    torch.testing.assert_close(torch.rand(3, generator=state.generator), first)
    backend.set_rng_state(None)
    stats = backend.memory_stats()
    assert (stats.allocated, stats.reserved, stats.peak) == (state.allocated, state.reserved, state.peak)
    backend.reset_peak_memory()
    backend.empty_cache()
    after = backend.memory_stats()
    assert after.peak == after.allocated == after.reserved


DEVICE_AND_AUTOCAST = f"""
import importlib.util, sys, torch
spec = importlib.util.spec_from_file_location("fake_torch_npu", {str(FAKE_PATH)!r})
fake = importlib.util.module_from_spec(spec); sys.modules[spec.name] = fake; spec.loader.exec_module(fake)
fake.install_for_process("910B")
from tuneport.backends import get_backend
backend = get_backend("npu")
assert backend.device(1) == torch.device("npu", 1), backend.device(1)
with backend.autocast(torch.float32):
    assert not torch.is_autocast_enabled("npu")
with backend.autocast(torch.bfloat16):
    assert torch.is_autocast_enabled("npu") and torch.get_autocast_dtype("npu") == torch.bfloat16
print("ok")
"""


def test_device_and_autocast_in_a_child_process(tmp_path):
    # torch.device("npu") and torch.autocast("npu") need torch's PrivateUse1 backend renamed to "npu", which
    # cannot be undone in this process, so they run in a child.
    result = subprocess.run([sys.executable, "-c", DEVICE_AND_AUTOCAST], cwd=tmp_path, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr


def test_autocast_and_grad_scaler(installed, monkeypatch):
    _, backend = installed
    assert isinstance(backend.autocast(torch.float32), contextlib.nullcontext)
    assert backend.grad_scaler(torch.bfloat16) is None and backend.grad_scaler(torch.float32) is None
    assert isinstance(backend.grad_scaler(torch.float16), torch.amp.GradScaler)

    def no_device_arg(*args, **kwargs):  # a torch_npu whose torch.amp.GradScaler does not take "npu"
        raise RuntimeError("GradScaler: unsupported device 'npu'")

    fallback = torch.npu.amp.GradScaler
    monkeypatch.setattr(torch.amp, "GradScaler", no_device_arg)
    assert isinstance(backend.grad_scaler(torch.float16), fallback)


# ---- fused kernels against the reference ------------------------------------------------------------


def test_rms_norm(installed):
    mod, backend = installed
    x, w = randn(2, 5, 64, seed=1), randn(64, seed=2).abs() + 0.5
    torch.testing.assert_close(backend.kernels.rms_norm(x, w, 1e-5), ref.rms_norm(x, w, 1e-5), **TOL)
    assert mod.fake_state.calls["npu_rms_norm"] == 1
    xb = x.bfloat16()  # computed in float32, returned in x's dtype, like the reference
    out = backend.kernels.rms_norm(xb, w, 1e-5)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out, ref.rms_norm(xb, w, 1e-5))


def rotary_inputs(batch, seq, heads, dim, rot, cos_batch, seed=3):
    x = randn(batch, seq, heads, dim, seed=seed)
    angles = randn(cos_batch, seq, rot // 2, seed=seed + 1) * 3
    return x, angles.cos(), angles.sin()


@pytest.mark.parametrize("cos_batch", [1, 2])
def test_rotary_partial_head(installed, chip, cos_batch, caplog):
    mod, backend = installed
    x, cos, sin = rotary_inputs(2, 6, 4, 32, rot=16, cos_batch=cos_batch)  # rot < head_dim: half passes
    with caplog.at_level(logging.INFO, logger="tuneport.backends.npu"):
        out = backend.kernels.rotary(x, cos, sin)
    torch.testing.assert_close(out, ref.rotary(x, cos, sin), **TOL)
    # On a 910B the first call probes (1 call) and then runs (1 call); on a 910A the probe fails once.
    if chip == "910B":
        assert mod.fake_state.calls["npu_rotary_mul"] == 2
        assert "npu_rotary_mul(rotary_mode='interleave') in use" in caplog.text
    else:
        assert mod.fake_state.calls["npu_rotary_mul"] == 1 and "using the eager rotary kernel" in caplog.text
    backend.kernels.rotary(x, cos, sin)
    assert mod.fake_state.calls["npu_rotary_mul"] == (3 if chip == "910B" else 1)  # decided once


def test_rotary_full_head_and_constraints(monkeypatch):
    mod = fake.install(monkeypatch, "910B")
    kernels = get_backend("npu").kernels
    x, cos, sin = rotary_inputs(1, 3, 2, 16, rot=16, cos_batch=1)
    torch.testing.assert_close(kernels.rotary(x, cos, sin), ref.rotary(x, cos, sin), **TOL)
    used = mod.fake_state.calls["npu_rotary_mul"]
    x, cos, sin = rotary_inputs(1, 2, 1000, 8, rot=8, cos_batch=1)  # B * N >= 1000: outside the op's range
    torch.testing.assert_close(kernels.rotary(x, cos, sin), ref.rotary(x, cos, sin), **TOL)
    assert mod.fake_state.calls["npu_rotary_mul"] == used


def test_rotary_on_torch_npu_without_rotary_mode(monkeypatch, caplog):
    fake.install(monkeypatch, "910B", rotary_mode_arg=False)
    kernels = get_backend("npu").kernels
    x, cos, sin = rotary_inputs(2, 4, 2, 32, rot=16, cos_batch=1)
    with caplog.at_level(logging.WARNING, logger="tuneport.backends.npu"):
        torch.testing.assert_close(kernels.rotary(x, cos, sin), ref.rotary(x, cos, sin), **TOL)
        kernels.rotary(x, cos, sin)
    assert "TypeError" in caplog.text and caplog.text.count("using the eager rotary kernel") == 1


@pytest.mark.parametrize("dim, rot, cos_batch", [(16, 16, 1), (32, 16, 2), (128, 128, 1)])
def test_rotary_half(installed, chip, dim, rot, cos_batch):
    mod, backend = installed
    x = randn(2, 5, 3, dim, seed=50)
    angles = randn(cos_batch, 5, rot // 2, seed=51) * 3
    angles = torch.cat((angles, angles), dim=-1)  # transformers' layout: each half the same angles
    out = backend.kernels.rotary_half(x, angles.cos(), angles.sin())
    torch.testing.assert_close(out, ref.rotary_half(x, angles.cos(), angles.sin()), **TOL)
    # half mode on every chip, no probe; before Atlas A2 only for a multiple of 128 channels (the reference else)
    fused = chip == "910B" or rot % 128 == 0
    assert mod.fake_state.calls["npu_rotary_mul"] == (1 if fused else 0)


def test_rotary_half_on_torch_npu_without_rotary_mode(monkeypatch):
    mod = fake.install(monkeypatch, "910B", rotary_mode_arg=False)  # half is the old releases' only mode
    x, angles = randn(1, 4, 2, 16, seed=52), randn(1, 4, 16, seed=53)
    out = get_backend("npu").kernels.rotary_half(x, angles.cos(), angles.sin())
    torch.testing.assert_close(out, ref.rotary_half(x, angles.cos(), angles.sin()), **TOL)
    assert mod.fake_state.calls["npu_rotary_mul"] == 1


@pytest.fixture
def qkv():
    q = randn(2, 4, 5, 16, seed=10)  # 4 query heads
    k = randn(2, 2, 7, 16, seed=11)  # 2 KV heads; 2 cached keys before the 5 new ones (S < T)
    v = randn(2, 2, 7, 16, seed=12)
    return q, k, v


PADDING = torch.tensor([[0, 0, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1, 1]], dtype=torch.bool)[:, None, None, :]
ATTENTION_CASES = {
    "no mask": dict(),
    "causal with cache": dict(causal=True),
    "padding": dict(mask=PADDING),
    "padding and causal": dict(mask=PADDING, causal=True),
    "per-head mask": dict(mask=randn(2, 4, 5, 7, seed=13) > 0),
    "2-D mask": dict(mask=torch.tensor([j % 3 != 0 for j in range(7)]).expand(5, 7)),
    "rows with no key": dict(mask=torch.tensor([[0, 0, 0, 1, 1, 1, 1]], dtype=torch.bool), causal=True),
}


@pytest.mark.parametrize("case", ATTENTION_CASES)
def test_attention(installed, chip, qkv, case):
    mod, backend = installed
    q, k, v = qkv
    kwargs = ATTENTION_CASES[case]
    out = backend.kernels.attention(q, k, v, **kwargs)
    torch.testing.assert_close(out, ref.attention(q, k, v, **kwargs), **TOL)
    assert out.shape == q.shape and out.dtype == q.dtype
    # 910B: the fused op ran. 910A: it must not have (the fake's op raises there, as the real one does).
    assert mod.fake_state.calls["npu_fusion_attention"] == (1 if chip == "910B" else 0)


def test_attention_without_kv_cache_and_outside_constraints(monkeypatch):
    mod = fake.install(monkeypatch, "910B")
    kernels = get_backend("npu").kernels
    q, k, v = randn(1, 4, 6, 32, seed=20), randn(1, 1, 6, 32, seed=21), randn(1, 1, 6, 32, seed=22)
    torch.testing.assert_close(kernels.attention(q, k, v, causal=True), ref.attention(q, k, v, causal=True), **TOL)
    assert mod.fake_state.calls["npu_fusion_attention"] == 1
    q, k, v = randn(1, 4, 6, 8, seed=23), randn(1, 2, 6, 8, seed=24), randn(1, 2, 6, 8, seed=25)  # D=8
    torch.testing.assert_close(kernels.attention(q, k, v, causal=True), ref.attention(q, k, v, causal=True), **TOL)
    assert mod.fake_state.calls["npu_fusion_attention"] == 1  # D not a multiple of 16: the reference ran


def test_packed_attention_runs_the_variable_length_layout(installed, chip):
    """Packed rows through npu_fusion_attention's TND layout (sparse_mode 3, the compressed causal mask, the
    samples' ends as host lists: the fake checks all three) on 910B; the reference on 910A."""
    mod, backend = installed
    q, k, v = randn(2, 4, 6, 16, seed=14), randn(2, 2, 6, 16, seed=15), randn(2, 2, 6, 16, seed=16)
    cu = torch.tensor([0, 2, 6, 9, 10, 12], dtype=torch.int32)  # rows of 6: samples of 2, 4 | 3, 1, 2
    out = backend.kernels.packed_attention(q, k, v, cu)
    torch.testing.assert_close(out, ref.packed_attention(q, k, v, cu), **TOL)
    assert out.shape == q.shape and out.dtype == q.dtype
    assert mod.fake_state.calls["npu_fusion_attention TND"] == (1 if chip == "910B" else 0)


def test_swiglu(installed, chip):
    mod, backend = installed
    x = randn(3, 4, 64, seed=30)
    torch.testing.assert_close(backend.kernels.swiglu(x), ref.swiglu(x), **TOL)
    x_strided = randn(3, 64, 4, seed=31).transpose(1, 2)  # not contiguous: the wrapper makes it so
    torch.testing.assert_close(backend.kernels.swiglu(x_strided), ref.swiglu(x_strided), **TOL)
    assert mod.fake_state.calls["npu_swiglu"] == (2 if chip == "910B" else 0)


def test_fused_kernels_backpropagate(monkeypatch):
    fake.install(monkeypatch, "910B")
    kernels = get_backend("npu").kernels
    q, k, v = (randn(1, 2, 4, 16, seed=s).requires_grad_() for s in (40, 41, 42))
    kernels.attention(q, k, v, mask=PADDING[:1, ..., :4], causal=True).sum().backward()
    assert all(t.grad is not None and torch.isfinite(t.grad).all() for t in (q, k, v))


# ---- versions --------------------------------------------------------------------------------------


def test_stack_versions_from_torch_npu(monkeypatch):
    fake.install(monkeypatch, "910B", version="2.1.0.post12", cann="8.1.RC1")
    assert stack_versions() == {"torch": torch.__version__, "torch_npu": "2.1.0.post12", "cann": "8.1.RC1"}


def test_stack_versions_from_toolkit_files(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "torch_npu", None)
    monkeypatch.setattr(npu_backend, "CANN_VERSION_CFG", tmp_path / "absent.cfg")
    monkeypatch.delenv("ASCEND_TOOLKIT_HOME", raising=False)
    assert stack_versions() == {"torch": torch.__version__, "torch_npu": None, "cann": None}
    (tmp_path / "version.cfg").write_text(
        "runtime_running_version=[7.3.0.1.231:8.0.RC2]\ntoolkit_running_version=[7.3.0.1.231:8.0.RC2]\n")
    monkeypatch.setenv("ASCEND_TOOLKIT_HOME", str(tmp_path))
    assert stack_versions()["cann"] == "8.0.RC2"


@pytest.mark.parametrize("triple, ok, verdict", [
    (("2.1.0", "2.1.0.post12", "8.1.RC1"), True, "known-good"),
    (("2.1.0+cpu", "2.1.0.post6", "8.0.RC2.beta1"), True, "known-good"),  # community build of 8.0.RC2
    (("2.6.0", "2.6.0.post5", "CANN 8.5.0"), True, "known-good"),
    (("2.5.1", "2.4.0.post4", "8.1.RC1"), False, "known-bad"),  # torch_npu built for another torch
    (("2.13.0", "2.12.0", None), False, "known-bad"),
    (("2.1.0", "2.1.0.post12", "8.0.RC1"), False, "unknown"),  # the table pairs it with 8.1.RC1
    (("2.13.0", "2.13.0", "9.0.0"), False, "unknown"),  # not in the table kept here
    (("2.1.0", "2.1.0.post12", None), False, "unknown"),
    (("2.1.0", None, None), False, "unknown"),
])
def test_compatibility(triple, ok, verdict):
    good, message = compatibility(*triple)
    assert good is ok and message.startswith(verdict + ":"), message
    if verdict == "known-bad":
        assert "same version as torch" in message
    if triple == ("2.1.0", "2.1.0.post12", "8.0.RC1"):
        assert "CANN 8.1.RC1" in message
