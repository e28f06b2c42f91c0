"""Decoder checkpoint folders as Hugging Face publishes them (Qwen/Qwen3-8B, meta-llama/Llama-3.1-8B-Instruct,
THUDM/GLM-4-9B-0414 and the others): config.json, model.safetensors or its shards with
model.safetensors.index.json, tokenizer.json.

Only files are read: no code from the folder runs (config.json's auto_map is dropped) and no network is
used. The folder is validated from config.json and the safetensors headers before any weight is read;
then transformers loads the weights memory-mapped, straight onto the device in the requested dtype.
"""

from __future__ import annotations

from pathlib import Path
from typing import Union

import torch
from huggingface_hub.errors import StrictDataclassError
from safetensors import SafetensorError, safe_open
from transformers import CONFIG_MAPPING, PretrainedConfig
from transformers.core_model_loading import revert_weight_conversion
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

from ...backends import Backend, get_backend
from ..family import CheckpointError, checked_once, layout_weight_files, read_json
from .entries import ENTRIES
from .model import kernel_model

INDEX, SINGLE = "model.safetensors.index.json", "model.safetensors"
DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16, "half": torch.float16}
POSITIVE_INTS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size")


def _positive_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def config_problems(values: dict, known: bool = True) -> list[str]:
    """Every problem of a decoder's config.json values, each naming the field, the value and the fix (a model
    type without an entry, not `known`, may name its sizes otherwise: only those present are checked)."""
    problems = [f"{key}: {'missing' if key not in values else repr(values[key])}; expected a positive integer"
                for key in POSITIVE_INTS if (known or key in values) and not _positive_int(values.get(key))]
    heads, hidden = values.get("num_attention_heads"), values.get("hidden_size")
    kv_heads = values.get("num_key_value_heads") or heads
    if (known or heads is not None) and (not _positive_int(kv_heads) or (_positive_int(heads) and heads % kv_heads)):
        problems.append(f"num_key_value_heads: {kv_heads!r}; expected a positive integer dividing "
                        f"num_attention_heads ({heads})")
    head_dim = values.get("head_dim") or (hidden // heads if _positive_int(hidden) and _positive_int(heads)
                                          and hidden % heads == 0 else None)
    if head_dim is None and _positive_int(hidden) and _positive_int(heads):
        problems.append(f"hidden_size: {hidden} is not a multiple of num_attention_heads ({heads}); give head_dim")
    elif head_dim is not None and (not _positive_int(head_dim) or head_dim % 2):
        problems.append(f"head_dim: {head_dim!r}; expected an even positive integer (the rotary embedding "
                        "rotates halves)")
    eps = values.get("rms_norm_eps", 1e-6)
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or eps <= 0:
        problems.append(f"rms_norm_eps: {eps!r}; expected a positive number")
    if values.get("attention_dropout", 0.0) not in (0, 0.0):
        problems.append(f"attention_dropout: {values['attention_dropout']!r}; the backends' attention kernels "
                        "have no dropout: set it to 0.0")
    if values.get("quantization_config") is not None:
        problems.append("quantization_config: a pre-quantized checkpoint (AWQ, GPTQ, ...) is not supported; use "
                        "the bf16 release (method qlora quantizes it on the fly)")
    return problems


def model_class(config: PretrainedConfig) -> type:
    """The kernel model class of `config`'s model type (models/decoder/model.py)."""
    return kernel_model(MODEL_FOR_CAUSAL_LM_MAPPING[type(config)], ENTRIES.get(config.model_type))


def build(config: PretrainedConfig):
    """An untrained model of `config` on the kernels (for `tuneport estimate`, on the meta device)."""
    return model_class(config)(config)


def load_config(path: Union[str, Path], **overrides) -> PretrainedConfig:
    """Read and validate config.json of a decoder folder.

    Raises:
        CheckpointError: the file is missing or invalid, its values are (every problem listed), or
            overrides ask for what these models have not (P-tuning v2's prefix encoder).
    """
    file = Path(path) / "config.json"
    values = read_json(file)
    values.pop("auto_map", None)  # never point transformers at code in the folder
    model_type = values.pop("model_type", None)
    if overrides:
        raise CheckpointError(f"{path}: {model_type} models have no {', '.join(sorted(overrides))} (P-tuning v2 "
                              "is ChatGLM3's prefix encoder); use method lora, qlora or another peft method")
    problems = config_problems(values, model_type in ENTRIES)
    if problems:
        raise CheckpointError(f"{file}: " + "; ".join(problems))
    try:
        return CONFIG_MAPPING[model_type](**values)
    except (TypeError, ValueError, StrictDataclassError) as e:  # transformers' own checks of the values
        raise CheckpointError(f"{file}: {' '.join(str(e).split())}") from None


