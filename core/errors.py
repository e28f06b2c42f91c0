"""Every kind of problem tuneport reports to a user, in one leaf module (it imports nothing of tuneport's),
the same types for every framework. The CLI prints each of EXPECTED as one `error:` line (exit status 2;
Diverged 3; Stopped 128 + the signal); anything else is a bug and keeps its traceback."""

from __future__ import annotations

import signal
from pathlib import Path


class RecipeError(ValueError):
    """A recipe with problems; the message lists every one of them."""


class DataError(ValueError):
    """A data file that cannot be used; the message names the file, line, field and fix."""


class CheckpointError(ValueError):
    """A checkpoint folder that cannot be loaded; the message names the file and the fix."""


class PrecisionError(ValueError):
    """The requested precision cannot run on this device; the message says why and what to use."""


class FolderError(RuntimeError):
    """An output folder tuneport may not use or cannot write; the message says what to do instead."""


class MethodUnavailable(RuntimeError):
    """The tuning method cannot run here (this device, framework, model or software stack); the message
    names the fix."""


class BackendUnavailable(RuntimeError):
    """The requested device or framework cannot be used here; the message says what is missing and the fix."""


class RunError(RuntimeError):
    """A run that cannot start or continue; the message says why and what to do."""


class Diverged(RunError):
    """The loss or gradient norm stopped being finite; the run stopped without saving (exit status 3)."""


class Stopped(Exception):
    """SIGINT or SIGTERM stopped the run after a checkpoint was saved (exit status 128 + signal)."""

    def __init__(self, signum: int, step: int, checkpoint: Path):
        super().__init__(f"stopped by {signal.Signals(signum).name} after step {step}; saved {checkpoint}")
        self.signum, self.step, self.checkpoint = signum, step, checkpoint


class Unsupported(RuntimeError):
    """The model family lacks what was asked for (a framework, a method, export, serve, ...): `ModelFamily.require`."""


class ParityError(ValueError):
    """Bad input to `tuneport parity`; the message names the option, the problem and the fix."""


class MissingDependency(ImportError):
    """An optional extra is not installed; the message names the install command."""


# What the CLI reports as one line (FileNotFoundError: a path given on the command line that is not there).
EXPECTED = (RecipeError, DataError, CheckpointError, PrecisionError, FolderError, MethodUnavailable,
            BackendUnavailable, RunError, Unsupported, ParityError, MissingDependency, FileNotFoundError)
