"""Device backends, looked up by name and imported only when asked for.

>>> backend = get_backend("cpu")
>>> backend.capabilities.dist_backend
'gloo'
"""

from __future__ import annotations

from typing import Callable

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


# Each factory imports its module only when called, so asking for "cpu" never imports torch_npu.
_BACKENDS: dict[str, Callable[[], Backend]] = {
    "cpu": _cpu,
    "cuda": _cuda,
    "npu": _npu,
}


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
        raise ValueError(f"unknown device {name!r}; expected one of: {', '.join(available_backends())}")
    return _BACKENDS[key]()


__all__ = [
    "Backend",
    "BackendUnavailable",
    "Capabilities",
    "Kernels",
    "MemoryStats",
    "available_backends",
    "get_backend",
]
