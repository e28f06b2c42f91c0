"""The torch framework: `TorchRuntime` (runtime.py) on any Backend, the tuned-model builder (build.py),
`tuneport parity`'s capture (parity.py), and one file per tuning method in methods/. Importing this
package imports no torch; `choose` and `capture` import what they run."""

from __future__ import annotations

from ...backends import pick_backend
from ...core.errors import RecipeError
from ...core.runtime import RuntimeChoice


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
        from .runtime import TorchRuntime  # the framework's entry, loaded when a run starts

        return TorchRuntime(recipe, backend, precision, model_dir, dist)

    return RuntimeChoice("torch", name, backend, build)


def capture(device, device_index: int, *args, **kwargs) -> dict:
    """`tuneport parity`'s capture on a torch Backend (parity.capture)."""
    from .parity import capture as run  # the framework's entry, loaded when parity runs

    return run(device, device_index, *args, **kwargs)
