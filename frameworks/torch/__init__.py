"""The torch framework: `TorchRuntime` (runtime.py) on any Backend, the one builder of tuned models
(build.py), `tuneport estimate`'s memory model (estimate.py), batched generation (generate.py),
`tuneport parity`'s capture (parity.py), and one file per tuning method in methods/. The registry
(`tuneport.frameworks.framework("torch")`) imports this package, and torch with it, only when a
command needs it."""

from __future__ import annotations


from ...backends import pick_backend
from ...core.errors import RecipeError
from ...core.runtime import RuntimeChoice
from . import estimate  # noqa: F401  (the framework's API: estimate.plan, estimate.trainable_parameters, ...)
from .build import DTYPES, adapter_method, build_tuned_model, load_tuned_model  # noqa: F401
from .collective import check as check_collective  # noqa: F401  (`tuneport doctor --nproc N`)
from .generate import generate_replies  # noqa: F401
from .objectives import pair_scores  # noqa: F401  (`tuneport eval --preference`)
from .parity import capture as _capture
from .runtime import TorchRuntime


def choose(device: str) -> RuntimeChoice:
    """The torch runtime on the backend `device` names (`auto`: the best one here).

    Raises:
        RecipeError: an unknown device name.
        BackendUnavailable: the device is not usable here.
    """
    try:
        name, backend = pick_backend(device)
    except ValueError as e:
        raise RecipeError(f"device: {e}") from None

    def build(recipe, precision, model_dir, dist):
        return TorchRuntime(recipe, backend, precision, model_dir, dist)

    return RuntimeChoice("torch", name, backend, build)


def capture(device, device_index: int, *args, **kwargs) -> dict:
    """`tuneport parity`'s capture on a torch Backend (parity.capture)."""
    return _capture(device, device_index, *args, **kwargs)
