"""tuneport never loses a user's files or work: it deletes only what it wrote, locks its run folder,
keeps a resume from changing what a run learns, saves on SIGINT/SIGTERM, stops a diverged run, and
turns bad input into one `error:` line (exit 2) that writes nothing.

Each test reproduces a failure found by trying tuneport as a user would (issue 8) and asserts the new
behaviour. Read-only and full file systems are real ones: a private mount namespace (`unshare`) holds a
read-only bind mount or a small tmpfs; those tests skip, saying why, where namespaces are not allowed.
"""

import hashlib
import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tuneport.models.chatglm3.builders import build_model_folder
from tuneport.core.cli import main
from tuneport.core.config import load_recipe, resolve_path
from tuneport.core.rundir import write_marker

DEMO = "builtin:demo.yaml"
QUICK = ("train.max_steps=4", "train.warmup_steps=0")

# Runs the CLI with a hook after optimizer step AT: "wait" (write READY, wait for READY.go), "fill" (take the
# free space of the file system that holds $FILL), or signals to send itself ("SIGINT", "SIGINT,SIGINT",
# "SIGTERM", "SIGKILL"). Usage: HOOK ACTION AT READY ARGS...
HOOK = """
import os, signal, sys, time
from pathlib import Path
from tuneport.core import cli, trainer
action, at, ready = sys.argv[1], int(sys.argv[2]), Path(sys.argv[3])
def hook(record):
    if record["step"] != at or os.environ.get("RANK", "0") != os.environ.get("HOOK_RANK", "0"):
        return
    if action == "wait":
        ready.write_text(str(os.getpid()))
        while not ready.with_suffix(".go").exists():
            time.sleep(0.05)
    elif action == "fill":
        try:
            with open(os.environ["FILL"], "ab", buffering=0) as f:
                while True:
                    f.write(bytes(4096))
        except OSError:
            pass
    else:
        for name in action.split(","):
            os.kill(os.getpid(), getattr(signal, name))
original = trainer.train
def train(*args, **kwargs):
    kwargs["on_step"] = hook
    return original(*args, **kwargs)
trainer.train = train
sys.exit(cli.main(sys.argv[4:]))
"""


def hooked(action: str, at: int, *args: str, ready: Path = Path("-"), wait: bool = True):
    command = [sys.executable, "-c", HOOK, action, str(at), str(ready), *args]
    alone = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE")}
    if not wait:
        return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=alone)
    return subprocess.run(command, capture_output=True, text=True, timeout=300, env=alone)


def snapshot(folder: Path) -> dict:
    """Every file under `folder` (relative path -> sha256), to show that nothing changed."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def error_line(err: str) -> str:
    """The one `error:` line a failed command printed (asserting there is exactly one, and no traceback)."""
    assert "Traceback" not in err, err[-3000:]
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, err[-3000:]
    return lines[0]


def user_project(root: Path) -> Path:
    """A user's project folder: data, notes and source code."""
    root.mkdir()
    shutil.copy(resolve_path("builtin:demo/data.jsonl"), root / "data.jsonl")
    (root / "notes.md").write_text("my notes\n")
    (root / "src").mkdir()
    (root / "src" / "prepare.py").write_text("print('mine')\n")
    return root


def adapter(out: Path) -> dict:
    return load_file(out / "adapter" / "adapter_model.safetensors")


# --- 1. tuneport deletes only what it wrote ---------------------------------------------------------------
def test_a_project_folder_as_output_dir_is_refused_untouched(tmp_path, capsys, monkeypatch):
    project = user_project(tmp_path / "project")
    before = snapshot(project)
    monkeypatch.chdir(project)
    assert main(["train", DEMO, "output_dir=.", "data.train=data.jsonl", *QUICK]) == 2
    assert "not a tuneport run folder" in error_line(capsys.readouterr().err)
    assert snapshot(project) == before and sorted(p.name for p in project.iterdir()) == ["data.jsonl", "notes.md",
                                                                                         "src"]


