"""Full fine-tuning: every weight trains in float32; the result is a complete checkpoint."""

from __future__ import annotations

from pathlib import Path

import torch

from ..method import Build, TorchMethod


class Full(TorchMethod):
    adapter_files = ("config.json",)
    complete = True

    def base_dtype(self, build: Build) -> torch.dtype:
        return torch.float32  # the weights it trains stay float32

    def attach(self, model, build: Build):
        return model

    def save(self, model, build: Build, folder: Path, trained, weights=None) -> None:
        model.save_pretrained(folder, state_dict=weights)

    def load(self, base: Path, adapter: Path, load_base, family):
        return load_base(adapter)  # a complete checkpoint: the base is not needed


METHOD = Full()
