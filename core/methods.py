"""The tuning methods: one config dataclass per method, registered with the frameworks that run it.

A recipe's `method:` section names the method (`name: lora`) and gives that method's fields. A method
is added here with its config class and frameworks, and implemented by each framework's runtime;
a method a framework lacks is refused when the recipe is read, before anything loads.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional, Union


@dataclass
class LoraConfig:
    """LoRA (Hu et al., 2021) through peft: low-rank updates of the named linear layers."""

    name: str = "lora"
    r: int = 8  # rank
    alpha: float = 32  # updates are scaled by alpha / r
    dropout: float = 0.1
    target_modules: Optional[list[str]] = None  # None: the model family's default (ChatGLM3: query_key_value)
    init_from: Optional[str] = None  # start from this PEFT adapter folder instead of a fresh one

    def problems(self) -> list[str]:
        found = []
        if self.r <= 0:
            found.append(f"method.r: {self.r!r} must be > 0")
        if not 0 <= self.dropout < 1:
            found.append(f"method.dropout: {self.dropout!r} must be in [0, 1)")
        if self.target_modules is not None and not self.target_modules:
            found.append("method.target_modules: empty; name the linear layers to adapt, e.g. [query_key_value]")
        return found


@dataclass
class QLoraConfig(LoraConfig):
    """QLoRA (Dettmers et al., 2023): LoRA over a base quantized to 4 bits by bitsandbytes."""

    name: str = "qlora"
    quant_type: str = "nf4"  # nf4 | fp4
    double_quant: bool = True  # quantize the quantization constants too

    def problems(self) -> list[str]:
        found = super().problems()
        if self.quant_type not in ("nf4", "fp4"):
            found.append(f"method.quant_type: {self.quant_type!r} is not one of nf4, fp4")
        return found


@dataclass
class PtuningV2Config:
    """P-tuning v2 (Liu et al., 2022): trained key/value prefixes in every layer (ChatGLM's prefix encoder)."""

    name: str = "ptuning_v2"
    num_virtual_tokens: int = 128  # prefix length
    prefix_projection: bool = False  # the prefix through a 2-layer MLP

    def problems(self) -> list[str]:
        return [f"method.num_virtual_tokens: {self.num_virtual_tokens!r} must be > 0"] \
            if self.num_virtual_tokens <= 0 else []


@dataclass
class FullConfig:
    """Full fine-tuning: every weight trains (in float32)."""

    name: str = "full"

    def problems(self) -> list[str]:
        return []


MethodConfig = Union[LoraConfig, QLoraConfig, PtuningV2Config, FullConfig]


@dataclass(frozen=True)
class Method:
    config: type
    frameworks: tuple[str, ...]  # the frameworks whose runtimes implement it


# The registry.
METHODS: dict[str, Method] = {
    "lora": Method(LoraConfig, ("torch", "mindspore")),
    "qlora": Method(QLoraConfig, ("torch",)),  # bitsandbytes' 4-bit kernels exist for torch only
    "ptuning_v2": Method(PtuningV2Config, ("torch", "mindspore")),
    "full": Method(FullConfig, ("torch", "mindspore")),
}


def method_fields(name: str) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(METHODS[name].config)}


# Defaults of the single method config recipes had before this registry (its resolved recipe.yaml files).
LEGACY_DEFAULTS = {"target_modules": ["query_key_value"]}


def foreign_default(key: str, value, own: str) -> bool:
    """Whether `key: value` is another method's field at its default: recipes written before methods had
    their own configs (every resolved recipe.yaml then) carry every field, and those are ignored."""
    if key in LEGACY_DEFAULTS and value == LEGACY_DEFAULTS[key] and key not in method_fields(own):
        return True
    for name in METHODS:
        found = method_fields(name).get(key)
        if name != own and found is not None:
            default = found.default_factory() if found.default_factory is not dataclasses.MISSING else found.default
            if value == default:
                return True
    return False


def model_overrides(method: MethodConfig) -> dict:
    """Config keys a method changes in the base model (P-tuning v2 adds a prefix encoder)."""
    if isinstance(method, PtuningV2Config):
        return dict(pre_seq_len=method.num_virtual_tokens, prefix_projection=method.prefix_projection)
    return {}