def test_a_failed_run_then_a_rerun_keep_the_users_data_file(tmp_path, capsys):
    """The user's data file lives in the output folder. The run with a bad override used to write
    recipe.yaml there and its rerun wiped the folder; now both are refused before writing anything."""
    out = tmp_path / "run"
    out.mkdir()
    shutil.copy(resolve_path("builtin:demo/data.jsonl"), out / "data.jsonl")
    before = snapshot(out)
    common = (f"output_dir={out}", f"data.train={out / 'data.jsonl'}", *QUICK)
    assert main(["train", DEMO, *common, "method.target_modules=[no_such_layer]"]) == 2
    error_line(capsys.readouterr().err)
    assert main(["train", DEMO, *common]) == 2
    assert "choose a new output_dir" in error_line(capsys.readouterr().err)
    assert snapshot(out) == before


def test_starting_afresh_removes_only_what_tuneport_wrote(tmp_path, capsys):
    """A run that fails after claiming its folder removes what it wrote there. A start killed outright
    (SIGKILL: nothing can be undone) leaves a run folder without progress, which is started afresh; a file the
    user put there survives, and so does the user's file in an earlier demo's folder when the demo runs again."""
    out = tmp_path / "run"
    assert main(["train", DEMO, f"output_dir={out}", *QUICK, "method.target_modules=[no_such_layer]"]) == 2
    assert "no_such_layer" in error_line(capsys.readouterr().err)
    assert not out.exists()
    out.mkdir()
    write_marker(out)  # what a start killed right after claiming its folder leaves
    (out / "recipe.yaml").write_text("model: demo\n")
    (out / "my_notes.txt").write_text("keep me\n")
    assert main(["train", DEMO, f"output_dir={out}", *QUICK]) == 0
    assert (out / "my_notes.txt").read_text() == "keep me\n" and (out / "adapter").is_dir()
    assert main(["demo", f"output_dir={out}", *QUICK]) == 0  # the demo starts its old folder afresh
    assert (out / "my_notes.txt").read_text() == "keep me\n"
    assert [r["step"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())] == [1, 2, 3, 4]


