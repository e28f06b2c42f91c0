"""The tuning methods' settings: one config dataclass per method, and the registry of their names.

A recipe's `method:` section names the method (`name: lora`) and gives that method's fields. A method
is its config class here (a `MethodSettings`) plus, for each framework that runs it, one implementation
object: a file `frameworks/<framework>/methods/<name>.py` (or one given to `register_method`). Its
frameworks are those implementations; a method a framework lacks is refused when the recipe is read,
before anything loads. Nothing outside an implementation decides by a method's name.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from typing import Any, ClassVar, Optional, Union

from .errors import MethodUnavailable


class MethodSettings:
    """What every method's config answers (its dataclass fields are the recipe's `method.*` keys)."""

    name: str
    spans_run: ClassVar[bool] = False  # its schedule depends on train.max_steps, which a resume cannot change
    needs: ClassVar[Optional[str]] = None  # the model family feature it needs (models/family.py FEATURES)
    virtual_tokens: ClassVar[bool] = False  # trained tokens (or keys and values) come before each sample

    def problems(self) -> list[str]:
        """Problems with the method's own fields."""
        return []

    def recipe_problems(self, recipe) -> list[str]:
        """Problems with the method in this recipe (its length, DeepSpeed, ...)."""
        return []

    def model_overrides(self, family) -> dict:
        """config.json keys the method changes in a base model of `family` (P-tuning v2 adds a prefix encoder)."""
        return {}


@dataclass
class LoraConfig(MethodSettings):
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

    def recipe_problems(self, recipe) -> list[str]:
        if recipe.train.strategy == "fsdp":
            return ["method.name: qlora's 4-bit base cannot be sharded by fsdp; use train.strategy=ddp (QLoRA's base "
                    "is small already), or method lora with fsdp"]
        return []

    def problems(self) -> list[str]:
        found = super().problems()
        if self.quant_type not in ("nf4", "fp4"):
            found.append(f"method.quant_type: {self.quant_type!r} is not one of nf4, fp4")
        return found


# A P-tuning v2 result, under the official fine-tuning demo's names: its prefix encoder's config.json keys
# (ModelFamily.prefix_config) and its weights.
PREFIX_CONFIG, PREFIX_WEIGHTS = "prefix_config.json", "prefix_encoder.safetensors"


@dataclass
class PtuningV2Config(MethodSettings):
    """P-tuning v2 (Liu et al., 2022): trained key/value prefixes in every layer (ChatGLM's prefix encoder)."""

    name: str = "ptuning_v2"
    virtual_tokens: ClassVar[bool] = True
    needs: ClassVar[Optional[str]] = "ptuning_v2"  # the family's own prefix encoder
    num_virtual_tokens: int = 128  # prefix length
    prefix_projection: bool = False  # the prefix through a 2-layer MLP

    def problems(self) -> list[str]:
        return [f"method.num_virtual_tokens: {self.num_virtual_tokens!r} must be > 0"] \
            if self.num_virtual_tokens <= 0 else []

    def model_overrides(self, family) -> dict:
        return family.prefix_config(self.num_virtual_tokens, self.prefix_projection) if family.prefix_config else {}


@dataclass
class DoraConfig(LoraConfig):
    """DoRA (Liu et al., 2024): LoRA on the direction of each weight, with its magnitude trained apart
    (peft's `use_dora`)."""

    name: str = "dora"


