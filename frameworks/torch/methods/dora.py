"""DoRA: peft's LoRA with `use_dora`."""

from ..method import LoraLike


class Dora(LoraLike):
    dora = True


METHOD = Dora()
