"""Full fine-tuning: every weight trains."""

from ..method import CompleteCheckpoint


class Full(CompleteCheckpoint):
    def attach(self, model, build) -> None:
        pass  # every parameter is trainable as loaded


METHOD = Full()
