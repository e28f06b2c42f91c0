"""Training objectives: supervised fine-tuning, and the preference objectives that need no reward model or
sampling (DPO, ORPO, SimPO). The recipe's `objective:` section; framework-neutral (numpy only).

An objective is independent of the tuning method. Its framework side (frameworks/torch/objectives.py) is one
object per objective with the forward on a batch, the loss and the metrics; the training loop asks it here only
what to normalise a step's loss by (`units`).

- sft: the label tokens' cross entropy (today's training).
- dpo (Rafailov et al., 2023): -log sigmoid(beta * ((pi_c - ref_c) - (pi_r - ref_r))), pi and ref the summed
  log-probabilities of the chosen (c) and rejected (r) replies under the trained model and the reference; with
  `label_smoothing` e, cDPO's (1 - e) times that plus e times the same with the pair swapped; `loss_type: ipo`
  (Azar et al., 2023) the squared distance of the per-token log-ratio margin from 1 / (2 beta).
- orpo (Hong et al., 2024): the chosen reply's token-mean cross entropy plus `orpo_lambda` times
  -log sigmoid(log odds(c) - log odds(r)), odds from the per-token mean log-probabilities; no reference.
- simpo (Meng et al., 2024): -log sigmoid(beta * (mean pi_c - mean pi_r) - gamma) with per-token means (length
  normalised); no reference.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import numpy as np

OBJECTIVES = ("sft", "dpo", "orpo", "simpo")
LOSS_TYPES = ("sigmoid", "ipo")


@dataclass
class ObjectiveConfig:
    """The recipe's `objective:` keys. Defaults: the DPO paper's beta 0.1 (TRL's too), ORPO's lambda 0.1 (the
    ORPO paper's and TRL's), SimPO's gamma 0.5 (TRL's simpo_gamma; the paper's beta for SimPO is 2.0-2.5, set
    objective.beta with it)."""

    name: str = "sft"  # sft | dpo | orpo | simpo
    beta: float = 0.1  # dpo, simpo: the scale of the log-probability margin
    label_smoothing: float = 0.0  # dpo: cDPO's share of pairs taken as mislabelled
    loss_type: str = "sigmoid"  # dpo: sigmoid | ipo
    orpo_lambda: float = 0.1  # orpo: the weight of the odds-ratio term
    gamma: float = 0.5  # simpo: the target reward margin
    # dpo: the reference's log-probabilities computed once before training (a pass that resumes, stored in the run
    # folder's reference/), so each step runs one forward instead of two, and `full` needs no frozen copy
    precompute_reference: bool = False

    @property
    def preference(self) -> bool:
        """Trained on pairs of replies (data with chosen and rejected)."""
        return self.name != "sft"

    @property
    def reference(self) -> bool:
        """Needs a reference model's log-probabilities (DPO)."""
        return self.name == "dpo"


def objective_problems(recipe) -> list[str]:
    """Problems with the recipe's objective: its values, and what it cannot run with."""
    o, found = recipe.objective, []
    if o.name not in OBJECTIVES:
        return [f"objective.name: {o.name!r} is not one of {', '.join(OBJECTIVES)}"]
    if o.loss_type not in LOSS_TYPES:
        found.append(f"objective.loss_type: {o.loss_type!r} is not one of {', '.join(LOSS_TYPES)}")
    if o.beta <= 0:
        found.append(f"objective.beta: {o.beta!r} must be > 0")
    if not 0 <= o.label_smoothing < 0.5:
        found.append(f"objective.label_smoothing: {o.label_smoothing!r} must be in [0, 0.5)")
    if o.precompute_reference and o.name != "dpo":
        found.append(f"objective.precompute_reference: objective {o.name} has no reference; set it false")
    if o.orpo_lambda < 0:
        found.append(f"objective.orpo_lambda: {o.orpo_lambda!r} must be >= 0")
    if o.preference and recipe.framework != "torch" and o.name != "dpo":
        found.append(f"objective.name: {o.name} runs with framework torch; MindSpore trains sft and dpo (with lora)")
    if o.preference and recipe.data.packing:
        found.append(f"data.packing: objective {o.name} trains on pairs of replies, which are not packed; set "
                     "data.packing: false")
    if o.preference and getattr(recipe.method, "virtual_tokens", False):
        found.append(f"objective.name: {o.name} with method {recipe.method.name}, whose virtual tokens come before "
                     "each sample, is not supported; use lora, dora, ia3, full or freeze")
    return found


def pair_metrics(chosen_rewards: np.ndarray, rejected_rewards: np.ndarray, policy: np.ndarray,
                 counts: np.ndarray) -> dict[str, float]:
    """Sums over a batch's pairs (the loop divides by the step's pairs): the rewards, their margin and how often
    the chosen reply's is higher (`accuracy`, TRL's rewards/accuracies); the replies' summed log-probabilities
    (`policy`, the chosen rows first); and how often the model itself, with no reference, gives the chosen reply
    the higher log-probability per token (`preference`: per token, so that a shorter reply is not preferred for
    its length)."""
    import numpy as np

    c, r = np.asarray(chosen_rewards, np.float64), np.asarray(rejected_rewards, np.float64)
    chosen, rejected = np.split(np.asarray(policy, np.float64), 2)
    mean_c, mean_r = np.split(np.asarray(policy, np.float64) / np.maximum(np.asarray(counts), 1), 2)
    return {"rewards_chosen": float(c.sum()), "rewards_rejected": float(r.sum()), "margin": float((c - r).sum()),
            "accuracy": float((c > r).sum()), "logps_chosen": float(chosen.sum()),
            "logps_rejected": float(rejected.sum()), "preference": float((mean_c > mean_r).sum())}


def units(objective: ObjectiveConfig, batch: dict[str, np.ndarray]) -> dict[str, int]:
    """What a micro-batch's loss is normalised by, summed over an optimizer step's micro-batches and processes:
    the label tokens (sft), the pairs (dpo, simpo), the pairs and the chosen replies' label tokens (orpo). A pair
    batch holds its chosen replies' rows first, then the rejected ones'."""
    labelled = batch["labels"][:, 1:] != -100
    if not objective.preference:
        return {"tokens": int(labelled.sum())}
    pairs = batch["labels"].shape[0] // 2
    found = {"pairs": pairs}
    if objective.name == "orpo":
        found["chosen_tokens"] = int(labelled[:pairs].sum())
    return found
