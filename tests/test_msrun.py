"""MindSpore across processes on the CPU: msrun starts 2 workers that join with MindSpore's communication API
(mccl collectives) and learn as one process with the same global batch does (the same losses, gradient norms
and adapter), resume bit for bit, print the run's summary from rank 0 only, and refuse in one line."""

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("mindspore", reason="MindSpore is not installed (pip install 'tuneport[mindspore]')")

from safetensors.numpy import load_file  # noqa: E402

from tuneport.core.cli import main  # noqa: E402
from tuneport.core.errors import RunError  # noqa: E402
from tuneport.frameworks.mindspore.distributed import msrun_job  # noqa: E402

BIN = Path(sys.executable).parent
MSRUN = shutil.which("msrun", path=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}")
needs_msrun = pytest.mark.skipif(MSRUN is None, reason="msrun (MindSpore's launcher, installed with mindspore) is "
                                                       "not on PATH")

REPO = Path(__file__).resolve().parents[1]
GOLDEN = REPO / "tests" / "golden" / "chatglm3" / "checkpoint"
# tests/test_sharded.py's settings (fp32, no dropout, the official demo's scale of learning rate, a checkpoint
# every 2 steps) on MindSpore, with a constant learning rate: a run of 2 steps resumed to 4 then takes the
# steps of a run of 4.
COMMON = (f"model={GOLDEN}", f"tokenizer={GOLDEN}", "data.train=builtin:demo/data.jsonl", "train.lr=1e-4",
          "train.warmup_steps=0", "train.scheduler=constant", "precision=fp32", "device=cpu", "method.dropout=0.0",
          "save.every=2", "data.group_by_length=false", "framework=mindspore")
SUMMARY = "trained 4 steps (mindspore) on cpu x2: loss"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def msrun(logs: Path, *args: str, expect: int = 0) -> subprocess.CompletedProcess:
    """`msrun ... python -m tuneport.core.cli ARGS` with 2 workers; msrun starts the `python` first on PATH."""
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
           "GLOG_v": "3"}  # MindSpore's own log: errors only, so that the workers' logs stay readable
    command = [MSRUN, "--worker_num", "2", "--local_worker_num", "2", "--master_port", str(free_port()),
               "--log_dir", str(logs), "--join", "True", "--cluster_time_out", "120",
               "python", "-m", "tuneport.core.cli", *args]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env)
    if (result.returncode == 0) != (expect == 0):
        tails = {p.name: p.read_text()[-2000:] for p in sorted(logs.glob("*.log"))}
        pytest.fail(f"msrun exited {result.returncode}: {result.stderr[-2000:]}\n{tails}")
    return result


def train_msrun(out: Path, steps: int) -> Path:
    msrun(out.parent / f"{out.name}-logs", "train", "builtin:demo.yaml", f"output_dir={out}", *COMMON,
          "train.micro_batch_size=2", f"train.max_steps={steps}")
    return out


def resumed(out: Path, straight: Path) -> Path:
    """The 4-step run as it stood had its workers been killed after the checkpoint of step 2 (a copy without
    what came after it), then --resume with the same 2 workers."""
    shutil.copytree(straight, out)
    for later in (out / "checkpoints" / "step-4", out / "adapter"):
        shutil.rmtree(later)
    msrun(out.parent / f"{out.name}-resume-logs", "train", "--resume", str(out))
    return out