@dataclass
class AdaLoraConfig(MethodSettings):
    """AdaLoRA (Zhang et al., 2023): SVD-shaped LoRA whose rank budget moves to the layers that matter,
    pruned from `init_r` to an average of `target_r` per layer between steps `tinit` and
    max_steps - `tfinal`, every `delta_t` steps (peft's `update_and_allocate`)."""

    name: str = "adalora"
    init_r: int = 12  # starting rank of every adapted layer
    target_r: int = 8  # average rank left after budgeting
    alpha: float = 32
    dropout: float = 0.1
    target_modules: Optional[list[str]] = None  # None: the model family's LoRA default
    tinit: int = 200  # steps before pruning starts
    tfinal: int = 1000  # last steps, trained at the final budget
    delta_t: int = 10  # steps between budget reallocations
    beta1: float = 0.85  # smoothing of the importance scores
    beta2: float = 0.85  # smoothing of their uncertainty
    orth_reg_weight: float = 0.5  # weight of the orthogonality penalty on P and Q
    spans_run: ClassVar[bool] = True  # the budget schedule runs to train.max_steps

    def problems(self) -> list[str]:
        found = []
        if not 0 < self.target_r <= self.init_r:
            found.append(f"method.target_r: {self.target_r!r} must be > 0 and <= method.init_r ({self.init_r})")
        if self.tinit < 0 or self.tfinal < 0 or self.delta_t <= 0:
            found.append("method.tinit, method.tfinal: must be >= 0, method.delta_t > 0")
        if not 0 <= self.dropout < 1:
            found.append(f"method.dropout: {self.dropout!r} must be in [0, 1)")
        for name in ("beta1", "beta2"):
            if not 0 < getattr(self, name) < 1:
                found.append(f"method.{name}: {getattr(self, name)!r} must be in (0, 1)")
        if self.orth_reg_weight < 0:
            found.append(f"method.orth_reg_weight: {self.orth_reg_weight!r} must be >= 0")
        return found

    def recipe_problems(self, recipe) -> list[str]:
        found = self.schedule_problems(recipe.train.max_steps)
        if recipe.train.strategy in ("deepspeed", "fsdp"):
            found.append(f"method.name: adalora does not run under {recipe.train.strategy} (its rank budget reads whole "
                         "gradients after each step); use train.strategy=ddp, or choose method lora")
        return found

    def schedule_problems(self, max_steps: Optional[int]) -> list[str]:
        """The budget schedule against the run's length (peft needs the total step count up front)."""
        if max_steps is None:
            return ["method.name: adalora schedules its rank budget over the run; give train.max_steps "
                    "(not train.epochs)"]
        if self.tinit >= max_steps - self.tfinal:
            return [f"method.tinit: {self.tinit} leaves no budgeting phase: it must be < train.max_steps - "
                    f"method.tfinal ({max_steps} - {self.tfinal}); lower tinit or tfinal"]
        # peft scores importance at the steps before max_steps - tfinal (tuneport's steps count from 1) and sets
        # the final budget from those scores at that step: with none before it, its mask_to_budget fails.
        if max_steps - self.tfinal < 2:
            return [f"method.tfinal: {self.tfinal} leaves no step to score importance before the final budget is set "
                    f"at step {max_steps - self.tfinal}: train.max_steps - method.tfinal ({max_steps} - {self.tfinal}) "
                    "must be at least 2; lower tfinal or raise train.max_steps"]
        return []


@dataclass
class Ia3Config(MethodSettings):
    """(IA)^3 (Liu et al., 2022): learned vectors that rescale the keys, values and feed-forward activations."""

    name: str = "ia3"
    target_modules: Optional[list[str]] = None  # None: the model family's IA3 default
    feedforward_modules: Optional[list[str]] = None  # of those, the ones scaled on their input

    def problems(self) -> list[str]:
        if self.target_modules is not None and not self.target_modules:
            return ["method.target_modules: empty; name the layers to rescale, e.g. [query_key_value]"]
        return []

    def modules(self, family) -> tuple[list[str], list[str]]:
        """(target modules, feed-forward modules): the recipe's, or the model family's IA3 defaults.

        Raises:
            ValueError: feed-forward modules that are not targets (the message names the fix).
        """
        targets = list(self.target_modules or family.ia3_targets)
        feedforward = list(self.feedforward_modules if self.feedforward_modules is not None
                           else [m for m in family.ia3_feedforward if m in targets])
        extra = sorted(set(feedforward) - set(targets))
        if extra:
            raise ValueError(f"method.feedforward_modules: {extra} are not in the targets {targets}; add them to "
                             "method.target_modules or drop them")
        return targets, feedforward


@dataclass
class PromptTuningConfig(MethodSettings):
    """Prompt tuning (Lester et al., 2021): trained embeddings of virtual tokens before the input."""

    name: str = "prompt_tuning"
    virtual_tokens: ClassVar[bool] = True
    num_virtual_tokens: int = 20

    def problems(self) -> list[str]:
        return _positive_tokens(self.num_virtual_tokens)


@dataclass
class PtuningConfig(MethodSettings):
    """P-tuning (Liu et al., 2021): virtual token embeddings produced by a small trained encoder."""

    name: str = "ptuning"
    virtual_tokens: ClassVar[bool] = True
    num_virtual_tokens: int = 20
    encoder_hidden_size: int = 128
    encoder_type: str = "MLP"  # MLP | LSTM

    def problems(self) -> list[str]:
        found = _positive_tokens(self.num_virtual_tokens)
        if self.encoder_type not in ("MLP", "LSTM"):
            found.append(f"method.encoder_type: {self.encoder_type!r} is not one of MLP, LSTM")
        return found


