"""`tuneport doctor`: exit 0 for a usable device, 1 with what is missing and how to install it.

The expected answer comes from the backend registry on the machine the test runs on, so the same test
holds on a CPU-only machine, a GPU machine and an Ascend machine."""

import pytest
import torch

from tuneport.backends import BackendUnavailable, get_backend
from tuneport.core.cli import main


def usable(device: str) -> bool:
    try:
        get_backend(device)
        return True
    except BackendUnavailable:
        return False


def test_cpu_is_usable(capsys):
    assert main(["doctor", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    for expected in ("torch 2.", "transformers ", "peft ", "dist_backend: gloo", "CUDA_VISIBLE_DEVICES",
                     "result: cpu is usable"):
        assert expected in out


@pytest.mark.parametrize("device", ["cuda", "npu"])
def test_doctor_gives_this_machines_answer(device, capsys):
    code = main(["doctor", "--device", device])
    out = capsys.readouterr().out
    if usable(device):
        assert code == 0 and f"result: {device} is usable" in out
        return
    assert code == 1 and f"NOT USABLE: device {device}:" in out
    if device == "cuda" and torch.version.cuda is None:  # a CPU-only torch build: the fix is a CUDA wheel
        assert "pip install torch==" in out and "--index-url" in out
    if device == "npu":
        assert "version triple:" in out and ("torch-npu==" in out or "CANN" in out or "no NPU" in out)


@pytest.mark.parametrize("device", [pytest.param(d, marks=pytest.mark.device(d)) for d in ("cuda", "npu")])
def test_doctor_passes_on_the_hardware(device, capsys):
    """Hardware truth (`pytest -m device`): on a machine with the device, doctor says it is usable."""
    assert main(["doctor", "--device", device]) == 0


def test_doctor_nproc_starts_the_collective_of_a_job_of_n_processes(capsys, monkeypatch):
    assert main(["doctor", "--device", "cpu", "--nproc", "2"]) == 0
    out = capsys.readouterr().out
    assert "collective: gloo across 2 processes: ok (all-reduce of the ranks 1..2 = 3)" in out
    assert "result: cpu is usable for 2 processes" in out
    monkeypatch.setenv("GLOO_SOCKET_IFNAME", "no-such-interface0")  # gloo cannot start: the check says so
    assert main(["doctor", "--device", "cpu", "--nproc", "2"]) == 1
    out = capsys.readouterr().out
    assert "NOT USABLE: gloo across 2 processes failed (" in out and "Unable to find address" in out
    assert "set GLOO_SOCKET_IFNAME to the interface to use" in out
