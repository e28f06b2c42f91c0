"""Recipes: YAML files that say what to fine-tune, on what data, and how.

A recipe is read, `key=value` overrides are applied with dotted keys (`train.lr=1e-4`), and the result
is validated as a whole: every problem is reported at once, each naming the field, the bad value and
the fix. The resolved recipe is written into the run's output folder so a run can be resumed or
repeated exactly.
"""

from __future__ import annotations

import dataclasses
import difflib
import logging
import math
import re
import typing
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Optional, Union

import yaml

from ..frameworks import FRAMEWORKS, STRATEGIES_OF, frameworks_of
from ..models import builder_names
from .errors import RecipeError
from .methods import METHODS, LoraConfig, MethodConfig, foreign_default, method_fields
from .objectives import ObjectiveConfig, objective_problems

FORMATS = ("auto", "conversations", "alpaca", "advertisegen", "sharegpt")
SCHEDULERS = ("constant", "linear", "cosine")
STRATEGIES = ("ddp", "fsdp", "deepspeed")
DTYPES = ("fp32", "bf16", "fp16")  # the dtypes every command names (torch's: frameworks/torch/build.py)
PRECISIONS = ("auto", *DTYPES)
BUILTIN = "builtin:"  # files shipped in recipes/, e.g. builtin:demo.yaml, builtin:demo/data.jsonl


log = logging.getLogger(__name__)


@dataclass
class DataConfig:
    train: str = ""  # JSON or JSON-lines file
    eval: Optional[str] = None  # held-out file for evaluation loss
    format: str = "auto"  # auto | conversations | alpaca | advertisegen | sharegpt
    max_input_length: int = 256  # samples are cut to max_input + max_output + 1 tokens (official demo)
    max_output_length: int = 512
    group_by_length: bool = True  # batches of similar lengths (less padding); seeded, exact on resume
    mix: Optional[str] = None  # general-domain training file mixed into the batches, to limit forgetting
    # the share of samples drawn from data.mix (per batch, seeded, exact on resume); train.epochs counts all
    # samples, so with mixing an epoch covers (1 - mix_ratio) of data.train
    mix_ratio: float = 0.1
    # a chat template (.jinja) for a model folder without one (transformers decoders; ChatGLM3 has its own)
    template: Optional[str] = None
    # several samples a row, none seeing another (first-fit decreasing, seeded, exact on resume): less padding
    packing: bool = False
    pack_length: Optional[int] = None  # tokens a packed row holds; null: max_input + max_output + 1

    @property
    def longest_sample(self) -> int:
        """The most tokens a sample keeps (the official demo's cut)."""
        return self.max_input_length + self.max_output_length + 1

    @property
    def row_tokens(self) -> int:
        """The tokens of the longest row a micro-batch holds: a packed row, or the longest sample."""
        return (self.pack_length or self.longest_sample) if self.packing else self.longest_sample


@dataclass
class TrainConfig:
    max_steps: Optional[int] = None  # optimizer steps; or give epochs
    epochs: Optional[float] = None
    micro_batch_size: int = 4  # samples per forward pass
    grad_accum: int = 1  # micro-batches per optimizer step
    lr: float = 5e-5
    scheduler: str = "linear"  # constant | linear | cosine, after warmup
    warmup_steps: int = 0
    weight_decay: float = 0.0
    grad_clip: Optional[float] = 1.0  # max gradient norm; null disables clipping
    # true | false | auto: auto turns it off when `tuneport estimate` says the step fits the device's memory
    gradient_checkpointing: Union[bool, str] = "auto"
    seed: int = 42
    # ddp: every process holds the whole model; fsdp: torch's FSDP2 shards weights, gradients and optimizer
    # state over the processes (the frozen base too); deepspeed: the `deepspeed` JSON config's ZeRO stage
    strategy: str = "ddp"
    offload: bool = False  # fsdp: keep the shards of weights and optimizer state in host memory


