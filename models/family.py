"""What a model family is to the rest of tuneport (`ModelFamily`), and the checkpoint helpers every
family's loaders share. The registry of families is `tuneport.models` (this package's __init__); a
family's folder imports this module, never the registry."""

from __future__ import annotations

import copy
import functools
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

from ..core.errors import CheckpointError, Unsupported

# What a family can support, and the fields that provide it (a family supports a feature when they are set).
FEATURES = {
    "torch": "load_model",  # every family: the torch model
    "mindspore": "mindspore",  # a MindSpore model: --framework mindspore, parity against it
    "ptuning_v2": "prefix_module",  # its own P-tuning v2 prefix encoder
    "freeze": "blocks",  # freeze tuning and parity's per-block rows
    "export": "save_official",  # tuneport export (the official layout)
    "onnx": "export_onnx",  # tuneport export --format onnx
    "serve": "chat",  # tuneport serve (its chat protocol)
    "estimate": ("model_class", "load_config"),  # tuneport estimate (from config.json alone)
    "convert": "convert",  # tuneport convert
    "template": "templated",  # data.template: its tokenizer renders with a chat template it is given
}


# A chat template as a file of its own (transformers' name for it in a checkpoint folder); a run trained with
# data.template keeps it in its adapter folder, so that serving and exporting render with it.
TEMPLATE_FILE = "chat_template.jinja"


def _stamp(path: Path) -> tuple:
    """What tells one version of a file from the next: its path, modification time and size."""
    info = os.stat(path)
    return str(Path(path).resolve()), info.st_mtime_ns, info.st_size


@functools.lru_cache(maxsize=64)
def _parsed_json(stamp: tuple) -> dict:
    path = stamp[0]
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: line {e.lineno}: invalid JSON ({e.msg})") from None
    except UnicodeDecodeError as e:
        raise CheckpointError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None


def read_json(path: Path) -> dict:
    """A JSON file of a checkpoint or adapter folder, parsed once per version of the file (a command asks for
    config.json from several places); every problem is a one-line CheckpointError."""
    try:
        stamp = _stamp(path)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: file not found") from None
    return copy.deepcopy(_parsed_json(stamp))


def checked_once(check: Callable[..., tuple]) -> Callable[..., tuple]:
    """A family's `check_checkpoint`, run once per version of the folder and config overrides: training,
    loading and the memory estimate of one command each ask for it, and the check reads every weight
    file's header."""
    cache: dict[tuple, tuple] = {}

    @functools.wraps(check)
    def checked(path, **overrides):
        folder = Path(path)
        try:
            stamp = tuple(sorted(_stamp(p) for p in folder.iterdir()))
        except OSError:  # not a folder: the check says so
            return check(path, **overrides)
        key = (str(folder.resolve()), tuple(sorted(overrides.items(), key=str)), stamp)
        if key not in cache:
            cache.clear()  # one folder at a time is what a command checks
            cache[key] = check(path, **overrides)
        return copy.deepcopy(cache[key])

    checked.cache_clear = cache.clear
    return checked


def refused_pickle(file: Path, error: BaseException) -> Optional[CheckpointError]:
    """The one-line error for a pickle (.bin) file that torch's safe loader refused; None when `error` is
    another failure (a truncated zip or bad header keeps its own message). A file that would call code or
    build objects other than tensors is refused, naming the global it asks for; one the loader cannot parse
    is damaged. torch's advice to turn the safe loader off is never repeated."""
    text = str(error)
    if "Weights only load failed" not in text:
        return None
    found = re.search(r"GLOBAL ([\w.]+)", text)
    if found:
        return CheckpointError(f"{file}: refused: loading this pickle file would call {found.group(1)}; tuneport never "
                               "unpickles code or objects from a checkpoint. Get the model's safetensors files from a "
                               "trusted source, or convert this file to safetensors on a machine you trust")
    detail = next((line.strip() for line in text.splitlines()[1:]
                   if line.strip() and not line.startswith(("Please file", "Check the documentation"))), "")
    return CheckpointError(f"{file}: cannot be read (the safe pickle loader stopped at: {detail or 'an unknown opcode'});"
                           " the file is damaged or incomplete, download it again (or get the model's safetensors "
                           "files)")


