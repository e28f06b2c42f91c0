"""Data parallelism on the CPU: torchrun with 2 gloo processes equals one process with the same global
batch (on packed rows: each process takes its rows of the global micro-batch), and DeepSpeed ZeRO-2 trains
the demo recipe and equals plain training."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tuneport.core.cli import main

DEMO = "builtin:demo.yaml"
# The official demo's scale of learning rate: Adam turns float-rounding differences of near-zero
# gradients into differences of order lr, which the demo's 3e-3 would magnify past 1e-5.
COMMON = ("train.max_steps=4", "train.lr=1e-4", "train.warmup_steps=0")


def adapter(out: Path) -> dict:
    return load_file(out / "adapter" / "adapter_model.safetensors")


def assert_same_adapter(a: Path, b: Path) -> None:
    wa, wb = adapter(a), adapter(b)
    assert wa.keys() == wb.keys()
    for name in wa:
        torch.testing.assert_close(wa[name], wb[name], atol=1e-5, rtol=1e-5, msg=name)


def test_torchrun_two_processes_equal_one_with_the_same_global_batch(tmp_path):
    assert main(["train", DEMO, f"output_dir={tmp_path / 'one'}", *COMMON, "train.micro_batch_size=4",
                 "save.every=0", "data.packing=true"]) == 0
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
              "-m", "tuneport.core.cli", "train", DEMO, f"output_dir={tmp_path / 'two'}", *COMMON,
              "train.micro_batch_size=2", "save.every=2", "data.packing=true"]
    result = subprocess.run(launch, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "x2: loss" in result.stdout  # one summary line, from rank 0 only
    assert_same_adapter(tmp_path / "one", tmp_path / "two")
    assert sorted(p.name for p in (tmp_path / "two" / "checkpoints").iterdir()) == ["step-2", "step-4"]
    assert {p.name for p in (tmp_path / "two" / "checkpoints" / "step-4").glob("rng-rank*.pt")} == {
        "rng-rank0.pt", "rng-rank1.pt"}


def test_deepspeed_zero2_trains_the_demo_like_plain_training(tmp_path):
    """One process under torchrun, launched the `--no-python tuneport` way."""
    pytest.importorskip("deepspeed", reason="DeepSpeed is in the dev extra; install tuneport[deepspeed]")
    assert main(["train", DEMO, f"output_dir={tmp_path / 'plain'}", *COMMON, "save.every=0"]) == 0
    tuneport = str(Path(sys.executable).parent / "tuneport")
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1", "--no-python",
              tuneport, "train", DEMO, f"output_dir={tmp_path / 'zero2'}", *COMMON, "save.every=2",
              "deepspeed=builtin:deepspeed/zero2.json"]
    extensions = tmp_path / "torch_extensions"  # where DeepSpeed would compile C++ ops (minutes on 2 cores)
    result = subprocess.run(launch, capture_output=True, text=True, timeout=600,
                            env={**os.environ, "TORCH_EXTENSIONS_DIR": str(extensions)})
    assert result.returncode == 0, result.stderr[-3000:]
    assert not extensions.exists() or not any(extensions.rglob("*.so")), "DeepSpeed compiled an extension"
    assert_same_adapter(tmp_path / "plain", tmp_path / "zero2")
    assert (tmp_path / "zero2" / "checkpoints" / "step-4" / "deepspeed" / "state").is_dir()


def test_deepspeed_without_a_launcher_says_how_to_launch(tmp_path, capsys):
    assert main(["train", DEMO, f"output_dir={tmp_path / 'x'}", "deepspeed=builtin:deepspeed/zero2.json"]) == 2
    assert "torchrun --standalone --nproc_per_node N" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_torchrun_resume_is_bitwise_exact(tmp_path):
    """2 processes: 4 steps straight equal 2 steps, then --resume to 4 (dropout on: every rank's RNG resumes)."""
    run = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "tuneport.core.cli", "train"]
    common = ["train.micro_batch_size=2", "save.every=2", "train.scheduler=constant", "method.dropout=0.1"]
    for out, steps in (("straight", 4), ("resumed", 2)):
        result = subprocess.run([*run, DEMO, f"output_dir={tmp_path / out}", f"train.max_steps={steps}", *common],
                                capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, result.stderr[-3000:]
    result = subprocess.run([*run, "--resume", str(tmp_path / "resumed"), "train.max_steps=4"],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    a, b = adapter(tmp_path / "straight"), adapter(tmp_path / "resumed")
    assert all(torch.equal(a[name], b[name]) for name in a)