def one_process(out: Path) -> Path:
    assert main(["train", "builtin:demo.yaml", f"output_dir={out}", *COMMON, "train.micro_batch_size=4",
                 "train.max_steps=4"]) == 0
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Runs made once, on demand, shared by the tests: name -> output folder."""
    root, made = tmp_path_factory.mktemp("msrun"), {}
    makers = {"one": one_process, "two": lambda out: train_msrun(out, 4),
              "resumed": lambda out: resumed(out, run("two"))}

    def run(name: str) -> Path:
        if name not in made:
            made[name] = makers[name](root / name)
        return made[name]

    return run


def records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def adapter(out: Path) -> dict:
    return load_file(str(out / "adapter" / "adapter_model.safetensors"))


@needs_msrun
def test_two_msrun_workers_learn_as_one_process_with_the_same_global_batch(runs):
    one, two = records(runs("one")), records(runs("two"))
    assert [r["step"] for r in two] == [1, 2, 3, 4]
    np.testing.assert_allclose([r["loss"] for r in two], [r["loss"] for r in one], atol=1e-5, rtol=0)
    # Adam takes nearly the same steps from half the gradient, so the norm is what shows they were summed
    # over the workers (not averaged, not left apart).
    np.testing.assert_allclose([r["grad_norm"] for r in two], [r["grad_norm"] for r in one], rtol=1e-5)
    assert [r["tokens"] for r in two] == [r["tokens"] for r in one]  # counted over both workers
    a, b = adapter(runs("one")), adapter(runs("two"))
    assert a.keys() == b.keys()
    assert max(np.abs(w).max() for w in a.values()) > 1e-4  # trained away from the start: the check can fail
    for name in a:
        np.testing.assert_allclose(b[name], a[name], atol=1e-5, rtol=0, err_msg=name)


@needs_msrun
def test_the_summary_comes_from_rank_0_and_checkpoints_record_both_workers(runs):
    out = runs("two")
    logs = out.parent / f"{out.name}-logs"
    assert (logs / "worker_0.log").read_text().count(SUMMARY) == 1
    assert SUMMARY not in (logs / "worker_1.log").read_text()
    assert SUMMARY not in (logs / "scheduler.log").read_text()  # it serves the job and trains nothing
    assert json.loads((out / "run.json").read_text())["world_size"] == 2
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-2", "step-4"]
    assert json.loads((out / "checkpoints" / "step-4" / "trainer_state.json").read_text())["world_size"] == 2


@needs_msrun
def test_an_msrun_resume_is_bit_exact(runs):
    straight, again = runs("two"), runs("resumed")
    assert records(again)[-1]["step"] == 4
    assert [r["loss"] for r in records(again)] == [r["loss"] for r in records(straight)]
    assert [r["grad_norm"] for r in records(again)] == [r["grad_norm"] for r in records(straight)]
    a, b = adapter(straight), adapter(again)
    assert a.keys() == b.keys()
    for name in a:
        np.testing.assert_array_equal(b[name], a[name], err_msg=name)
    resumes = json.loads((again / "run.json").read_text())["resumes"]
    assert [r["changed"] for r in resumes] == [{}]
    assert sorted(p.name for p in (again / "checkpoints").iterdir()) == ["step-2", "step-4"]


@needs_msrun
def test_a_refusal_under_msrun_is_one_line_from_each_process(tmp_path):
    out = tmp_path / "run"
    msrun(tmp_path / "logs", "train", "builtin:demo.yaml", f"output_dir={out}", "framework=mindspore",
          "train.strategy=fsdp", expect=1)
    for log in ("scheduler.log", "worker_0.log", "worker_1.log"):
        lines = (tmp_path / "logs" / log).read_text().strip().splitlines()
        assert lines == ["error: command line: train.strategy: fsdp is not a strategy of framework mindspore; "
                         "it has ddp"], (log, lines)
    assert not out.exists()


def test_several_processes_of_another_launcher_are_refused_with_the_msrun_command(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")  # as torchrun describes a job of 2 (nothing is started)
    out = tmp_path / "run"
    assert main(["train", "builtin:demo.yaml", f"output_dir={out}", "framework=mindspore"]) == 2
    err = capsys.readouterr().err
    assert "framework mindspore: several processes start with msrun: msrun --worker_num N" in err, err
    assert len(err.strip().splitlines()) == 1, err
    assert not out.exists()


@pytest.mark.parametrize("env, rank, world_size", [
    ({}, 0, 1),
    ({"MS_ROLE": "MS_WORKER", "RANK_ID": "1", "RANK_SIZE": "2"}, 1, 2),
    ({"MS_ROLE": "MS_SCHED", "RANK_ID": "0", "RANK_SIZE": "2"}, None, 2),  # the scheduler: no rank, writes nothing
])
def test_where_msrun_puts_a_process_before_it_joins(monkeypatch, env, rank, world_size):
    for name in ("MS_ROLE", "RANK_ID", "RANK_SIZE", "LOCAL_RANK", "WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    job = msrun_job()
    assert (job.rank, job.world_size) == (rank, world_size)


def test_a_worker_without_its_rank_is_refused(monkeypatch):
    monkeypatch.delenv("RANK_ID", raising=False)
    monkeypatch.setenv("MS_ROLE", "MS_WORKER")
    monkeypatch.setenv("MS_WORKER_NUM", "4")
    with pytest.raises(RunError, match="--node_rank"):
        msrun_job()


@needs_msrun
def test_doctor_nproc_starts_mindspores_collective_under_msrun(capsys, monkeypatch):
    monkeypatch.setenv("PATH", f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}")
    assert main(["doctor", "--framework", "mindspore", "--device", "cpu", "--nproc", "2"]) == 0
    out = capsys.readouterr().out
    assert "collective: mccl (MindSpore's) across 2 msrun workers: ok (all-reduce of the ranks 1..2 = 3)" in out