@dataclass
class EvalConfig:
    every: int = 0  # optimizer steps between evaluations; 0 evaluates only at the end (if data.eval)
    max_batches: Optional[int] = None  # cap on evaluation micro-batches
    general: Optional[str] = None  # general-domain file scored by loss before training and at each evaluation
    generate: bool = False  # also generate replies to data.eval's prompts and score them (ROUGE, BLEU; eval extra)
    generate_samples: int = 50  # how many data.eval samples to generate for (the official demo's 50)


@dataclass
class SaveConfig:
    every: int = 0  # optimizer steps between checkpoints; 0 saves only the final adapter
    keep_last: int = 3  # checkpoints kept; older ones are deleted


@dataclass
class Recipe:
    model: str = ""  # official checkpoint folder, or a builder name (tuneport.models.builder_names())
    tokenizer: Optional[str] = None  # tokenizer.model or its folder; default: the model's
    method: MethodConfig = field(default_factory=LoraConfig)  # one of methods.METHODS, chosen by method.name
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)  # sft, or a preference objective
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    save: SaveConfig = field(default_factory=SaveConfig)
    precision: str = "auto"  # auto | fp32 | bf16 | fp16
    output_dir: str = "outputs/run"
    device: str = "auto"  # auto, or a registered device: cpu, cuda, npu, ... (tuneport.backends)
    framework: str = "torch"  # torch | mindspore
    deepspeed: Optional[str] = None  # DeepSpeed JSON config (ZeRO stage etc.); batch sizes come from train


def resolve_path(path: str) -> Path:
    """A recipe path: `builtin:...` inside the installed package, otherwise as given."""
    if path.startswith(BUILTIN):
        return Path(str(resources.files("tuneport.recipes").joinpath(path[len(BUILTIN):])))
    return Path(path).expanduser()


def parse_override(text: str) -> tuple[list[str], Any]:
    """`train.lr=1e-4` -> (["train", "lr"], 0.0001); the value is read as YAML."""
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise RecipeError(f"override {text!r}: expected key=value, e.g. train.lr=1e-4")
    if " #" in value or "\t#" in value:  # a command line has no comments: "runs/exp #2" is a name
        return key.strip().split("."), value.strip()
    try:
        return key.strip().split("."), yaml.safe_load(value) if value.strip() else None
    except yaml.YAMLError:
        raise RecipeError(f"override {text!r}: the value is not valid YAML; quote it, e.g. {key}='{value}'") from None


def apply_override(values: dict, keys: list[str], value: Any) -> None:
    node = values
    for key in keys[:-1]:
        node = node.setdefault(key, {})
        if not isinstance(node, dict):
            raise RecipeError(f"override {'.'.join(keys)}: {key} is not a section")
    node[keys[-1]] = value


def _type_ok(value: Any, hint: Any) -> bool:
    origin = typing.get_origin(hint)
    if origin is Union:
        return any(_type_ok(value, arg) for arg in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if origin is list:
        (item,) = typing.get_args(hint)
        return isinstance(value, list) and all(_type_ok(v, item) for v in value)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, hint)


def _type_name(hint: Any) -> str:
    if typing.get_origin(hint) is Union:
        return " or ".join(_type_name(a) for a in typing.get_args(hint))
    if typing.get_origin(hint) is list:
        return f"a list of {_type_name(typing.get_args(hint)[0])}"
    return {type(None): "null", int: "an integer", float: "a number", str: "a string", bool: "true/false"}.get(
        hint, getattr(hint, "__name__", str(hint))
    )


def _allows_float(hint: Any) -> bool:
    return hint is float or (typing.get_origin(hint) is Union and float in typing.get_args(hint))


def _coerce(value: Any, hint: Any) -> Any:
    """YAML 1.1 reads `5e-5` (no dot) as a string; a number field takes it as the number it means."""
    if isinstance(value, str) and _allows_float(hint):
        try:
            return float(value)
        except ValueError:
            return value
    if isinstance(value, int) and not isinstance(value, bool) and _allows_float(hint):
        return float(value)
    return value


