"""Device backends, looked up by name and imported only when asked for.

>>> backend = get_backend("cpu")
>>> backend.capabilities.dist_backend
'gloo'
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

from .base import Backend, BackendUnavailable, Capabilities, Kernels, MemoryStats


def _cpu() -> Backend:
    from .cpu import CPUBackend

    return CPUBackend()


def _cuda() -> Backend:
    from .cuda import CUDABackend

    return CUDABackend()


def _npu() -> Backend:
    from .npu import NPUBackend

    return NPUBackend()


def _npu_doctor() -> list[str]:
    from .npu import doctor_lines

    return doctor_lines()


@dataclass(frozen=True)
class Entry:
    """A registered backend: its factory (which imports the backend's module only when called), its
    rank for `device: auto` (higher is tried first; 0 is never picked by auto), and optional extra
    lines for `tuneport doctor` (software-stack checks that run even when the device is unusable)."""

    factory: Callable[[], Backend]
    auto_rank: int = 0
    doctor: Optional[Callable[[], list[str]]] = None


# The registry: a new device is one file in this folder plus one line here (or `register_backend`).
_BACKENDS: dict[str, Entry] = {
    "cpu": Entry(_cpu),
    "cuda": Entry(_cuda, auto_rank=1),
    "npu": Entry(_npu, auto_rank=2, doctor=_npu_doctor),
}


def register_backend(name: str, factory: Callable[[], Backend], auto_rank: int = 0,
                     doctor: Optional[Callable[[], list[str]]] = None) -> None:
    """Add a device backend under `name` (for backends that live outside this package)."""
    _BACKENDS[name.lower()] = Entry(factory, auto_rank, doctor)


def doctor_lines(name: str) -> list[str]:
    """The backend's extra `tuneport doctor` lines (none for an unknown name)."""
    entry = _BACKENDS.get(name.lower())
    return entry.doctor() if entry and entry.doctor else []


def available_backends() -> list[str]:
    """Names `get_backend` knows (whether or not their hardware is present here)."""
    return sorted(_BACKENDS)


def get_backend(name: str) -> Backend:
    """Return the backend called `name` ("cpu", "cuda", "npu"; a ":N" device index is ignored here).

    Raises:
        ValueError: `name` is not a known backend.
        BackendUnavailable: the backend is known but its device or software stack is missing here.
    """
    key = name.split(":", 1)[0].strip().lower()
    if key not in _BACKENDS:
        raise ValueError(f"unknown device {name!r}; expected one of: auto, {', '.join(available_backends())}")
    return _BACKENDS[key].factory()


def pick_backend(name: str) -> tuple[str, Backend]:
    """(name, backend) for a device name; `auto` is the usable backend of highest auto rank (an Ascend
    NPU, then an NVIDIA GPU), else the CPU.

    Raises:
        ValueError, BackendUnavailable: as `get_backend`.
    """
    if name != "auto":
        return name, get_backend(name)
    for candidate, entry in sorted(_BACKENDS.items(), key=lambda item: -item[1].auto_rank):
        if entry.auto_rank > 0:
            try:
                return candidate, entry.factory()
            except BackendUnavailable:
                continue
    return "cpu", get_backend("cpu")


def open_backend(name: str) -> tuple[str, Backend, int]:
    """The device a command runs on, ready: picked as `pick_backend` does, then set up (the Backend
    protocol's first call, before any tensor is made).

    Returns:
        (the chosen name, e.g. "npu:1"; the backend; the device index its ":N" names, 0 by default).

    Raises:
        ValueError, BackendUnavailable: as `get_backend`.
    """
    chosen, backend = pick_backend(name)
    backend.setup()
    return chosen, backend, int(chosen.partition(":")[2] or 0)


__all__ = [
    "Backend",
    "BackendUnavailable",
    "Capabilities",
    "Kernels",
    "MemoryStats",
    "available_backends",
    "doctor_lines",
    "get_backend",
    "open_backend",
    "pick_backend",
    "register_backend",
]
