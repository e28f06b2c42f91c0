"""Reading one weight file of a checkpoint (safetensors, or a pickle `.bin` through torch's safe loader), for
the torch loader and the MindSpore model alike; torch is imported only for pickle files."""

from __future__ import annotations

import pickle
import zipfile
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

from safetensors import SafetensorError, safe_open

from ..family import CheckpointError, refused_pickle

if TYPE_CHECKING:
    import torch


def _unreadable(file: Path, e: BaseException) -> CheckpointError:
    return refused_pickle(file, e) or CheckpointError(
        f"{file}: cannot be read ({type(e).__name__}: {e}); the file is damaged or incomplete, download it again")


def _load_pickle(file: Path) -> dict:
    import torch  # pickle weights need it; safetensors do not (the MindSpore model reads those without torch)

    try:
        return torch.load(file, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError as e:
        if "mmap" not in str(e):
            raise
        return torch.load(file, map_location="cpu", weights_only=True)  # legacy, non-zip format


READ_ERRORS = (SafetensorError, pickle.UnpicklingError, zipfile.BadZipFile, EOFError, RuntimeError, OSError)


def shard_shapes(file: Path) -> dict[str, tuple[int, ...]]:
    """Names and shapes of one weight file's tensors, read from its header (pickle: memory-mapped)."""
    try:
        if file.suffix == ".safetensors":
            with safe_open(str(file), framework="pt") as f:
                return {name: tuple(f.get_slice(name).get_shape()) for name in f.keys()}
        return {name: tuple(t.shape) for name, t in _load_pickle(file).items()}
    except READ_ERRORS as e:
        raise _unreadable(file, e) from None


def read_shard(file: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (name, tensor) from one weight file; pickle files are read with weights_only=True."""
    try:
        if file.suffix == ".safetensors":
            with safe_open(str(file), framework="pt") as f:
                for name in f.keys():
                    yield name, f.get_tensor(name)
            return
        yield from _load_pickle(file).items()
    except READ_ERRORS as e:
        raise _unreadable(file, e) from None
