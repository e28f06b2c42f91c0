"""One process of `tuneport doctor --nproc N`'s check (collective.py), started by torchrun: join the job,
add up rank + 1 over it on the device's collective, and rank 0 prints the sum."""

from __future__ import annotations

import json
import sys

import torch.distributed

from ...backends import pick_backend
from ...core.distributed import init_distributed


def main() -> None:
    """One process of the check: join the job, add up rank + 1 over it, and rank 0 prints the sum."""
    _, backend = pick_backend(sys.argv[1])
    backend.setup()
    dist = init_distributed(backend.capabilities.dist_backend, backend.device, process_group_alone=True)
    backend.set_device(dist.local_rank)
    (total,) = dist.all_sum([dist.rank + 1.0])
    if dist.is_main:
        print(json.dumps({"sum": total, "world_size": dist.world_size}))
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