def layout_weight_files(folder: Path, layouts: tuple[tuple[str, str], ...], hint: str = "") -> list[Path]:
    """The weight files of a checkpoint `folder` in the first of `layouts` ((index file, single file) pairs,
    preferred first) it has: the index's shards when it is sharded, else the single file.

    Raises:
        CheckpointError: no weights (`hint` says more), an index without a weight map, shards that are
            missing, or an index entry that points outside the folder (checked before any shard is opened).
    """
    for index_name, single_name in layouts:
        index = folder / index_name
        if index.exists():
            weight_map = read_json(index).get("weight_map")
            if not isinstance(weight_map, dict) or not weight_map:
                raise CheckpointError(f"{index}: has no 'weight_map' of parameter names to shard files")
            names = list(dict.fromkeys(weight_map.values()))
            # Judged by the name alone: a shard that is a symlink (as in the Hugging Face cache) is the
            # user's choice, but the index must not lead us out of the folder.
            outside = [name for name in names if not isinstance(name, str) or os.path.isabs(name)
                       or os.path.normpath(name).split(os.sep)[0] in ("..", "")]
            if outside:
                raise CheckpointError(f"{index}: weight_map names shard files outside the checkpoint folder "
                                      f"({', '.join(map(str, outside[:3]))}); each entry must be a file name in "
                                      f"{folder}")
            missing = [name for name in names if not (folder / name).is_file()]
            if missing:
                raise CheckpointError(f"{index}: lists shard files that are not in the folder: {', '.join(missing)}")
            return [folder / name for name in names]
        if (folder / single_name).is_file():
            return [folder / single_name]
    expected = ", ".join(name for pair in layouts for name in pair)
    raise CheckpointError(f"{folder}: no weights found; expected one of {expected}{hint}")


def check_vocabulary_size(tokens: int, rows: int, field: str, tokenizer_file: str, tokenizer_path, model_path) -> None:
    """A tokenizer of `tokens` ids must not produce ids past the model's `rows` embedding rows.

    Raises:
        CheckpointError: naming both files, the sizes, the config field and the fix.
    """
    if tokens > rows:
        raise CheckpointError(
            f"{tokenizer_path}: the tokenizer has {tokens} tokens but the model in {model_path} has {rows} embedding "
            f"rows (config.json {field}); use the {tokenizer_file} that came with the model")


def older_cache_name(inputs: dict) -> dict:
    """`generate()`'s model inputs with the cache under its older name `past_key_values` (transformers 5
    calls it `cache`), which peft's prompt methods (peft 0.21) read to tell the first step from the next
    and set to inject their prefix; the models take both names."""
    if "cache" in inputs:
        inputs["past_key_values"] = inputs.pop("cache")
    return inputs


