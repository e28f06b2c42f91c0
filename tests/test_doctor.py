"""`tuneport doctor`: exit 0 for a usable device, 1 with what is missing and how to install it."""

from tuneport.core.cli import main


def test_cpu_is_usable(capsys):
    assert main(["doctor", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    for expected in ("torch 2.", "transformers ", "peft ", "dist_backend: gloo", "CUDA_VISIBLE_DEVICES",
                     "result: cpu is usable"):
        assert expected in out


def test_cuda_is_not_usable_here_and_says_how_to_fix(capsys):
    assert main(["doctor", "--device", "cuda"]) == 1
    out = capsys.readouterr().out
    assert "NOT USABLE: device cuda:" in out and "pip install torch==" in out and "--index-url" in out


def test_npu_is_not_usable_here_and_says_how_to_fix(capsys):
    assert main(["doctor", "--device", "npu"]) == 1
    out = capsys.readouterr().out
    assert "NOT USABLE: device npu: torch_npu is not installed" in out
    assert "torch-npu==" in out and "CANN" in out and "version triple:" in out
