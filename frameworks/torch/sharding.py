"""FSDP2 for the torch runtime (`train.strategy: fsdp`): torch's `fully_shard` on each transformer block and
then on the whole model, so every process holds 1/N of every weight (the frozen base's too), of the
gradients and of the optimizer state; checkpoints through `torch.distributed.checkpoint` (each process
writes its shard, and a different number of processes can load them); the tuned result gathered whole.
We write no sharding of our own: this module only decides what torch shards, and how it is saved.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch
from torch import nn

CHECKPOINT = "sharded"  # a checkpoint's folder for torch.distributed.checkpoint's files


def block_lists(model: nn.Module, blocks: str) -> list[nn.Module]:
    """The model's lists of transformer blocks: the module at the family's path `blocks`, under whatever
    wrapper (peft's) holds the model."""
    return [module for name, module in model.named_modules() if blocks and (name == blocks or name.endswith("." + blocks))]


def shard(model: nn.Module, blocks: str, device: torch.device, world_size: int, compute: torch.dtype,
          offload: bool) -> None:
    """Shard `model` over the job's processes in place: each block its own unit (its weights are gathered
    just for its forward and backward), the rest (embedding, output layer, norms) the root's.

    Args:
        blocks: the family's module path of its transformer blocks ("" makes the whole model one unit).
        device: this process's device (the mesh is over devices of its type).
        compute: the compute dtype: weights are gathered in it, gradients reduced in float32.
        offload: keep the shards (weights, gradients, optimizer state) in host memory between uses.
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard

    mesh = init_device_mesh(device.type, (world_size,))
    policy = MixedPrecisionPolicy(param_dtype=None if compute == torch.float32 else compute,
                                  reduce_dtype=torch.float32)
    options = dict(mesh=mesh, mp_policy=policy, **({"offload_policy": CPUOffloadPolicy()} if offload else {}))
    for blocks_list in block_lists(model, blocks):
        for block in blocks_list:
            fully_shard(block, **options)
    fully_shard(model, **options)


def total_norm(norm: torch.Tensor) -> float:
    """A gradient norm as a number (over sharded gradients, clipping returns it as a DTensor)."""
    return float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)


def _options(**more):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(ignore_frozen_params=True, **more)


def save(model: nn.Module, optimizer: torch.optim.Optimizer, folder: Path) -> None:
    """Every process writes its shard of the trained weights and the optimizer state (a collective call)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    weights, state = get_state_dict(model, optimizer, options=_options())
    dcp.save({"model": weights, "optimizer": state}, checkpoint_id=str(folder / CHECKPOINT))


def load(model: nn.Module, optimizer: torch.optim.Optimizer, folder: Path) -> None:
    """Read what `save` wrote, resharded over however many processes load it now (a collective call)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    weights, state = get_state_dict(model, optimizer, options=_options())
    both = {"model": weights, "optimizer": state}
    dcp.load(both, checkpoint_id=str(folder / CHECKPOINT))
    set_state_dict(model, optimizer, model_state_dict=both["model"], optim_state_dict=both["optimizer"],
                   options=_options(strict=False))


def gathered(model: nn.Module, complete: bool, main: bool) -> Optional[dict[str, torch.Tensor]]:
    """The model's weights whole, in host memory, on the main process (None elsewhere): the trained ones, or
    with `complete` every one (a collective call; each process gathers one unit at a time)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    weights = get_model_state_dict(model, options=StateDictOptions(
        full_state_dict=True, cpu_offload=True, ignore_frozen_params=not complete))
    return weights if main else None