def dotted_keys(cls=None, prefix: str = "") -> list[str]:
    """Every dotted key a recipe may set (`train.seed`, `method.r`, ...; the method keys of every method)."""
    cls = cls or Recipe
    hints = typing.get_type_hints(cls)
    keys = []
    for f in dataclasses.fields(cls):
        if cls is Recipe and f.name == "method":
            keys += sorted({f"method.{k}" for name in METHODS for k in method_fields(name)})
        elif dataclasses.is_dataclass(hints[f.name]):
            keys += dotted_keys(hints[f.name], f"{prefix}{f.name}.")
        else:
            keys.append(f"{prefix}{f.name}")
    return keys


def _suggestion(where: str, siblings: list[str], prefix: str) -> str:
    """For an unknown key: the keys of the whole recipe with the same last part (`seed` -> `train.seed`), else
    the closest dotted key (a typo), else the closest key beside it, else the keys beside it."""
    keys, leaf = dotted_keys(), where.rpartition(".")[2]
    close = ([k for k in keys if k.rpartition(".")[2] == leaf] or difflib.get_close_matches(where, keys, n=1)
             or [prefix + c for c in difflib.get_close_matches(leaf, siblings, n=1)])
    return f"did you mean {' or '.join(close[:3])}?" if close else f"known keys: {', '.join(siblings)}"


def _build(cls, values: dict, prefix: str, problems: list[str]):
    """Make dataclass `cls` from `values`, appending a problem for each unknown key or wrong type."""
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in values.items():
        where = f"{prefix}{key}"
        if key not in names:
            problems.append(f"{where}: unknown key; {_suggestion(where, names, prefix)}")
        elif cls is Recipe and key == "method":
            if isinstance(value, dict):
                kwargs[key] = _build_method(value, problems)
            else:
                problems.append(f"{where}: {value!r} must be a section of keys")
        elif dataclasses.is_dataclass(hints[key]):
            if isinstance(value, dict):
                kwargs[key] = _build(hints[key], value, f"{where}.", problems)
            else:
                problems.append(f"{where}: {value!r} must be a section of keys")
        elif not _type_ok(_coerce(value, hints[key]), hints[key]):
            problems.append(f"{where}: {value!r} must be {_type_name(hints[key])}")
        else:
            kwargs[key] = _coerce(value, hints[key])
    return cls(**kwargs)


def _build_method(values: dict, problems: list[str]) -> MethodConfig:
    """The config of the method `values["name"]` names (lora by default) from its own keys."""
    name = values.get("name", "lora")
    if not isinstance(name, str) or name not in METHODS:
        problems.append(f"method.name: {name!r} is not one of {', '.join(METHODS)}")
        return LoraConfig()
    own = method_fields(name)
    mine = {k: v for k, v in values.items() if k in own or not foreign_default(k, v, name)}
    for key in [k for k in mine if k not in own]:
        other = [m for m in METHODS if key in method_fields(m)]
        if other:  # e.g. `method.name=ptuning_v2` over a LoRA recipe: its LoRA keys do not apply
            log.warning("method.%s: ignored; it belongs to method %s, not %s", key, " or ".join(other), name)
            del mine[key]
    return _build(METHODS[name].config, mine, "method.", problems)


