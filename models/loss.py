"""The causal-LM loss every torch model family shares: the official shifted float32 cross entropy, and the
same loss from the label positions alone (`label_loss`), which never forms whole-vocabulary logits for
the batch."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def shifted_loss(logits: torch.Tensor, labels: torch.Tensor, num_items_in_batch=None) -> torch.Tensor:
    """Cross entropy of logits[:, :-1] against labels[:, 1:] in float32, ignore index -100."""
    logits = logits[:, :-1].float().flatten(0, 1)
    targets = labels[:, 1:].to(logits.device).flatten()
    if num_items_in_batch is None:
        return F.cross_entropy(logits, targets, ignore_index=-100)
    return F.cross_entropy(logits, targets, ignore_index=-100, reduction="sum") / num_items_in_batch


LOSS_CHUNK = 128  # label positions per chunk on the CPU: float32 logits of 128 x 65,024 are 32 MiB
ACCELERATOR_LOSS_CHUNK = 1024  # GPU or NPU (254 MiB): on an H200, 128 rows ran 5% slower, 1024 as fast as full logits


def loss_chunk(device_type: str) -> int:
    """Label positions whose logits the label-only loss forms at once on a device of `device_type`."""
    return LOSS_CHUNK if device_type in ("cpu", "meta") else ACCELERATOR_LOSS_CHUNK


def label_loss(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, num_items_in_batch=None):
    """`shifted_loss(hidden @ weight.T, labels)` from the label positions alone, without whole-vocabulary
    logits for the batch.

    Only positions whose next token is a label are gathered (a fine-tuning sample's prompt needs no
    logits), and their logits, float32 softmax and gradients are formed `loss_chunk` rows at a time
    inside one autograd function, which keeps the gradients rather than the logits for backward.
    Same value, dtype and gradients as the full path.
    """
    targets = labels[:, 1:].to(hidden.device)
    keep = targets != -100
    rows = hidden[:, :-1][keep]
    count = keep.sum()
    if num_items_in_batch is None:
        loss = _LabelLoss.apply(rows, weight, targets[keep], count.clamp(min=1))
        # as F.cross_entropy: the mean over no tokens is nan; the official mean comes back in the activations' dtype
        return (loss if count else loss * float("nan")).to(hidden.dtype)
    return _LabelLoss.apply(rows, weight, targets[keep], num_items_in_batch)


class _LabelLoss(torch.autograd.Function):
    """sum(cross_entropy(rows @ weight.T, targets)) / denominator, with its gradients formed in forward."""

    @staticmethod
    def forward(ctx, rows, weight, targets, denominator):
        scale = 1.0 / float(denominator)
        ctx.weight_dtype = weight.dtype
        total = torch.zeros((), dtype=torch.float32, device=rows.device)
        grad_rows = torch.empty_like(rows) if rows.requires_grad else None
        grad_weight = torch.zeros_like(weight, dtype=torch.float32) if weight.requires_grad else None
        # Under autocast the matmuls run in the autocast dtype, as the full path's output layer does.
        # One chunk's float32 logits are the only large tensor: the log-sum-exp, the softmax and its
        # gradient are formed in place in them. They are held vocabulary-major ([vocab, rows]): for a few
        # hundred rows, weight @ rows.T runs about a fifth faster than rows @ weight.T on CPU BLAS.
        step = loss_chunk(rows.device.type)
        for start in range(0, rows.shape[0], step):
            chunk, target = rows[start:start + step], targets[start:start + step]
            product = torch.matmul(weight, chunk.t())
            dtype = product.dtype
            logits = product.float()
            del product
            columns = torch.arange(len(target), device=logits.device)
            picked = logits[target, columns]
            peak = logits.amax(dim=0)
            sums = logits.sub_(peak).exp_().sum(dim=0)  # logits now hold exp(logit - max)
            total += (peak + sums.log() - picked).sum()
            if grad_rows is not None or grad_weight is not None:
                grad = logits.div_(sums)  # the softmax
                grad[target, columns] -= 1.0
                grad = grad.mul_(scale).to(dtype)
                if grad_rows is not None:
                    grad_rows[start:start + step] = torch.matmul(grad.t(), weight.to(dtype))
                if grad_weight is not None:
                    grad_weight += torch.matmul(grad, chunk.to(dtype)).float()
                del grad
            del logits
        ctx.save_for_backward(grad_rows, grad_weight)
        return total * scale

    @staticmethod
    def backward(ctx, grad_output):
        grad_rows, grad_weight = ctx.saved_tensors
        rows = grad_rows * grad_output.to(grad_rows.dtype) if grad_rows is not None else None
        weight = (grad_weight * grad_output).to(ctx.weight_dtype) if grad_weight is not None else None
        return rows, weight, None, None
