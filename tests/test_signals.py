"""SIGINT and SIGTERM at any moment of `tuneport train`'s start-up (core/signals.py): one line, exit status
128 + the signal, no traceback, no segfault, and no partial run folder; from the first step on, the
training loop's save-and-resume. The command runs as the console script runs it (core/entry.py), in a
process of its own with both signals at their default action."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ENTRY = [sys.executable, "-c", "import sys; from tuneport.core.entry import main; sys.exit(main())"]
NEVER_ENDS = ["train.max_steps=100000", "save.every=100000"]


def interrupt(out: Path, signum: int, delay: float = 0.0, after_claim: bool = False) -> tuple[int, str]:
    """Start the demo into `out`, send `signum` after `delay` seconds (or as soon as the run has claimed its
    folder), and return (exit status, stderr)."""
    process = subprocess.Popen([*ENTRY, "train", f"output_dir={out}", *NEVER_ENDS], stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, text=True)
    began = time.monotonic()
    if after_claim:
        while not (out / ".tuneport-run.json").exists() and process.poll() is None and time.monotonic() - began < 120:
            time.sleep(0.002)
    else:
        time.sleep(delay)
    process.send_signal(signum)
    _, err = process.communicate(timeout=300)
    return process.returncode, err


def check_clean(code: int, err: str, signum: int, out: Path) -> str:
    """The outcome every signal must have, wherever it lands; returns "start-up" or "training"."""
    assert code == 128 + signum, err
    for noise in ("Traceback", "Segmentation fault", "Exception ignored", "ImportError"):
        assert noise not in err, err
    last = err.strip().splitlines()[-1]
    if last.startswith("interrupted"):
        assert "nothing was written" in last
        assert not out.exists(), sorted(p.name for p in out.iterdir())  # nothing left: not even the folder
        return "start-up"
    name = signal.Signals(signum).name
    assert last.startswith(f"stopped by {name} after step ") and f"continue with: tuneport train --resume {out}" in last
    assert list((out / "checkpoints").glob("step-*"))
    return "training"


@pytest.mark.parametrize("signum,delays", [(signal.SIGINT, (0.2, 1.0, 2.5)), (signal.SIGTERM, (0.5,))],
                         ids=["SIGINT", "SIGTERM"])
def test_a_signal_at_any_delay_ends_the_start_cleanly(tmp_path, signum, delays):
    """Under a second the command is still importing (torch alone takes longer): that case must be the
    start-up one. Later delays may land in start-up or in training, depending on the machine; both are clean."""
    outcomes = []
    for delay in delays:
        out = tmp_path / f"run-{delay}"
        outcomes.append(check_clean(*interrupt(out, signum, delay), signum, out))
    assert outcomes[0] == "start-up"


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_signal_after_the_folder_is_claimed_removes_what_the_start_wrote(tmp_path, signum):
    """The marker is the start's first write; the base model and the model load follow. A signal then
    undoes the claim: the folder, which this start created, is gone again."""
    out = tmp_path / "run"
    assert check_clean(*interrupt(out, signum, after_claim=True), signum, out) == "start-up"


def test_a_signal_swallowed_during_start_up_still_ends_it(tmp_path):
    """A KeyboardInterrupt raised inside a destructor is lost (Python prints it and carries on); the guard
    remembers the signal and ends the start when training would begin, undoing what it wrote."""
    written = tmp_path / "written"
    code = (
        "import os, signal, sys\n"
        "from tuneport.core.signals import StartupGuard\n"
        "guard = StartupGuard().install()\n"
        f"guard.undo = lambda: os.remove({str(written)!r})\n"
        f"open({str(written)!r}, 'w').close()\n"
        "class Slow:\n"
        "    def __del__(self):\n"
        "        os.kill(os.getpid(), signal.SIGINT)\n"
        "Slow()\n"  # the interrupt is raised in __del__ and swallowed there
        "print('carried on', flush=True)\n"
        "guard.hand_over()\n"
        "print('trained')\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 130, result.stderr
    assert result.stdout.splitlines() == ["carried on"]
    assert result.stderr.strip().splitlines()[-1] == "interrupted; nothing was written"
    assert not written.exists()