def test_a_run_with_progress_is_never_overwritten(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", DEMO, f"output_dir={out}", *QUICK]) == 0
    before = snapshot(out)
    assert main(["train", DEMO, f"output_dir={out}", *QUICK]) == 2
    assert f"--resume {out}" in error_line(capsys.readouterr().err)
    assert snapshot(out) == before


# --- 2. one run per folder ------------------------------------------------------------------------------
def test_a_second_run_into_a_running_folder_is_refused_and_the_first_completes(tmp_path, capsys):
    out, ready = tmp_path / "run", tmp_path / "ready"
    first = hooked("wait", 2, "train", DEMO, f"output_dir={out}", "train.max_steps=6", "save.every=3",
                   ready=ready, wait=False)
    deadline = time.time() + 120
    while not ready.exists() and time.time() < deadline and first.poll() is None:
        time.sleep(0.1)
    assert ready.exists(), first.communicate()[1][-3000:]
    pid = ready.read_text()
    before = snapshot(out)
    assert main(["train", DEMO, f"output_dir={out}", "train.max_steps=6"]) == 2  # no progress yet: was wiped before
    assert f"PID {pid}" in error_line(capsys.readouterr().err)
    assert main(["train", "--resume", str(out)]) == 2
    assert f"PID {pid}" in error_line(capsys.readouterr().err)
    assert snapshot(out) == before
    ready.with_suffix(".go").touch()
    _, err = first.communicate(timeout=300)
    assert first.returncode == 0, err[-3000:]
    steps = [r["step"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())]
    assert steps == [1, 2, 3, 4, 5, 6] and (out / "adapter" / "adapter_model.safetensors").is_file()


# --- 3. resume is a contract ------------------------------------------------------------------------------
@pytest.mark.parametrize("args,named", [
    (["method.r=4"], "method.r (16 -> 4)"),
    (["method.name=full"], "method.name"),
    (["train.lr=1e-4"], "train.lr"),
    (["data.train=builtin:demo/data.jsonl", "data.format=auto"], "data.format"),
    (["train.micro_batch_size=2"], "train.micro_batch_size"),
    (["--framework", "mindspore"], "framework"),
    (["output_dir=elsewhere"], "drop output_dir"),
    (["builtin:demo.yaml"], "drop builtin:demo.yaml"),
])
def test_a_refused_resume_writes_nothing_and_the_run_stays_resumable(tmp_path, capsys, args, named):
    out = tmp_path / "run"
    assert main(["train", DEMO, f"output_dir={out}", *QUICK, "save.every=2"]) == 0
    before = snapshot(out)
    recipe = [a for a in args if a.endswith(".yaml")]
    assert main(["train", *recipe, "--resume", str(out), *[a for a in args if a not in recipe]]) == 2
    assert named in error_line(capsys.readouterr().err)
    assert snapshot(out) == before
    assert main(["train", "--resume", str(out), "train.max_steps=5"]) == 0  # a longer run is allowed, and recorded
    run = json.loads((out / "run.json").read_text())
    assert run["resumes"][-1]["changed"] == {"train.max_steps": [4, 5]}
    assert load_recipe(out / "recipe.yaml").train.max_steps == 5


def test_resume_refuses_a_folder_tuneport_did_not_make(tmp_path, capsys):
    project = user_project(tmp_path / "project")
    shutil.copy(resolve_path(DEMO), project / "recipe.yaml")  # the user's own recipe.yaml
    before = snapshot(project)
    assert main(["train", "--resume", str(project)]) == 2
    assert "not a tuneport run folder" in error_line(capsys.readouterr().err)
    assert snapshot(project) == before


def test_resume_takes_the_folder_name_literally(tmp_path):
    """A folder name that YAML would cut short ("#" starts a comment) is resumed, not its prefix."""
    out = tmp_path / "exp #2"
    assert main(["train", DEMO, f"output_dir={out}", *QUICK, "save.every=2"]) == 0
    (tmp_path / "exp").mkdir()
    assert main(["train", "--resume", str(out), "train.max_steps=5"]) == 0
    assert not list((tmp_path / "exp").iterdir())
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 5


# --- 4. SIGINT and SIGTERM save; a second signal quits at once -------------------------------------------
@pytest.mark.parametrize("name,status", [("SIGINT", 130), ("SIGTERM", 143)])
def test_a_signal_saves_a_checkpoint_and_the_resume_is_bitwise_exact(tmp_path, name, status):
    common = ("train.max_steps=6", "save.every=100", "method.dropout=0.1")  # dropout: the RNG resumes too
    assert main(["train", DEMO, f"output_dir={tmp_path / 'straight'}", *common]) == 0
    out = tmp_path / "stopped"
    result = hooked(name, 3, "train", DEMO, f"output_dir={out}", *common)
    assert result.returncode == status, result.stderr[-3000:]
    assert f"continue with: tuneport train --resume {out}" in result.stderr
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step-3"] and not (out / "adapter").exists()
    assert main(["train", "--resume", str(out)]) == 0
    straight, resumed = adapter(tmp_path / "straight"), adapter(out)
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)
    losses = [[r["loss"] for r in map(json.loads, (d / "metrics.jsonl").read_text().splitlines())]
              for d in (tmp_path / "straight", out)]
    assert losses[0] == losses[1] and len(losses[0]) == 6


