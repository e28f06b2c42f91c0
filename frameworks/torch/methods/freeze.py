"""Freeze tuning: the last blocks (or the named modules of them) train, in float32; every other weight
stays frozen. The result is a complete checkpoint, as full fine-tuning's."""

from __future__ import annotations

from ..method import Build
from .full import Full


class Freeze(Full):
    def attach(self, model, build: Build):
        chosen = build.method.trained_names([n for n, _ in model.named_parameters()], build.family)
        for name, param in model.named_parameters():
            param.requires_grad_(name in chosen)
        return model


METHOD = Freeze()
