"""SIGINT and SIGTERM from the first line of the `tuneport` command until training starts.

Python's own SIGINT handler raises KeyboardInterrupt wherever the main thread is. Inside an import that
can leave a C extension half-initialised (torch then segfaults at exit, or a later import fails with a
long traceback), and inside a destructor the exception is swallowed and the run carries on. The start-up
guard replaces that handler before anything heavy is imported:

- a signal inside an import ends the process at once (`os._exit`, nothing unwinds half-built modules);
- anywhere else it raises `Interrupted` (a KeyboardInterrupt), so `finally` blocks remove what they were
  writing, and the CLI prints one line;
- either way the command's `undo` runs first (a new run removes the folder it claimed), and the process
  exits with 128 + the signal's number (130 for SIGINT, 143 for SIGTERM).

When training starts, `hand_over` leaves signals to the training loop's save-and-resume handler; a signal
that arrived but was swallowed ends the start there. This module imports only the standard library, so
that the entry point can install the guard before anything else.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from typing import Callable, Optional

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Interrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM arrived while a command was starting or running outside the training loop."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _importing(frame) -> bool:
    """Whether the interrupted code runs inside an import (module initialisation)."""
    while frame is not None:
        if frame.f_code.co_filename.startswith("<frozen importlib"):
            return True
        frame = frame.f_back
    return False


class StartupGuard:
    """What SIGINT and SIGTERM do while a command starts. Inert until `install` (tests that call the CLI
    in-process keep pytest's handlers); `message` and `undo` are the running command's."""

    def __init__(self):
        self.message = "interrupted; nothing was written"
        self.undo: Optional[Callable[[], None]] = None  # removes what the command wrote so far
        self.signum: Optional[int] = None
        self.started = False  # training has started: its own handler saves a checkpoint on a signal

    def install(self) -> "StartupGuard":
        """Handle SIGINT and SIGTERM from now on (those the parent left at their default; an ignored
        signal stays ignored, as for any Python program started in the background)."""
        if threading.current_thread() is threading.main_thread():
            for s in SIGNALS:
                if signal.getsignal(s) is not signal.SIG_IGN:
                    signal.signal(s, self._handle)
        return self

    def _handle(self, signum: int, frame) -> None:
        self.signum = self.signum or signum
        if _importing(frame):
            self.exit(signum)
        raise Interrupted(signum)

    def run_undo(self) -> None:
        """Remove what the command wrote so far (once; a failure here must not hide the interruption)."""
        undo, self.undo = self.undo, None
        if undo is not None:
            try:
                undo()
            except Exception:  # noqa: BLE001 - best effort: the line below still says what happened
                pass

    def exit(self, signum: int) -> None:
        """Undo, print the line, and end the process now."""
        self.run_undo()
        try:
            os.write(sys.stderr.fileno(), f"{self.message}\n".encode())
        finally:
            os._exit(128 + signum)

    def hand_over(self) -> None:
        """Training starts: from here a signal saves a checkpoint (core.trainer.StopOnSignal). A signal
        that arrived during start-up but was swallowed (raised inside a destructor) ends the start now."""
        if self.signum is not None:
            self.exit(self.signum)
        self.started, self.undo, self.message = True, None, "interrupted"
