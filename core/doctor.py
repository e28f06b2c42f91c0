"""`tuneport doctor`: one report a support engineer can read, and an exit status that says whether the
chosen device is usable (0) or not (1, with the fix)."""

from __future__ import annotations

import os
import platform
import sys
from dataclasses import asdict

from .errors import RecipeError, RunError
from .versions import installed
from ..backends import BackendUnavailable, doctor_lines
from ..frameworks import framework as framework_package, get_runtime

ENV_VARS = (
    "CUDA_VISIBLE_DEVICES", "ASCEND_RT_VISIBLE_DEVICES", "PYTORCH_NPU_ALLOC_CONF", "TORCH_DEVICE_BACKEND_AUTOLOAD",
    "ASCEND_TOOLKIT_HOME", "ASCEND_HOME_PATH", "HF_HUB_OFFLINE", "OMP_NUM_THREADS", "WORLD_SIZE", "MASTER_ADDR",
)


def _version(name: str) -> str:
    return installed(name) or "not installed"


def _gib(n: int) -> str:
    return f"{n / 2**30:.1f} GiB"


def report(device: str, framework: str = "torch", nproc: int = 1) -> tuple[list[str], bool]:
    """Lines of the report for `device` under `framework`, and whether it is usable (with `nproc` > 1: whether
    that many local processes start the framework's collective on it)."""
    lines = [f"tuneport {_version('tuneport')}", f"python {platform.python_version()} ({sys.executable})",
             f"platform {platform.platform()}"]
    for name in ("torch", "transformers", "peft", "safetensors", "numpy", "bitsandbytes", "deepspeed", "mindspore"):
        lines.append(f"{name} {_version(name)}")
    lines.append("")
    lines.append(f"device {device} ({framework}):")
    usable = True
    try:
        backend = get_runtime(framework, device).device
        if framework == "mindspore":
            lines.append(f"  mindspore {_version('mindspore')} with numpy {_version('numpy')} (MindSpore needs numpy<2): ok")
        caps = backend.capabilities
        for key, value in asdict(caps).items():
            lines.append(f"  {key}: {_gib(value) if key == 'memory_total' else value}")
        lines.append(f"  memory in use by this process: {_gib(backend.memory_stats().allocated)}")
    except (BackendUnavailable, RecipeError, RunError, ValueError) as e:
        usable = False
        lines.append(f"  NOT USABLE: {e}")
    if usable and nproc > 1:
        usable, more = framework_package(framework).check_collective(device, nproc)
        lines += more
    lines += doctor_lines(device.split(":")[0])
    lines.append("")
    lines.append("environment:")
    for name in ENV_VARS:
        lines.append(f"  {name}={os.environ[name]}" if name in os.environ else f"  {name} (unset)")
    return lines, usable


def run(device: str, framework: str = "torch", nproc: int = 1) -> int:
    if nproc < 1:
        raise RunError(f"--nproc {nproc}: the number of processes must be >= 1")
    lines, usable = report(device, framework, nproc)
    print("\n".join(lines))
    job = f" for {nproc} processes" if nproc > 1 else ""
    print(f"\nresult: {device} is {'usable' if usable else 'NOT usable (see the fix above)'}{job}")
    return 0 if usable else 1
