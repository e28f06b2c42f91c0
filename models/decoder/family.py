"""Every transformers-native decoder as a model family: what the registry in `tuneport.models` hands to the
rest of tuneport for a config.json `model_type` that transformers implements as a causal LM.

A model type with an entry (models/decoder/entries.py) runs its norms, rotary and attention on the
backend's kernels; any other native one runs transformers' own modules with the backend's attention, which
`family` says in one line. Its adaptable layers are then every linear layer of a block.
"""

from __future__ import annotations

import functools
import logging
from importlib import import_module
from pathlib import Path

import torch
from transformers import CONFIG_MAPPING
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

from ..family import CheckpointError, ModelFamily
from .checkpoint import build, check_checkpoint, load_config, load_model, reference_config
from .entries import ENTRIES
from .tokenizer import check_vocabulary, load_tokenizer

log = logging.getLogger(__name__)


def native_types() -> frozenset[str]:
    """The config.json model types transformers has a causal-LM class for (no remote code)."""
    return frozenset(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)


def _linear_layers(model_type: str) -> tuple[str, ...]:
    """Every linear layer's name in a block of a model type without an entry (built on the meta device from
    transformers' default config)."""
    with torch.device("meta"):
        model = build(CONFIG_MAPPING[model_type](num_hidden_layers=1))
    return tuple(sorted({name.rsplit(".", 1)[-1] for name, module in model.named_modules()
                         if isinstance(module, torch.nn.Linear) and ".layers.0." in name}))


def save_pretrained(model, folder: Path) -> None:
    """The model in transformers' own layout (config.json, generation_config.json, safetensors)."""
    model.save_pretrained(folder, safe_serialization=True)


@functools.cache  # one per model type: its line is said once
def family(model_type: str) -> ModelFamily:
    """The family of `model_type`.

    Raises:
        CheckpointError: transformers has no causal-LM class for it.
    """
    entry = ENTRIES.get(model_type)
    if entry is None:
        if model_type not in native_types():
            raise CheckpointError(f"model_type {model_type!r} has no transformers causal-LM class (tuneport runs no "
                                  f"code from a checkpoint); tuneport knows chatglm, {', '.join(ENTRIES)} and every "
                                  "other decoder transformers implements")
        log.warning("%s: no tuneport entry; training on transformers' own modules with the backend's attention "
                    "kernel only (norm and rotary are not fused)", model_type)
        layers = _linear_layers(model_type)
    else:
        layers = tuple(dict.fromkeys(entry.lora_targets + entry.ia3_targets))
        if entry.not_trained:
            log.warning("%s: the default LoRA targets leave out %s", model_type, entry.not_trained)
    return ModelFamily(
        model_type=model_type,
        check_checkpoint=check_checkpoint,
        load_model=load_model,
        load_tokenizer=load_tokenizer,
        check_vocabulary=check_vocabulary,
        lora_targets=entry.lora_targets if entry else layers,
        linear_layers=layers,
        blocks="model.layers",
        ia3_targets=entry.ia3_targets if entry else (),
        ia3_feedforward=entry.ia3_feedforward if entry else (),
        model_class=build,
        load_config=load_config,
        save_official=save_pretrained,
        # imports torch.onnx, which is slow: only when exporting to ONNX
        export_onnx=(lambda model, path: import_module(".onnx", __package__).export_onnx(model, path))
        if entry and entry.onnx else None,
        chat=lambda: import_module(".chat", __package__).protocol(entry.tool_calls if entry else ""),
        templated=True,
        reference=(entry.reference[0], lambda: reference_config(model_type)) if entry else None,
    )
