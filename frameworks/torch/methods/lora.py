"""LoRA through peft."""

from ..method import LoraLike

METHOD = LoraLike()