def _check_values(r: Recipe) -> list[str]:
    """Problems with values that have the right type but are not allowed."""
    found = []

    def choice(name: str, value: str, allowed: tuple):
        if value not in allowed:
            found.append(f"{name}: {value!r} is not one of {', '.join(allowed)}")

    def positive(name: str, value, allow_zero: bool = False):
        if value is not None and (value < 0 or (value == 0 and not allow_zero)):
            found.append(f"{name}: {value!r} must be {'>= 0' if allow_zero else '> 0'}")

    if not r.model:
        found.append("model: missing; give an official checkpoint folder or a builder name "
                     f"({', '.join(builder_names())})")
    if not r.data.train:
        found.append("data.train: missing; give a JSON or JSON-lines training file")
    found += r.method.problems()
    found += r.method.recipe_problems(r)
    if r.method.name in METHODS and r.framework in FRAMEWORKS and r.framework not in frameworks_of(r.method.name):
        found.append(f"method.name: {r.method.name} does not run with framework {r.framework}; it runs with "
                     f"{', '.join(frameworks_of(r.method.name))}")
    choice("data.format", r.data.format, FORMATS)
    choice("train.scheduler", r.train.scheduler, SCHEDULERS)
    if isinstance(r.train.gradient_checkpointing, str):
        choice("train.gradient_checkpointing", r.train.gradient_checkpointing, ("auto",))
    choice("precision", r.precision, PRECISIONS)
    choice("framework", r.framework, FRAMEWORKS)
    found += _strategy_problems(r)
    if (r.train.max_steps is None) == (r.train.epochs is None):
        found.append("train.max_steps / train.epochs: give exactly one of them (the other null)")
    for name, value in [("data.max_input_length", r.data.max_input_length),
                        ("data.max_output_length", r.data.max_output_length),
                        ("train.max_steps", r.train.max_steps), ("train.epochs", r.train.epochs),
                        ("train.micro_batch_size", r.train.micro_batch_size),
                        ("train.grad_accum", r.train.grad_accum), ("train.lr", r.train.lr),
                        ("train.grad_clip", r.train.grad_clip), ("save.keep_last", r.save.keep_last),
                        ("eval.max_batches", r.eval.max_batches)]:
        positive(name, value)
    for name, value in [("train.warmup_steps", r.train.warmup_steps), ("train.weight_decay", r.train.weight_decay),
                        ("eval.every", r.eval.every), ("save.every", r.save.every)]:
        positive(name, value, allow_zero=True)
    for name, value in flatten(dataclasses.asdict(r)).items():
        if isinstance(value, float) and not math.isfinite(value):
            found.append(f"{name}: {value!r} must be a finite number")
    if r.eval.generate and not r.data.eval:
        found.append("eval.generate: true needs data.eval, the file whose replies are generated and scored")
    positive("eval.generate_samples", r.eval.generate_samples)
    found += _packing_problems(r)
    found += objective_problems(r)
    if not 0 <= r.data.mix_ratio < 1:
        found.append(f"data.mix_ratio: {r.data.mix_ratio!r} must be in [0, 1): the share of each batch from data.mix")
    if not 0 <= r.train.seed < 2**32:
        found.append(f"train.seed: {r.train.seed!r} must be in [0, 2**32 - 1]")
    return found


def _packing_problems(r: Recipe) -> list[str]:
    """data.packing against the row length and the method."""
    d, found = r.data, []
    if d.pack_length is not None and d.pack_length < d.longest_sample:
        found.append(f"data.pack_length: {d.pack_length!r} is shorter than a sample may be (max_input_length + "
                     f"max_output_length + 1 = {d.longest_sample}); raise it or lower those lengths")
    if d.packing and getattr(r.method, "virtual_tokens", False):
        found.append(f"data.packing: method {r.method.name} puts its virtual tokens before each sample, which "
                     "packed rows of several samples cannot hold; set data.packing: false or use another method")
    return found


def _strategy_problems(r: Recipe) -> list[str]:
    """train.strategy against the DeepSpeed config, offload and the framework."""
    t = r.train
    if t.strategy not in STRATEGIES:
        return [f"train.strategy: {t.strategy!r} is not one of {', '.join(STRATEGIES)}"]
    found = []
    if t.strategy == "deepspeed" and not r.deepspeed:
        found.append("train.strategy: deepspeed needs deepspeed: its JSON config, e.g. "
                     "deepspeed=builtin:deepspeed/zero3.json")
    if t.strategy == "fsdp" and r.deepspeed:
        found.append("train.strategy / deepspeed: fsdp and a DeepSpeed config exclude each other; remove deepspeed= "
                     "for fsdp, or set train.strategy=deepspeed")
    if t.offload and t.strategy != "fsdp":
        found.append("train.offload: true is FSDP's host-memory offload: set train.strategy=fsdp (DeepSpeed offloads "
                     "through its JSON: deepspeed=builtin:deepspeed/zero3_offload.json)")
    if r.framework in FRAMEWORKS and t.strategy not in STRATEGIES_OF[r.framework]:
        found.append(f"train.strategy: {t.strategy} is not a strategy of framework {r.framework}; it has "
                     f"{', '.join(STRATEGIES_OF[r.framework])}")
    return found


