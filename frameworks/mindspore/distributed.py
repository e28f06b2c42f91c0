"""MindSpore across processes: the job `msrun` starts, joined with MindSpore's communication API.

`msrun --worker_num N --local_worker_num N --master_port P --log_dir D --join True python -m
tuneport.core.cli train RECIPE framework=mindspore ...` starts N workers and a scheduler, each running
that command (msrun starts the first `python` on PATH). A worker joins in `join` (mindspore.communication
`init`) and trains data-parallel: every worker takes its slice of each global micro-batch by rank
(core/trainer.py), and the runtime sums the accumulated gradients over the workers with `AllReduce`
before each optimizer step. The scheduler validates the run like a worker (so a refusal ends it too),
then serves the job inside `init` and exits there: it never trains, writes or locks.
"""

from __future__ import annotations

import logging
import os
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from ...backends.base import collective_verdict
from ...backends.mindspore import MindSporeDevice
from ...core.distributed import Dist, Job, launched
from ...core.errors import RunError

log = logging.getLogger(__name__)

MSRUN = ("msrun --worker_num N --local_worker_num N --master_port PORT --log_dir LOGS --join True "
         "python -m tuneport.core.cli train RECIPE framework=mindspore ...")


def under_msrun() -> bool:
    """Started by msrun (it names each process's role in the job: MS_WORKER or MS_SCHED)."""
    return os.environ.get("MS_ROLE") in ("MS_WORKER", "MS_SCHED")


def msrun_job() -> Job:
    """Where msrun put this process, from its environment (before joining).

    Raises:
        RunError: several processes started by another launcher (torchrun, a rank table), or an msrun job
            whose ranks are assigned only when the workers join (several nodes without --node_rank).
    """
    if not under_msrun():
        if launched() and int(os.environ.get("WORLD_SIZE", "1")) > 1 or int(os.environ.get("RANK_SIZE", "1")) > 1:
            raise RunError(f"framework mindspore: several processes start with msrun: {MSRUN}")
        return Job()
    world_size = int(os.environ.get("RANK_SIZE") or os.environ["MS_WORKER_NUM"])
    if os.environ["MS_ROLE"] == "MS_SCHED":
        return Job(rank=None, world_size=world_size)
    if "RANK_ID" not in os.environ:
        raise RunError("framework mindspore: msrun assigns this worker's rank only when it joins; pass msrun "
                       "--node_rank on every node, so that rank 0 is known before the run folder is locked")
    return Job(rank=int(os.environ["RANK_ID"]), world_size=world_size)


def join(device) -> Dist:
    """Join msrun's job (MindSpore's communication `init`, after the device's setup); one process alone
    without msrun. msrun's scheduler process does not return: it serves the job and exits inside `init`."""
    if not under_msrun():
        return Dist()
    from mindspore.communication import get_group_size, get_local_rank, get_rank, init

    init()
    rank, world_size, local_rank = get_rank(), get_group_size(), get_local_rank()
    log.info("msrun job: rank %d of %d (local rank %d)", rank, world_size, local_rank)
    return Dist(rank=rank, world_size=world_size, local_rank=local_rank, device=device.device(local_rank),
                collective=MindSporeCollective())


class MindSporeCollective:
    """`Dist`'s all_sum and barrier through MindSpore's collectives (the world group `init` made)."""

    def __init__(self):
        import mindspore as ms

        self.ms = ms
        self.gather = ms.ops.AllGather()
        self.reduce = ms.ops.AllReduce()

    def all_sum(self, values: list[float]) -> list[float]:
        # MindSpore's collectives have no float64 kernel, and the loss and token counts must add up as exactly
        # as torch's float64 all_reduce does: each process sends the bits of its float64 values (as int32
        # pairs), and every process adds them up in rank order, in float64 (the same numbers everywhere).
        bits = np.ascontiguousarray(values, np.float64).view(np.int32)[None]
        every = self.gather(self.ms.Tensor(bits)).asnumpy()
        return np.ascontiguousarray(every).view(np.float64).sum(axis=0).tolist()

    def barrier(self) -> None:
        # An all-reduce returns on no process before every process has sent its part; MindSpore's Barrier
        # has no CPU kernel.
        self.reduce(self.ms.Tensor(np.zeros(1, np.float32))).asnumpy()


def check_collective(device: str, nproc: int, timeout: float = 180) -> tuple[bool, list[str]]:
    """`tuneport doctor --framework mindspore --nproc N`: whether msrun starts N local workers on `device` that
    add up their ranks over MindSpore's collective; the report's lines."""
    name = MindSporeDevice(device).capabilities.dist_backend
    label = f"{name} (MindSpore's)"
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"  # msrun runs this python
    msrun = shutil.which("msrun", path=path)
    if msrun is None:
        return False, [f"  NOT USABLE: msrun not found; it comes with mindspore: pip install 'tuneport[mindspore]'"]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as logs:
        launch = [msrun, "--worker_num", str(nproc), "--local_worker_num", str(nproc), "--master_port", str(port),
                  "--log_dir", logs, "--join", "True", "--cluster_time_out", str(int(timeout)), "python", "-m",
                  f"{__package__}.collective_job", device]
        try:
            done = subprocess.run(launch, capture_output=True, text=True, timeout=timeout,
                                  env={**os.environ, "PATH": path, "GLOG_v": "3"})
        except subprocess.TimeoutExpired:
            return collective_verdict(name, nproc, "msrun workers", None, "", [], label)
        worker0 = Path(logs) / "worker_0.log"
        text = worker0.read_text(errors="replace") if worker0.exists() else done.stderr
    errors = [line for line in reversed(text.splitlines()) if "Error" in line or "error" in line]  # the last says why
    return collective_verdict(name, nproc, "msrun workers", done.returncode, text, errors, label)
