"""The one builder of "the model with its tuning method" in MindSpore: for training (the runtime) and for
loading a tuned result (`tuneport parity`'s MindSpore side). What differs between methods is each method's
`MindSporeMethod` (method.py); this module never asks a name."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from ...core.errors import CheckpointError
from ...models import family_for
from .. import implementation, implementations
from .method import Build, MindSporeMethod

PURPOSES = ("train", "load")


@dataclass
class Tuned:
    """A built MindSpore model, the method implementation that built or loaded it, and what its hooks knew
    (None when loaded)."""

    model: Any
    method: Optional[MindSporeMethod]
    build: Optional[Build]


def build_tuned_model(model_dir: Path, method, purpose: str, *, seed: int = 0, adapter: Optional[Path] = None) -> Tuned:
    """The MindSpore model of the checkpoint `model_dir` (float32 weights) with `method` attached ("train":
    trained weights from `seed`) or the tuned result `adapter` loaded, trainable ("load"; `method` None).

    Raises:
        Unsupported: the model family has no MindSpore model.
        MethodUnavailable: the method cannot run on this model.
        CheckpointError: ("load") an adapter of a kind the MindSpore model does not load.
    """
    if purpose not in PURPOSES:
        raise ValueError(f"purpose {purpose!r} is not one of {', '.join(PURPOSES)}")
    family = family_for(Path(model_dir))
    family.require("mindspore", "framework mindspore")
    msmodel = family.mindspore()
    if purpose == "load":
        model = msmodel.load_model(model_dir)
        if adapter is None:
            return Tuned(model, None, None)
        impl = adapter_method(Path(adapter))
        impl.load(model, Path(adapter), msmodel)
        return Tuned(model, impl, None)
    impl = implementation(method.name, "mindspore")
    model = msmodel.load_model(model_dir, **method.model_overrides(family))
    build = Build(method, family, msmodel, seed, Path(model_dir))
    impl.attach(model, build)
    return Tuned(model, impl, build)


def adapter_method(adapter: Path) -> MindSporeMethod:
    """The implementation that loads the tuned result in `adapter`.

    Raises:
        CheckpointError: none does (the message names the kinds MindSpore loads).
    """
    every = implementations("mindspore")
    for impl in every.values():
        if impl.owns(adapter):
            return impl
    loads = [name for name, impl in every.items() if type(impl).load is not MindSporeMethod.load]
    raise CheckpointError(f"--adapter {adapter}: the MindSpore model loads {', '.join(loads)} adapters (PEFT format); "
                          "compare this one with --framework torch on both sides")
