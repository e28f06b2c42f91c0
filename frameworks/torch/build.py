"""The one builder of "the model with its tuning method" in torch, for every purpose: training, loading a
tuned result (chat, eval, serve, export, parity) and the meta-device model `tuneport estimate` measures.
What differs between methods is each method's `TorchMethod` (method.py); this module never asks a name.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Union

import torch
from torch import nn

from ...backends.reference import REFERENCE_KERNELS, lean_swiglu
from ...core.config import DTYPES as CONFIG_DTYPES
from ...core.errors import CheckpointError
from ...models import ModelFamily, family_for
from .. import implementation, implementations
from .method import Build, TorchMethod

DTYPES = dict(zip(CONFIG_DTYPES, (torch.float32, torch.bfloat16, torch.float16)))  # config.DTYPES as torch's
PURPOSES = ("train", "load", "meta")


@dataclass
class Tuned:
    """A built model, the method implementation that built it, and what the hooks knew (None when loaded
    without an adapter)."""

    model: nn.Module
    method: Optional[TorchMethod]
    build: Optional[Build]


def enable_checkpointing(model: nn.Module) -> None:
    """Activation (gradient) checkpointing on a transformers model, by its current name: transformers 5.2x
    deprecated `gradient_checkpointing_enable` for `activation_checkpointing_enable` (same behaviour)."""
    (getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable)()


def build_tuned_model(model: Union[Path, Any], method, backend, purpose: str, compute: torch.dtype = torch.float32, *,
                      device_index: int = 0, adapter: Optional[Path] = None, family: Optional[ModelFamily] = None,
                      max_steps: Optional[int] = None, shares: int = 1,
                      checkpointing: Union[bool, Callable[[nn.Module], bool]] = False, required: bool = False,
                      quantize: Optional[Callable[[nn.Module], None]] = None, host: bool = False) -> Tuned:
    """The model `method` tunes, built for `purpose`.

    Args:
        model: the base checkpoint folder; for "meta", the model's config (with `family`).
        method: the method's config; for "load", None (the adapter folder says which method made it).
        backend: a Backend, or a device name (None for "meta").
        purpose: "train" (the base loaded, the method attached, trained weights from the recipe's seed),
            "load" (`adapter` applied to the base; no adapter: the base alone) or "meta" (shapes only).
        compute: the compute dtype; frozen base weights live in it unless the method trains them.
        device_index: which of the backend's devices.
        max_steps, shares: the run's length and the micro-batches per optimizer step (training).
        checkpointing: activation checkpointing, or a function of the loaded model that decides it;
            `required`: the recipe asked for it by name (a method that cannot keep it then refuses).
        quantize: replaces QLoRA's 4-bit rounding (tests).
        host: ("train") build in host memory, with the backend's kernels, for FSDP to shard onto the device
            (so the whole model never has to fit one device).

    Raises:
        MethodUnavailable: the method cannot run on this model, device or software stack.
        CheckpointError: ("load") the adapter is missing, damaged, or from another base.
    """
    if purpose not in PURPOSES:
        raise ValueError(f"purpose {purpose!r} is not one of {', '.join(PURPOSES)}")
    if purpose == "load":
        return _load(Path(model), adapter, backend, compute, device_index)
    impl = implementation(method.name, "torch")
    meta = purpose == "meta"
    family = family or family_for(Path(model))
    device = torch.device("meta") if meta else torch.device("cpu") if host else backend.device(device_index)
    build = Build(method, family, purpose, compute, backend, device, None if meta else Path(model), max_steps,
                  shares, quantize)
    impl.check(build)
    if meta:
        with torch.device("meta"):
            base = family.model_class(model).to(impl.base_dtype(build))
            base.set_kernels(dataclasses.replace(REFERENCE_KERNELS, swiglu=lean_swiglu))  # as every torch backend's
            tuned = impl.attach(base, build)
            if checkpointing:
                enable_checkpointing(base)
        return Tuned(tuned.train(), impl, build)
    base = family.load_model(model, "cpu" if host else backend, dtype=impl.base_dtype(build),
                             device_index=device_index, **method.model_overrides(family))
    if host:
        base.set_kernels(backend.kernels)
    wanted = checkpointing(base) if callable(checkpointing) else checkpointing
    wanted = impl.checkpointing(base, build, bool(wanted), required)
    tuned = impl.attach(base, build)
    if wanted:  # after peft, which refuses prefix tuning on a checkpointing model (ours keeps the prefix)
        enable_checkpointing(base)
    return Tuned(tuned, impl, build)


def adapter_method(adapter: Path) -> TorchMethod:
    """The implementation whose tuned result `adapter` holds: the method whose marker files it has, the
    most specific first (a QLoRA adapter is a peft adapter plus its base's quantization).

    Raises:
        CheckpointError: no such folder, or no method's result.
    """
    if not adapter.is_dir():
        raise CheckpointError(f"--adapter {adapter}: no such folder; pass the adapter/ folder of a run")
    every = implementations("torch")
    found = [impl for impl in every.values() if impl.owns(adapter)]
    if not found:
        marks: dict[str, list[str]] = {}
        for name, impl in every.items():
            if impl.adapter_files:
                marks.setdefault(impl.adapter_files[0], []).append(name)
        expected = [f"{file} ({', '.join(names)})" for file, names in marks.items()]
        raise CheckpointError(f"--adapter {adapter}: not a tuned result; expected {', '.join(expected[:-1])} or "
                              f"{expected[-1]}")
    return max(found, key=lambda impl: len(impl.adapter_files))


def _load(base: Path, adapter: Optional[Path], backend, compute, device_index: int) -> Tuned:
    def load_base(folder: Path, **overrides) -> nn.Module:
        return family_for(folder).load_model(folder, backend, dtype=compute, device_index=device_index, **overrides)

    if adapter is None:
        return Tuned(load_base(base), None, None)
    impl = adapter_method(Path(adapter))
    return Tuned(impl.load(base, Path(adapter), load_base, family_for(base)), impl, None)


def load_tuned_model(base: Path, adapter: Optional[Path], backend="cpu", dtype=None, device_index: int = 0) -> nn.Module:
    """The base model with a tuned result from `TorchRuntime.save_adapter` applied, on `backend` (a Backend,
    or a device name) and its device `device_index` (chat, eval, serve, export).

    Raises:
        CheckpointError: the adapter folder is missing, is not a tuned result, is damaged, or was tuned
            from another base model (its shapes or layers do not fit).
    """
    return build_tuned_model(Path(base), None, backend, "load", dtype, device_index=device_index,
                             adapter=adapter).model


def apply_method(model: nn.Module, method, family: ModelFamily, quantize: Optional[Callable[[nn.Module], None]] = None,
                 max_steps: Optional[int] = None) -> nn.Module:
    """`method` attached to an already loaded `model` (what it does not train frozen, its adapter added;
    `quantize` replaces QLoRA's rounding of the frozen base)."""
    device = next(model.parameters()).device
    build = Build(method, family, "train", torch.float32, None, device, None, max_steps, 1, quantize)
    return implementation(method.name, "torch").attach(model, build)
