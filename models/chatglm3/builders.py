"""Builders: base models made from a name instead of loaded from a folder.

A builder writes an ordinary checkpoint folder (official layout: config.json, model.safetensors,
tokenizer.model), so everything downstream (training, resume, chat, adapters) treats it like any
downloaded checkpoint.
"""

from __future__ import annotations

import shutil
from importlib import resources
from pathlib import Path

import torch
from safetensors.torch import save_file

from ...core.checkpoints import atomic_folder
from .files import load_tokenizer
from .config import chatglm3_tiny_config
from .model import ChatGLMForConditionalGeneration


def demo_tokenizer() -> Path:
    """The built-in demo's tokenizer (shipped with the recipes)."""
    return Path(str(resources.files("tuneport.recipes").joinpath("demo/tokenizer.model")))


def demo_config(vocab: int):
    """The built-in demo's model: ChatGLM3's architecture (GQA, qkv bias, RoPE, RMSNorm, SwiGLU), tiny."""
    return chatglm3_tiny_config(
        padded_vocab_size=-(-vocab // 64) * 64, hidden_size=128, ffn_hidden_size=256, num_layers=2,
        num_attention_heads=4, kv_channels=32, multi_query_group_num=2, seq_length=256,
        # 1/sqrt(hidden) rather than 0.02: a frozen random output layer must be able to express a
        # confident next token, or LoRA can fix the argmax but the loss stays near log(vocab).
        initializer_range=128**-0.5,
    )


def builder_config(name: str):
    """The config of the base model called `name` ("demo"), without building it."""
    if name != "demo":
        raise ValueError(f"unknown builder {name!r}")
    return demo_config(len(load_tokenizer(demo_tokenizer())))


def build_model_folder(name: str, folder: Path) -> None:
    """Write the base model called `name` ("demo") into `folder`, the same bytes on every machine."""
    config = builder_config(name)
    tokenizer_file = demo_tokenizer()
    generator_state = torch.get_rng_state()
    torch.manual_seed(0)  # the base model is fixed; a recipe's seed varies only the tuning
    model = ChatGLMForConditionalGeneration(config)
    torch.set_rng_state(generator_state)
    # `.base_model.tmp` by name: a run folder lists it as its own, so a killed start's is removed afresh
    with atomic_folder(folder, folder.parent / f".{folder.name}.tmp") as tmp:
        # The files `model.save_pretrained(tmp)` writes, byte for byte, written without it: its unwrap_model goes
        # through accelerate, which imports DeepSpeed wherever it is installed (a quarter second and its
        # accelerator warning on every demo).
        model.config.architectures = [type(model).__name__]
        model.config.save_pretrained(tmp)
        model.generation_config.save_pretrained(tmp)
        save_file(model.state_dict(), tmp / "model.safetensors", metadata={"format": "pt"})
        shutil.copy(tokenizer_file, tmp / "tokenizer.model")


def build_demo_folder(folder: Path) -> None:
    build_model_folder("demo", folder)
