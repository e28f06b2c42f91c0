"""The framework interface: what the training loop needs from a framework.

Two interfaces meet here. A **Backend** (`backends/base.py`) is a device as torch sees it; a
**Runtime** is a model, its tuning method and its optimizer inside one framework. `TorchRuntime`
(`backends/torch_runtime.py`, on any Backend) and `MindSporeRuntime` (`backends/mindspore.py`, on a
`MindSporeDevice`) implement the protocol side by side; `core/trainer.py` is typed against it only.
`tuneport.frameworks.get_runtime(framework, device)` returns a RuntimeChoice: what a run needs to start one.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Optional, Protocol


from ..backends.base import MemoryStats
from .config import Recipe
from .distributed import Dist, Job, torchrun_job
from .precision import PrecisionPlan

if TYPE_CHECKING:  # annotations only; the functions import it when they run
    import numpy as np


class Runtime(Protocol):
    """One model, one tuning method, one optimizer, in one framework, on one device.

    A runtime is made by its framework's `RuntimeChoice.build(recipe, precision, model_dir, dist)`: that
    loads the base model from the official checkpoint folder `model_dir` and attaches the recipe's
    method (its trainable weights start from the recipe's seed). Batches are numpy arrays
    (`input_ids`, `labels`, `attention_mask`); the runtime moves them to its device.

    Attributes:
        recipe: the validated recipe.
        precision: the resolved precision plan (compute dtype, loss scaling).
        dist: this process's place in a data-parallel job.
    """

    recipe: Recipe
    precision: PrecisionPlan
    dist: Dist

    def forward_backward(self, batch: dict[str, np.ndarray], num_items: int, boundary: bool = True) -> float:
        """Add this micro-batch's gradients, its loss summed over label tokens and divided by `num_items`
        (the label tokens of the whole optimizer step, over all processes); `boundary` marks the step's
        last micro-batch. Returns this micro-batch's share of the step's loss."""

    def optimizer_step(self, lr: float, grad_clip: float | None) -> float:
        """Apply the accumulated gradients at learning rate `lr` (clipped to `grad_clip`), clear them,
        and return the gradient norm before clipping."""

    def eval_loss(self, batch: dict[str, np.ndarray]) -> tuple[float, int]:
        """(sum of token losses, number of label tokens) of one batch, without training."""

    def save_state(self, folder: Path) -> None:
        """Write what continuing bit for bit needs (trained weights, optimizer, loss scale, random
        generators) into `folder`. Called on every process; shared files come from rank 0."""

    def load_state(self, folder: Path) -> None:
        """Restore what `save_state` wrote."""

    def gather(self) -> Any:
        """Called on every process before the result is saved: what `save_adapter` needs from the other
        processes (a sharded model's weights, whole, on the main process), or None."""

    def save_adapter(self, folder: Path, weights: Any = None) -> None:
        """Write the tuned result in its portable format (a PEFT adapter for LoRA), from `weights` when
        `gather` returned them (main process only)."""

    def generate(self, prompt_ids: list[int], max_new_tokens: int, stop_ids: list[int], pad_id: int) -> list[int]:
        """Greedy continuation of `prompt_ids`, ending at any of `stop_ids` (not included)."""

    def generate_batch(self, prompts: list[list[int]], max_new_tokens: int, stop_ids: list[int],
                       pad_id: int) -> list[list[int]]:
        """`generate` for many prompts (batched where the framework can: left padding, greedy)."""

    def memory_stats(self) -> MemoryStats:
        """The device's memory use (allocated, reserved, peak bytes)."""

    def take_metrics(self) -> dict[str, float]:
        """The objective's metric sums over this process's micro-batches since the last call (preference
        objectives: rewards, margin, accuracy, log-probabilities; none for sft)."""

    def eval_pairs(self, batch: dict[str, np.ndarray]) -> tuple[float, int, dict[str, float]]:
        """For a batch of preference pairs: the objective's loss summed over the pairs, their number, and the
        metrics' sums."""

    def mfu(self, tokens_per_s: float) -> Optional[float]:
        """Model FLOP utilisation of this process's card at `tokens_per_s` (its own tokens): the model's FLOPs
        per token (4 N + 2 N_trained, README "Speed") times the rate, over the card's peak; None where the
        peak is unknown (the CPU)."""


@dataclass(frozen=True)
class RuntimeChoice:
    """What `get_runtime` chose: the framework, the device's name and object (a Backend for torch, a
    MindSporeDevice for MindSpore: both have `name`, `capabilities`, `setup`, `set_device`, `device` and
    `memory_stats`), `build(recipe, precision, model_dir, dist) -> Runtime`, and how the framework joins a
    job of several processes: torchrun's process group (`data_parallel`), or its own launcher's job (`join`).

    `job` is where the launcher put this process, read before joining; `join()` is called once, after the
    device's `setup()`, and returns this process's Dist (with the framework's `Collective` when the job has
    more than one process)."""

    framework: str
    device_name: str
    device: Any
    build: Callable[[Recipe, PrecisionPlan, Path, Dist], Runtime]
    data_parallel: bool = True  # joins a torchrun job's process group
    join: Optional[Callable[[], Dist]] = None  # joins the job of the framework's own launcher (msrun) instead
    job: Job = field(default_factory=torchrun_job)
