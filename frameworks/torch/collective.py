"""`tuneport doctor --nproc N` for torch: N local processes, started by torchrun as a training job is, start
the device's collective (gloo, nccl or hccl, from the backend's capabilities) and add up their ranks.

    python -m torch.distributed.run --standalone --nproc_per_node N -m tuneport.frameworks.torch.collective_job DEVICE
"""

from __future__ import annotations

import json
import subprocess
import sys

from ...backends import pick_backend
from ...backends.base import COLLECTIVE_FIXES


def check(device: str, nproc: int, timeout: float = 180) -> tuple[bool, list[str]]:
    """Whether `nproc` processes on `device` form a job; the report's lines (with the fix when they do not)."""
    _, backend = pick_backend(device)
    caps = backend.capabilities
    name = caps.dist_backend
    if device.split(":")[0] != "cpu" and nproc > caps.device_count:
        return False, [f"  NOT USABLE: {nproc} processes but {caps.device_count} {device} devices visible; use "
                       f"--nproc {caps.device_count} or fewer, or make more visible ({caps.visible_devices_env})"]
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
              "-m", f"{__package__}.collective_job", device]
    try:
        done = subprocess.run(launch, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return False, [f"  NOT USABLE: {name} across {nproc} processes did not start in {timeout:.0f} s; "
                       f"{COLLECTIVE_FIXES[name]}"]
    result = next((json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")), None)
    expected = nproc * (nproc + 1) // 2
    if done.returncode != 0 or result is None or result["sum"] != expected:
        errors = [line for line in done.stderr.splitlines() if "Error" in line or "error" in line]
        why = errors[0].strip()[:300] if errors else f"exit status {done.returncode}"
        return False, [f"  NOT USABLE: {name} across {nproc} processes failed ({why}); {COLLECTIVE_FIXES[name]}"]
    return True, [f"  collective: {name} across {nproc} processes: ok (all-reduce of the ranks 1..{nproc} "
                  f"= {result['sum']:g})"]
