"""The MindSpore framework: `MindSporeRuntime` (runtime.py) on a `backends.mindspore.MindSporeDevice`,
`tuneport parity`'s capture (parity.py), and one file per tuning method it runs in methods/. Importing
this package imports no MindSpore (its runtime and capture import it when they run); the registry
(`tuneport.frameworks.framework("mindspore")`) imports this package only when a command needs it."""

from __future__ import annotations

import logging
import os

from ...backends.mindspore import MindSporeDevice
from ...core.distributed import launched
from ...core.errors import RunError
from ...core.runtime import RuntimeChoice
from .build import adapter_method  # noqa: F401  (the framework's API)
from .parity import capture as _capture
from .runtime import MindSporeRuntime

log = logging.getLogger(__name__)


def choose(device: str) -> RuntimeChoice:
    """The MindSpore runtime on `device` (cpu, npu or cuda; `auto` means the CPU).

    Raises:
        RunError: a job of several processes (msrun jobs train with the torch path for now).
        BackendUnavailable: MindSpore or the device is not usable here.
    """
    if launched() and int(os.environ.get("WORLD_SIZE", "1")) > 1 or int(os.environ.get("RANK_SIZE", "1")) > 1:
        raise RunError("framework mindspore: one process per job for now; several cards train with the torch "
                       "path (torchrun, hccl on Ascend)")
    if device == "auto":
        device = "cpu"
        log.warning("framework mindspore: device auto means the CPU; pass --device npu for Ascend")
    ms_device = MindSporeDevice(device)

    def build(recipe, precision, model_dir, dist):
        return MindSporeRuntime(recipe, ms_device, precision, model_dir, dist)

    return RuntimeChoice("mindspore", device, ms_device, build, data_parallel=False)


def capture(device, device_index: int, *args, **kwargs) -> dict:
    """`tuneport parity`'s capture on a MindSporeDevice (parity.capture; the device index is the device's own)."""
    return _capture(device, *args, **kwargs)
