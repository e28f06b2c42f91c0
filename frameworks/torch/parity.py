"""What `tuneport parity` captures from a torch model on one Backend: one fixed batch forward and backward.

The model is loaded as a run would train it: frozen base weights in the compute dtype, the trained
weights (the adapter's) in float32, the forward under the backend's autocast, fp16 losses scaled. Forward
hooks take the first block's input (the embedding), every block's output and the output layer's input (the
final norm); the model gives the logits and the loss; backward gives every trained parameter's gradient.
The framework-neutral rest (rows, tolerances, report) is `tuneport.core.parity`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
from torch import nn

from ...backends.base import Backend
from ...core.objectives import ObjectiveConfig
from ...models import family_for
from .build import DTYPES, build_tuned_model
from .objectives import Dpo



def _numpy(value) -> np.ndarray:
    value = value[0] if isinstance(value, (tuple, list)) else value
    return value.detach().float().cpu().numpy()


def _attach_lora(model: nn.Module, lora) -> nn.Module:
    """The synthetic LoRA of `tuneport.core.parity.SyntheticLora` through peft, weights from `lora.weight`."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=0.0, target_modules=list(lora.targets),
                        task_type="CAUSAL_LM")
    model = get_peft_model(model, config)
    for name, param in model.named_parameters():
        if ".lora_" in name:
            param.data = torch.from_numpy(lora.weight(name, tuple(param.shape))).to(param.device)
    return model


def capture(backend: Backend, device_index: int, dtype: str, model_dir: Path, adapter: Optional[Path],
            batch: dict[str, np.ndarray], lora, loss_scale: float, objective: str = "sft") -> dict[str, np.ndarray]:
    """Run `batch` forward and backward once and return what `tuneport parity` compares.

    Args:
        backend: the device (already set up); its kernels run the model.
        device_index: which of its devices.
        dtype: compute dtype: fp32, bf16 or fp16.
        model_dir: the base checkpoint folder.
        adapter: a tuned result (PEFT adapter or P-tuning v2 folder), or None for `lora`.
        batch: numpy input_ids, labels, attention_mask.
        lora: the synthetic LoRA attached when there is no adapter (`tuneport.core.parity.SyntheticLora`).
        loss_scale: the loss is multiplied by this before backward and the gradients divided by it (fp16).
        objective: "sft", or "dpo": the batch's rows are pairs (chosen rows, then rejected), the loss DPO's (beta
            0.1) against the model with its adapter disabled, and `logps` (each row's label log-probability)
            replaces `logits`.

    Returns:
        float32 arrays in forward order: `embedding`, `layers.N` for each block, `final_norm`, `logits`,
        `loss`, then `grad:NAME` for each trained parameter (peft's names, as the model has them).
    """
    compute = DTYPES[dtype]
    torch.manual_seed(0)
    backend.manual_seed(0)
    tuned = build_tuned_model(model_dir, None, backend, "load", compute, device_index=device_index, adapter=adapter)
    model = tuned.model if adapter is not None else _attach_lora(tuned.model, lora)
    family = family_for(model_dir)
    # the weights the result was trained in (the synthetic LoRA's: a peft adapter's, by its name)
    trained = tuned.method.trained(model, family) if tuned.method else \
        {n: p for n, p in model.named_parameters() if model.active_adapter in n.split(".")}
    model.requires_grad_(False)
    for param in trained.values():  # trained weights stay float32, as in a run
        param.data = param.data.float()
        param.requires_grad_(True)
    model.eval()  # no dropout: both sides see the same function

    device = backend.device(device_index)
    inputs = {k: torch.from_numpy(v).to(device) for k, v in batch.items()}
    reference = None
    if objective == "dpo":  # the reference first, so that the hooks below keep the trained model's activations
        with torch.no_grad(), backend.autocast(compute), model.disable_adapter():
            reference = model(**inputs, use_cache=False, return_logps=True).logps
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    blocks = inner.get_submodule(family.blocks)
    captured: dict[str, np.ndarray] = {}

    def keeper(name: str) -> Callable:
        return lambda module, args, output: captured.__setitem__(name, _numpy(output))

    hooks = [blocks[0].register_forward_pre_hook(
        lambda module, args, kwargs: captured.__setitem__("embedding", _numpy(args[0] if args else
                                                                              kwargs["hidden_states"])),
        with_kwargs=True)]
    hooks += [block.register_forward_hook(keeper(f"layers.{i}")) for i, block in enumerate(blocks)]
    hooks.append(inner.get_output_embeddings().register_forward_pre_hook(
        lambda module, args: captured.__setitem__("final_norm", _numpy(args[0]))))
    num_items = int((batch["labels"][:, 1:] != -100).sum())
    try:
        with backend.autocast(compute):
            if reference is None:
                out = model(**inputs, num_items_in_batch=num_items, use_cache=False)
                rows, loss = out.logits, out.loss
            else:
                dpo = Dpo(ObjectiveConfig(name="dpo"), reference=None)
                loss, _ = dpo.loss(model, {**inputs, "reference_logps": reference}, {"pairs": len(reference) // 2})
        (loss * loss_scale).backward()
    finally:
        for hook in hooks:
            hook.remove()
    if reference is not None:  # the log-probabilities' path runs no output layer: one more forward for its input
        hook = inner.get_output_embeddings().register_forward_pre_hook(
            lambda module, args: captured.__setitem__("final_norm", _numpy(args[0])))
        with torch.no_grad(), backend.autocast(compute):
            rows = model(**inputs, use_cache=False, return_logps=True).logps
            model(**inputs, use_cache=False)
        hook.remove()
    captured["logps" if reference is not None else "logits"] = _numpy(rows)
    captured["loss"] = _numpy(loss)
    for name, param in trained.items():
        grad = param.grad if param.grad is not None else torch.zeros_like(param)
        captured[f"grad:{name}"] = _numpy(grad.float() / loss_scale)
    backend.synchronize()
    return captured