def reference_config(model_type: str) -> PretrainedConfig:
    """The config of the released size `ENTRIES[model_type].reference` names."""
    return CONFIG_MAPPING[model_type](**ENTRIES[model_type].reference[1]())


def weight_files(folder: Path) -> list[Path]:
    """The safetensors files of `folder`, via the index when the checkpoint is sharded.

    Raises:
        CheckpointError: see `layout_weight_files`; pickle (.bin) weights are named with the fix.
    """
    return layout_weight_files(folder, ((INDEX, SINGLE),), " (pickle .bin weights: convert them to safetensors)")


def _shapes(file: Path) -> dict[str, tuple[int, ...]]:
    try:
        with safe_open(str(file), framework="pt") as f:
            return {name: tuple(f.get_slice(name).get_shape()) for name in f.keys()}
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{file}: cannot be read ({type(e).__name__}: {e}); the file is damaged or "
                              "incomplete, download it again") from None


@checked_once
def check_checkpoint(path: Union[str, Path], **overrides) -> tuple[PretrainedConfig, list[Path], list[str]]:
    """Validate a decoder folder from config.json and the safetensors headers, reading no weights.

    Returns:
        (config, weight files, names the files may lack: lm_head.weight when tied to the embedding).

    Raises:
        CheckpointError: not a folder, a bad config, no weights, missing or unexpected tensors, wrong
            shapes (all listed), or a damaged file.
    """
    folder = Path(path)
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: not a folder; pass the checkpoint folder that holds config.json")
    config = load_config(folder, **overrides)
    files = weight_files(folder)
    with torch.device("meta"):
        model = build(config)
        own = model.state_dict()
        saved = revert_weight_conversion(model, dict(own))  # the release's names (Qwen3-MoE: one tensor an expert)
    found = {name: (shape, file.name) for file in files for name, shape in _shapes(file).items()
             if not name.endswith("rotary_emb.inv_freq")}  # a buffer older exports stored; recomputed
    layout = saved if any(name in found for name in saved.keys() - own.keys()) else own
    expected = {name: tuple(t.shape) for name, t in layout.items()}
    optional = ["lm_head.weight"] if config.tie_word_embeddings else []
    missing = [n for n in expected if n not in found and n not in optional]
    unexpected = [n for n in found if n not in expected]
    wrong = [f"{n} (expected {list(expected[n])}, found {list(shape)} in {file})"
             for n, (shape, file) in found.items() if n in expected and tuple(shape) != expected[n]]
    problems = [f"{label}: {', '.join(items[:5])}{' ...' if len(items) > 5 else ''}" for label, items in
                (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", wrong)) if items]
    if problems:
        raise CheckpointError(f"{folder}: the weights do not match config.json ({'; '.join(problems)}); check that "
                              "config.json belongs to these weights")
    return config, files, optional


def resolve_dtype(dtype: Union[None, str, torch.dtype], config: PretrainedConfig) -> torch.dtype:
    """None means float32; "auto" the checkpoint's own dtype (config.json torch_dtype); names like "bf16"."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype or torch.float32
    if dtype == "auto":
        own = config.dtype
        return own if isinstance(own, torch.dtype) else DTYPES.get(str(own), torch.float32)
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r} is not one of: auto, {', '.join(DTYPES)}")
    return DTYPES[dtype]


def load_model(path: Union[str, Path], backend: Union[str, Backend] = "cpu", dtype=None, device_index: int = 0,
               **overrides):
    """Load a decoder checkpoint folder onto a backend's device, running on the backend's kernels.

    Args:
        path: the Hugging Face folder (config.json, model.safetensors or shards with their index).
        backend: the run's Backend, or a device name ("cpu", "cuda:1") for which one is made.
        dtype: the weights' dtype (torch dtype or name; None is float32, "auto" the checkpoint's).
        device_index: which of the backend's devices; a name's ":N" wins.
        **overrides: config keys to change (these models take none; P-tuning v2 asks for some and is refused).

    Returns:
        The model in eval mode.

    Raises:
        CheckpointError: as `check_checkpoint`, before any weight is read.
    """
    config, _, _ = check_checkpoint(path, **overrides)
    if isinstance(backend, str):
        name, _, index = backend.partition(":")
        backend, device_index = get_backend(name), int(index) if index else device_index
    model = model_class(config).from_pretrained(
        Path(path), config=config, dtype=resolve_dtype(dtype, config), device_map={"": backend.device(device_index)},
        local_files_only=True, use_safetensors=True)
    model.set_kernels(backend.kernels)
    return model.eval()
