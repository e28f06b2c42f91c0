"""TorchRuntime: the training loop's view of a torch model on one backend.

It builds the model from a checkpoint folder, attaches the tuning method (LoRA and QLoRA through
peft, P-tuning v2 through the model's prefix encoder, or full fine-tuning), and runs micro-batch
forward/backward, optimizer steps, evaluation, checkpoints and generation. Batches arrive as numpy
arrays; device specifics come from the backend.
"""

from __future__ import annotations

import json
import logging
import math
import pickle
import sys
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from ..core.checkpoints import torch_save
from ..core.config import DTYPES as CONFIG_DTYPES, Recipe, resolve_path
from ..core.methods import METHODS, decays, model_overrides
from ..core.distributed import Dist
from ..core.precision import PrecisionPlan
from ..models import CheckpointError, family_for, read_json, refused_pickle
from .base import Backend, MemoryStats, MethodUnavailable

log = logging.getLogger(__name__)

DTYPES = dict(zip(CONFIG_DTYPES, (torch.float32, torch.bfloat16, torch.float16)))  # config.DTYPES as torch's
PREFIX_CONFIG = "prefix_config.json"
PREFIX_WEIGHTS = "prefix_encoder.safetensors"
QUANTIZED_BASE = "tuneport_quantized_base.json"  # in a QLoRA adapter: how its base was quantized
ADALORA_STATE = "adalora.pt"  # in a checkpoint: AdaLoRA's step count, importance scores and rank pattern


def quantize_linear_4bit(model: nn.Module, quant_type: str, double_quant: bool, compute_dtype: torch.dtype,
                         device: torch.device) -> int:
    """Replace every nn.Linear except the output layer (`get_output_embeddings()`) by a bitsandbytes 4-bit
    layer (QLoRA base).

    Returns:
        The number of layers quantized.
    """
    import bitsandbytes as bnb

    count = 0
    output = model.get_output_embeddings()  # stays in float: the loss reads its weight
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if type(child) is not nn.Linear or child is output:
                continue
            layer = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=child.bias is not None,
                                      compute_dtype=compute_dtype, quant_type=quant_type,
                                      compress_statistics=double_quant)
            if child.in_features % 64:
                # bitsandbytes' CPU inference repacking (taken where the CPU has AVX512-BF16) assumes rows of
                # whole 64-wide quantization blocks; narrower layers (tiny test models) keep the plain path.
                layer.support_avx512bf16_for_cpu = False
            layer.weight = bnb.nn.Params4bit(child.weight.data.to("cpu"), requires_grad=False,
                                             quant_type=quant_type, compress_statistics=double_quant)
            if child.bias is not None:
                layer.bias = nn.Parameter(child.bias.data, requires_grad=False)
            setattr(module, child_name, layer.to(device))  # moving quantizes
            count += 1
    return count


