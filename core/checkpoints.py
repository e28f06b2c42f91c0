"""Checkpoint folders: written atomically, found again after a crash, pruned to `keep_last`.

`output_dir/checkpoints/step-N/` appears only complete: it is written as `.step-N.tmp` and renamed
in one step, so a process killed mid-write leaves the previous checkpoint as the newest complete one
(the unfinished temporary folder is removed on the next start). `atomic_folder` does the same for every
other folder tuneport writes whole: the adapter, an export, a converted checkpoint, the demo's base model.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional

STEP_DIR = re.compile(r"^step-(\d+)$")
STATE_FILE = "trainer_state.json"


def checkpoint_dirs(root: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints under `root` as (step, folder), oldest first."""
    if not root.is_dir():
        return []
    found = []
    for child in root.iterdir():
        match = STEP_DIR.match(child.name)
        if match and child.is_dir() and (child / STATE_FILE).exists():
            found.append((int(match.group(1)), child))
    return sorted(found)


def latest_checkpoint(root: Path) -> Optional[Path]:
    found = checkpoint_dirs(root)
    return found[-1][1] if found else None


def remove_unfinished(root: Path) -> None:
    """Delete temporary folders that a killed process left behind."""
    if root.is_dir():
        for child in root.iterdir():
            if child.name.startswith(".") and child.name.endswith(".tmp"):
                shutil.rmtree(child, ignore_errors=True)


def _fsync_tree(folder: Path) -> None:
    for path in [*folder.rglob("*"), folder]:
        if path.is_file() or path.is_dir():
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)


def temporary_dir(final: Path) -> Path:
    """Where checkpoint `final` is written before it is published."""
    return final.parent / f".{final.name}.tmp"


def reset_dir(folder: Path) -> None:
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)


def publish(tmp: Path, final: Path) -> None:
    """Sync `tmp` to disk, then rename it to `final` in one step."""
    _fsync_tree(tmp)
    if final.exists():  # rewriting the same step (a resumed run passing it again)
        shutil.rmtree(final)
    os.rename(tmp, final)


@contextmanager
def atomic_folder(final: Path, temporary: Optional[Path] = None) -> Iterator[Path]:
    """A folder that appears only complete. Yields an empty temporary folder beside `final` (`temporary`, or
    a new `.NAME.XXXX.tmp`, readable by all as a finished folder is); when the block ends, it is synced and
    renamed to `final`, replacing an earlier one (the caller decides whether that may be replaced); when the
    block fails, it is removed and `final` is as it was."""
    final.parent.mkdir(parents=True, exist_ok=True)
    if temporary is None:
        temporary = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent))
        temporary.chmod(0o755)  # mkdtemp's 0700 would hide the folder from other users (a container's, say)
    else:
        reset_dir(temporary)
    try:
        yield temporary
        publish(temporary, final)
    except BaseException:
        shutil.rmtree(temporary, ignore_errors=True)
        raise


def write_state(folder: Path, state: dict) -> None:
    (folder / STATE_FILE).write_text(json.dumps(state, indent=2))


def read_state(folder: Path) -> dict:
    return json.loads((folder / STATE_FILE).read_text())


def prune(root: Path, keep_last: int) -> None:
    """Keep only the newest `keep_last` complete checkpoints."""
    for _, folder in checkpoint_dirs(root)[:-keep_last]:
        shutil.rmtree(folder, ignore_errors=True)


def write_failure(e: BaseException) -> Optional[str]:
    """Why a write failed ("No space left on device", ...), or None when `e` is not a failed write.

    Libraries report a failed write differently: an OSError; torch.save into a Python file object, a
    RuntimeError whose context is the OSError; safetensors, a SafetensorError quoting the OS error code.
    """
    from safetensors import SafetensorError

    seen: Optional[BaseException] = e
    while seen is not None:
        if isinstance(seen, OSError):
            return seen.strerror or str(seen)
        if isinstance(seen, SafetensorError):
            code = re.search(r"(?:code: |os error )(\d+)", str(seen))  # "... (os error 28)" in safetensors 0.5+
            return os.strerror(int(code.group(1))) if code else str(seen).splitlines()[0][:200]
        seen = seen.__cause__ or (None if seen.__suppress_context__ else seen.__context__)  # `from None` ends it
    return None


def torch_save(obj, path: Path) -> None:
    """torch.save through a Python file, so that a failed write surfaces as an OSError (see write_failure)."""
    import torch

    with open(path, "wb") as f:
        torch.save(obj, f)
