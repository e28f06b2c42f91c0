"""What a tuning method is to the MindSpore framework: one `MindSporeMethod` object per method, in
`methods/<name>.py` (its `METHOD`). `attach` adds the method to a loaded MindSpore model and leaves
trainable exactly what it trains; `save` writes the result in the same portable format as torch's.
A method without a file here does not run on MindSpore (the recipe check refuses it)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from safetensors.numpy import save_file

from ...models import read_json


@dataclass
class Build:
    """What the hooks know: the method's config, the model family and its MindSpore module (`load_model`,
    the LoRA and IA3 helpers), the run's seed, the base folder, and what `attach` keeps for `save`."""

    method: Any
    family: Any
    msmodel: Any
    seed: int
    model_dir: Path
    kept: dict = field(default_factory=dict)


class MindSporeMethod:
    # DPO's reference is the model with this method switched off (the family's `adapters_disabled`): LoRA's
    # branches can be; a method that cannot is refused for objective dpo on MindSpore
    switchable = False

    def owns(self, adapter: Path) -> bool:
        """Whether the folder `adapter` holds a result this method loads (`load`)."""
        return False

    def load(self, model, adapter: Path, msmodel) -> None:
        """Add the tuned result in `adapter` to `model`, trainable (`tuneport parity` takes its gradients)."""
        raise NotImplementedError

    def attach(self, model, build: Build) -> None:
        """Add the method to `model` and leave trainable (`requires_grad`) what it trains."""
        raise NotImplementedError

    def save(self, model, build: Build, folder: Path, trained: dict) -> None:
        """Write the tuned result into `folder` (which exists)."""
        raise NotImplementedError


class PeftAdapter(MindSporeMethod):
    """A method whose result is a PEFT adapter folder of `peft_type` (LoRA, IA3)."""

    peft_type = ""

    def owns(self, adapter: Path) -> bool:
        config = adapter / "adapter_config.json"
        return config.is_file() and read_json(config).get("peft_type") == self.peft_type


class CompleteCheckpoint(MindSporeMethod):
    """A method whose result is the whole model, a checkpoint folder in the official layout (full, freeze)."""

    def save(self, model, build: Build, folder: Path, trained: dict) -> None:
        save_file({n: p.asnumpy() for n, p in model.parameters_and_names()}, str(folder / "model.safetensors"))
        (folder / "config.json").write_text(model.config.to_json_string())
