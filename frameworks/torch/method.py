"""What a tuning method is to the torch framework: one `TorchMethod` object per method, in
`methods/<name>.py` (its `METHOD`), whose hooks do everything that differs between methods.

The builder (`build.py`) and the runtime (`runtime.py`) call the hooks and never a method's name:
`check` before the base model loads, `base_dtype` for its frozen weights, `attach` to add the adapter
and freeze the rest (also on the meta device, for `tuneport estimate`), `checkpointing` to veto
activation checkpointing, `after_step` after every optimizer step, `task_model` for evaluation,
`state`/`set_state` for what a checkpoint carries beyond trained weights and optimizer, `save` and
`load` for the tuned result, `merged` to fold it into plain weights (export, serve), and `trained`
for the weights a loaded result was trained in (`tuneport parity`). `PeftMethod` is the shared part of the peft methods.
"""

from __future__ import annotations

import pickle
import sys
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from ...core.config import resolve_path
from ...core.errors import CheckpointError, MethodUnavailable
from ...models import ModelFamily, read_json, refused_pickle


@dataclass
class Build:
    """What the hooks know of the model being built.

    Attributes:
        method: the method's config (a `core.methods.MethodSettings`).
        family: the model's family.
        purpose: "train", "load" (chat, eval, serve, export, parity) or "meta" (estimate, no weights).
        compute: the compute dtype (frozen weights may live in it; trained ones stay float32).
        backend: the device backend (None on the meta device).
        device: the torch device weights go to.
        model_dir: the base checkpoint folder (None for a model built from a config).
        max_steps: the run's length, for methods that schedule over it.
        shares: the micro-batches of all processes that add up to one optimizer step.
        quantize: replaces QLoRA's 4-bit rounding of the frozen base (tests).
    """

    method: Any
    family: ModelFamily
    purpose: str = "train"
    compute: torch.dtype = torch.float32
    backend: Any = None
    device: Optional[torch.device] = None
    model_dir: Optional[Path] = None
    max_steps: Optional[int] = None
    shares: int = 1
    quantize: Optional[Callable[[nn.Module], None]] = None


class TorchMethod:
    """The defaults: a method that trains what `attach` leaves trainable and saves nothing extra."""

    adapter_files: tuple[str, ...] = ()  # the files that mark its tuned result (the longest match loads a folder)
    state_file: Optional[str] = None  # a checkpoint's file for `state` (None: the method has none)
    unestimated: Optional[str] = None  # why `tuneport estimate` cannot predict its memory (None: it can)

    def owns(self, adapter: Path) -> bool:
        """Whether the folder `adapter` holds this method's tuned result (of those that do, the one with the
        most marker files loads it)."""
        return bool(self.adapter_files) and all((adapter / f).exists() for f in self.adapter_files)

    def check(self, build: Build) -> None:
        """Refuse what cannot run here (MethodUnavailable), before any weight loads."""

    def base_dtype(self, build: Build) -> torch.dtype:
        """The dtype the base model loads in: frozen weights may live in the compute dtype."""
        return build.compute

    def attach(self, model: nn.Module, build: Build) -> nn.Module:
        """`model` made ready to train: its adapter added, what it does not train frozen. Reads no weights
        unless the method starts from saved ones, so it also runs on the meta device."""
        raise NotImplementedError

    def checkpointing(self, model: nn.Module, build: Build, wanted: bool, required: bool) -> bool:
        """Whether activation checkpointing may stay on (`required`: the recipe asked for it by name)."""
        return wanted

    def after_step(self, model: nn.Module, steps_done: int) -> None:
        """After each finite optimizer step."""

    def task_model(self, model: nn.Module) -> nn.Module:
        """The model whose loss scores the task (evaluation)."""
        return model

    def state(self, model: nn.Module, steps_done: int) -> dict:
        """What continuing bit for bit needs beyond the trained weights and the optimizer (`state_file`)."""
        return {}

    def set_state(self, model: nn.Module, state: dict) -> int:
        """Restore `state`; returns the optimizer steps it counted."""
        return 0

    complete = False  # its result holds every weight of the model (then a sharded run gathers them all)

    def save(self, model: nn.Module, build: Build, folder: Path, trained: dict[str, torch.Tensor],
             weights: Optional[dict[str, torch.Tensor]] = None) -> None:
        """Write the tuned result in its portable format into `folder` (which exists). `trained`: the
        trained weights by name; `weights`: in a sharded run, the model's state gathered whole (the trained
        weights, or every weight for a `complete` method), to write instead of the model's own."""
        raise NotImplementedError

    def load(self, base: Path, adapter: Path, load_base: Callable[..., nn.Module], family: ModelFamily) -> nn.Module:
        """The base model `base` (of `family`) with the tuned result in `adapter` applied; `load_base(folder,
        **config overrides)` loads a checkpoint on the caller's device and dtype.

        Raises:
            CheckpointError: the result is damaged or does not fit the base.
        """
        raise NotImplementedError

    def trained(self, model: nn.Module, family: ModelFamily) -> dict[str, nn.Parameter]:
        """The parameters a loaded result was trained in (their gradients are what parity compares)."""
        return {}

    def merged(self, model: nn.Module) -> Optional[nn.Module]:
        """The loaded result as plain weights of the model (export, serve); None when it cannot be folded in.
        The default: it is the model's weights already (full, freeze, P-tuning v2's prefix encoder)."""
        return model