def load_recipe(source: Union[str, Path, dict], overrides: tuple[str, ...] = ()) -> Recipe:
    """Read, override and validate a recipe.

    Args:
        source: a YAML file (`builtin:demo.yaml` style paths allowed) or an already-parsed dict.
        overrides: `dotted.key=value` strings applied in order; values are read as YAML.

    Returns:
        The validated Recipe.

    Raises:
        RecipeError: listing every problem, each with field, value and fix.
    """
    name = str(source) if not isinstance(source, dict) else "recipe"
    if isinstance(source, dict):
        values = dict(source)
    else:
        path = resolve_path(str(source))
        try:
            values = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except FileNotFoundError:
            raise RecipeError(f"{name}: file not found") from None
        except (OSError, UnicodeDecodeError) as e:
            raise RecipeError(f"{name}: cannot be read as a YAML recipe ({e.__class__.__name__}: {e})") from None
        except yaml.YAMLError as e:
            line = getattr(getattr(e, "problem_mark", None), "line", None)
            where = f"line {line + 1}: " if line is not None else ""
            raise RecipeError(f"{name}: {where}invalid YAML ({getattr(e, 'problem', e)})") from None
        if not isinstance(values, dict):
            raise RecipeError(f"{name}: expected a mapping of recipe keys at the top level")
    overridden = []
    for text in overrides:
        keys, value = parse_override(text)
        apply_override(values, keys, value)
        overridden.append(".".join(keys))
    problems: list[str] = []
    recipe = _build(Recipe, values, "", problems)
    if recipe.deepspeed and recipe.train.strategy == "ddp":
        recipe.train.strategy = "deepspeed"  # a DeepSpeed config names the strategy (recipes from before it)
    problems += _check_values(recipe)
    if problems:
        # Each problem starts with its field(s); one an override set is the command line's, not the file's.
        sourced = [("command line" if _from(problem, overridden) else name, problem) for problem in problems]
        sources = {source for source, _ in sourced}
        if len(sources) == 1:
            (source,) = sources
            if len(problems) == 1:
                raise RecipeError(f"{source}: {problems[0]}")
            raise RecipeError(f"{source}: {len(problems)} problems:\n  " + "\n  ".join(problems))
        raise RecipeError(f"{len(problems)} problems:\n  " + "\n  ".join(f"{s}: {p}" for s, p in sourced))
    return recipe


def _from(problem: str, keys: list[str]) -> bool:
    """Whether `problem` ("train.lr: ...", "train.max_steps / train.epochs: ...") concerns one of `keys`."""
    fields = re.split(r" / |, ", problem.partition(": ")[0])
    return any(f == k or f.startswith(k + ".") or k.startswith(f + ".") for f in fields for k in keys)


def recipe_to_dict(recipe: Recipe) -> dict:
    return dataclasses.asdict(recipe)


def flatten(values: dict, prefix: str = "") -> dict:
    """{"train": {"lr": 1}} -> {"train.lr": 1}"""
    flat = {}
    for key, value in values.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def changed_keys(old: Recipe, new: Recipe) -> dict[str, tuple[Any, Any]]:
    """Dotted keys whose values differ between two recipes, as {key: (old, new)}."""
    a, b = flatten(recipe_to_dict(old)), flatten(recipe_to_dict(new))
    return {key: (a.get(key), b.get(key)) for key in {**a, **b} if a.get(key) != b.get(key)}

