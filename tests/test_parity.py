"""`tuneport parity` on the CPU with the golden model: torch fp32 against MindSpore fp32 (every row within
1e-4) and against torch bf16 autocast (every row within the bf16 tolerance, and past fp32's, so bf16 really
ran); a broken rotary kernel caught at block 0 with exit 1; a reference saved by a second process giving
the same report as one process; the captured values themselves against the golden vectors; bad input,
exit 2 with one `error:` line."""

from __future__ import annotations

import importlib.util
import json
import math
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import peft  # noqa: F401  imported (with accelerate, which probes for torch_npu) before a fake torch_npu exists
import pytest
import torch
from safetensors.numpy import load_file

import tuneport.models.chatglm3  # noqa: F401  (transformers' generation utilities import accelerate too)

import tuneport.backends as backends
from tuneport.backends import get_backend, register_backend
from tuneport.backends.cpu import CPUBackend
from tuneport.backends.reference import REFERENCE_KERNELS, rotary
from tuneport.core import parity
from tuneport.core.cli import main

FORWARD = ["embedding", "layers.0", "layers.1", "final_norm", "logits", "loss"]  # the golden model has 2 blocks
CLI = [sys.executable, "-m", "tuneport.core.cli", "parity"]  # a second process


@pytest.fixture(scope="module")
def model(golden):
    return str(golden / "checkpoint")


def run_parity(out, *args) -> tuple[int, dict | None]:
    code = main(["parity", *args, "--out", str(out)])
    report = out / "parity.json"
    return code, json.loads(report.read_text()) if report.exists() else None


def rows_of(report: dict) -> dict:
    return {r["row"]: r for r in report["rows"]}


def one_error_line(capsys) -> str:
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, lines
    return lines[0]


def swapped_rotary(x, cos, sin):
    """Rotary with each interleaved pair swapped before rotating: a plausible port bug (the wrong channel of
    the pair read as the real part)."""
    rot = cos.shape[-1] * 2
    pairs = x[..., :rot].unflatten(-1, (-1, 2)).flip(-1).flatten(-2)
    return rotary(torch.cat((pairs, x[..., rot:]), dim=-1), cos, sin)


class BrokenBackend(CPUBackend):
    """The CPU with one wrong kernel, registered for this test only."""

    name = "broken"
    kernels = replace(REFERENCE_KERNELS, rotary=swapped_rotary)


@pytest.fixture
def fake_npu_kernels(monkeypatch):
    """The NPU backend's fused-kernel wrappers (backends/npu.py) over a FAKE torch_npu 910B whose ops run on
    CPU tensors (tests/fakes/torch_npu.py: no Ascend hardware here), as backend "npu-fake"; yields the fake."""
    spec = importlib.util.spec_from_file_location("tuneport_tests_fake_torch_npu_parity",
                                                  Path(__file__).parent / "fakes" / "torch_npu.py")
    fake = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, fake)  # under its own name, never as "torch_npu"
    spec.loader.exec_module(fake)
    mod = fake.install(monkeypatch, "910B")
    kernels = get_backend("npu").kernels

    class OnCPU(CPUBackend):
        name = "npu-fake"

    OnCPU.kernels = kernels
    register_backend("npu-fake", OnCPU)
    yield mod
    backends._BACKENDS.pop("npu-fake")


@pytest.fixture
def broken_backend():
    register_backend("broken", BrokenBackend)
    yield
    backends._BACKENDS.pop("broken")


