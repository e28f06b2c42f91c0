"""The MindSpore framework: `MindSporeRuntime` (runtime.py) on a `backends.mindspore.MindSporeDevice`,
`tuneport parity`'s capture (parity.py), msrun's jobs of several processes (distributed.py), and one file
per tuning method it runs in methods/. Importing this package imports no MindSpore (its runtime, capture
and collectives import it when they run); the registry (`tuneport.frameworks.framework("mindspore")`)
imports this package only when a command needs it."""

from __future__ import annotations

import logging

from ...backends.mindspore import MindSporeDevice
from ...core.runtime import RuntimeChoice
from .build import adapter_method  # noqa: F401  (the framework's API)
from .distributed import check_collective, join, msrun_job  # noqa: F401  (check_collective: doctor's)
from .parity import capture as _capture
from .runtime import MindSporeRuntime

log = logging.getLogger(__name__)


def choose(device: str) -> RuntimeChoice:
    """The MindSpore runtime on `device` (cpu, npu or cuda; `auto` means the CPU), one process alone or a
    worker of an msrun job (distributed.py).

    Raises:
        RunError: several processes started by another launcher than msrun.
        BackendUnavailable: MindSpore or the device is not usable here.
    """
    job = msrun_job()
    if device == "auto":
        device = "cpu"
        log.warning("framework mindspore: device auto means the CPU; pass --device npu for Ascend")
    ms_device = MindSporeDevice(device)

    def build(recipe, precision, model_dir, dist):
        return MindSporeRuntime(recipe, ms_device, precision, model_dir, dist)

    return RuntimeChoice("mindspore", device, ms_device, build, data_parallel=False, join=lambda: join(ms_device),
                         job=job)


def capture(device, device_index: int, *args, **kwargs) -> dict:
    """`tuneport parity`'s capture on a MindSporeDevice (parity.capture; the device index is the device's own)."""
    return _capture(device, *args, **kwargs)
