"""Loading official ChatGLM3 checkpoint folders: config.json, weights (sharded or not, safetensors or
pickle), tokenizer.model. Only files are read; no code from the folder runs and no network is used.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Union

import torch
from torch import nn

from ...backends import Backend, get_backend
from ...core.checkpoints import atomic_folder
from ..family import CheckpointError, checked_once
from .config import ChatGLM3Config
from .shards import read_shard, shard_shapes
from .files import PREFIX_ENCODER, load_config, match_weights, official_config, weight_files
from .model import ChatGLMForConditionalGeneration, PrefixEncoder

DTYPES = {
    "float32": torch.float32, "fp32": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
}


def _set_tensor(model: nn.Module, name: str, value: torch.Tensor) -> None:
    module_name, _, leaf = name.rpartition(".")
    module = model.get_submodule(module_name)
    if leaf in module._parameters:
        module._parameters[leaf] = nn.Parameter(value, requires_grad=module._parameters[leaf].requires_grad)
    else:
        module._buffers[leaf] = value


def resolve_dtype(dtype: Union[None, str, torch.dtype], config: ChatGLM3Config) -> torch.dtype:
    """None means float32; "auto" means the checkpoint's own dtype; names like "bf16" are accepted."""
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        return config.dtype if isinstance(config.dtype, torch.dtype) else DTYPES.get(str(config.dtype), torch.float32)
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r} is not one of: auto, {', '.join(DTYPES)}")
    return DTYPES[dtype]


@checked_once
def check_checkpoint(path: Union[str, Path], **config_overrides) -> tuple[ChatGLM3Config, list[Path], list[str]]:
    """Validate a checkpoint folder from its config and the weight files' headers, reading no weights.

    Args:
        path: the checkpoint folder.
        **config_overrides: config keys to change, e.g. pre_seq_len=128.

    Returns:
        (config, weight files, names of optional tensors the files lack: recomputed or freshly initialised).

    Raises:
        CheckpointError: not a folder, bad config, no weights, missing or unexpected keys, wrong shapes,
            or a damaged file.
    """
    folder = Path(path)
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: not a folder; pass the checkpoint folder that holds config.json")
    config = load_config(folder, **config_overrides)
    files = weight_files(folder)
    with torch.device("meta"):
        expected = {name: tuple(t.shape) for name, t in ChatGLMForConditionalGeneration(config).state_dict().items()}
    found = {name: (shape, file.name) for file in files for name, shape in shard_shapes(file).items()}
    optional = match_weights(folder, expected, found, config)
    return config, files, optional


def load_model(
    path: Union[str, Path],
    backend: Union[str, Backend] = "cpu",
    dtype: Union[None, str, torch.dtype] = None,
    device_index: int = 0,
    **config_overrides,
) -> ChatGLMForConditionalGeneration:
    """Load an official ChatGLM3 checkpoint folder onto a device.

    The folder is validated first (`check_checkpoint`); then weights are read shard by shard and
    tensor by tensor straight onto the device, so at most one shard is held besides the model.
    P-tuning v2 (`pre_seq_len=N`) on a checkpoint without a prefix encoder starts that encoder fresh.

    Args:
        path: folder with config.json and model(-0000N-of-0000M).safetensors or
            pytorch_model(-0000N-of-0000M).bin (with their index json when sharded).
        backend: the run's Backend, whose device and kernels the model uses; or a device name ("cpu",
            "cuda:1"), for which one is made.
        dtype: floating dtype to cast weights to (torch dtype or name; None is float32, "auto" the
            checkpoint's).
        device_index: which of the backend's devices (this process's local rank); a name's ":N" wins.
        **config_overrides: config keys to change, e.g. pre_seq_len=128.

    Returns:
        The model in eval mode.

    Raises:
        CheckpointError: no weights, missing or unexpected keys, wrong shapes, or a damaged file.
    """
    if "device" in config_overrides:  # the argument's name before backends were passed in
        raise TypeError("load_model: give the device as backend=, e.g. load_model(path, backend='cuda:0')")
    config, files, optional = check_checkpoint(path, **config_overrides)
    if isinstance(backend, str):
        name, _, index = backend.partition(":")
        backend, device_index = get_backend(name), int(index) if index else device_index
    target = backend.device(device_index)
    dtype = resolve_dtype(dtype, config)
    with torch.device("meta"):
        model = ChatGLMForConditionalGeneration(config)
    for file in files:
        for name, tensor in read_shard(file):
            cast = dtype if tensor.is_floating_point() else tensor.dtype
            _set_tensor(model, name, tensor.to(device=target, dtype=cast))
    if any(name.startswith(PREFIX_ENCODER) for name in optional):
        model.transformer.prefix_encoder = PrefixEncoder(config).to(device=target, dtype=dtype)
    if "transformer.rotary_pos_emb.inv_freq" in optional:
        rope = model.transformer.rotary_pos_emb
        inv_freq = 1.0 / (10000.0 ** (torch.arange(0, rope.rot_dim, 2, dtype=torch.float) / rope.rot_dim))
        rope.inv_freq = inv_freq.to(device=target, dtype=dtype)
    model.set_kernels(backend.kernels)
    return model.eval()


def convert_to_safetensors(source: Path, destination: Path) -> None:
    """Copy a checkpoint folder, its weights rewritten shard for shard as safetensors (with an index).

    The copy is written into a temporary folder beside `destination` and renamed at the end, so a
    failed conversion leaves no `destination` behind (a failed write raises the OSError or SafetensorError).
    """
    from safetensors.torch import save_file

    files = weight_files(Path(source))
    if destination.exists():
        raise CheckpointError(f"{destination}: already exists; give a new folder to write the converted checkpoint")
    with atomic_folder(destination) as tmp:
        weight_map = {}
        for i, file in enumerate(files, start=1):
            name = f"model-{i:05d}-of-{len(files):05d}.safetensors"
            shard = {key: tensor.contiguous() for key, tensor in read_shard(file)}
            save_file(shard, tmp / name, metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(shard, name))
        index = {"metadata": {}, "weight_map": weight_map}
        (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
        for extra in Path(source).iterdir():
            if extra.suffix in (".json", ".model", ".txt") and "index" not in extra.name and extra.is_file():
                shutil.copy(extra, tmp / extra.name)


def save_official(model: nn.Module, folder: Path, max_shard_bytes: int = 2 * 2**30) -> None:
    """Write a torch ChatGLM3 model as the official checkpoint layout: `model-0000N-of-0000M.safetensors`
    shards with `model.safetensors.index.json`, and config.json with exactly the official keys."""
    from safetensors.torch import save_file

    state = {name: tensor.detach().contiguous().cpu() for name, tensor in model.state_dict().items()}
    shards: list[dict] = [{}]
    size = 0
    for name, tensor in state.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = tensor
        size += nbytes
    weight_map = {}
    for i, shard in enumerate(shards, start=1):
        file = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, folder / file, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, file))
    total = sum(t.numel() * t.element_size() for t in state.values())
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    dtype = str(next(iter(state.values())).dtype).replace("torch.", "")
    (folder / "config.json").write_text(json.dumps(official_config(model.config, dtype), indent=2))
