"""The MindSpore runtime: the same recipes, checkpoints and PEFT-format adapters, trained by MindSpore.

`MindSporeRuntime` implements the interface the training loop in `core/trainer.py` drives (as
`TorchRuntime` does): micro-batch forward/backward with token-normalised accumulation, AdamW steps
with torch's exact update rule and clipping, evaluation, exact checkpoints, adapters, greedy
generation, on a `backends.mindspore.MindSporeDevice`. The tuning method is its `MindSporeMethod`
(methods/). Runs in PyNative mode, one process per device; several processes are an msrun job
(distributed.py), whose workers sum their gradients before each step.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Optional

import numpy as np

from ...backends.base import MemoryStats
from ...backends.mindspore import MindSporeDevice
from ...core.errors import MethodUnavailable
from ...core.methods import decays
from ...core.objectives import pair_metrics, units
from ...models import family_for
from .build import build_tuned_model
from .objectives import Dpo

log = logging.getLogger(__name__)

BETAS, EPS = (0.9, 0.999), 1e-8  # torch.optim.AdamW's defaults, so both frameworks take the same steps


class MindSporeRuntime:
    """One MindSpore model, one tuning method, AdamW; the same interface as TorchRuntime."""

    def __init__(self, recipe, device: MindSporeDevice, precision, model_dir: Path, dist):
        import mindspore as ms

        self.family = family_for(Path(model_dir))
        self.family.require("mindspore", "framework mindspore")
        self.ms, self.msmodel = ms, self.family.mindspore()
        self.recipe, self.device, self.precision, self.dist = recipe, device, precision, dist
        self.method = recipe.method
        self.model_dir = Path(model_dir)
        self.compute_dtype = {"fp32": ms.float32, "bf16": ms.bfloat16, "fp16": ms.float16}[precision.compute]
        self.loss_scaler = None
        if precision.loss_scaling:
            from mindspore.amp import DynamicLossScaler

            self.loss_scaler = DynamicLossScaler(scale_value=2.0**16, scale_factor=2, scale_window=1000)
        ms.set_seed(recipe.train.seed)
        self.model = self._build_model()
        self.trainable = {p.name: p for p in self.model.get_parameters() if p.requires_grad}
        if not self.trainable:
            raise MethodUnavailable(f"method {self.method.name}: nothing to train")
        log.info("trainable parameters: %s", f"{sum(int(np.prod(p.shape)) for p in self.trainable.values()):,}")
        params = list(self.trainable.values())
        self.exp_avg = [ms.ops.zeros_like(p) for p in params]
        self.exp_avg_sq = [ms.ops.zeros_like(p) for p in params]
        self.grads = None
        self.step_count = 0
        # Each worker's losses are divided by the token count of the whole job's step (num_items), so the
        # step's gradient is the sum of the workers' (TorchRuntime multiplies its loss by the world size
        # because DDP averages instead).
        self.sum_over_workers = ms.ops.AllReduce() if dist.world_size > 1 else None
        self.grad_fn = ms.value_and_grad(self._loss, None, params)
        self.objective = None  # sft; or DPO (frameworks/mindspore/objectives.py), with its own gradient function
        if recipe.objective.name == "dpo":
            if not self.impl.switchable:
                raise MethodUnavailable(f"objective dpo with framework mindspore: method {self.method.name} cannot be "
                                        "switched off for the reference; use method lora, or framework torch")
            self.objective = Dpo(recipe.objective, self.msmodel)
            self.pair_grad_fn = ms.value_and_grad(self._pair_loss, None, params, has_aux=True)
        self.metric_sums: dict[str, float] = {}
        self.model.set_train(True)

    def _build_model(self):
        tuned = build_tuned_model(self.model_dir, self.method, "train", seed=self.recipe.train.seed)
        self.impl, self.build = tuned.method, tuned.build
        tuned.model.compute_dtype = self.compute_dtype
        return tuned.model

    # --- training -----------------------------------------------------------------------------------
    def _loss(self, ids, mask, labels, num_items, positions=None, cuts=None):
        _, loss = self.model(ids, attention_mask=mask, labels=labels, num_items_in_batch=num_items,
                             position_ids=positions, cu_seq_lens=cuts)
        return self.loss_scaler.scale(loss) if self.loss_scaler else loss

    def _pair_loss(self, ids, mask, labels, reference, pairs):
        loss, policy, counts = self.objective.loss(self.model, ids, mask, labels, reference, pairs)
        return (self.loss_scaler.scale(loss) if self.loss_scaler else loss), policy, counts

    def _pair_inputs(self, batch: dict):
        ms = self.ms
        ids, labels = ms.Tensor(batch["input_ids"], ms.int32), ms.Tensor(batch["labels"], ms.int32)
        mask = batch["attention_mask"]
        if "reference_logps" in batch:  # computed before training (objective.precompute_reference)
            reference = ms.Tensor(batch["reference_logps"], ms.float32)
        else:
            reference = self.objective.reference(self.model, ids, mask, labels)
        return ids, mask, labels, reference

    def _pair_metrics(self, policy, reference, counts) -> dict[str, float]:
        policy, reference, counts = policy.asnumpy(), reference.asnumpy(), counts.asnumpy()
        beta = self.recipe.objective.beta
        ratio_c, ratio_r = np.split(policy - reference, 2)
        return pair_metrics(beta * ratio_c, beta * ratio_r, policy, counts)

    def reference_logps(self, batch: dict) -> np.ndarray:
        """The reference's summed label log-probability of each row of a pair batch (LoRA off)."""
        self.model.set_train(False)
        try:
            return self._pair_inputs({k: v for k, v in batch.items() if k != "reference_logps"})[3].asnumpy()
        finally:
            self.model.set_train(True)

    def eval_pairs(self, batch: dict) -> tuple[float, int, dict[str, float]]:
        self.model.set_train(False)
        try:
            inputs, pairs = self._pair_inputs(batch), units(self.recipe.objective, batch)["pairs"]
            loss, policy, counts = self.objective.loss(self.model, *inputs, pairs)
            return float(loss.asnumpy()) * pairs, pairs, self._pair_metrics(policy, inputs[3], counts)
        finally:
            self.model.set_train(True)

    def forward_backward(self, batch: dict, num_items, boundary: bool = True) -> float:
        ms = self.ms
        if self.objective is not None:  # DPO: `num_items` holds the step's pairs
            inputs = self._pair_inputs(batch)
            (loss, policy, counts), grads = self.pair_grad_fn(*inputs, num_items["pairs"])
            for name, value in self._pair_metrics(policy, inputs[3], counts).items():
                self.metric_sums[name] = self.metric_sums.get(name, 0.0) + value
            return self._add_grads(loss, grads)
        loss, grads = self.grad_fn(ms.Tensor(batch["input_ids"], ms.int32), batch["attention_mask"],
                                   ms.Tensor(batch["labels"], ms.int32), num_items, batch.get("position_ids"),
                                   batch.get("cu_seq_lens"))
        return self._add_grads(loss, grads)

    def _add_grads(self, loss, grads) -> float:
        """Accumulate a micro-batch's gradients (unscaled, with fp16's loss scaling); its loss as a float."""
        if self.loss_scaler:
            grads = self.loss_scaler.unscale(grads)
            loss = self.loss_scaler.unscale(loss)
        self.grads = list(grads) if self.grads is None else [a + g for a, g in zip(self.grads, grads)]
        return float(loss.asnumpy())

    def optimizer_step(self, lr: float, grad_clip: Optional[float]) -> float:
        """AdamW with torch's update order (decay, moments, bias corrections), after torch-style clipping."""
        ops = self.ms.ops
        grads, self.grads = self.grads, None
        if self.sum_over_workers is not None:
            grads = [self.sum_over_workers(g) for g in grads]
        norm = float(np.sqrt(sum(float((g.astype(self.ms.float32) ** 2).sum().asnumpy()) for g in grads)))
        if self.loss_scaler is not None:
            from mindspore.amp import all_finite

            finite = all_finite(grads)
            self.loss_scaler.adjust(finite)
            if not bool(finite.asnumpy()):
                log.warning("fp16 overflow: step skipped, loss scale lowered")
                return norm
        if grad_clip:
            coef = min(grad_clip / (norm + 1e-6), 1.0)
            grads = [g * coef for g in grads]
        self.step_count += 1
        t = self.step_count
        b1, b2 = BETAS
        step_size = lr / (1 - b1**t)
        correction2_sqrt = math.sqrt(1 - b2**t)
        decay = self.recipe.train.weight_decay
        for i, ((name, param), grad) in enumerate(zip(self.trainable.items(), grads)):
            value = param * (1 - lr * decay) if decay and decays(name, param.ndim) else param
            self.exp_avg[i] = self.exp_avg[i] + (grad - self.exp_avg[i]) * (1 - b1)
            self.exp_avg_sq[i] = self.exp_avg_sq[i] * b2 + grad * grad * (1 - b2)
            denom = ops.sqrt(self.exp_avg_sq[i]) / correction2_sqrt + EPS
            param.set_data(value - step_size * self.exp_avg[i] / denom)
        return norm

    def eval_loss(self, batch: dict) -> tuple[float, int]:
        self.model.set_train(False)
        try:
            _, loss = self.model(batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"],
                                 num_items_in_batch=1)
            return float(loss.asnumpy()), int((batch["labels"][:, 1:] != -100).sum())
        finally:
            self.model.set_train(True)

    # --- checkpoints --------------------------------------------------------------------------------
    def save_state(self, folder: Path) -> None:
        from safetensors.numpy import save_file

        if not self.dist.is_main:
            return
        save_file({n: p.asnumpy() for n, p in self.trainable.items()}, str(folder / "trainable.safetensors"))
        moments = {f"exp_avg.{n}": m.asnumpy() for n, m in zip(self.trainable, self.exp_avg)}
        moments.update({f"exp_avg_sq.{n}": v.asnumpy() for n, v in zip(self.trainable, self.exp_avg_sq)})
        save_file(moments, str(folder / "optimizer.safetensors"))
        # MindSpore's dropout draws from per-operator seeds that no public API saves, so a resumed run
        # is bit-exact only without dropout (LoRA dropout 0; P-tuning's prefix dropout is always on). Nothing
        # else differs between the workers of an msrun job, so rank 0's files are the whole state.
        state = {"step": self.step_count}
        if self.loss_scaler:
            state["loss_scale"] = float(self.loss_scaler.scale_value.asnumpy())
        (folder / "mindspore_state.json").write_text(json.dumps(state))

    def load_state(self, folder: Path) -> None:
        from safetensors.numpy import load_file

        ms = self.ms
        weights = load_file(str(folder / "trainable.safetensors"))
        moments = load_file(str(folder / "optimizer.safetensors"))
        for i, (name, param) in enumerate(self.trainable.items()):
            param.set_data(ms.Tensor(weights[name]))
            self.exp_avg[i] = ms.Tensor(moments[f"exp_avg.{name}"])
            self.exp_avg_sq[i] = ms.Tensor(moments[f"exp_avg_sq.{name}"])
        state = json.loads((folder / "mindspore_state.json").read_text())
        self.step_count = state["step"]
        if self.loss_scaler and "loss_scale" in state:
            self.loss_scaler.scale_value.set_data(ms.Tensor(state["loss_scale"], ms.float32))

    def take_metrics(self) -> dict[str, float]:
        sums, self.metric_sums = self.metric_sums, {}
        return sums

    def mfu(self, tokens_per_s: float) -> None:
        return None  # no peak is known for MindSpore's devices here

    def memory_stats(self) -> MemoryStats:
        return self.device.memory_stats()

    def gather(self) -> None:
        return None  # every worker holds the whole model

    def save_adapter(self, folder: Path, weights=None) -> None:
        """The same formats as TorchRuntime: PEFT LoRA or IA3, the official prefix-encoder weights, or a
        complete checkpoint (full, freeze)."""
        folder.mkdir(parents=True, exist_ok=True)
        self.impl.save(self.model, self.build, folder, self.trainable)

    # --- generation ---------------------------------------------------------------------------------
    def generate_batch(self, prompts: list[list[int]], max_new_tokens: int, stop_ids: list[int],
                       pad_id: int) -> list[list[int]]:
        """`generate` for each prompt in turn."""
        return [self.generate(ids, max_new_tokens, stop_ids, pad_id) for ids in prompts]

    def generate(self, prompt_ids: list[int], max_new_tokens: int, stop_ids: list[int], pad_id: int) -> list[int]:
        """Greedy continuation with the KV cache, ending at any of `stop_ids` (not included)."""
        self.model.set_train(False)
        try:
            cache = self.msmodel.KVCache()
            ids, new = np.array([prompt_ids], np.int32), []
            for _ in range(max_new_tokens):
                logits, _ = self.model(ids, cache=cache)
                token = int(logits[0, -1].asnumpy().argmax())
                if token in stop_ids:
                    break
                new.append(token)
                ids = np.array([[token]], np.int32)
            return new
        finally:
            self.model.set_train(True)
