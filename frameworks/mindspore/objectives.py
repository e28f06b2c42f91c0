"""DPO in MindSpore (the formulas and keys: core/objectives.py), with LoRA: the reference is the model with its
LoRA branches off (`adapters_disabled`), computed outside the differentiated function, so it costs no copy and
no gradient. Pair batches hold their chosen rows, then their rejected ones (core/preference.py)."""

from __future__ import annotations

from ...core.objectives import ObjectiveConfig


class Dpo:
    def __init__(self, config: ObjectiveConfig, msmodel):
        self.config, self.msmodel = config, msmodel

    def reference(self, model, ids, mask, labels):
        """The reference's summed log-probability of each row (LoRA off)."""
        from mindspore import ops

        with self.msmodel.adapters_disabled(model):
            logits, _ = model(ids, attention_mask=mask)
        return ops.stop_gradient(self.msmodel.label_logps(logits, labels)[0])

    def loss(self, model, ids, mask, labels, reference, pairs: int):
        """(the batch's share of the step's loss, each row's log-probability, each row's label count)."""
        from mindspore import ops

        logits, _ = model(ids, attention_mask=mask)
        policy, counts = self.msmodel.label_logps(logits, labels)
        ratio_c, ratio_r = ops.chunk(policy - reference, 2)
        beta, o = self.config.beta, self.config
        if o.loss_type == "ipo":
            n_c, n_r = ops.chunk(ops.clamp(counts, min=1.0), 2)
            losses = (ratio_c / n_c - ratio_r / n_r - 1 / (2 * beta)) ** 2
        else:
            z = beta * (ratio_c - ratio_r)
            losses = -(1 - o.label_smoothing) * ops.logsigmoid(z) - o.label_smoothing * ops.logsigmoid(-z)
        return losses.sum() / pairs, policy, counts
