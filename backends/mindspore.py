"""MindSpore's device table: `MindSporeDevice` maps `--device cpu|npu|cuda` to MindSpore's CPU / Ascend /
GPU targets and answers what the CLI and the training loop ask of a device. The MindSpore runtime that
trains on it is `tuneport.frameworks.mindspore`.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import resource
from typing import Optional

from .base import BackendUnavailable, Capabilities, MemoryStats

log = logging.getLogger(__name__)

TARGETS = {"cpu": "CPU", "npu": "Ascend", "cuda": "GPU"}


def unavailable_reason() -> Optional[str]:
    """Why MindSpore cannot run here, with the fix; None when it can."""
    if importlib.util.find_spec("mindspore") is None:
        return "MindSpore is not installed; install it with: pip install 'tuneport[mindspore]' (MindSpore 2.x, numpy<2)"
    import numpy

    if int(numpy.__version__.split(".")[0]) >= 2:
        return (f"MindSpore needs numpy<2 but numpy {numpy.__version__} is installed; "
                "run: pip install 'numpy<2'")
    try:
        import mindspore  # noqa: F401
    except Exception as e:  # a broken install raises many kinds of errors
        return f"MindSpore is installed but cannot be imported ({type(e).__name__}: {e})"
    return None


class MindSporeDevice:
    """The device as MindSpore sees it: what the CLI and training loop ask of a backend."""

    def __init__(self, device: str):
        reason = unavailable_reason()
        if reason:
            raise BackendUnavailable(f"framework mindspore: {reason}")
        kind = device.split(":", 1)[0]
        if kind not in TARGETS:
            raise BackendUnavailable(f"framework mindspore: device {device!r} is not one of {', '.join(TARGETS)}")
        self.name = kind
        self.target = TARGETS[kind]
        self.index = int(device.split(":", 1)[1]) if ":" in device else None  # None: MindSpore's default card

    @property
    def capabilities(self) -> Capabilities:
        import mindspore as ms

        name = self.target
        with contextlib.suppress(Exception):
            name = ms.hal.get_device_name(0) if self.target != "CPU" else "cpu"
        ascend_a2 = name.startswith(("Ascend910B", "Ascend910_93"))
        return Capabilities(device_name=name, device_count=1, memory_total=0,
                            bf16=ascend_a2 or self.target == "GPU", fp16=self.target != "CPU",
                            dist_backend={"CPU": "mccl", "Ascend": "hccl", "GPU": "nccl"}[self.target],  # MindSpore's
                            visible_devices_env={"Ascend": "ASCEND_RT_VISIBLE_DEVICES",
                                                 "GPU": "CUDA_VISIBLE_DEVICES"}.get(self.target),
                            prefers_fp32=self.target == "CPU")

    def setup(self) -> None:
        import mindspore as ms

        ms.set_context(mode=ms.PYNATIVE_MODE)
        if self.index is None:
            ms.set_device(self.target)
        else:
            ms.set_device(self.target, self.index)
        log.info("mindspore %s: PyNative mode on %s", ms.__version__, self.target)

    def set_device(self, index: int) -> None:
        pass  # MindSpore binds a process to its device in setup (device_id from msrun's environment)

    def device(self, index: int = 0) -> str:
        return f"{self.target}:{index}"

    def memory_stats(self) -> MemoryStats:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # host memory; device stats need Ascend
        return MemoryStats(allocated=0, reserved=0, peak=peak)
