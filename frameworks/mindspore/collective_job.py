"""One worker of `tuneport doctor --framework mindspore --nproc N`'s check (distributed.check_collective),
started by msrun: join the job, add up rank + 1 over it, and rank 0 prints the sum."""

from __future__ import annotations

import json
import sys

from ...backends.mindspore import MindSporeDevice
from .distributed import join

device = MindSporeDevice(sys.argv[1])
device.setup()
dist = join(device)
(total,) = dist.all_sum([dist.rank + 1.0])
if dist.is_main:
    print(json.dumps({"sum": total, "world_size": dist.world_size}), flush=True)
