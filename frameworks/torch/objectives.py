"""The training objectives in torch (their recipe keys and formulas: core/objectives.py): one object each, whose
`loss` runs the forward on a micro-batch (for pairs: the chosen rows and the rejected rows in one batch) and
returns the micro-batch's share of the step's loss with the sums of its metrics.

The models give each row's summed label log-probability from the label positions alone (`return_logps`,
models/loss.py), so no whole-vocabulary logits are formed. DPO's reference is the same model with its adapter
disabled (no second copy), or a frozen copy for methods without an adapter.
"""

from __future__ import annotations

from typing import Callable, ContextManager

import torch
import torch.nn.functional as F

from ...core.objectives import ObjectiveConfig
from ...core.objectives import pair_metrics as metric_sums

Metrics = dict[str, float]


class Sft:
    """The label tokens' cross entropy, normalised by the step's label tokens."""

    def loss(self, model, inputs: dict, units: dict) -> tuple[torch.Tensor, Metrics]:
        out = model(**inputs, num_items_in_batch=units["tokens"], use_cache=False, loss_only=True)
        return out.loss, {}


def logps(model, inputs: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's summed label log-probability and its label count."""
    out = model(**inputs, use_cache=False, return_logps=True)
    return out.logps, out.label_counts


def smoothed(z: torch.Tensor, smoothing: float) -> torch.Tensor:
    """-log sigmoid(z), with cDPO's share `smoothing` of the pairs taken as swapped."""
    return -(1 - smoothing) * F.logsigmoid(z) - smoothing * F.logsigmoid(-z)


def pair_metrics(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor, policy: torch.Tensor,
                 counts: torch.Tensor) -> Metrics:
    """`core.objectives.pair_metrics` of these tensors."""
    return metric_sums(*(t.detach().float().cpu().numpy() for t in (chosen_rewards, rejected_rewards, policy, counts)))


class Dpo:
    """DPO (sigmoid, with cDPO smoothing) or IPO against a reference: `reference()` is a context that gives the
    reference model (the trained model with its adapter disabled, or a frozen copy)."""

    def __init__(self, config: ObjectiveConfig, reference: Callable[[], ContextManager]):
        self.config, self.reference = config, reference

    def loss(self, model, inputs: dict, units: dict) -> tuple[torch.Tensor, Metrics]:
        ref = inputs.pop("reference_logps", None)  # computed before training (objective.precompute_reference)
        policy, counts = logps(model, inputs)
        if ref is None:
            with torch.no_grad(), self.reference() as reference_model:
                ref, _ = logps(reference_model, inputs)
        ratio_c, ratio_r = (policy - ref).chunk(2)
        beta, o = self.config.beta, self.config
        if o.loss_type == "ipo":  # per-token log-ratios (TRL's normalisation, confirmed by IPO's authors)
            n_c, n_r = counts.clamp(min=1).chunk(2)
            losses = (ratio_c / n_c - ratio_r / n_r - 1 / (2 * beta)) ** 2
        else:
            losses = smoothed(beta * (ratio_c - ratio_r), o.label_smoothing)
        return losses.sum() / units["pairs"], pair_metrics(beta * ratio_c, beta * ratio_r, policy, counts)


class Orpo:
    """ORPO: the chosen replies' cross entropy (over the step's chosen label tokens) plus lambda times the
    odds-ratio term (over the step's pairs)."""

    def __init__(self, config: ObjectiveConfig):
        self.config = config

    def loss(self, model, inputs: dict, units: dict) -> tuple[torch.Tensor, Metrics]:
        policy, counts = logps(model, inputs)
        chosen = policy.chunk(2)[0]
        mean_c, mean_r = (policy / counts.clamp(min=1)).chunk(2)
        log_odds = (mean_c - mean_r) - (torch.log1p(-torch.exp(mean_c)) - torch.log1p(-torch.exp(mean_r)))
        odds_term = -self.config.orpo_lambda * F.logsigmoid(log_odds)
        loss = -chosen.sum() / units["chosen_tokens"] + odds_term.sum() / units["pairs"]
        lam = self.config.orpo_lambda
        return loss, pair_metrics(lam * mean_c, lam * mean_r, policy, counts)


class Simpo:
    """SimPO: -log sigmoid(beta * (mean log-prob margin) - gamma), with cDPO smoothing; no reference."""

    def __init__(self, config: ObjectiveConfig):
        self.config = config

    def loss(self, model, inputs: dict, units: dict) -> tuple[torch.Tensor, Metrics]:
        policy, counts = logps(model, inputs)
        mean_c, mean_r = (policy / counts.clamp(min=1)).chunk(2)
        beta = self.config.beta
        losses = smoothed(beta * (mean_c - mean_r) - self.config.gamma, self.config.label_smoothing)
        return losses.sum() / units["pairs"], pair_metrics(beta * mean_c, beta * mean_r, policy, counts)


@torch.no_grad()
def pair_scores(model, batches: list[dict]) -> list[tuple[float, float, int, int]]:
    """Per pair of the numpy pair batches (core.preference.collate_pairs): the chosen and rejected replies'
    summed log-probabilities and label counts under `model` (`tuneport eval --preference`)."""
    device = next(model.parameters()).device
    found = []
    for batch in batches:
        summed, counts = logps(model, {k: torch.from_numpy(v).to(device) for k, v in batch.items()})
        (c, r), (n_c, n_r) = summed.chunk(2), counts.chunk(2)
        found += list(zip(c.tolist(), r.tolist(), n_c.tolist(), n_r.tolist()))
    return found


def make_objective(config: ObjectiveConfig, reference: Callable[[], ContextManager]):
    """The objective object of `config` (`reference`: DPO's reference context, see `Dpo`)."""
    if config.name == "sft":
        return Sft()
    if config.name == "dpo":
        return Dpo(config, reference)
    return {"orpo": Orpo, "simpo": Simpo}[config.name](config)