@pytest.fixture(scope="module")
def reference(model, tmp_path_factory):
    """Side A (cpu torch fp32, seeded batch, synthetic LoRA) saved by a second process."""
    file = tmp_path_factory.mktemp("reference") / "a.safetensors"
    result = subprocess.run([*CLI, "--model", model, "--a", "cpu", "--save-reference",
                             str(file)], capture_output=True, text=True, cwd=file.parent, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert file.is_file() and not (file.parent / "parity").exists()  # side A only: no report
    return file


# --- the acceptance checks -------------------------------------------------------------------------------
@pytest.mark.parametrize("adapter", [None, "lora_adapter"])
def test_torch_and_mindspore_fp32_agree_on_the_golden_model(model, golden, tmp_path, adapter):
    pytest.importorskip("mindspore", reason="MindSpore is not installed (pip install 'tuneport[mindspore]')")
    extra = ["--adapter", str(golden / adapter)] if adapter else []
    code, report = run_parity(tmp_path / "out", "--model", model, "--a", "cpu", "--b", "cpu", "--framework-b",
                              "mindspore", *extra)
    assert code == 0 and report["passed"] and report["first_drift"] is None
    assert report["b"]["framework"] == "mindspore" and report["tolerance"]["dtype"] == "fp32"
    rows = rows_of(report)
    grads = [name for name in rows if name.startswith("grad:")]
    assert [name for name in rows if not name.startswith("grad:")] == FORWARD
    # the golden adapter trains query_key_value; the synthetic LoRA every linear layer: A and B of each, per block
    assert len(grads) == 2 * 2 * (1 if adapter else 4)
    assert all(r["tolerance"] == 1e-4 and r["error"] <= 1e-4 and r["pass"] for r in rows.values())
    assert any(r["error"] > 0 for r in rows.values())  # two implementations, not one compared with itself


def test_torch_and_mindspore_agree_on_the_dpo_loss_and_its_gradients(model, tmp_path):
    """--objective dpo: the seeded batch's two rows as one pair (chosen, rejected), DPO against the model without
    its (synthetic) LoRA; the rows show each row's log-probability instead of the logits."""
    pytest.importorskip("mindspore", reason="MindSpore is not installed (pip install 'tuneport[mindspore]')")
    code, report = run_parity(tmp_path / "out", "--model", model, "--a", "cpu", "--b", "cpu", "--framework-b",
                              "mindspore", "--objective", "dpo")
    assert code == 0 and report["passed"] and report["batch"]["objective"] == "dpo"
    rows = rows_of(report)
    assert [name for name in rows if not name.startswith("grad:")] == [*FORWARD[:-2], "logps", "loss"]
    assert sum(name.startswith("grad:") for name in rows) == 2 * 2 * 4
    assert all(r["error"] <= 1e-4 for r in rows.values()) and any(r["error"] > 0 for r in rows.values())


def test_bf16_autocast_rows_pass_at_the_bf16_tolerance(model, tmp_path):
    code, report = run_parity(tmp_path / "out", "--model", model, "--a", "cpu", "--b", "cpu", "--dtype-b", "bf16")
    assert report["tolerance"]["dtype"] == "bf16"
    rows = rows_of(report)
    assert code == 0 and report["passed"], [r for r in rows.values() if not r["pass"]]
    u = 2.0**-8
    assert rows["embedding"]["tolerance"] == pytest.approx(8 * u)
    assert rows["layers.0"]["tolerance"] == pytest.approx(8 * u * math.sqrt(2))
    assert rows["logits"]["tolerance"] == pytest.approx(8 * u * math.sqrt(3))
    assert rows["grad:transformer.encoder.layers.0.self_attention.query_key_value.lora_A.weight"]["tolerance"] == \
        pytest.approx(16 * u * math.sqrt(5))
    # bf16 really ran: every row but the (averaged) loss is off by more than fp32's tolerance
    assert all(r["error"] > 1e-4 for name, r in rows.items() if name != "loss")


def test_a_broken_kernel_is_caught_at_the_first_layer_that_uses_it(model, tmp_path, broken_backend, capsys):
    out = tmp_path / "out"
    code, report = run_parity(out, "--model", model, "--a", "cpu", "--b", "broken")
    assert code == 1 and not report["passed"]
    assert report["first_drift"] == {"row": "layers.0", "layer": 0, "direction": "forward"}
    rows = rows_of(report)
    assert rows["embedding"]["pass"]  # the embedding runs no rotary
    assert not rows["layers.0"]["pass"] and rows["layers.0"]["error"] > 1e-2
    stdout = capsys.readouterr().out
    assert "first drift: layers.0" in stdout and "FAIL" in stdout
    assert (out / "parity.png").read_bytes().startswith(b"\x89PNG")
    assert report["files"] == ["parity.json", "parity.png"]
    assert parity.output_problems(out) == []  # tuneport's own report may be replaced by the next run


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_npu_fused_kernels_on_a_fake_910b_agree_with_the_cpu(model, tmp_path, fake_npu_kernels, dtype):
    code, report = run_parity(tmp_path / "out", "--model", model, "--a", "cpu", "--b", "npu-fake", "--dtype", dtype)
    rows = rows_of(report)
    assert code == 0 and report["passed"], [r for r in rows.values() if not r["pass"]]
    calls = fake_npu_kernels.fake_state.calls
    # (the golden model's 8-wide heads are below npu_fusion_attention's constraints: attention falls back)
    assert min(calls[op] for op in ("npu_rms_norm", "npu_rotary_mul", "npu_swiglu")) > 0, calls
    assert rows["layers.0"]["error"] > 0  # the fused ops ran on side B only


def test_a_reference_from_another_process_gives_the_same_report(model, reference, tmp_path):
    one = run_parity(tmp_path / "one", "--model", model, "--a", "cpu", "--b", "cpu", "--dtype-b", "bf16")
    two = run_parity(tmp_path / "two", "--model", model, "--b", "cpu", "--dtype-b", "bf16", "--against",
                     str(reference))
    assert one[0] == two[0] == 0
    assert two[1].pop("reference") == {"file": str(reference)} and one[1].pop("reference") is None
    assert one[1] == two[1]


def test_captures_are_the_models_golden_values(model, golden, tmp_path):
    """What parity compares is what the model computes: side A saved, against the golden vectors."""
    file = tmp_path / "a.safetensors"
    assert main(["parity", "--model", model, "--a", "cpu", "--adapter", str(golden / "lora_adapter"),
                 "--batch", str(golden / "cases.safetensors"), "--save-reference", str(file)]) == 0
    saved = load_file(str(file))
    cases = load_file(str(golden / "cases.safetensors"))
    np.testing.assert_allclose(saved["row/logits"][..., :1024], cases["lora_logits_head"], atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(saved["row/loss"].reshape(1), cases["lora_loss"], atol=1e-4, rtol=1e-4)
    expected = load_file(str(golden / "lora_grads.safetensors"))
    grads = {k[len("row/grad:"):]: v for k, v in saved.items() if k.startswith("row/grad:")}
    assert sorted(grads) == sorted(k[len("grad.base_model.model."):] for k in expected)
    for name, value in grads.items():
        np.testing.assert_allclose(value, expected["grad.base_model.model." + name], atol=1e-4, rtol=1e-4)
    np.testing.assert_array_equal(saved["batch/input_ids"], cases["input_ids"])


# --- bad input ---------------------------------------------------------------------------------------------
def test_equal_sides_are_refused(model, tmp_path, capsys):
    code, report = run_parity(tmp_path / "out", "--model", model, "--a", "cpu", "--b", "CPU", "--dtype", "fp32")
    assert code == 2 and report is None and not (tmp_path / "out").exists()
    assert "both sides are cpu torch fp32" in one_error_line(capsys)


def test_a_reference_from_another_model_is_refused(model, golden, reference, tmp_path, capsys):
    other = tmp_path / "other"
    shutil.copytree(golden / "checkpoint", other, symlinks=True)
    config = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**config, "rope_ratio": 2.0}))
    code, report = run_parity(tmp_path / "out", "--model", str(other), "--b", "cpu", "--against", str(reference))
    assert code == 2 and report is None
    assert "made with another model" in one_error_line(capsys)


