"""`tuneport doctor --nproc N` for torch: N local processes, started by torchrun as a training job is, start
the device's collective (gloo, nccl or hccl, from the backend's capabilities) and add up their ranks.

    python -m torch.distributed.run --standalone --nproc_per_node N -m tuneport.frameworks.torch.collective_job DEVICE
"""

from __future__ import annotations

import subprocess
import sys

from ...backends import pick_backend
from ...backends.base import collective_verdict


def check(device: str, nproc: int, timeout: float = 180) -> tuple[bool, list[str]]:
    """Whether `nproc` processes on `device` form a job; the report's lines (with the fix when they do not)."""
    _, backend = pick_backend(device)
    caps = backend.capabilities
    name = caps.dist_backend
    if backend.device(0).type != "cpu" and nproc > caps.device_count:  # one process per device, the host aside
        return False, [f"  NOT USABLE: {nproc} processes but {caps.device_count} {device} devices visible; use "
                       f"--nproc {caps.device_count} or fewer, or make more visible ({caps.visible_devices_env})"]
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
              "-m", f"{__package__}.collective_job", device]
    try:
        done = subprocess.run(launch, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return collective_verdict(name, nproc, "processes", None, "", [])
    errors = [line for line in done.stderr.splitlines() if "Error" in line or "error" in line]
    return collective_verdict(name, nproc, "processes", done.returncode, done.stdout, errors)
