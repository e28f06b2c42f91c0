"""How a command ends: the exit status for an exception, after its one `error:` line (a traceback is for bugs),
and how a worker of a distributed job leaves."""

from __future__ import annotations

import os
import shlex
import signal
import sys

from .checkpoints import write_failure
from .errors import EXPECTED, Diverged, Stopped
from .signals import StartupGuard


def report(e: BaseException, guard: StartupGuard) -> int:
    """The exit status for an exception that ended a command, after printing its one `error:` line;
    re-raises what is a bug (a traceback is for bugs)."""
    main_process = int(os.environ.get("RANK", "0")) == 0  # collective outcomes are reported once
    if isinstance(e, Stopped):
        if main_process:
            run_dir = shlex.quote(str(e.checkpoint.parent.parent))
            how = (f"the same launcher with: train --resume {run_dir}" if "LOCAL_RANK" in os.environ
                   else f"tuneport train --resume {run_dir}")
            print(f"{e}; continue with: {how}", file=sys.stderr)
        return 128 + e.signum
    if isinstance(e, Diverged):
        if main_process:
            print(f"error: {e}", file=sys.stderr)
        return 3
    if isinstance(e, EXPECTED):
        print(f"error: {e}", file=sys.stderr)
        return 2
    if isinstance(e, KeyboardInterrupt):
        print(guard.message, file=sys.stderr)
        return 128 + getattr(e, "signum", signal.SIGINT)
    reason = write_failure(e) if isinstance(e, Exception) else None
    if reason is None:
        raise e
    where = getattr(e, "filename", None) or "a file"
    print(f"error: {where}: cannot be written ({reason}); free disk space or fix the permissions", file=sys.stderr)
    return 2


def leave_job(code: int) -> None:
    """End a worker of a distributed job now, with `code`, while its model is still alive: freeing
    DistributedDataParallel's reducer can deadlock gloo's threads against the GIL, so a worker that has
    written everything skips the destructors."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
