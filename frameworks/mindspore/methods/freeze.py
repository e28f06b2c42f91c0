"""Freeze tuning: the last blocks (or the named modules of them) train; the rest stays frozen."""

from ..method import CompleteCheckpoint


class Freeze(CompleteCheckpoint):
    def attach(self, model, build) -> None:
        chosen = build.method.trained_names([n for n, _ in model.parameters_and_names()], build.family)
        for name, param in model.parameters_and_names():
            param.requires_grad = name in chosen


METHOD = Freeze()
