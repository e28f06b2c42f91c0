"""`tuneport estimate` (torch's, on the meta device): the peak memory of a recipe's training step, from config.json alone.

The model is built on torch's meta device (shapes, no memory, no weights read) with the recipe's
method applied, so parameter counts and dtypes are exactly those of our implementation. Activations
are the tensors our forward saves for backward, recorded by running it on meta tensors. The parts:

- weights: every parameter and buffer in its training dtype (frozen base weights in the compute dtype);
- gradients and optimizer state: float32 gradients and AdamW's two moments for trainable parameters;
- activations: what the forward saves (with checkpointing: each layer's input, plus one layer's
  recomputation held during backward);
- logits/loss: the label-only loss's working set, one chunk of float32 logits, and the label rows;
- runtime: the framework itself (on the CPU the process's resident memory before any model; on an
  accelerator the allocator counts tensors only, so 0).
"""

from __future__ import annotations

import dataclasses
import logging
import resource
import sys
from dataclasses import dataclass, fields
from typing import Optional

import torch

from ...backends import get_backend
from ...core.config import resolve_path
from ...core.errors import BackendUnavailable, CheckpointError, MethodUnavailable, RunError, Unsupported
from ...core.precision import resolve_precision
from ...models import builder_family, builder_names, family_for
from ...models.loss import loss_chunk
from .. import implementation
from .build import DTYPES, build_tuned_model
from .sharding import block_lists

log = logging.getLogger(__name__)
ADAM_STATES = 2  # exp_avg and exp_avg_sq, float32 each
STRATEGIES = ("ddp", "fsdp", "zero2", "zero3")  # what `--strategy` divides by: DeepSpeed's stages apart
BUCKET = 50_000_000  # elements in DeepSpeed's reduce bucket (recipes/deepspeed/*.json's reduce_bucket_size)


@dataclass
class Estimate:
    """Predicted peak memory of one training step, in bytes, by part."""

    weights: int
    gradients: int
    optimizer: int
    activations: int
    logits: int
    runtime: int

    @property
    def peak(self) -> int:
        return sum(getattr(self, f.name) for f in fields(self))


def _family_and_config(recipe):
    """The recipe's model family and config (with the method's config changes), reading config.json only."""
    if recipe.model in builder_names():
        family = builder_family(recipe.model)
        config = family.builders[recipe.model][0]()
        for key, value in recipe.method.model_overrides(family).items():
            setattr(config, key, value)
        return family, config
    folder = resolve_path(recipe.model)
    family = family_for(folder)
    family.require("estimate", f"tuneport estimate ({folder})")
    return family, family.load_config(folder, **recipe.method.model_overrides(family))


def _meta_model(family, config, method, compute, checkpointing: bool):
    """The model as training builds it (dtypes, frozen parts, adapter), on the meta device."""
    return build_tuned_model(config, method, None, "meta", compute, family=family, checkpointing=checkpointing).model


def trainable_parameters(family, config, method) -> int:
    """Parameters `method` trains on a model of `config` (with the method's config changes), counted on
    the meta device."""
    import copy

    config = copy.deepcopy(config)
    for key, value in method.model_overrides(family).items():
        setattr(config, key, value)
    model = _meta_model(family, config, method, DTYPES["fp32"], False)
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def _saved_bytes(model, seq: int) -> int:
    """Bytes the forward of one sample of `seq` tokens saves for backward (not the weights), on meta tensors."""
    weights = {id(t) for t in [*model.parameters(), *model.buffers()]}  # counted as weights already
    saved: dict[int, int] = {}

    def pack(t):
        base = t._base if t._base is not None else t  # a saved view keeps all of its base alive
        if id(base) not in weights:
            saved[id(base)] = base.numel() * base.element_size()
        return t

    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    ids = torch.zeros(1, seq, dtype=torch.long, device="meta")
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            hidden = inner.base_model(input_ids=ids)
    except RuntimeError:  # transformers' mask code reads values (meta tensors have none); a ready causal mask skips it
        saved.clear()
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            hidden = inner.base_model(input_ids=ids, position_ids=torch.arange(seq, device="meta")[None],
                                      attention_mask=torch.ones(1, 1, seq, seq, dtype=torch.bool, device="meta"))
    hidden = hidden if torch.is_tensor(hidden) else hidden[0]  # transformers' models return an output object
    return sum(saved.values()) + hidden.numel() * hidden.element_size()  # the final hidden feeds the loss


def runtime_bytes(device: str) -> int:
    """Memory the framework holds before any model: this process's resident memory now on the CPU
    (imports done), 0 on an accelerator."""
    if device != "cpu":
        return 0
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * resource.getpagesize()
    except OSError:  # not Linux: the peak so far
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)


