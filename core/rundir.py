"""Run folders: tuneport deletes and overwrites only what it wrote itself.

A run folder (`output_dir`) carries a marker, `.tuneport-run.json`, that tuneport writes before
anything else: the run id and the names of the entries a run writes there. Starting a run afresh
removes those entries and nothing else, so a user's own file in a run folder survives; a folder that
holds anything but has no marker is refused. While a run is active, its first process holds an OS
lock on `.tuneport.lock` (released by the OS when the process dies, however it dies), so a second run
into the same folder is refused with the holder's PID.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import shutil
import tempfile
import time
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional

from .checkpoints import write_failure
from .errors import FolderError

MARKER = ".tuneport-run.json"
LOCK = ".tuneport.lock"
# Every entry a run writes at the top of its folder; the marker records this list when it is made.
OWNED = (MARKER, LOCK, "recipe.yaml", "run.json", "metrics.jsonl", "tensorboard", "loss.png", "checkpoints",
         "adapter", "adapter.tmp", "base_model", ".base_model.tmp")


log = logging.getLogger(__name__)


def atomic_write_text(path: Path, text: str) -> None:
    """Replace `path` in one step: a crash leaves the old file or the new one, never half of one."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


@contextmanager
def writing(output: str, kept: str, fix: str) -> Iterator[None]:
    """A write that fails inside the block (disk full, read-only file system, no permission) becomes one
    FolderError line: "OUTPUT: cannot be written (REASON); KEPT; FIX". Other errors pass through.

    Args:
        output: the command's own output, as the user named it ("--out /models/tuned").
        kept: what the command left behind ("nothing was written there").
        fix: what to do, for this command ("free disk space, or choose a writable --out").
    """
    try:
        yield
    except FolderError:
        raise
    except Exception as e:
        reason = write_failure(e)
        if reason is None:
            raise
        raise FolderError(f"{output}: cannot be written ({reason}); {kept}; {fix}") from None


def check_writable(path: Path, output: str, fix: str) -> None:
    """Refuse, before any long work, an output that cannot be created: the nearest existing folder at or above
    `path` must take a new file (a read-only file system or a folder without permission does not).

    Raises:
        FolderError: "OUTPUT: cannot be written (REASON); nothing was written; FIX".
    """
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    with writing(output, "nothing was written", fix):
        fd, probe = tempfile.mkstemp(prefix=".tuneport-probe-", dir=existing if existing.is_dir() else existing.parent)
        os.close(fd)
        os.unlink(probe)


def read_marker(folder: Path) -> Optional[dict]:
    """The marker of a tuneport run folder, or None when the folder has none."""
    try:
        return json.loads((folder / MARKER).read_text())
    except (FileNotFoundError, NotADirectoryError):
        return None
    except (OSError, ValueError):
        return {"owned": list(OWNED)}  # damaged, but tuneport wrote it: the entries are ours


def read_json_object(path: Path) -> dict:
    """A JSON object file tuneport wrote (run.json, eval.json, parity.json); {} when it is missing, unreadable
    or not an object."""
    try:
        found = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return found if isinstance(found, dict) else {}


def is_run_folder(folder: Path) -> bool:
    return (folder / MARKER).is_file()


def check_usable(folder: Path) -> None:
    """Refuse, writing nothing, a folder that exists and holds something without being a run folder.

    Raises:
        FolderError: it is a file, or holds files and no tuneport marker.
    """
    try:
        if folder.exists() and not folder.is_dir():
            raise FolderError(f"output_dir: {folder} is a file; give a folder for the run")
        foreign = folder.is_dir() and not is_run_folder(folder) and any(
            p.name not in (LOCK, f".{MARKER}.tmp") for p in folder.iterdir())  # what a failed first write leaves
    except OSError as e:
        raise FolderError(f"output_dir: {folder} cannot be read ({e.strerror}); choose another output_dir=...") from None
    if foreign:
        raise FolderError(f"output_dir: {folder} is not empty and is not a tuneport run folder (no {MARKER}); "
                          "tuneport never writes among your files: choose a new output_dir=...")


class RunLock:
    """An exclusive OS lock on a run folder, held until `release()` or until the process ends.

    Raises:
        FolderError: another live process holds it (its PID is named).
    """

    def __init__(self, folder: Path):
        self.path = folder / LOCK
        self.fd: Optional[int] = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno in (errno.ENOSYS, errno.ENOLCK, errno.EOPNOTSUPP, errno.EINVAL):
                log.warning("%s: this file system has no file locks (%s); nothing stops a second run into this "
                            "folder, so start only one", folder, e.strerror)
                return
            holder = os.read(self.fd, 64).decode(errors="replace").strip() or "unknown"
            os.close(self.fd)
            if e.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                raise
            raise FolderError(f"output_dir: {folder} is in use by another tuneport run (PID {holder}); wait for it "
                              "to finish, or choose another output_dir=...") from None
        os.ftruncate(self.fd, 0)
        os.write(self.fd, str(os.getpid()).encode())

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing the descriptor drops the lock
            self.fd = None


def claim(folder: Path) -> RunLock:
    """Create the folder if needed and lock it (after `check_usable` said it may be used)."""
    folder.mkdir(parents=True, exist_ok=True)
    return RunLock(folder)


def write_marker(folder: Path) -> str:
    """Mark `folder` as a tuneport run folder; returns the new run id."""
    run_id = uuid.uuid4().hex
    atomic_write_text(folder / MARKER, json.dumps(
        {"tool": "tuneport", "run_id": run_id, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
         "owned": list(OWNED)}, indent=2))
    return run_id


def clear(folder: Path, temporaries: bool = False) -> None:
    """Remove what the marker lists as tuneport's (except the marker and the lock), nothing else; with
    `temporaries`, also the `.NAME.tmp` files an interrupted atomic write of those entries left."""
    marker = read_marker(folder) or {"owned": []}
    for name in marker.get("owned", []):
        if name in (MARKER, LOCK) or "/" in name or name in ("", ".", ".."):
            continue
        for path in (folder / name, folder / f".{name}.tmp") if temporaries else (folder / name,):
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            elif path.exists() or path.is_symlink():
                path.unlink()


def unclaim(folder: Path, created: bool, was_run_folder: bool) -> None:
    """Undo the start of a new run that never reached training: remove everything it wrote, so the folder
    is as it was (gone, if this start created it). A folder that was a run folder before keeps its marker,
    so it can be started afresh; others lose marker and lock too."""
    if not folder.is_dir():
        return
    clear(folder, temporaries=True)
    if was_run_folder:
        return
    for name in (MARKER, f".{MARKER}.tmp", LOCK):
        (folder / name).unlink(missing_ok=True)
    if created:
        try:
            folder.rmdir()
        except OSError:  # something else appeared there meanwhile: it is not ours to remove
            pass
