"""The frameworks, one package each (`torch/`, `mindspore/`), and the methods they implement.

A framework package owns its runtime (`Runtime`, core/runtime.py), its `tuneport parity` capture and
its tuned-model builder; its `methods/` folder holds one file per tuning method it runs, and that file
is the registration: a method's frameworks are the frameworks with a file for it (or an implementation
given to `core.methods.register_method`). This module imports no framework: each is imported when
asked for, so `tuneport --help` and recipe checks stay light.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any, Optional

from ..core.errors import CheckpointError, RecipeError
from ..core.methods import METHODS

FRAMEWORKS = ("torch", "mindspore")  # a new framework: a package here and its name in this tuple
# how each trains across processes (train.strategy): torch under torchrun, MindSpore under msrun
STRATEGIES_OF = {"torch": ("ddp", "fsdp", "deepspeed"), "mindspore": ("ddp",)}


def framework(name: str):
    """The framework package `name` (its `choose(device)` and `capture(...)`), imported now.

    Raises:
        RecipeError: no framework has that name.
    """
    if name not in FRAMEWORKS:
        raise RecipeError(f"framework: {name!r} is not one of {', '.join(FRAMEWORKS)}")
    return importlib.import_module(f"{__name__}.{name}")


def get_runtime(framework_name: str, device: str):
    """Choose the framework and its device (a `core.runtime.RuntimeChoice`): the one place a run picks either.

    Raises:
        RecipeError: an unknown framework or device name.
        BackendUnavailable: the device or the framework is not usable here (the message names the fix).
    """
    return framework(framework_name).choose(device)


def adapter_problem(framework_name: str, adapter: Path) -> Optional[str]:
    """Why the framework cannot load the tuned result in `adapter` (None: it can); imports the framework."""
    try:
        framework(framework_name).adapter_method(Path(adapter))
    except CheckpointError as e:
        return str(e)
    return None


def _module_name(method: str, framework_name: str) -> str:
    return f"{__name__}.{framework_name}.methods.{method}"


def frameworks_of(method: str) -> tuple[str, ...]:
    """The frameworks that implement `method`: found by their files, importing no framework."""
    own = METHODS[method].implementations
    here = Path(__file__).parent
    return tuple(name for name in FRAMEWORKS if name in own or (here / name / "methods" / f"{method}.py").is_file())


def implementation(method: str, framework_name: str) -> Any:
    """The object implementing `method` in `framework_name` (its hooks: see that framework's `method.py`).

    Raises:
        RecipeError: the framework does not implement it.
    """
    own = METHODS[method].implementations
    if framework_name in own:
        return own[framework_name]
    if framework_name not in frameworks_of(method):
        raise RecipeError(f"method.name: {method} does not run with framework {framework_name}; it runs with "
                          f"{', '.join(frameworks_of(method))}")
    return importlib.import_module(_module_name(method, framework_name)).METHOD


def implementations(framework_name: str) -> dict[str, Any]:
    """Every method `framework_name` implements, by name, in the registry's order."""
    return {name: implementation(name, framework_name) for name in METHODS if framework_name in frameworks_of(name)}