@dataclass(frozen=True)
class ModelFamily:
    """What the rest of tuneport needs from one model family.

    Attributes:
        model_type: the `model_type` of its config.json.
        check_checkpoint: (folder, **config overrides) -> (config, weight files, optional tensor names);
            validates a folder from its config and weight headers, reading no weights.
        load_model: (folder, backend, dtype=None, device_index=0, **config overrides) -> a torch model
            whose forward takes input_ids, attention_mask, labels, num_items_in_batch, use_cache and
            loss_only (the loss from label positions alone, no logits) and returns an output with
            `.loss` and `.logits` (a transformers PreTrainedModel).
        load_tokenizer: (folder or tokenizer file) -> a tokenizer with `encode_conversation`,
            `build_chat_input`, `stop_token_ids`, `pad_token_id` and `decode`.
        check_vocabulary: (tokenizer, config, tokenizer path, model path) -> None; raises CheckpointError
            when the tokenizer makes ids past the model's embedding.
        lora_targets: the linear layers LoRA (and DoRA, AdaLoRA) adapts by default.
        ia3_targets: the layers IA3 rescales by default, and ia3_feedforward those of them scaled on
            their input (the feed-forward ones).
        prefix_shape: (config) -> peft PrefixTuningConfig keys (num_attention_heads, token_dim) for a
            config whose KV geometry peft cannot read (grouped KV heads under other names); optional.
        linear_layers: every adaptable linear layer's name (for error messages).
        blocks: the module path of its list of transformer blocks (the same in every framework), whose
            parameters are named `BLOCKS.N.…`; "" when the family does not say (freeze tuning and
            `tuneport parity` need it).
        prefix_module: the module path of its own P-tuning v2 prefix encoder; "" for none.
        prefix_config: (virtual tokens, projection) -> the config.json keys that build that prefix encoder
            (also what a P-tuning v2 result's prefix_config.json holds); optional.
        reference: (name, config maker) of the family's flagship size, for tables (`tuneport methods`); optional.
        builders: base models it builds by name: name -> (config maker, folder writer).
        convert: (source folder, destination) -> None, the weights rewritten as safetensors; optional.
        save_official: (torch model, folder) -> None, the model in the family's official checkpoint
            layout (for `tuneport export`); optional.
        release_code: the release's own code files that engines run with trust_remote_code: file name ->
            the sha256 of each published version (`tuneport export` copies only those); optional.
        export_onnx: (torch model, file) -> None, the model as one ONNX generation step with its KV
            cache (the inputs and outputs of `tuneport.core.onnx_generate`), config.json beside; optional.
        load_config: (folder, **overrides) -> the validated config from config.json alone; optional.
        model_class: (config) -> an untrained torch model of that config (for `tuneport estimate`, which
            builds it on the meta device); optional.
        chat: () -> the module with its chat protocol for the server (`history_from_openai`,
            `split_reply`, `parse_tool_call`, `ChatFormatError`); optional.
        mindspore: () -> the module with the MindSpore model (`load_model`, LoRA helpers); optional.
        templated: `load_tokenizer` also takes `template`, a chat template file (.jinja) to render with.
    """

    model_type: str
    check_checkpoint: Callable[..., tuple]
    load_model: Callable[..., Any]
    load_tokenizer: Callable[[Any], Any]
    check_vocabulary: Callable[..., None]
    lora_targets: tuple[str, ...]
    linear_layers: tuple[str, ...]
    blocks: str = ""
    prefix_module: str = ""
    prefix_config: Optional[Callable[[int, bool], dict]] = None
    ia3_targets: tuple[str, ...] = ()
    ia3_feedforward: tuple[str, ...] = ()
    prefix_shape: Optional[Callable[[Any], dict]] = None
    reference: Optional[tuple[str, Callable[[], Any]]] = None
    builders: dict[str, tuple[Callable[[], Any], Callable[[Path], None]]] = field(default_factory=dict)
    convert: Optional[Callable[[Path, Path], None]] = None
    save_official: Optional[Callable[[Any, Path], None]] = None
    release_code: dict[str, frozenset[str]] = field(default_factory=dict)
    export_onnx: Optional[Callable[[Any, Path], None]] = None
    chat: Optional[Callable[[], Any]] = None
    model_class: Optional[Callable[[Any], Any]] = None
    load_config: Optional[Callable[..., Any]] = None
    mindspore: Optional[Callable[[], Any]] = None
    templated: bool = False

    @property
    def supports(self) -> frozenset[str]:
        """The FEATURES this family has."""
        return frozenset(name for name, fields in FEATURES.items()
                         if all(getattr(self, f) for f in ((fields,) if isinstance(fields, str) else fields)))

    def require(self, feature: str, what: str) -> None:
        """Refuse `what` (a command or option, for the message) when the family lacks `feature`, before anything
        loads.

        Raises:
            Unsupported: naming the model type, what it lacks and what it has.
        """
        if feature not in self.supports:
            raise Unsupported(f"{what}: {self.model_type} models do not support {feature}; they support "
                              f"{', '.join(sorted(self.supports)) or 'training with the torch framework only'}")