@contextmanager
def bitsandbytes_hidden():
    """peft with bitsandbytes out of sight, for a run that quantizes nothing.

    peft imports bitsandbytes whenever it is installed (at its own import, and again when it wraps
    layers), and bitsandbytes brings torch's compiler with it: about 45 MiB of memory and a second of
    start-up that only QLoRA uses. Inside this block `import bitsandbytes` fails as if it were absent;
    afterwards peft's cached answer is cleared, so a later QLoRA run in the same process still finds it.
    """
    if "bitsandbytes" in sys.modules:  # already imported (or already hidden): nothing to save
        yield
        return
    sys.modules["bitsandbytes"] = None  # what the import system reads as "not installed"
    try:
        yield
    finally:
        del sys.modules["bitsandbytes"]
        from peft import import_utils

        import_utils.is_bnb_available.cache_clear()
        import_utils.is_bnb_4bit_available.cache_clear()


class PeftMethod(TorchMethod):
    """A method peft implements: its adapter is peft's, saved and loaded by peft (`adapter_config.json`)."""

    adapter_files = ("adapter_config.json",)
    peft_type = "LORA"  # its adapter_config.json's peft_type

    def owns(self, adapter: Path) -> bool:
        return super().owns(adapter) and read_json(adapter / "adapter_config.json").get("peft_type") == self.peft_type

    def peft_config(self, method, family: ModelFamily, model_config, max_steps: Optional[int]):
        """The peft config of `method`, with the family's defaults where the recipe names no layers."""
        raise NotImplementedError

    def quantize(self, model: nn.Module, build: Build) -> bool:
        """Round the frozen base before peft wraps it; whether it did (then bitsandbytes stays visible)."""
        return False

    def attach(self, model: nn.Module, build: Build) -> nn.Module:
        method, family = build.method, build.family
        model.requires_grad_(False)
        quantized = self.quantize(model, build)
        with nullcontext() if quantized else bitsandbytes_hidden():
            from peft import get_peft_model

            config = self.peft_config(method, family, model.config, build.max_steps)
            try:
                tuned = get_peft_model(model, config)
            except ValueError as e:  # peft: no module matches target_modules
                targets = getattr(method, "target_modules", None) or sorted(getattr(config, "target_modules", None)
                                                                            or [])
                raise MethodUnavailable(f"method.target_modules: {targets} ({e}); {family.model_type}'s linear "
                                        f"layers are {', '.join(family.linear_layers)}") from None
        if build.model_dir is not None:
            tuned.peft_config["default"].base_model_name_or_path = str(build.model_dir.resolve())
        if getattr(method, "init_from", None) and build.purpose == "train":
            self._start_from(tuned, method, build.device)
        return tuned

    @staticmethod
    def _start_from(tuned: nn.Module, method, device) -> None:
        from peft import set_peft_model_state_dict

        weights = load_file(resolve_path(method.init_from) / "adapter_model.safetensors", device=str(device))
        try:
            result = set_peft_model_state_dict(tuned, weights)
        except RuntimeError as e:  # shape mismatch: the adapter has another rank or targets
            raise MethodUnavailable(f"method.init_from: {method.init_from} does not fit this method's "
                                    f"settings ({method}): {str(e)[:300]}") from None
        if getattr(result, "unexpected_keys", None):
            raise MethodUnavailable(f"method.init_from: {method.init_from}: weights {result.unexpected_keys[:3]} "
                                    "match no layer of this model")

    def save(self, model, build: Build, folder: Path, trained, weights=None) -> None:
        model.save_pretrained(folder, state_dict=weights)

    def prepare_base(self, model: nn.Module, adapter: Path) -> bool:
        """Change the loaded base before the adapter goes on (QLoRA's 4-bit rounding); whether bitsandbytes
        was used."""
        return False

    def load(self, base: Path, adapter: Path, load_base: Callable[..., nn.Module], family: ModelFamily) -> nn.Module:
        with bitsandbytes_hidden():  # QLoRA's base is dequantized by bitsandbytes, which imports it then
            from peft import PeftModel

        trained_on = read_json(adapter / "adapter_config.json").get("base_model_name_or_path") or "?"
        model = load_base(base)
        quantized = self.prepare_base(model, adapter)
        try:
            with nullcontext() if quantized else bitsandbytes_hidden():
                return PeftModel.from_pretrained(model, str(adapter)).eval()
        except (RuntimeError, ValueError) as e:  # torch: size mismatch; peft: target layers missing in this model
            raise CheckpointError(f"--adapter {adapter}: does not fit the base model {base} "
                                  f"({str(e).strip().splitlines()[-1].strip()[:200]}); pass the base it was tuned "
                                  f"from ({trained_on})") from None
        except SafetensorError as e:
            raise CheckpointError(f"--adapter {adapter}: damaged adapter file ({e}); copy the adapter again") from None
        except pickle.UnpicklingError as e:  # a pickle adapter_model.bin
            raise refused_pickle(adapter / "adapter_model.bin", e) or CheckpointError(
                f"--adapter {adapter}: damaged adapter file ({e}); copy the adapter again") from None

    def trained(self, model: nn.Module, family: ModelFamily) -> dict[str, nn.Parameter]:
        adapter = model.active_adapter  # its parameters carry the adapter's name
        return {n: p for n, p in model.named_parameters() if adapter in n.split(".")}

    def merged(self, model: nn.Module) -> Optional[nn.Module]:
        return model.merge_and_unload()  # LoRA, DoRA, AdaLoRA, IA3: peft folds the adapter into the weights


class VirtualTokens(PeftMethod):
    """A peft method that puts trained virtual tokens before the input (prompt tuning, P-tuning, prefix
    tuning): nothing to fold into the weights."""

    def merged(self, model: nn.Module) -> Optional[nn.Module]:
        return None


class LoraLike(PeftMethod):
    """LoRA and its variants: the family's LoRA targets unless the recipe names its own."""

    dora = False  # peft's use_dora

    def common(self, method, family: ModelFamily) -> dict:
        return dict(lora_alpha=method.alpha, lora_dropout=method.dropout,
                    target_modules=list(method.target_modules or family.lora_targets), task_type="CAUSAL_LM")

    def peft_config(self, method, family, model_config, max_steps):
        import peft

        return peft.LoraConfig(r=method.r, use_dora=self.dora, **self.common(method, family))