@dataclass
class PrefixTuningConfig(MethodSettings):
    """Prefix tuning (Li and Liang, 2021) through peft: trained keys and values before every layer's
    attention (peft's adapter format; ChatGLM's own is `ptuning_v2`)."""

    name: str = "prefix_tuning"
    virtual_tokens: ClassVar[bool] = True
    num_virtual_tokens: int = 20
    prefix_projection: bool = False  # the prefix through a 2-layer MLP

    def problems(self) -> list[str]:
        return _positive_tokens(self.num_virtual_tokens)


def _positive_tokens(count: int) -> list[str]:
    return [f"method.num_virtual_tokens: {count!r} must be > 0"] if count <= 0 else []


@dataclass
class FullConfig(MethodSettings):
    """Full fine-tuning: every weight trains (in float32)."""

    name: str = "full"


@dataclass
class FreezeConfig(MethodSettings):
    """Freeze tuning (LLaMA-Factory's `freeze`): only the last `trainable_layers` transformer blocks train
    (of those, only the modules `trainable_modules` names, when it names any); every other weight stays
    frozen. The trained weights are float32, and the result is a complete checkpoint, as full fine-tuning's."""

    name: str = "freeze"
    needs: ClassVar[Optional[str]] = "freeze"  # the family says where its blocks are
    trainable_layers: int = 2  # the last N blocks train
    trainable_modules: Optional[list[str]] = None  # e.g. [mlp]: only these modules of those blocks; None: all

    def problems(self) -> list[str]:
        found = []
        if self.trainable_layers <= 0:
            found.append(f"method.trainable_layers: {self.trainable_layers!r} must be > 0")
        if self.trainable_modules is not None and not self.trainable_modules:
            found.append("method.trainable_modules: empty; name modules of a block (e.g. [mlp]), or null for all")
        return found

    def trained_names(self, names: list[str], family) -> set[str]:
        """Of a model's parameter names (the same in every framework), the ones this method trains.

        Raises:
            MethodUnavailable: the family does not say where its blocks are, the model has fewer blocks
                than `trainable_layers`, or no parameter of those blocks matches `trainable_modules`.
        """
        if not family.blocks:
            raise MethodUnavailable(f"method freeze: model type {family.model_type} does not declare its blocks "
                                    "(ModelFamily.blocks); use method lora or full")
        index = re.compile(re.escape(family.blocks) + r"\.(\d+)\.(.+)")
        found = {name: match for name in names if (match := index.fullmatch(name))}
        count = 1 + max((int(m[1]) for m in found.values()), default=-1)
        if self.trainable_layers > count:
            raise MethodUnavailable(f"method.trainable_layers: {self.trainable_layers} but the model has {count} "
                                    f"blocks; give at most {count}")
        wanted = set(self.trainable_modules or ())
        chosen = {name for name, m in found.items() if int(m[1]) >= count - self.trainable_layers
                  and (not wanted or wanted & set(m[2].split(".")))}
        if not chosen:
            raise MethodUnavailable(f"method.trainable_modules: {sorted(wanted)} match no parameter of the last "
                                    f"{self.trainable_layers} blocks ({sorted(found)[0].rpartition('.')[0]}, ...)")
        return chosen


MethodConfig = Union[LoraConfig, QLoraConfig, DoraConfig, AdaLoraConfig, Ia3Config, PromptTuningConfig, PtuningConfig,
                     PrefixTuningConfig, PtuningV2Config, FullConfig, FreezeConfig]


@dataclass(frozen=True)
class Method:
    """A registered method: its config class, and implementations given from outside the package
    (framework -> object); the package's own are the files `frameworks/<framework>/methods/<name>.py`."""

    config: type
    implementations: dict[str, Any] = field(default_factory=dict)


# The registry: a new method is its config class above, its line here, and one file per framework.
METHODS: dict[str, Method] = {name: Method(config) for name, config in (
    ("lora", LoraConfig), ("qlora", QLoraConfig), ("dora", DoraConfig), ("adalora", AdaLoraConfig),
    ("ia3", Ia3Config), ("prompt_tuning", PromptTuningConfig), ("ptuning", PtuningConfig),
    ("prefix_tuning", PrefixTuningConfig), ("ptuning_v2", PtuningV2Config), ("full", FullConfig),
    ("freeze", FreezeConfig))}


def register_method(name: str, config: type, implementations: dict[str, Any]) -> None:
    """Add a method from outside the package: its config dataclass (a MethodSettings whose `name` field
    defaults to `name`) and its implementation object for each framework that runs it."""
    METHODS[name] = Method(config, dict(implementations))


def decays(name: str, ndim: int) -> bool:
    """Whether weight decay applies to a trained parameter: matrices, not biases, norms or IA3's scaling
    vectors (stored as [n, 1] or [1, n]; decay would pull them to 0, not to their identity 1)."""
    return ndim >= 2 and "ia3_l" not in name


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
