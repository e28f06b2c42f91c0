"""P-tuning v2: ChatGLM's own prefix encoder, saved under the official names."""

from __future__ import annotations

import json
from pathlib import Path

from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ....core.errors import CheckpointError, MethodUnavailable
from ....core.methods import PREFIX_CONFIG, PREFIX_WEIGHTS
from ....models import read_json
from ..method import Build, TorchMethod



def prefix_module(model, family):
    """The model's prefix encoder (the family names where it lives), or None."""
    if not family.prefix_module:
        return None
    try:
        return model.get_submodule(family.prefix_module)
    except AttributeError:
        return None


class PtuningV2(TorchMethod):
    adapter_files = (PREFIX_CONFIG,)

    def attach(self, model, build: Build):
        model.requires_grad_(False)
        encoder = prefix_module(model, build.family)
        if encoder is None:
            raise MethodUnavailable(f"method ptuning_v2 is ChatGLM's own prefix encoder; {build.family.model_type} "
                                    "has none: use method prefix_tuning")
        encoder.float().requires_grad_(True)
        return model

    def save(self, model, build: Build, folder: Path, trained, weights=None) -> None:
        (folder / PREFIX_CONFIG).write_text(json.dumps(build.method.model_overrides(build.family)))
        save_file({n: p.detach().contiguous() for n, p in trained.items()}, folder / PREFIX_WEIGHTS)

    def load(self, base: Path, adapter: Path, load_base, family):
        model = load_base(base, **read_json(adapter / PREFIX_CONFIG))
        try:
            weights = load_file(adapter / PREFIX_WEIGHTS)
        except (SafetensorError, OSError) as e:
            raise CheckpointError(f"{adapter / PREFIX_WEIGHTS}: cannot be read ({e}); copy the adapter again") from None
        shapes = {n: tuple(t.shape) for n, t in self.trained(model, family).items()}
        if {n: tuple(t.shape) for n, t in weights.items()} != shapes:
            raise CheckpointError(f"--adapter {adapter}: its prefix encoder does not fit the base model {base} "
                                  f"(expected {shapes}); pass the base it was tuned from")
        model.load_state_dict(weights, strict=False)
        return model

    def trained(self, model, family):
        encoder = prefix_module(model, family)
        return {} if encoder is None else {f"{family.prefix_module}.{n}": p for n, p in encoder.named_parameters()}


METHOD = PtuningV2()
