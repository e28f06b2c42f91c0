"""Run folders as `tuneport console` shows them, read from the files the runs write and nothing else, so the
command line and the console cannot disagree.

A run's status:
- running: a process holds the folder's lock (its PID is in the lock file);
- otherwise what run.json's `outcome` says (written by the run's last process as it ended: finished, stopped
  by a signal after a checkpoint, diverged, failed with its one-line error), cleared when a resume starts;
- with no outcome (a run killed outright, or one of an earlier tuneport): finished when it has its adapter,
  stopped when it has a checkpoint to resume from, failed otherwise.
"""

from __future__ import annotations

import fcntl
import json
import math
import os
import shlex
from pathlib import Path
from typing import Optional

import yaml

from . import checkpoints
from .config import flatten
from .rundir import LOCK, MARKER, is_run_folder, read_json_object, read_marker

STATUSES = ("running", "finished", "stopped", "diverged", "failed")
METRICS = "metrics.jsonl"
EVAL_FOLDER, PARITY_FOLDER = "eval", "parity"  # where `tuneport eval` writes by default; `--out RUN/parity`
SKIPPED_FOLDERS = {"checkpoints", "adapter", "adapter.tmp", "base_model", ".base_model.tmp", "tensorboard", "reference",
                   EVAL_FOLDER, PARITY_FOLDER}


class RunNotFound(LookupError):
    """A run name that is not a run folder under the console's folder."""


def find_runs(root: Path, depth: int = 3) -> list[Path]:
    """Every run folder under `root` (itself included), down to `depth` folders, newest first; a run folder's own
    entries are not searched."""
    found, stack = [], [(root, 0)]
    while stack:
        folder, level = stack.pop()
        if is_run_folder(folder):
            found.append(folder)
            continue
        if level == depth:
            continue
        try:
            children = [c for c in folder.iterdir() if c.is_dir() and not c.is_symlink() and not c.name.startswith(".")]
        except OSError:
            continue
        stack.extend((c, level + 1) for c in children)
    return sorted(found, key=lambda f: _mtime(f / MARKER), reverse=True)


def run_folder(root: Path, name: str) -> Path:
    """The run folder `name` (a path relative to `root`), which must stay inside `root` after resolving `..` and
    links.

    Raises:
        RunNotFound: outside `root`, or not a run folder.
    """
    base = root.resolve()
    folder = (base / name).resolve()
    if not folder.is_relative_to(base) or not is_run_folder(folder):
        raise RunNotFound(f"{name}: no run folder of that name under {root}")
    return folder


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:
        return 0.0


def lock_holder(folder: Path) -> Optional[int]:
    """The PID of the process holding the run folder's lock, or None when no process holds it. Reads the kernel's
    table of locks (Linux), so it never takes the lock itself, even for an instant."""
    path = folder / LOCK
    try:
        st = path.stat()
        pid_text = path.read_text().strip()
    except OSError:
        return None
    pid = int(pid_text) if pid_text.isdigit() else 0
    try:
        table = Path("/proc/locks").read_text()
    except OSError:  # no table to read: try the lock, which a starting run could find taken for that instant
        return _try_lock(path, pid)
    key = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino} "
    held = any(line.split()[1] == "FLOCK" and key in line for line in table.splitlines() if len(line.split()) > 1)
    return pid if held else None


def _try_lock(path: Path, pid: int) -> Optional[int]:
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError:
        return pid
    finally:
        os.close(fd)
    return None


def last_record(folder: Path) -> dict:
    """The newest complete line of metrics.jsonl, or {}."""
    path = folder / METRICS
    try:
        with open(path, "rb") as f:
            f.seek(max(0, f.seek(0, os.SEEK_END) - 65536))
            lines = f.read().split(b"\n")[:-1]  # the last piece is a line still being written, or empty
    except OSError:
        return {}
    for line in reversed(lines):
        try:
            return json.loads(line)
        except ValueError:
            continue
    return {}


def read_metrics(folder: Path, offset: int = 0, inode: Optional[int] = None) -> tuple[list[dict], int, int, bool]:
    """The complete lines of metrics.jsonl from byte `offset` on, as records.

    A resume rewrites the file without the killed run's lines past its checkpoint (a new file, so a new inode):
    then every line is read again and `reset` is True.

    Returns:
        (records, the offset to ask for next, the file's inode, reset)
    """
    path = folder / METRICS
    try:
        with open(path, "rb") as f:
            now = os.fstat(f.fileno()).st_ino
            reset = inode is not None and now != inode or f.seek(0, os.SEEK_END) < offset
            start = 0 if reset else offset
            f.seek(start)
            data = f.read()
    except OSError:
        return [], 0, 0, offset > 0
    complete = data[:data.rfind(b"\n") + 1]
    records = []
    for line in complete.splitlines():
        try:
            records.append(json.loads(line))
        except ValueError:  # a line cut short by a crash, later dropped by the resume
            continue
    return records, start + len(complete), now, reset