@dataclass
class Plan:
    """A recipe's memory worked out once (one meta model, or two with checkpointing): the parts that do
    not depend on the micro-batch, and how the others grow with it."""

    recipe: object
    fixed: Estimate  # weights, gradients, optimizer and runtime; activations and logits 0
    per_sample: int  # activation bytes of one sample
    vocab: int
    hidden: int
    size: int  # bytes per element in the compute dtype
    device_type: str  # "cpu", "cuda", "npu": the label-only loss's chunk size depends on it
    unit: int = 0  # bytes FSDP or ZeRO-3 gathers at once: the rest of the model with its two largest blocks
    unit_trained: int = 0  # trainable parameters in that gathered unit

    def at(self, batch: int, nproc: int = 1, strategy: str = "ddp", offload: bool = False) -> Estimate:
        """The estimate for a micro-batch of `batch` samples, on each of `nproc` cards under `strategy`
        (one of STRATEGIES; `offload`: fsdp's shards in host memory)."""
        data = self.recipe.data
        seq = data.row_tokens  # a sample at its longest, or a packed row
        rows = batch * seq * data.max_output_length // (data.max_input_length + data.max_output_length)
        cast = self.size if self.size < 4 else 0  # the gradient cast back to the compute dtype
        logits = min(rows, loss_chunk(self.device_type)) * self.vocab * (4 + cast) + 2 * rows * self.hidden * self.size
        return dataclasses.replace(self.shared(nproc, strategy, offload), activations=self.per_sample * batch,
                                   logits=logits)

    def shared(self, nproc: int, strategy: str, offload: bool) -> Estimate:
        """The fixed parts on one of `nproc` cards: what each engine divides among the processes, and what it
        holds whole for a while (DDP's gradient buckets, the unit FSDP and ZeRO-3 gather, DeepSpeed's reduce and
        gather buckets and float32 master partition). Activations and logits are every card's own.

        The optimizer part holds AdamW's two moments and the one float32 temporary of its step, over the
        trained weights this card updates."""
        f, n = self.fixed, nproc
        grads = f.gradients  # float32, one per trained weight
        bucket = min(grads, BUCKET * 4)
        if strategy == "ddp":  # every card holds everything; DDP's buckets copy the gradients once more
            return dataclasses.replace(f, gradients=grads * (2 if n > 1 else 1), optimizer=f.optimizer + grads)
        if strategy in ("zero2", "zero3"):  # gradients (and a float32 copy), master weights and optimizer divided
            weights = f.weights // n + self.unit + bucket if strategy == "zero3" else f.weights
            return dataclasses.replace(f, weights=weights, gradients=2 * grads // n + bucket,
                                       optimizer=(f.optimizer + 2 * grads) // n + (bucket if strategy == "zero2" else 0))
        if offload:  # fsdp with the shards in host memory: only what is gathered stays on the card
            return dataclasses.replace(f, weights=self.unit, gradients=self.unit_trained * 4, optimizer=0)
        return dataclasses.replace(f, weights=f.weights // n + self.unit,
                                   gradients=grads // n + self.unit_trained * 4, optimizer=(f.optimizer + grads) // n)

    def host(self, nproc: int) -> int:
        """Host memory each of `nproc` processes holds under fsdp with offload: its shards of the weights, the
        gradients and the optimizer state with its step's temporary (as `shared` counts them on a card)."""
        f = self.fixed
        return (f.weights + f.gradients + f.optimizer + f.gradients) // nproc

    def largest_batch(self, memory: int, limit: int = 1 << 16, **sharing) -> int:
        """The largest micro-batch (up to `limit`) that fits in `memory` bytes; 0 if one sample does not
        (`sharing`: `at`'s nproc, strategy and offload)."""
        low, high = 0, limit  # the estimate grows with the batch: bisect
        while low < high:
            middle = (low + high + 1) // 2
            low, high = (middle, high) if self.at(middle, **sharing).peak <= memory else (low, middle - 1)
        return low


def _precision(requested: str, device: str) -> str:
    """The compute precision: as asked, or what `auto` picks on `device` (bf16 on an accelerator this
    machine cannot reach, so a GPU's or NPU's run is estimated from any machine)."""
    if requested != "auto":
        return requested
    try:
        return resolve_precision(requested, device, get_backend(device).capabilities).compute
    except BackendUnavailable:
        return "bf16"


def plan(recipe, device: str, checkpointing: Optional[bool] = None, runtime: Optional[int] = None) -> Plan:
    """The memory Plan of `recipe` on `device` (arguments as `estimate`'s)."""
    why = implementation(recipe.method.name, "torch").unestimated
    if why:
        raise RunError(f"tuneport estimate: method {recipe.method.name} is not estimated yet ({why})")
    compute = DTYPES[_precision(recipe.precision, device)]
    family, config = _family_and_config(recipe)
    if checkpointing is None:
        checkpointing = recipe.train.gradient_checkpointing is True  # auto: estimated as off, its first choice
    seq = recipe.data.row_tokens
    model = _meta_model(family, config, recipe.method, compute, checkpointing)
    weights = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    try:
        per_sample = _saved_bytes(model, seq)
    except RuntimeError as e:  # a forward that cannot run on shapes alone in this dtype (MoE grouped matmuls in fp32)
        raise RunError(f"tuneport estimate: {config.model_type}'s forward does not run on the meta device in "
                       f"{str(compute).replace('torch.', '')} ({str(e).splitlines()[0]}); estimate the precision "
                       "it trains in on an accelerator: precision=bf16") from None
    if checkpointing:  # backward recomputes one layer at a time and holds its activations meanwhile
        per_sample += _saved_bytes(_meta_model(family, config, recipe.method, compute, False), seq) // \
            config.num_hidden_layers
    fixed = Estimate(weights=weights, gradients=trainable * 4, optimizer=trainable * 4 * ADAM_STATES, activations=0,
                     logits=0, runtime=runtime_bytes(device) if runtime is None else runtime)
    rows = model.get_output_embeddings().weight.shape[0]  # the vocabulary the loss forms logits over
    unit, unit_trained = _gathered_unit(model, family.blocks, compute)
    return Plan(recipe, fixed, per_sample, rows, config.hidden_size,
                torch.empty((), dtype=compute).element_size(), device.partition(":")[0], unit, unit_trained)


def _gathered_unit(model, blocks: str, compute) -> tuple[int, int]:
    """(bytes, trainable parameters) of what a sharded step holds whole at once: the parameters outside the
    blocks (the root unit: embedding, output layer, norms) and the two largest blocks (the one computing and
    the one prefetched), gathered in the compute dtype."""
    def size(params) -> tuple[int, int]:
        params = list(params)
        return (sum(p.numel() * min(p.element_size(), compute.itemsize) for p in params),
                sum(p.numel() for p in params if p.requires_grad))

    every_block = [block for blocks_list in block_lists(model, blocks) for block in blocks_list]
    largest = sorted((size(block.parameters()) for block in every_block), reverse=True)[:2]
    inside = {id(p) for block in every_block for p in block.parameters()}
    root = size(p for p in model.parameters() if id(p) not in inside)
    return root[0] + sum(b[0] for b in largest), root[1] + sum(b[1] for b in largest)


def estimate(recipe, device: str, batch: Optional[int] = None, checkpointing: Optional[bool] = None,
             runtime: Optional[int] = None, nproc: int = 1, strategy: str = "ddp", offload: bool = False) -> Estimate:
    """The predicted peak memory of one training step of `recipe` on `device`.

    Args:
        recipe: the Recipe: model (a folder, of which only config.json is read, or a builder name),
            method, precision, sequence limits, micro-batch and gradient checkpointing.
        device: the device name, for the compute dtype and the runtime part.
        batch, checkpointing: override the recipe's micro-batch size and gradient checkpointing.
        runtime: override the runtime part, in bytes.
        nproc, strategy, offload: the memory of each of `nproc` cards under `strategy` (one of STRATEGIES).

    Raises:
        RunError: a method or model family that cannot be estimated.
    """
    return plan(recipe, device, checkpointing, runtime).at(batch or recipe.train.micro_batch_size, nproc, strategy,
                                                           offload)


def needs_checkpointing(peak_without: int, memory: int) -> bool:
    """auto's rule: checkpointing unless the step without it takes at most 90% of the memory."""
    return peak_without > 0.9 * memory


def choose_checkpointing(recipe, device: str, memory: int) -> bool:
    """`train.gradient_checkpointing: auto`: off when the step without it is estimated to fit in 90% of
    `memory` (the device's), on otherwise or when it cannot be estimated."""
    if memory <= 0:
        log.info("gradient checkpointing auto: on (the device's memory is unknown)")
        return True
    try:
        peak = estimate(recipe, device, checkpointing=False).peak
    except (RunError, CheckpointError, MethodUnavailable, Unsupported) as e:
        log.info("gradient checkpointing auto: on (no estimate: %s)", e)
        return True
    on = needs_checkpointing(peak, memory)
    log.info("gradient checkpointing auto: %s (estimated peak without it %.1f GiB, device %.1f GiB)",
             "on" if on else "off", peak / 2**30, memory / 2**30)
    return on


def largest_batch(recipe, device: str, memory: int, checkpointing: Optional[bool] = None,
                  runtime: Optional[int] = None, limit: int = 1 << 16) -> int:
    """The largest micro-batch (up to `limit`) whose estimate fits in `memory` bytes; 0 if one sample does not."""
    return plan(recipe, device, checkpointing, runtime).largest_batch(memory, limit)
