"""Model families, one folder each, found by the `model_type` in a checkpoint's config.json.

core/ never imports a family's folder: it asks this registry. A family provides a `ModelFamily`:
checkpoint validation and loading, the tokenizer (its chat template and `encode_conversation`, tool
calls included), its default LoRA targets, the base models it can build by name, and optionally a
MindSpore model. This module imports no framework; a family is imported only when it is asked for.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from ..core.errors import CheckpointError
from .family import (TEMPLATE_FILE, ModelFamily, check_vocabulary_size, layout_weight_files,  # noqa: F401
                     older_cache_name, read_json, refused_pickle)


@dataclass(frozen=True)
class Entry:
    factory: Callable[[], ModelFamily]  # imports the family only when called
    builders: tuple[str, ...] = ()  # the names it builds, known without importing it


def _chatglm3() -> ModelFamily:
    from .chatglm3.family import family

    return family()


def _decoder(model_type: str) -> ModelFamily:
    from .decoder.family import family

    return family(model_type)


# The registry: a new family is one folder under models/ plus one line here (or `register_family`). Every
# other model type is a transformers decoder (models/decoder), or refused there when transformers has none.
_FAMILIES: dict[str, Entry] = {"chatglm": Entry(_chatglm3, builders=("demo",))}
# The decoders run on the backends' kernels (models/decoder/entries.py ENTRIES, which a test keeps equal to this).
DECODERS = ("llama", "qwen2", "qwen3", "glm4", "glm", "mistral", "gemma2", "gemma3_text", "qwen3_moe")


def register_family(model_type: str, factory: Callable[[], ModelFamily], builders: tuple[str, ...] = ()) -> None:
    """Add a model family under its config.json `model_type` (for families outside this package)."""
    _FAMILIES[model_type] = Entry(factory, builders)


def model_types() -> list[str]:
    """The families registered by name, then the decoders with a kernel entry (every other transformers decoder
    trains too)."""
    return [*sorted(_FAMILIES), *DECODERS]


def builder_names() -> list[str]:
    """Model names that build a base model instead of loading a folder (e.g. "demo")."""
    return sorted(name for entry in _FAMILIES.values() for name in entry.builders)


def get_family(model_type: str) -> ModelFamily:
    """The family registered under `model_type`, else the transformers decoder family of that type.

    Raises:
        CheckpointError: no family has that model_type and transformers has no causal-LM class for it.
    """
    if model_type not in _FAMILIES:
        return _decoder(model_type)
    return _FAMILIES[model_type].factory()


def family_for(folder: Path) -> ModelFamily:
    """The family of the checkpoint in `folder`, from the `model_type` of its config.json.

    Raises:
        CheckpointError: no readable config.json, or a model_type no family has.
    """
    file = Path(folder) / "config.json"
    if not file.is_file():
        raise CheckpointError(f"{folder}: no config.json; pass the checkpoint folder that holds it")
    model_type = read_json(file).get("model_type")
    if not isinstance(model_type, str) or not model_type:
        raise CheckpointError(f"{file}: has no model_type; tuneport knows {', '.join(model_types())} and every "
                              "other decoder transformers implements")
    return get_family(model_type)


def builder_family(name: str) -> ModelFamily:
    """The family that builds the base model called `name`."""
    for entry in _FAMILIES.values():
        if name in entry.builders:
            return entry.factory()
    raise CheckpointError(f"model: {name!r} is no builder; builders: {', '.join(builder_names())}")
