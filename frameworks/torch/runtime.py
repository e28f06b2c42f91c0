"""TorchRuntime: the training loop's view of a torch model on one backend.

It builds the model with its tuning method (`build.build_tuned_model`, the method's hooks in
`methods/`), and runs micro-batch forward/backward, optimizer steps, evaluation, checkpoints and
generation. Batches arrive as numpy arrays; device specifics come from the backend.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import math
from contextlib import nullcontext
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ...backends.base import Backend, MemoryStats
from ...core.checkpoints import torch_save
from ...core.config import Recipe, resolve_path
from ...core.distributed import Dist
from ...core.errors import MethodUnavailable
from ...core.methods import decays
from ...core.objectives import units
from ...core.precision import PrecisionPlan
from . import sharding
from .build import DTYPES, build_tuned_model
from .estimate import choose_checkpointing
from .generate import generate_replies
from .objectives import make_objective

log = logging.getLogger(__name__)


class TorchRuntime:
    """One model, one tuning method, one optimizer, on one backend.

    With several processes (torchrun) the model is wrapped in DistributedDataParallel, or handed to
    DeepSpeed when the recipe names a DeepSpeed config; either averages gradients over processes, so
    each process scales its loss by the world size to keep the token-sum normalisation.

    Args:
        recipe: the validated recipe.
        backend: the device backend.
        precision: the resolved precision plan.
        model_dir: official-layout checkpoint folder of the base model.
        dist: this process's place in a data-parallel job.
    """

    def __init__(self, recipe: Recipe, backend: Backend, precision: PrecisionPlan, model_dir: Path,
                 dist: Dist = Dist()):
        self.recipe = recipe
        self.backend = backend
        self.precision = precision
        self.dist = dist
        self.model_dir = Path(model_dir)
        self.device = backend.device(dist.local_rank)
        self.compute_dtype = DTYPES[precision.compute]
        torch.manual_seed(recipe.train.seed)  # adapter initialisation is part of the run's seed
        backend.manual_seed(recipe.train.seed)
        t = recipe.train
        self.sharded = t.strategy == "fsdp"
        tuned = build_tuned_model(self.model_dir, recipe.method, backend, "train", self.compute_dtype,
                                  device_index=dist.local_rank, max_steps=t.max_steps,
                                  shares=t.grad_accum * dist.world_size, checkpointing=self._checkpointing,
                                  required=t.gradient_checkpointing is True,
                                  host=self.sharded and self.device.type != "cpu")
        self.model, self.impl, self.build = tuned.model, tuned.method, tuned.build
        self.family = self.build.family
        if self.sharded:
            sharding.shard(self.model, self.family.blocks, self.device, dist.world_size, self.compute_dtype, t.offload)
        self.trainable = {n: p for n, p in self.model.named_parameters() if p.requires_grad}
        if not self.trainable:
            raise MethodUnavailable(f"method {recipe.method.name}: nothing to train")
        log.info("trainable parameters: %s", f"{sum(p.numel() for p in self.trainable.values()):,}")
        decay = [p for n, p in self.trainable.items() if decays(n, p.ndim)]
        no_decay = [p for n, p in self.trainable.items() if not decays(n, p.ndim)]
        self.optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": recipe.train.weight_decay},
             {"params": no_decay, "weight_decay": 0.0}], lr=recipe.train.lr)
        self.scaler = backend.grad_scaler(self.compute_dtype) if precision.loss_scaling else None
        self._flops_per_token: Optional[int] = None
        self.steps_done = 0  # optimizer steps taken (a method's schedule may count them: its state saves them)
        self.engine = None  # DeepSpeed engine, when the recipe asks for one
        self.forward_model = self.model
        if recipe.deepspeed:
            self._start_deepspeed(precision)
        elif dist.world_size > 1 and not self.sharded:
            from torch.nn.parallel import DistributedDataParallel

            device_ids = None if self.device.type == "cpu" else [self.device.index]
            self.forward_model = DistributedDataParallel(self.model, device_ids=device_ids)
        self.model.train()
        self.frozen = None  # DPO's reference for a method without an adapter to disable: a frozen copy
        if recipe.objective.reference and not recipe.objective.precompute_reference and \
                not hasattr(self.model, "disable_adapter"):
            self.frozen = copy.deepcopy(self.model).requires_grad_(False)
        self.objective = make_objective(recipe.objective, self._reference)
        self.metric_sums: dict[str, float] = {}

    @contextlib.contextmanager
    def _reference(self):
        """The reference model (DPO): the model with its adapter disabled, or the frozen copy, or (a method
        without an adapter, before training, for objective.precompute_reference) the model itself."""
        if self.frozen is not None or not hasattr(self.model, "disable_adapter"):
            yield self.frozen if self.frozen is not None else self.model
            return
        with self.model.disable_adapter():
            yield self.model

    def _start_deepspeed(self, precision: PrecisionPlan) -> None:
        """Hand the model and optimizer to DeepSpeed (ZeRO stage and the rest from the recipe's config)."""
        import deepspeed

        if self.device.type == "cpu":
            # On the CPU, DeepSpeed would first compile a shared-memory all-reduce extension into the user's
            # cache (minutes); torch's gloo, already running, does that job without a compiler.
            deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
        t = self.recipe.train
        config = json.loads(resolve_path(self.recipe.deepspeed).read_text())
        config.update(train_micro_batch_size_per_gpu=t.micro_batch_size, gradient_accumulation_steps=t.grad_accum,
                      gradient_clipping=t.grad_clip or 0.0, zero_allow_untested_optimizer=True)
        config.pop("train_batch_size", None)  # derived by DeepSpeed from the two above and the world size
        config["bf16"] = {"enabled": precision.compute == "bf16"}
        config["fp16"] = {"enabled": precision.compute == "fp16", "loss_scale": 0}  # 0: dynamic
        self.engine, _, _, _ = deepspeed.initialize(model=self.model, optimizer=self.optimizer, config=config)
        self.forward_model = self.engine
        self.scaler = None  # DeepSpeed scales fp16 losses itself

    # --- building -----------------------------------------------------------------------------------
    def _checkpointing(self, model: nn.Module) -> bool:
        """The recipe's gradient checkpointing; `auto` asks the memory estimate against the device (and
        is off for a model that cannot checkpoint)."""
        wanted = self.recipe.train.gradient_checkpointing
        if wanted != "auto":
            return bool(wanted)
        if not getattr(model, "supports_gradient_checkpointing", False):
            return False
        return choose_checkpointing(self.recipe, self.backend.name, self.backend.capabilities.memory_total)

    # --- training -----------------------------------------------------------------------------------
    def _tensors(self, batch: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
        """The batch on the device; a packed batch's `cu_seq_lens` stay on the host (the kernels that need them
        there, Ascend's, read them without a device sync; the others copy them over)."""
        return {k: torch.from_numpy(v) if k == "cu_seq_lens" else torch.from_numpy(v).to(self.device)
                for k, v in batch.items()}

    def forward_backward(self, batch: dict[str, np.ndarray], num_items, boundary: bool = True) -> float:
        """Add this micro-batch's gradients; its loss is the objective's, normalised by the whole step's units.

        Args:
            batch: numpy input_ids, labels, attention_mask (for preference pairs: the chosen rows, then the
                rejected ones).
            num_items: what the whole optimizer step's loss is normalised by, over all processes: its label
                tokens (an int, sft), or `core.objectives.units` summed (a dict, the preference objectives).
            boundary: the step's last micro-batch (gradients are exchanged between processes only then).

        Returns:
            This micro-batch's share of the step's loss. The objective's metric sums add up for `take_metrics`.
        """
        inputs = self._tensors(batch)
        step_units = num_items if isinstance(num_items, dict) else {"tokens": num_items}
        ddp = self.engine is None and self.forward_model is not self.model
        with self.forward_model.no_sync() if ddp and not boundary else nullcontext():
            with self.backend.autocast(self.compute_dtype):
                loss, metrics = self.objective.loss(self.forward_model, inputs, step_units)
            for name, value in metrics.items():
                self.metric_sums[name] = self.metric_sums.get(name, 0.0) + value
            scaled = loss * self.dist.world_size  # DDP and DeepSpeed average over processes; we want the sum
            if self.engine is not None:
                self.engine.backward(scaled, scale_wrt_gas=False)
                if not boundary:
                    self.engine.step()  # only advances DeepSpeed's micro-step count
            else:
                (self.scaler.scale(scaled) if self.scaler else scaled).backward()
        return loss.item()

    def optimizer_step(self, lr: float, grad_clip: Optional[float]) -> float:
        """Apply the accumulated gradients with learning rate `lr`; returns the gradient norm."""
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        if self.engine is not None:
            for group in self.engine.optimizer.param_groups:
                group["lr"] = lr
            self.engine.step()
            return float(self.engine.get_global_grad_norm() or 0.0)
        params = list(self.trainable.values())
        if self.scaler:
            self.scaler.unscale_(self.optimizer)
        norm = sharding.total_norm(torch.nn.utils.clip_grad_norm_(params, grad_clip if grad_clip else math.inf))
        if self.scaler:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.steps_done += 1
        if math.isfinite(float(norm)):  # not after a step fp16's loss scaler skipped
            self.impl.after_step(self.model, self.steps_done)
        self.optimizer.zero_grad(set_to_none=True)
        return float(norm)

    @torch.no_grad()
    def reference_logps(self, batch: dict[str, np.ndarray]) -> np.ndarray:
        """The reference's summed label log-probability of each row of a pair batch, in eval mode (before training:
        the model as it starts, with its adapter disabled)."""
        self.model.eval()
        try:
            inputs = {k: v for k, v in self._tensors(batch).items() if k != "reference_logps"}
            with self.backend.autocast(self.compute_dtype), self._reference() as reference:
                out = reference(**inputs, use_cache=False, return_logps=True)
            return out.logps.float().cpu().numpy()
        finally:
            self.model.train()

    def take_metrics(self) -> dict[str, float]:
        """The objective's metric sums since the last call (this process's micro-batches)."""
        sums, self.metric_sums = self.metric_sums, {}
        return sums

    @torch.no_grad()
    def eval_pairs(self, batch: dict[str, np.ndarray]) -> tuple[float, int, dict[str, float]]:
        """(the objective's loss summed over the batch's pairs, their number, the metrics' sums), in eval mode."""
        self.model.eval()
        try:
            batch_units = units(self.recipe.objective, batch)
            with self.backend.autocast(self.compute_dtype):
                loss, metrics = self.objective.loss(self.model, self._tensors(batch), batch_units)
            return float(loss) * batch_units["pairs"], batch_units["pairs"], metrics
        finally:
            self.model.train()

    @torch.no_grad()
    def eval_loss(self, batch: dict[str, np.ndarray]) -> tuple[float, int]:
        """(sum of token losses, number of label tokens) for one batch, in eval mode."""
        self.model.eval()
        try:
            inputs = self._tensors(batch)
            model = self.impl.task_model(self.model)  # the task's loss alone (AdaLoRA adds a penalty)
            with self.backend.autocast(self.compute_dtype):
                loss = model(**inputs, num_items_in_batch=1, use_cache=False, loss_only=True).loss
            return float(loss), int((inputs["labels"][:, 1:] != -100).sum())
        finally:
            self.model.train()

    # --- checkpoints --------------------------------------------------------------------------------
    def save_state(self, folder: Path) -> None:
        """Write everything needed to continue bit for bit: trained weights, optimizer, scaler, and
        every process's random generators. Called on every process; shared files come from rank 0."""
        torch_save({"torch_rng": torch.get_rng_state(), "device_rng": self.backend.rng_state()},
                   folder / f"rng-rank{self.dist.rank}.pt")
        if self.engine is not None:
            self.engine.save_checkpoint(str(folder / "deepspeed"), tag="state", save_latest=False)
        if self.sharded:
            sharding.save(self.model, self.optimizer, folder)
        if not self.dist.is_main or self.engine is not None:  # DeepSpeed's checkpoint holds weights and optimizer
            return
        if not self.sharded:
            save_file({n: p.detach().contiguous().cpu() for n, p in self.trainable.items()},
                      folder / "trainable.safetensors")
            torch_save(self.optimizer.state_dict(), folder / "optimizer.pt")
        if self.scaler:
            torch_save(self.scaler.state_dict(), folder / "scaler.pt")
        if self.impl.state_file:
            torch_save(self.impl.state(self.model, self.steps_done), folder / self.impl.state_file)

    def load_state(self, folder: Path) -> None:
        rng = self._saved_rng(folder)
        if self.engine is not None:
            self.engine.load_checkpoint(str(folder / "deepspeed"), tag="state")
            self._restore_rng(rng)
            return
        if self.sharded:
            sharding.load(self.model, self.optimizer, folder)
        else:
            self._load_trained(folder)
        if self.scaler:
            self.scaler.load_state_dict(torch.load(folder / "scaler.pt", weights_only=True))
        if self.impl.state_file:
            self.steps_done = self.impl.set_state(self.model, torch.load(folder / self.impl.state_file,
                                                                         map_location=self.device, weights_only=True))
        self._restore_rng(rng)

    def _load_trained(self, folder: Path) -> None:
        weights = load_file(folder / "trainable.safetensors", device=str(self.device))
        missing = sorted(set(self.trainable) - set(weights))
        if missing:
            raise MethodUnavailable(f"{folder}: checkpoint lacks trained weights {missing[:3]}; it is from another "
                                    "method or recipe: resume without changing method.*")
        with torch.no_grad():
            for name, param in self.trainable.items():
                param.copy_(weights[name])
        self.optimizer.load_state_dict(torch.load(folder / "optimizer.pt", map_location=self.device,
                                                  weights_only=True))

    def _saved_rng(self, folder: Path) -> Optional[dict]:
        """This process's random generators as the checkpoint saved them; None for a process that did not
        write it (fsdp resumed on more processes: it starts from the run's seed instead)."""
        file = folder / f"rng-rank{self.dist.rank}.pt"
        if self.sharded and not file.exists():
            log.warning("%s: no random state of process %d (fewer processes wrote it): its dropout masks start "
                        "from the run's seed", folder, self.dist.rank)
            torch.manual_seed(self.recipe.train.seed + self.dist.rank)
            return None
        return torch.load(file, weights_only=True)

    def _restore_rng(self, rng: Optional[dict]) -> None:
        if rng is None:
            return
        torch.set_rng_state(rng["torch_rng"])
        self.backend.set_rng_state(rng["device_rng"])

    def gather(self) -> Optional[dict[str, torch.Tensor]]:
        """The weights the tuned result holds, gathered whole from the processes' shards into the main
        process's host memory (None elsewhere, and when nothing is sharded). Every process calls it."""
        if self.sharded:
            weights = sharding.gathered(self.model, self.impl.complete, self.dist.is_main)
            self.model.unshard()  # the root unit whole: peft computes a prompt encoder's tokens from it on saving
            return weights
        if self.engine is None or self.engine.zero_optimization_stage() < 3:
            return None
        import deepspeed

        params = list(self.model.parameters()) if self.impl.complete else list(self.trainable.values())
        with deepspeed.zero.GatheredParameters(params):  # ZeRO-3's partitions, whole on every process for now
            if not self.dist.is_main:
                return None
            if self.impl.complete:
                return {n: t.detach().cpu().clone() for n, t in self.model.state_dict().items()}
            return {n: p.detach().cpu().clone() for n, p in self.trainable.items()}

    def save_adapter(self, folder: Path, weights: Optional[dict[str, torch.Tensor]] = None) -> None:
        """The tuned result in its method's portable format: a PEFT adapter folder for the peft methods
        (`peft.PeftModel.from_pretrained(load_model(base), folder)`), `prefix_config.json` and
        `prefix_encoder.safetensors` under the official names for P-tuning v2, a complete checkpoint folder
        for full and freeze tuning; `build.load_tuned_model` loads any of them."""
        folder.mkdir(parents=True, exist_ok=True)
        trained = self.trainable if weights is None else {n: weights[n] for n in self.trainable}
        self.impl.save(self.model, self.build, folder, trained, weights)

    def memory_stats(self) -> MemoryStats:
        return self.backend.memory_stats()

    def mfu(self, tokens_per_s: float) -> Optional[float]:
        peak = self.backend.capabilities.peak_flops
        if not peak:
            return None
        if self._flops_per_token is None:  # every weight a token multiplies (an embedding lookup multiplies none)
            embedding = {id(p) for p in self.model.get_input_embeddings().parameters()}
            size = lambda p: getattr(p, "ds_numel", p.numel())  # noqa: E731  (ZeRO-3 keeps the whole size there)
            weights = sum(size(p) for p in self.model.parameters() if id(p) not in embedding)
            self._flops_per_token = 4 * weights + 2 * sum(size(p) for p in self.trainable.values())
        return tokens_per_s * self._flops_per_token / peak

    # --- generation ---------------------------------------------------------------------------------
    @torch.no_grad()
    def generate_batch(self, prompts: list[list[int]], max_new_tokens: int, stop_ids: list[int],
                       pad_id: int) -> list[list[int]]:
        """Greedy replies to many prompts, batched `micro_batch_size` at a time with left padding."""
        self.model.eval()
        try:
            with self.backend.autocast(self.compute_dtype):
                return generate_replies(self.model, prompts, stop_ids, pad_id, max_new_tokens,
                                        self.recipe.train.micro_batch_size)
        finally:
            self.model.train()

    @torch.no_grad()
    def generate(self, prompt_ids: list[int], max_new_tokens: int, stop_ids: list[int], pad_id: int) -> list[int]:
        """Greedy continuation of `prompt_ids`, ending at any of `stop_ids` (not included)."""
        self.model.eval()
        try:
            ids = torch.tensor([prompt_ids], device=self.device)
            with self.backend.autocast(self.compute_dtype):
                out = self.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                          max_new_tokens=max_new_tokens, eos_token_id=stop_ids, pad_token_id=pad_id)
            new = out[0, len(prompt_ids):].tolist()
            return new[: next((i for i, t in enumerate(new) if t in stop_ids), len(new))]
        finally:
            self.model.train()