def dequantize_base_4bit(model: nn.Module, quant_type: str, double_quant: bool) -> int:
    """Round every nn.Linear except the output layer to bitsandbytes' 4-bit values and back, in place: the
    base weights a QLoRA adapter was trained on, in float. Returns the number of layers rounded."""
    import bitsandbytes.functional as bnbf

    count = 0
    output = model.get_output_embeddings()
    for name, module in model.named_modules():
        if type(module) is nn.Linear and module is not output:
            weight = module.weight.data
            packed, state = bnbf.quantize_4bit(weight.float(), quant_type=quant_type, compress_statistics=double_quant)
            module.weight.data = bnbf.dequantize_4bit(packed, state, quant_type=quant_type).to(weight.dtype)
            count += 1
    return count


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
        self.method = recipe.method
        self.model_dir = Path(model_dir)
        self.family = family_for(self.model_dir)
        self.device = backend.device(dist.local_rank)
        self.compute_dtype = DTYPES[precision.compute]
        torch.manual_seed(recipe.train.seed)  # adapter initialisation is part of the run's seed
        backend.manual_seed(recipe.train.seed)
        self.model = self._build_model()
        self.trainable = {n: p for n, p in self.model.named_parameters() if p.requires_grad}
        if not self.trainable:
            raise MethodUnavailable(f"method {self.method.name}: nothing to train")
        log.info("trainable parameters: %s", f"{sum(p.numel() for p in self.trainable.values()):,}")
        decay = [p for n, p in self.trainable.items() if decays(n, p.ndim)]
        no_decay = [p for n, p in self.trainable.items() if not decays(n, p.ndim)]
        self.optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": recipe.train.weight_decay},
             {"params": no_decay, "weight_decay": 0.0}], lr=recipe.train.lr)
        self.scaler = backend.grad_scaler(self.compute_dtype) if precision.loss_scaling else None
        self.steps_done = 0  # optimizer steps taken: AdaLoRA's budget schedule counts them (saved for AdaLoRA only)
        self.engine = None  # DeepSpeed engine, when the recipe asks for one
        self.forward_model = self.model
        if recipe.deepspeed:
            self._start_deepspeed(precision)
        elif dist.world_size > 1:
            from torch.nn.parallel import DistributedDataParallel

            device_ids = None if self.device.type == "cpu" else [self.device.index]
            self.forward_model = DistributedDataParallel(self.model, device_ids=device_ids)
        self.model.train()

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
    def _build_model(self) -> nn.Module:
        method = self.method
        # Frozen base weights may live in the compute dtype; trained weights stay in float32.
        base_dtype = torch.float32 if method.name == "full" else self.compute_dtype
        overrides = model_overrides(method)
        model = self.family.load_model(self.model_dir, self.backend, dtype=base_dtype,
                                       device_index=self.dist.local_rank, **overrides)
        checkpointing = self._checkpointing(model)
        if checkpointing and method.name == "prefix_tuning" and not getattr(model, "keeps_prefix_when_checkpointing",
                                                                             False):
            if self.recipe.train.gradient_checkpointing is True:
                raise MethodUnavailable(f"method prefix_tuning: {self.family.model_type}'s layers drop the prefix under "
                                        "gradient checkpointing; set train.gradient_checkpointing=false")
            log.info("gradient checkpointing off: %s's layers would drop prefix tuning's prefix", self.family.model_type)
            checkpointing = False
        if method.name == "qlora" and not self.backend.capabilities.bnb_4bit:
            raise MethodUnavailable(
                f"method qlora needs bitsandbytes 4-bit kernels on {self.backend.name}; "
                "install them with: pip install 'bitsandbytes>=0.45' (CPU and CUDA; Ascend has none: "
                "use method lora there)")

        def quantize(frozen: nn.Module) -> None:
            n = quantize_linear_4bit(frozen, method.quant_type, method.double_quant, self.compute_dtype, self.device)
            log.info("qlora: %d linear layers quantized to 4-bit %s", n, method.quant_type)

        peft_model = apply_method(model, method, self.family, quantize if method.name == "qlora" else None,
                                  self.recipe.train.max_steps)
        if checkpointing:  # after peft, which refuses prefix tuning on a checkpointing model (ours keeps the prefix)
            enable_checkpointing(model)
        if not METHODS[method.name].peft:
            return peft_model
        peft_model.peft_config["default"].base_model_name_or_path = str(self.model_dir.resolve())
        if method.name == "adalora":
            # peft adds the orthogonality penalty to every micro-batch's loss, of every process: a share of it
            # each keeps the recipe's weight per optimizer step (restored before the adapter is saved)
            shares = self.recipe.train.grad_accum * self.dist.world_size
            peft_model.peft_config["default"].orth_reg_weight = method.orth_reg_weight / shares
        if getattr(method, "init_from", None):
            from peft import set_peft_model_state_dict

            weights = load_file(resolve_path(method.init_from) / "adapter_model.safetensors", device=str(self.device))
            try:
                result = set_peft_model_state_dict(peft_model, weights)
            except RuntimeError as e:  # shape mismatch: the adapter has another rank or targets
                raise MethodUnavailable(f"method.init_from: {method.init_from} does not fit this method's "
                                        f"settings ({method}): {str(e)[:300]}") from None
            if getattr(result, "unexpected_keys", None):
                raise MethodUnavailable(f"method.init_from: {method.init_from}: weights {result.unexpected_keys[:3]} "
                                        "match no layer of this model")
        return peft_model

    def _checkpointing(self, model: nn.Module) -> bool:
        """The recipe's gradient checkpointing; `auto` asks the memory estimate against the device (and
        is off for a model that cannot checkpoint)."""
        wanted = self.recipe.train.gradient_checkpointing
        if wanted != "auto":
            return bool(wanted)
        if not getattr(model, "supports_gradient_checkpointing", False):
            return False
        from ..core.estimate import choose_checkpointing

        return choose_checkpointing(self.recipe, self.backend.name, self.backend.capabilities.memory_total)

    # --- training -----------------------------------------------------------------------------------
    def _tensors(self, batch: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
        return {k: torch.from_numpy(v).to(self.device) for k, v in batch.items()}

    def forward_backward(self, batch: dict[str, np.ndarray], num_items: int, boundary: bool = True) -> float:
        """Add this micro-batch's gradients; its loss is summed over label tokens / `num_items`.

        Args:
            batch: numpy input_ids, labels, attention_mask.
            num_items: label tokens in the whole optimizer step, over all processes.
            boundary: the step's last micro-batch (gradients are exchanged between processes only then).

        Returns:
            This micro-batch's share of the step's token-averaged loss.
        """
        inputs = self._tensors(batch)
        ddp = self.engine is None and self.forward_model is not self.model
        with self.forward_model.no_sync() if ddp and not boundary else nullcontext():
            with self.backend.autocast(self.compute_dtype):
                loss = self.forward_model(**inputs, num_items_in_batch=num_items, use_cache=False,
                                          loss_only=True).loss
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
        norm = torch.nn.utils.clip_grad_norm_(params, grad_clip if grad_clip else math.inf)
        if self.scaler:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.steps_done += 1
        if self.method.name == "adalora" and math.isfinite(float(norm)):
            # importance scores from this step's gradients (not from a step fp16's loss scaler skipped); prune on schedule
            self.model.base_model.update_and_allocate(self.steps_done)
        self.optimizer.zero_grad(set_to_none=True)
        return float(norm)

    @torch.no_grad()
    def eval_loss(self, batch: dict[str, np.ndarray]) -> tuple[float, int]:
        """(sum of token losses, number of label tokens) for one batch, in eval mode."""
        self.model.eval()
        try:
            inputs = self._tensors(batch)
            # AdaLoRA's model adds its orthogonality penalty to the loss; evaluation scores the task alone
            model = self.model.base_model.model if self.method.name == "adalora" else self.model
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
        if not self.dist.is_main or self.engine is not None:  # DeepSpeed's checkpoint holds weights and optimizer
            return
        save_file({n: p.detach().contiguous().cpu() for n, p in self.trainable.items()},
                  folder / "trainable.safetensors")
        torch_save(self.optimizer.state_dict(), folder / "optimizer.pt")
        if self.scaler:
            torch_save(self.scaler.state_dict(), folder / "scaler.pt")
        if self.method.name == "adalora":
            torch_save(self._adalora_state(), folder / ADALORA_STATE)

    def load_state(self, folder: Path) -> None:
        rng = torch.load(folder / f"rng-rank{self.dist.rank}.pt", weights_only=True)
        if self.engine is not None:
            self.engine.load_checkpoint(str(folder / "deepspeed"), tag="state")
            self._restore_rng(rng)
            return
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
        if self.scaler:
            self.scaler.load_state_dict(torch.load(folder / "scaler.pt", weights_only=True))
        if self.method.name == "adalora":
            self._set_adalora_state(torch.load(folder / ADALORA_STATE, map_location=self.device, weights_only=True))
        self._restore_rng(rng)

    def _adalora_state(self) -> dict:
        """What AdaLoRA's budgeting carries from step to step: the step count, the smoothed importance
        scores and the rank pattern allocated so far."""
        allocator = self.model.base_model.rankallocator
        return {"steps_done": self.steps_done, "rank_pattern": self.model.peft_config["default"].rank_pattern,
                "ipt": allocator.ipt, "exp_avg_ipt": allocator.exp_avg_ipt, "exp_avg_unc": allocator.exp_avg_unc}

    def _set_adalora_state(self, state: dict) -> None:
        allocator = self.model.base_model.rankallocator
        self.steps_done = state["steps_done"]
        self.model.peft_config["default"].rank_pattern = state["rank_pattern"]
        allocator.ipt, allocator.exp_avg_ipt, allocator.exp_avg_unc = \
            state["ipt"], state["exp_avg_ipt"], state["exp_avg_unc"]

    def _restore_rng(self, rng: dict) -> None:
        torch.set_rng_state(rng["torch_rng"])
        self.backend.set_rng_state(rng["device_rng"])

    def save_adapter(self, folder: Path) -> None:
        """The tuned result in its portable format.

        peft methods (lora, qlora, dora, adalora, ia3, prompt_tuning, ptuning, prefix_tuning): a PEFT adapter
            folder (`peft.PeftModel.from_pretrained(load_model(base), folder)`); a QLoRA one also says how its base was quantized (QUANTIZED_BASE), so `load_tuned_model` and
            `tuneport export` put it on the same (dequantized 4-bit) base weights it was trained on;
        ptuning_v2: `prefix_config.json` + `prefix_encoder.safetensors` under the official names;
        full: a complete checkpoint folder in the official layout.
        """
        folder.mkdir(parents=True, exist_ok=True)
        if METHODS[self.method.name].peft:
            if self.method.name == "adalora":  # the recipe's weight, not the per-micro-batch share training uses
                self.model.peft_config["default"].orth_reg_weight = self.method.orth_reg_weight
            self.model.save_pretrained(folder)
            if self.method.name == "qlora":  # loading it again means the same 4-bit base (dequantized)
                (folder / QUANTIZED_BASE).write_text(json.dumps(
                    {"quant_type": self.method.quant_type, "double_quant": self.method.double_quant}))
        elif self.method.name == "ptuning_v2":
            (folder / PREFIX_CONFIG).write_text(json.dumps(
                {"pre_seq_len": self.method.num_virtual_tokens, "prefix_projection": self.method.prefix_projection}))
            save_file({n: p.detach().contiguous() for n, p in self.trainable.items()}, folder / PREFIX_WEIGHTS)
        else:
            self.model.save_pretrained(folder)

    def memory_stats(self) -> MemoryStats:
        return self.backend.memory_stats()

    # --- generation ---------------------------------------------------------------------------------
    @torch.no_grad()
    def generate_batch(self, prompts: list[list[int]], max_new_tokens: int, stop_ids: list[int],
                       pad_id: int) -> list[list[int]]:
        """Greedy replies to many prompts, batched `micro_batch_size` at a time with left padding."""
        from ..core.evaluate import generate_replies

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


def peft_config(method, family, model_config=None, max_steps: Optional[int] = None):
    """The peft config of a peft-trained `method` (lora, qlora, dora, adalora, ia3, prompt_tuning,
    ptuning, prefix_tuning), with the family's defaults where the recipe names no layers."""
    import peft

    name = method.name
    if name in ("lora", "qlora", "dora", "adalora"):
        targets = list(method.target_modules or family.lora_targets)
        common = dict(lora_alpha=method.alpha, lora_dropout=method.dropout, target_modules=targets,
                      task_type="CAUSAL_LM")
        if name != "adalora":
            return peft.LoraConfig(r=method.r, use_dora=name == "dora", **common)
        return peft.AdaLoraConfig(init_r=method.init_r, target_r=method.target_r, tinit=method.tinit,
                                  tfinal=method.tfinal, deltaT=method.delta_t, beta1=method.beta1, beta2=method.beta2,
                                  orth_reg_weight=method.orth_reg_weight,
                                  # without a run (estimate, methods table) any valid schedule gives the same layers
                                  total_step=max_steps or method.tinit + method.tfinal + 1, **common)
    if name == "ia3":
        try:
            targets, feedforward = method.modules(family)
        except ValueError as e:
            raise MethodUnavailable(str(e)) from None
        return peft.IA3Config(target_modules=targets, feedforward_modules=feedforward, task_type="CAUSAL_LM")
    if name == "prompt_tuning":
        return peft.PromptTuningConfig(num_virtual_tokens=method.num_virtual_tokens, task_type="CAUSAL_LM")
    if name == "ptuning":
        return peft.PromptEncoderConfig(num_virtual_tokens=method.num_virtual_tokens, task_type="CAUSAL_LM",
                                        encoder_hidden_size=method.encoder_hidden_size,
                                        encoder_reparameterization_type=method.encoder_type)
    if name == "prefix_tuning":
        shape = family.prefix_shape(model_config) if family.prefix_shape and model_config is not None else {}
        return peft.PrefixTuningConfig(num_virtual_tokens=method.num_virtual_tokens, task_type="CAUSAL_LM",
                                       prefix_projection=method.prefix_projection, **shape)
    raise MethodUnavailable(f"method {name}: not a peft method")


def apply_method(model: nn.Module, method, family, quantize: Optional[Callable[[nn.Module], None]] = None,
                 max_steps: Optional[int] = None) -> nn.Module:
    """`model` made ready for `method`: what it does not train frozen and its adapter added (through
    peft, after `quantize` has rounded the frozen base for QLoRA; AdaLoRA schedules its budget over
    `max_steps`). Reads no weights, so it works on the meta device too (`tuneport estimate`)."""
    if method.name == "full":
        return model
    model.requires_grad_(False)
    if method.name == "ptuning_v2":
        encoder = getattr(getattr(model, "transformer", None), "prefix_encoder", None)
        if encoder is None:
            raise MethodUnavailable(f"method ptuning_v2 is ChatGLM's own prefix encoder; {family.model_type} "
                                    "has none: use method prefix_tuning")
        encoder.float().requires_grad_(True)
        return model
    if quantize is not None:
        quantize(model)
    with nullcontext() if quantize is not None else bitsandbytes_hidden():
        from peft import get_peft_model

        config = peft_config(method, family, model.config, max_steps)
        try:
            return get_peft_model(model, config)
        except ValueError as e:  # peft: no module matches target_modules
            targets = getattr(method, "target_modules", None) or sorted(getattr(config, "target_modules", None) or [])
            raise MethodUnavailable(f"method.target_modules: {targets} ({e}); {family.model_type}'s linear "
                                    f"layers are {', '.join(family.linear_layers)}") from None


def enable_checkpointing(model: nn.Module) -> None:
    """Activation (gradient) checkpointing on a transformers model, by its current name: transformers 5.2x
    deprecated `gradient_checkpointing_enable` for `activation_checkpointing_enable` (same behaviour)."""
    (getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable)()


@contextmanager
def bitsandbytes_hidden():
    """peft with bitsandbytes out of sight, for a run that quantizes nothing.

    peft imports bitsandbytes whenever it is installed (at its own import, and again when it wraps
    layers), and bitsandbytes brings torch's compiler with it: about 45 MiB of memory and a second of
    start-up that only QLoRA uses. Inside this block `import bitsandbytes` fails as if it were absent;
    afterwards peft's cached answer is cleared, so a later QLoRA run in the same process still finds it.
    """
    if "bitsandbytes" in sys.modules:  # already imported (or already hidden): nothing to save
        yield
        return
    sys.modules["bitsandbytes"] = None  # what the import system reads as "not installed"
    try:
        yield
    finally:
        del sys.modules["bitsandbytes"]
        from peft import import_utils

        import_utils.is_bnb_available.cache_clear()
        import_utils.is_bnb_4bit_available.cache_clear()


def load_tuned_model(base: Path, adapter: Optional[Path], backend="cpu", dtype=None, device_index: int = 0) -> nn.Module:
    """The base model with a tuned result from `TorchRuntime.save_adapter` applied (for chat), on
    `backend` (a Backend, or a device name) and its device `device_index`.

    Raises:
        CheckpointError: the adapter folder is missing, is not a tuned result, is damaged, or was tuned
            from another base model (its shapes or layers do not fit).
    """
    load_model = family_for(Path(base)).load_model
    if adapter is None:
        return load_model(base, backend, dtype=dtype, device_index=device_index)
    adapter = Path(adapter)
    if not adapter.is_dir():
        raise CheckpointError(f"--adapter {adapter}: no such folder; pass the adapter/ folder of a run")
    if (adapter / "config.json").exists():
        return family_for(adapter).load_model(adapter, backend, dtype=dtype, device_index=device_index)  # a full fine-tune: a checkpoint
    if (adapter / PREFIX_CONFIG).exists():
        config = read_json(adapter / PREFIX_CONFIG)
        model = load_model(base, backend, dtype=dtype, device_index=device_index, **config)
        weights = _adapter_weights(adapter / PREFIX_WEIGHTS)
        shapes = {n: tuple(t.shape) for n, t in model.state_dict().items() if n.startswith("transformer.prefix_encoder.")}
        if {n: tuple(t.shape) for n, t in weights.items()} != shapes:
            raise CheckpointError(f"--adapter {adapter}: its prefix encoder does not fit the base model {base} "
                                  f"(expected {shapes}); pass the base it was tuned from")
        model.load_state_dict(weights, strict=False)
        return model
    if not (adapter / "adapter_config.json").exists():
        raise CheckpointError(f"--adapter {adapter}: not a tuned result; expected adapter_config.json (LoRA, QLoRA), "
                              f"{PREFIX_CONFIG} (P-tuning v2) or config.json (full fine-tune)")
    with bitsandbytes_hidden():  # QLoRA's base is dequantized by bitsandbytes below, which imports it then
        from peft import PeftModel

    trained_on = read_json(adapter / "adapter_config.json").get("base_model_name_or_path") or "?"
    model = load_model(base, backend, dtype=dtype, device_index=device_index)
    quantized = (adapter / QUANTIZED_BASE).is_file()
    if quantized:
        settings = read_json(adapter / QUANTIZED_BASE)
        dequantize_base_4bit(model, settings["quant_type"], settings["double_quant"])
    try:
        with nullcontext() if quantized else bitsandbytes_hidden():
            return PeftModel.from_pretrained(model, str(adapter)).eval()
    except (RuntimeError, ValueError) as e:  # torch: size mismatch; peft: target layers missing in this model
        raise CheckpointError(f"--adapter {adapter}: does not fit the base model {base} "
                              f"({str(e).strip().splitlines()[-1].strip()[:200]}); pass the base it was tuned from "
                              f"({trained_on})") from None
    except SafetensorError as e:
        raise CheckpointError(f"--adapter {adapter}: damaged adapter file ({e}); copy the adapter again") from None
    except pickle.UnpicklingError as e:  # a pickle adapter_model.bin
        raise refused_pickle(adapter / "adapter_model.bin", e) or CheckpointError(
            f"--adapter {adapter}: damaged adapter file ({e}); copy the adapter again") from None


def _adapter_weights(file: Path) -> dict:
    try:
        return load_file(file)
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{file}: cannot be read ({e}); copy the adapter again") from None