def test_bad_input_is_refused_before_anything_runs(model, golden, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "parity.png").write_bytes(b"my own figure")
    mine = tmp_path / "mine.safetensors"
    mine.write_bytes(b"my own file")
    clean = tmp_path / "clean"  # never made: every case stops before writing
    cases = [
        (out, ["--a", "cpu", "--b", "cpu", "--dtype-b", "bf16"], "did not write"),  # the user's parity.png
        (clean, ["--a", "cpu", "--save-reference", str(mine)], "is not a tuneport parity reference"),
        (clean, ["--a", "cpu", "--dtype-b", "bf16"], "--b: missing"),
        (clean, ["--b", "cpu", "--against", str(golden / "cases.safetensors")], "not a tuneport parity reference"),
        (clean, ["--a", "cpu", "--b", "cpu", "--against", str(mine)], "side A is the reference file's"),
        (clean, ["--a", "nowhere", "--b", "cpu"], "--a nowhere torch fp32"),
    ]
    for folder, args, message in cases:
        assert main(["parity", "--model", model, "--out", str(folder), *args]) == 2, args
        assert message in one_error_line(capsys), args
    assert not clean.exists()
    assert (out / "parity.png").read_bytes() == b"my own figure" and mine.read_bytes() == b"my own file"
    assert not (out / "parity.json").exists()


def test_importing_the_command_is_light():
    """core/cli.py imports this module for `tuneport --help`, which must not import a framework or numpy."""
    script = ("import sys, tuneport.core.parity; print(sorted({m.partition('.')[0] for m in sys.modules} & "
              "{'torch', 'numpy', 'mindspore', 'matplotlib', 'safetensors', 'transformers'}))")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stdout.strip() == "[]", result.stdout + result.stderr