def test_a_signal_to_one_of_two_processes_stops_both_at_the_same_step(tmp_path):
    """torchrun, 2 gloo processes: SIGINT reaches rank 1 only; both save step 3 and the resume is exact."""
    run = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    common = ["train.max_steps=6", "save.every=100", "train.micro_batch_size=2", "method.dropout=0.1"]
    straight = subprocess.run([*run, "-m", "tuneport.core.cli", "train", DEMO, f"output_dir={tmp_path / 'straight'}",
                               *common], capture_output=True, text=True, timeout=600)
    assert straight.returncode == 0, straight.stderr[-3000:]
    out = tmp_path / "stopped"
    stopped = subprocess.run([*run, "--no-python", sys.executable, "-c", HOOK, "SIGINT", "2", "-", "train", DEMO,
                              f"output_dir={out}", *common], capture_output=True, text=True, timeout=600,
                             env={**os.environ, "HOOK_RANK": "1"})
    assert stopped.returncode != 0 and "stopped by SIGINT after step 3" in stopped.stderr, stopped.stderr[-3000:]
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step-3"]
    assert {p.name for p in (out / "checkpoints" / "step-3").glob("rng-rank*.pt")} == {"rng-rank0.pt", "rng-rank1.pt"}
    resumed = subprocess.run([*run, "-m", "tuneport.core.cli", "train", "--resume", str(out)],
                             capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    a, b = adapter(tmp_path / "straight"), adapter(out)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_second_sigint_quits_at_once_without_saving(tmp_path):
    out = tmp_path / "run"
    result = hooked("SIGINT,SIGINT", 3, "train", DEMO, f"output_dir={out}", "train.max_steps=6", "save.every=100")
    assert result.returncode == -signal.SIGINT, result.stderr[-3000:]  # the default action: ended by the signal
    assert not list(out.glob("checkpoints/step-*")) and (out / "metrics.jsonl").is_file()


def tensorboard_steps(folder: Path, tag: str) -> list[int]:
    """Steps of the scalar `tag` in a TensorBoard event folder (TFRecord framing, tensorboardX's protos)."""
    from tensorboardX.proto.event_pb2 import Event

    steps = []
    for file in folder.glob("events.out.tfevents.*"):
        data, at = file.read_bytes(), 0
        while at + 12 <= len(data):
            (length,) = struct.unpack("<Q", data[at:at + 8])
            event = Event.FromString(data[at + 12: at + 12 + length])
            at += 12 + length + 4
            steps += [event.step for value in event.summary.value if value.tag == tag]
    return sorted(steps)


def test_sigkill_loses_at_most_the_current_steps_tensorboard_events(tmp_path):
    out = tmp_path / "run"
    result = hooked("SIGKILL", 5, "train", DEMO, f"output_dir={out}", "train.max_steps=20", "save.every=100")
    assert result.returncode == -signal.SIGKILL
    assert tensorboard_steps(out / "tensorboard", "loss") == [1, 2, 3, 4, 5]


# --- 5. a diverged run stops, keeping the last good checkpoint -------------------------------------------
def test_a_diverging_run_exits_3_with_its_last_good_checkpoint_intact(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", DEMO, f"output_dir={out}", "train.lr=1e6", "train.warmup_steps=0", "save.every=1",
                 "save.keep_last=100", "train.max_steps=50"]) == 3
    line = error_line(capsys.readouterr().err)
    assert "diverged" in line and "train.lr" in line
    records = [json.loads(x, parse_constant=lambda c: pytest.fail(f"not strict JSON: {c}"))
               for x in (out / "metrics.jsonl").read_text().splitlines()]
    bad_step = records[-1]["step"] + 1  # the step that diverged was not logged ...
    assert f"step {bad_step}:" in line
    saved = sorted(int(p.name.split("-")[1]) for p in (out / "checkpoints").glob("step-*"))
    assert saved == list(range(1, bad_step))  # ... nor saved; every earlier step was, and is finite
    weights = load_file(out / "checkpoints" / f"step-{saved[-1]}" / "trainable.safetensors")
    assert all(torch.isfinite(w).all() for w in weights.values()) and not (out / "adapter").exists()
    assert str(out / "checkpoints" / f"step-{saved[-1]}") in line


@pytest.mark.parametrize("override,named", [
    ("train.lr=.nan", "train.lr: nan must be a finite number"),
    ("train.lr=.inf", "train.lr: inf must be a finite number"),
    ("train.seed=-5", "train.seed: -5 must be in [0, 2**32 - 1]"),
])
def test_impossible_numbers_in_a_recipe_are_one_line(tmp_path, capsys, override, named):
    assert main(["train", DEMO, f"output_dir={tmp_path / 'run'}", override]) == 2
    assert named in error_line(capsys.readouterr().err)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("override,line", [
    ("seed=-5", "error: command line: seed: unknown key; did you mean train.seed?"),
    ("train.sed=3", "error: command line: train.sed: unknown key; did you mean train.seed?"),
    ("method.lr=1e-4", "error: command line: method.lr: unknown key; did you mean train.lr?"),
])
def test_an_unknown_override_names_the_command_line_and_the_key_it_meant(tmp_path, capsys, override, line):
    """Suggestions come from every dotted key of a recipe, not only the keys beside the unknown one; the value
    came from the command line, so the command line is blamed, not the recipe file."""
    assert main(["train", DEMO, f"output_dir={tmp_path / 'run'}", override]) == 2
    assert error_line(capsys.readouterr().err) == line
    assert not (tmp_path / "run").exists()