def read_recipe(folder: Path) -> dict:
    try:
        found = yaml.safe_load((folder / "recipe.yaml").read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError):
        return {}
    return found if isinstance(found, dict) else {}


def status(folder: Path, record: Optional[dict] = None) -> dict:
    """{"status": one of STATUSES, "pid": the lock holder's or None, "message": why it ended, or ""}. `record`: the
    run's run.json when the caller has read it already."""
    pid = lock_holder(folder)
    if pid is not None:
        return {"status": "running", "pid": pid, "message": ""}
    outcome = (read_json_object(folder / "run.json") if record is None else record).get("outcome")
    if isinstance(outcome, dict) and outcome.get("status") in STATUSES:
        return {"status": outcome["status"], "pid": None, "message": str(outcome.get("message", ""))}
    if (folder / "adapter").is_dir():
        return {"status": "finished", "pid": None, "message": ""}
    if checkpoints.latest_checkpoint(folder / "checkpoints"):
        return {"status": "stopped", "pid": None, "message": "the run ended without recording why (killed?)"}
    return {"status": "failed", "pid": None, "message": "the run ended without a checkpoint or a recorded reason"}


def summary(root: Path, folder: Path, record: Optional[dict] = None) -> dict:
    """A run's line in the console's list: its name, status, what it trains and where, and its newest step."""
    recipe = read_recipe(folder)
    record = read_json_object(folder / "run.json") if record is None else record
    last = last_record(folder)
    method = recipe.get("method") if isinstance(recipe.get("method"), dict) else {}
    objective = recipe.get("objective") if isinstance(recipe.get("objective"), dict) else {}
    return {
        "name": folder.resolve().relative_to(root.resolve()).as_posix() or ".",
        **status(folder, record),
        "created": (read_marker(folder) or {}).get("created", ""),
        "model": recipe.get("model"), "method": method.get("name"), "objective": objective.get("name", "sft"),
        "device": record.get("device") or recipe.get("device"), "framework": recipe.get("framework"),
        "step": last.get("step"), "total_steps": record.get("total_steps"),
        "loss": last.get("loss"), "tokens_per_s": last.get("tokens_per_s"), "peak_memory": last.get("peak_memory"),
        "updated": _mtime(folder / METRICS) or _mtime(folder / MARKER),
    }


def details(root: Path, folder: Path) -> dict:
    """Everything a run's page shows but its curves: the summary, the recipe, the forgetting record, the resume
    history, the checkpoints, the command that resumes it, and its reports."""
    record = read_json_object(folder / "run.json")
    found = checkpoints.checkpoint_dirs(folder / "checkpoints")
    return {
        **summary(root, folder, record),
        "recipe": flatten(read_recipe(folder)),
        "baseline": record.get("baseline"), "forgetting": record.get("forgetting"),
        "resumes": record.get("resumes", []), "versions": record.get("versions", {}),
        "checkpoints": [{"step": step, "path": str(path)} for step, path in found],
        "resume_command": f"tuneport train --resume {shlex.quote(str(folder))}" if found else None,
        "adapter": str(folder / "adapter") if (folder / "adapter").is_dir() else None,
        "model_dir": record.get("model_dir"),
        "reports": reports(folder),
    }


def reports(folder: Path) -> dict:
    """The run's `tuneport eval` scores with its first predictions (eval/), and its `tuneport parity` report
    (parity/), where it has them."""
    found = {}
    scored = read_json_object(folder / EVAL_FOLDER / "eval.json")
    if scored:
        lines = []
        try:
            with open(folder / EVAL_FOLDER / "predictions.jsonl", encoding="utf-8") as f:
                lines = [json.loads(line) for _, line in zip(range(20), f)]
        except (OSError, ValueError):
            pass
        found["eval"] = {"metrics": scored.get("metrics", {}), "data": scored.get("data"), "predictions": lines}
    parity = read_json_object(folder / PARITY_FOLDER / "parity.json")
    if parity.get("report") == "parity":
        found["parity"] = {key: parity.get(key) for key in ("a", "b", "passed", "first_drift", "tolerance", "rows")}
        found["parity"]["plot"] = (folder / PARITY_FOLDER / "parity.png").is_file()
    return found


def compare(root: Path, folders: list[Path]) -> dict:
    """Runs side by side: each one's summary and final metrics, and the recipe keys whose values differ
    ({key: [value in each run]}; a key a run lacks is null)."""
    recipes = [flatten(read_recipe(f)) for f in folders]
    keys = sorted({k for r in recipes for k in r})
    differing = {k: [r.get(k) for r in recipes] for k in keys if len({json.dumps(r.get(k)) for r in recipes}) > 1}
    return {"runs": [{**summary(root, f), "final": _finite(last_record(f))} for f in folders], "differing": differing}


def _finite(record: dict) -> dict:
    return {k: v for k, v in record.items() if not (isinstance(v, float) and not math.isfinite(v))}
