"""What `tuneport parity` captures from a MindSpore model: one fixed batch forward and backward.

The model is set up as `MindSporeRuntime` trains it (float32 weights, activations in the compute dtype,
fp16 losses scaled), in PyNative mode, where cells take torch-style forward hooks: the first block's input
(the embedding), every block's output and the output layer's input (the final norm). A forward with the
hooks gives those, the logits and the loss; `mindspore.value_and_grad` then gives every trained
parameter's gradient. The same rows, under the same names, as the torch framework's `parity.capture`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np

from ...core.objectives import ObjectiveConfig
from ...models import family_for
from .build import build_tuned_model
from .objectives import Dpo


def _numpy(value) -> np.ndarray:
    import mindspore as ms

    value = value[0] if isinstance(value, (tuple, list)) else value
    return value.astype(ms.float32).asnumpy()


def _cell(model, path: str):
    """The cell at `path` (the family's names, as torch's modules have them)."""
    for name, cell in model.cells_and_names():
        if name == path:
            return cell
    raise ValueError(f"{type(model).__name__}: no cell {path} to capture")


def capture(device, dtype: str, model_dir: Path, adapter: Optional[Path], batch: dict[str, np.ndarray], lora,
            loss_scale: float, objective: str = "sft") -> dict[str, np.ndarray]:
    """Run `batch` forward and backward once; the arguments and result are those of `torch_parity.capture`
    (`device` is the MindSporeDevice, already set up; `objective` dpo as there, with LoRA). Adapters: PEFT LoRA
    and IA3.

    Raises:
        CheckpointError: an adapter of another kind.
    """
    import mindspore as ms

    family = family_for(model_dir)
    mm = family.mindspore()
    model = build_tuned_model(model_dir, None, "load", adapter=adapter).model
    if adapter is None:
        mm.add_lora(model, lora.r, lora.alpha, 0.0, list(lora.targets))
        for name, param in model.parameters_and_names():
            if ".lora_" in name:
                param.set_data(ms.Tensor(lora.weight(name, tuple(param.shape))))
    model.compute_dtype = {"fp32": ms.float32, "bf16": ms.bfloat16, "fp16": ms.float16}[dtype]
    model.set_train(False)  # no dropout: both sides see the same function
    trained = [p for p in model.get_parameters() if p.requires_grad]

    captured: dict[str, np.ndarray] = {}
    ids, labels, mask = batch["input_ids"], batch["labels"], batch["attention_mask"]
    dpo = reference = None
    if objective == "dpo":  # the reference first, so that the hooks below keep the trained model's activations
        dpo = Dpo(ObjectiveConfig(name="dpo"), mm)
        reference = dpo.reference(model, ms.Tensor(ids, ms.int32), mask, ms.Tensor(labels, ms.int32))

    def keeper(name: str):
        return lambda cell, args, output: captured.__setitem__(name, _numpy(output))

    blocks = _cell(model, family.blocks)
    hooks = [blocks[0].register_forward_pre_hook(lambda cell, args: captured.__setitem__("embedding",
                                                                                           _numpy(args[0])))]
    hooks += [block.register_forward_hook(keeper(f"layers.{i}")) for i, block in enumerate(blocks)]
    hooks.append(model.get_output_embeddings().register_forward_pre_hook(
        lambda cell, args: captured.__setitem__("final_norm", _numpy(args[0]))))
    num_items = int((labels[:, 1:] != -100).sum())
    pairs = ids.shape[0] // 2

    def forward(ids, labels):  # (loss, what the rows show: the logits, or DPO's per-row log-probabilities)
        if dpo is None:
            logits, loss = model(ids, attention_mask=mask, labels=labels, num_items_in_batch=num_items)
            return loss, logits
        loss, policy, _ = dpo.loss(model, ids, mask, labels, reference, pairs)
        return loss, policy

    try:
        loss, rows = forward(ms.Tensor(ids, ms.int32), ms.Tensor(labels, ms.int32))
    finally:
        for hook in hooks:
            hook.remove()
    captured["logits" if dpo is None else "logps"] = _numpy(rows)
    captured["loss"] = _numpy(loss)

    def scaled_loss(ids, labels):
        return forward(ids, labels)[0] * loss_scale

    grad_fn = ms.value_and_grad(scaled_loss, None, trained)
    _, grads = grad_fn(ms.Tensor(ids, ms.int32), ms.Tensor(labels, ms.int32))
    for param, grad in zip(trained, grads):
        captured[f"grad:{param.name}"] = _numpy(grad) / np.float32(loss_scale)
    return captured