def test_problems_from_the_file_and_the_command_line_each_name_their_source(tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(resolve_path(DEMO).read_text().replace("lr: ", "lr: -", 1))
    with pytest.raises(Exception) as caught:
        load_recipe(recipe, ("seed=3",))
    assert str(caught.value).splitlines() == [
        "2 problems:", "  command line: seed: unknown key; did you mean train.seed?",
        f"  {recipe}: train.lr: -0.003 must be > 0"]


@pytest.mark.parametrize("extra,says", [(("train.max_steps=2",), "train.max_steps=2 makes 2 steps, at or below the 4"),
                                         ((), "the run is complete (4 of 4 steps, adapter written)")],
                         ids=["shorter", "finished"])
def test_a_resume_with_nothing_left_to_train_is_refused_and_rewrites_nothing(tmp_path, capsys, extra, says):
    out = tmp_path / "run"
    assert main(["train", DEMO, f"output_dir={out}", *QUICK, "save.every=2"]) == 0
    before = snapshot(out)
    capsys.readouterr()
    assert main(["train", "--resume", str(out), *extra]) == 2
    line = error_line(capsys.readouterr().err)
    assert line.startswith(f"error: --resume {out}: {says}")
    assert line.endswith(f"To train longer: tuneport train --resume {out} train.max_steps=8")
    assert snapshot(out) == before  # recipe.yaml still says max_steps 4; run.json records no resume


# --- 6. one line, exit 2, nothing written ---------------------------------------------------------------
def in_namespace(script: str, *args: str) -> subprocess.CompletedProcess:
    """Run `script` (sh) as root of a private user and mount namespace, skipping where that is not allowed."""
    probe = subprocess.run(["unshare", "-Urm", "true"], capture_output=True)
    if probe.returncode != 0:
        pytest.skip(f"no private mount namespace here (unshare -Urm: {probe.stderr.decode().strip()})")
    return subprocess.run(["unshare", "-Urm", "sh", "-c", script, "sh", *args], capture_output=True, text=True,
                          timeout=300)


CLI = f"{sys.executable} -m tuneport.core.cli"


READ_ONLY = 'mount --bind "$1" "$1" && mount -o remount,bind,ro "$1" && '
TMPFS = 'mount -t tmpfs -o size={} tmpfs "$1" && '


def failed_write(setup: str, command: str, folder: Path) -> tuple[str, list[str]]:
    """Run `command` (CLI arguments, "$1" is `folder`) in a private namespace after `setup` mounted `folder`
    read-only or as a small tmpfs; returns (its one error line, what the file system holds afterwards)."""
    folder.mkdir(exist_ok=True)
    result = in_namespace(f'{setup}{CLI} {command}; status=$?; find "$1" -mindepth 1 | sort > "$1.left"; exit $status',
                          str(folder))
    assert result.returncode == 2, result.stderr[-3000:]
    left = Path(f"{folder}.left").read_text().split()
    return error_line(result.stderr), [str(Path(p).relative_to(folder)) for p in left]


NEW_RUN = "nothing of this run was kept; free disk space, or choose a writable output_dir=..."


def test_a_read_only_output_dir(tmp_path):
    ro = tmp_path / "ro"
    line, left = failed_write(READ_ONLY, f'train {DEMO} output_dir="$1/run" train.max_steps=2', ro)
    assert line == (f"error: output_dir {ro / 'run'}: cannot be written (Read-only file system); nothing was written; "
                    "free disk space, or choose a writable output_dir=...")
    assert left == []


def test_a_full_disk_at_the_demos_base_model_leaves_nothing(tmp_path):
    """The marker, recipe.yaml and run.json fit in 256 KiB; the demo's 2 MB base model does not."""
    disk = tmp_path / "disk"
    line, left = failed_write(TMPFS.format("256k"), f'train {DEMO} output_dir="$1/run" train.max_steps=2', disk)
    assert line == f"error: output_dir {disk / 'run'}: cannot be written (No space left on device); {NEW_RUN}"
    assert left == []  # no run folder, no .base_model.tmp


def test_a_full_disk_at_the_adapter_keeps_the_run_resumable(tmp_path):
    disk = tmp_path / "disk"
    disk.mkdir()
    hook = tmp_path / "hook.py"
    hook.write_text(HOOK)
    result = in_namespace(f'{TMPFS.format("8m")}FILL="$1/filler" {sys.executable} {hook} fill 4 - train {DEMO} '
                          f'output_dir="$1/run" {" ".join(QUICK)} save.every=0; status=$?; rm "$1/filler"; '
                          f'ls -A "$1/run" > "$1.left"; exit $status', str(disk))
    assert result.returncode == 2, result.stderr[-3000:]
    run = disk / "run"
    assert error_line(result.stderr) == (
        f"error: output_dir {run}: the tuned adapter could not be written (No space left on device); kept: no "
        f"checkpoint yet (a resume starts again from step 0); free disk space, then continue with: tuneport train "
        f"--resume {run}")
    assert "adapter.tmp" not in Path(f"{disk}.left").read_text().split()


def test_a_full_disk_at_a_resume_names_its_checkpoint(tmp_path):
    """The resume records itself in run.json (a new file, written atomically) before training continues."""
    disk = tmp_path / "disk"
    disk.mkdir()
    run = disk / "run"
    result = in_namespace(f'{TMPFS.format("8m")}{CLI} train {DEMO} output_dir="$1/run" {" ".join(QUICK)} save.every=2 '
                          f'&& (cat /dev/zero > "$1/filler" 2>/dev/null; true) && {CLI} train --resume "$1/run" '
                          f'train.max_steps=6; status=$?; find "$1/run" -name ".*.tmp" > "$1.left"; exit $status',
                          str(disk))
    assert result.returncode == 2, result.stderr[-3000:]
    assert error_line(result.stderr) == (
        f"error: output_dir {run}: cannot be written (No space left on device); kept: {run / 'checkpoints' / 'step-4'}; "
        f"free disk space, then continue with: tuneport train --resume {run}")
    assert Path(f"{disk}.left").read_text() == ""


@pytest.mark.parametrize("setup,reason", [(TMPFS.format("1m"), "No space left on device"),
                                          (READ_ONLY, "Read-only file system")], ids=["full", "read-only"])
def test_export_to_a_full_or_read_only_disk(golden, tmp_path, setup, reason):
    disk = tmp_path / "disk"
    line, left = failed_write(setup, f'export --model {golden / "checkpoint"} --out "$1/tuned"', disk)
    kept = "nothing was written there" if "tmpfs" in setup else "nothing was written"
    assert line == f"error: --out {disk / 'tuned'}: cannot be written ({reason}); {kept}; free disk space, or choose " \
                   "a writable --out"
    assert left == []


def test_convert_to_a_full_disk(golden, tmp_path):
    disk = tmp_path / "disk"
    line, left = failed_write(TMPFS.format("1m"), f'convert {golden / "checkpoint"} "$1/converted"', disk)
    assert line == f"error: {disk / 'converted'}: cannot be written (No space left on device); nothing was written " \
                   "there; free disk space, or choose a writable destination"
    assert left == []


def test_eval_into_a_read_only_folder_stops_before_generating(golden, tmp_path):
    from tuneport.core.metrics import MissingDependency, check_libraries

    try:
        check_libraries()
    except MissingDependency as e:
        pytest.skip(f"the eval extra is not installed ({e})")
    disk = tmp_path / "disk"
    data = tmp_path / "dev.jsonl"
    data.write_text(json.dumps({"content": "类型#裤", "summary": "宽松的裤子"}, ensure_ascii=False) + "\n")
    result = in_namespace(f'{READ_ONLY}{CLI} eval --model {golden / "checkpoint"} --data {data} --out "$1/eval" '
                          '--device cpu', str(disk.mkdir() or disk))
    assert result.returncode == 2, result.stderr[-3000:]
    assert error_line(result.stderr) == (f"error: --out {disk / 'eval'}: cannot be written (Read-only file system); "
                                         "nothing was written; free disk space, or choose a writable --out")
    assert "%|" not in result.stderr  # no progress bar: nothing was generated


def test_parity_into_a_read_only_folder_stops_before_either_side_runs(golden, tmp_path):
    disk = tmp_path / "disk"
    result = in_namespace(f'{READ_ONLY}{CLI} parity --model {golden / "checkpoint"} --a cpu --b cpu --dtype-b bf16 '
                          '--out "$1/parity"', str(disk.mkdir() or disk))
    assert result.returncode == 2, result.stderr[-3000:]
    assert error_line(result.stderr) == (f"error: --out {disk / 'parity'}: cannot be written (Read-only file "
                                         "system); nothing was written; free disk space, or choose a writable --out")
    assert "tuneport parity: A =" not in result.stdout


def test_estimate_checks_memory_before_estimating(capsys):
    assert main(["estimate", "builtin:demo.yaml", "--memory", "lots"]) == 2
    out, err = capsys.readouterr()
    assert error_line(err) == "error: --memory lots: not an amount of memory; write it like 24GiB, 80GB or 512MiB"
    assert out == ""  # nothing estimated first


def test_a_full_disk_keeps_the_older_checkpoints(tmp_path):
    disk = tmp_path / "disk"
    disk.mkdir()
    result = in_namespace(f'mount -t tmpfs -o size=6m tmpfs "$1" && {CLI} train {DEMO} output_dir="$1/run" '
                          f'train.max_steps=200 save.every=1 save.keep_last=1000 && exit 99; status=$?; '
                          f'cp -r "$1/run" "$1.copy"; exit $status', str(disk))
    assert result.returncode == 2, result.stderr[-3000:]
    line = error_line(result.stderr)
    assert "No space left on device" in line and "--resume" in line
    ckpts = tmp_path / "disk.copy" / "checkpoints"
    assert not list(ckpts.glob(".*.tmp"))  # the unfinished checkpoint was removed
    steps = sorted(int(p.name.split("-")[1]) for p in ckpts.glob("step-*"))
    assert steps and steps == list(range(1, len(steps) + 1))
    for step in steps:  # each is complete
        assert json.loads((ckpts / f"step-{step}" / "trainer_state.json").read_text())["step"] == step
        load_file(ckpts / f"step-{step}" / "trainable.safetensors")


def test_a_shard_index_pointing_outside_the_folder_is_refused_before_opening(golden, tmp_path, capsys):
    model = tmp_path / "model"
    shutil.copytree(golden / "checkpoint", model)
    index = json.loads((model / "model.safetensors.index.json").read_text())
    name = next(iter(index["weight_map"]))
    index["weight_map"][name] = "../../etc/passwd"
    (model / "model.safetensors.index.json").write_text(json.dumps(index))
    assert main(["train", DEMO, f"model={model}", "tokenizer=null", f"output_dir={tmp_path / 'run'}", *QUICK]) == 2
    assert "outside the checkpoint folder (../../etc/passwd)" in error_line(capsys.readouterr().err)
    assert not (tmp_path / "run").exists()


def test_a_tokenizer_larger_than_the_models_vocabulary(golden, tmp_path, capsys):
    build_model_folder("demo", tmp_path / "small")  # vocabulary of the demo tokenizer, padded to 64
    assert main(["train", DEMO, f"model={tmp_path / 'small'}", f"tokenizer={golden / 'checkpoint'}",
                 f"output_dir={tmp_path / 'run'}", *QUICK]) == 2
    line = error_line(capsys.readouterr().err)
    assert "the tokenizer has 64798 tokens" in line and "padded_vocab_size" in line
    assert not (tmp_path / "run").exists()


def test_a_damaged_checkpoint_is_reported_before_anything_is_written(golden, tmp_path, capsys):
    model = tmp_path / "model"
    shutil.copytree(golden / "checkpoint", model)
    shard = model / "model-00002-of-00002.safetensors"
    shard.write_bytes(shard.read_bytes()[:1000])
    assert main(["train", DEMO, f"model={model}", "tokenizer=null", f"output_dir={tmp_path / 'run'}", *QUICK]) == 2
    assert "model-00002-of-00002.safetensors: cannot be read" in error_line(capsys.readouterr().err)
    assert not (tmp_path / "run").exists()


def test_chat_max_new_tokens_must_be_positive(golden, capsys):
    assert main(["chat", "--model", str(golden / "checkpoint"), "--max-new-tokens", "-5", "--prompt", "hi"]) == 2
    assert "--max-new-tokens: -5 must be > 0" in error_line(capsys.readouterr().err)


def test_chat_with_an_adapter_of_another_base(golden, tmp_path, capsys):
    build_model_folder("demo", tmp_path / "demo_base")
    assert main(["chat", "--model", str(tmp_path / "demo_base"), "--adapter", str(golden / "lora_adapter"),
                 "--prompt", "hi", "--device", "cpu"]) == 2
    assert "does not fit the base model" in error_line(capsys.readouterr().err)


def test_chat_with_a_missing_adapter(golden, tmp_path, capsys):
    assert main(["chat", "--model", str(golden / "checkpoint"), "--adapter", str(tmp_path / "nope"),
                 "--prompt", "hi", "--device", "cpu"]) == 2
    assert f"--adapter {tmp_path / 'nope'}: no such folder" in error_line(capsys.readouterr().err)


def test_a_failed_convert_leaves_nothing_and_a_retry_works(golden, tmp_path, capsys):
    source = tmp_path / "bin"
    shutil.copytree(golden / "checkpoint", source,
                    ignore=shutil.ignore_patterns("*.safetensors", "model.safetensors.index.json"))
    good = (source / "pytorch_model-00002-of-00002.bin").read_bytes()
    (source / "pytorch_model-00002-of-00002.bin").write_bytes(good[:5000])
    destination = tmp_path / "converted"
    assert main(["convert", str(source), str(destination)]) == 2
    assert "pytorch_model-00002-of-00002.bin: cannot be read" in error_line(capsys.readouterr().err)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bin"]
    (source / "pytorch_model-00002-of-00002.bin").write_bytes(good)
    assert main(["convert", str(source), str(destination)]) == 0
    assert (destination / "model.safetensors.index.json").is_file()


# --- 7. a pickle that would run code ----------------------------------------------------------------------
class Planted:
    """Unpickled, this would run a shell command that writes `marker`."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def planted_bin_checkpoint(golden: Path, folder: Path, marker: Path) -> Path:
    """The golden checkpoint's pickle layout with its second shard replaced by a pickle that runs code."""
    shutil.copytree(golden / "checkpoint", folder,
                    ignore=shutil.ignore_patterns("*.safetensors", "model.safetensors.index.json"))
    shard = folder / "pytorch_model-00002-of-00002.bin"
    torch.save({"transformer.output_layer.weight": Planted(marker)}, shard)
    return shard


@pytest.mark.parametrize("command", ["train", "convert", "chat"])
def test_a_pickle_that_would_run_code_is_refused_in_one_line(golden, tmp_path, capsys, command):
    marker = tmp_path / "ran"
    shard = planted_bin_checkpoint(golden, tmp_path / "model", marker)
    args = {"train": ["train", DEMO, f"model={tmp_path / 'model'}", "tokenizer=null", f"output_dir={tmp_path / 'run'}"],
            "convert": ["convert", str(tmp_path / "model"), str(tmp_path / "converted")],
            "chat": ["chat", "--model", str(tmp_path / "model"), "--prompt", "hi", "--device", "cpu"]}[command]
    assert main(args) == 2
    err = capsys.readouterr().err
    line = error_line(err)
    assert line.startswith(f"error: {shard}: refused:") and "posix.system" in line
    assert "tuneport never unpickles code or objects" in line and "safetensors" in line and "trust" in line
    assert "weights_only" not in err and "damaged" not in line
    assert not marker.exists() and not (tmp_path / "run").exists() and not (tmp_path / "converted").exists()


def test_a_pickle_adapter_that_would_run_code_is_refused_in_one_line(golden, tmp_path, capsys):
    marker, adapter = tmp_path / "ran", tmp_path / "adapter"
    shutil.copytree(golden / "lora_adapter", adapter, ignore=shutil.ignore_patterns("*.safetensors"))
    torch.save({"base_model.model.x.lora_A.weight": Planted(marker)}, adapter / "adapter_model.bin")
    assert main(["chat", "--model", str(golden / "checkpoint"), "--adapter", str(adapter), "--prompt", "hi",
                 "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert error_line(err).startswith(f"error: {adapter / 'adapter_model.bin'}: refused: loading this pickle file "
                                      "would call posix.system;")
    assert "weights_only" not in err and not marker.exists()


def test_an_atomic_folder_appears_whole_or_not_at_all(tmp_path):
    """The one helper behind the adapter, exports, converted checkpoints and the demo's base model: a failure
    inside leaves the earlier folder as it was and no temporary folder; success replaces it in one rename."""
    from tuneport.core.checkpoints import atomic_folder

    final = tmp_path / "adapter"
    final.mkdir()
    (final / "weights").write_text("earlier")
    with pytest.raises(OSError):
        with atomic_folder(final) as tmp:
            (tmp / "weights").write_text("half")
            raise OSError(28, "No space left on device")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"] and (final / "weights").read_text() == "earlier"
    with atomic_folder(final, tmp_path / "adapter.tmp") as tmp:
        assert tmp == tmp_path / "adapter.tmp" and not any(tmp.iterdir())
        (tmp / "weights").write_text("new")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"] and (final / "weights").read_text() == "new"
