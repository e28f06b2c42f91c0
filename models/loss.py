"""The causal-LM loss every torch model family shares: the official shifted float32 cross entropy, and the
same loss from the label positions alone (`label_loss`), which never forms whole-vocabulary logits for
the batch."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from transformers.utils import ModelOutput


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


@dataclass
class LogpsOutput(ModelOutput):
    """A causal LM's `return_logps` output: each row's summed label log-probability and its label count."""

    logps: Optional[torch.Tensor] = None
    label_counts: Optional[torch.Tensor] = None


def logits_logps(logits: torch.Tensor, labels: torch.Tensor) -> LogpsOutput:
    """`label_logps` from whole logits [batch, seq, vocab] (a model that forms them, as Gemma's capped ones)."""
    targets = labels[:, 1:].to(logits.device)
    keep = targets != -100
    picked = logits[:, :-1].float().log_softmax(-1).gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return LogpsOutput(logps=(picked * keep).sum(dim=1), label_counts=keep.sum(dim=1))


def label_logps(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor) -> LogpsOutput:
    """Each row's summed log-probability of its labels (the shifted targets, -100 ignored) under `hidden @
    weight.T`, from the label positions alone, and how many labels each row has.

    The preference objectives' log-probabilities: float32 [rows], and int64 [rows]. Logits are formed
    `loss_chunk` label positions at a time and not kept: backward recomputes each chunk's softmax.
    """
    targets = labels[:, 1:].to(hidden.device)
    keep = targets != -100
    per_label = _LabelLogps.apply(hidden[:, :-1][keep], weight, targets[keep])
    sums = torch.zeros(labels.shape[0], dtype=torch.float32, device=hidden.device)
    return LogpsOutput(logps=sums.index_add(0, keep.nonzero()[:, 0], per_label), label_counts=keep.sum(dim=1))


class _LabelLogps(torch.autograd.Function):
    """log_softmax(rows @ weight.T)[target] per row, float32; backward recomputes the chunks' logits."""

    @staticmethod
    def forward(ctx, rows, weight, targets):
        out = torch.empty(rows.shape[0], dtype=torch.float32, device=rows.device)
        lse = torch.empty_like(out)
        step = loss_chunk(rows.device.type)
        dtype = rows.dtype
        for start in range(0, rows.shape[0], step):
            chunk, target = rows[start:start + step], targets[start:start + step]
            product = torch.matmul(weight, chunk.t())  # [vocab, rows], in the autocast dtype if any
            dtype = product.dtype
            logits = product.float()
            columns = torch.arange(len(target), device=logits.device)
            lse[start:start + step] = torch.logsumexp(logits, dim=0)
            out[start:start + step] = logits[target, columns] - lse[start:start + step]
        ctx.save_for_backward(rows, weight, targets, lse)
        ctx.dtype, ctx.step = dtype, step
        return out

    @staticmethod
    def backward(ctx, grad):
        rows, weight, targets, lse = ctx.saved_tensors
        grad_rows = torch.empty_like(rows) if ctx.needs_input_grad[0] else None
        grad_weight = torch.zeros_like(weight, dtype=torch.float32) if ctx.needs_input_grad[1] else None
        w = weight.to(ctx.dtype)
        for start in range(0, rows.shape[0], ctx.step):
            chunk, target = rows[start:start + ctx.step].to(ctx.dtype), targets[start:start + ctx.step]
            g = grad[start:start + ctx.step].float()
            columns = torch.arange(len(target), device=chunk.device)
            softmax = torch.matmul(w, chunk.t()).float().sub_(lse[start:start + ctx.step]).exp_()
            delta = softmax.mul_(-g)  # d/dlogits of g * log_softmax[target]: g * (onehot - softmax)
            delta[target, columns] += g
            delta = delta.to(ctx.dtype)
            if grad_rows is not None:
                grad_rows[start:start + ctx.step] = torch.matmul(delta.t(), w).to(rows.dtype)
            if grad_weight is not None:
                grad_weight += torch.matmul(delta, chunk).float()
        return grad_rows, None if grad_weight is None else grad_weight.to(weight.dtype), None
