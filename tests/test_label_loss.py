"""The label-only loss (`loss_only=True`, what training runs) against the full-logits loss the official
code computes: the same loss and gradients, in chunks or not, for LoRA-like and full training."""

import pytest
import torch
from safetensors.torch import load_file

import tuneport.models.loss as loss_module
from tuneport.models.chatglm3 import load_model

TOL = dict(atol=1e-5, rtol=1e-5)


def loss_and_grads(model, batch, **kwargs):
    model.zero_grad()
    loss = model(**batch, use_cache=False, **kwargs).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("chunk", [loss_module.LOSS_CHUNK, 5])
@pytest.mark.parametrize("full", [False, True])
@pytest.mark.parametrize("num_items", [None, 9])
def test_label_only_loss_equals_the_full_logits_loss(golden, monkeypatch, chunk, full, num_items):
    monkeypatch.setattr(loss_module, "LOSS_CHUNK", chunk)  # 5: many chunks, one of them partial
    cases = load_file(golden / "cases.safetensors")
    model = load_model(golden / "checkpoint").train()
    model.requires_grad_(full)  # not full: one adapted layer, as LoRA trains (the output layer frozen)
    model.transformer.encoder.layers[1].self_attention.query_key_value.weight.requires_grad_(True)
    batch = {"input_ids": cases["padded_input_ids"], "attention_mask": cases["padded_attention_mask"],
             "labels": cases["labels"], "num_items_in_batch": num_items}
    reference, reference_grads = loss_and_grads(model, batch)
    loss, grads = loss_and_grads(model, batch, loss_only=True)
    torch.testing.assert_close(loss, reference, **TOL)
    assert grads.keys() == reference_grads.keys() and len(grads) == (17 if full else 1)
    for name in grads:
        torch.testing.assert_close(grads[name], reference_grads[name], **TOL)
    if num_items is None:  # the golden loss of the official implementation
        torch.testing.assert_close(model(input_ids=cases["input_ids"], labels=cases["labels"], loss_only=True).loss,
                                   cases["loss"].reshape(()), atol=1e-4, rtol=1e-4)


def test_label_only_loss_without_labels_is_nan_like_the_full_loss(golden):
    model = load_model(golden / "checkpoint")
    ids = torch.tensor([[64790, 64792, 30910, 13]])
    labels = torch.full_like(ids, -100)
    assert model(input_ids=ids, labels=labels).loss.isnan()
    assert model(input_ids=ids, labels=labels, loss_only=True).loss.isnan()
    assert model(input_ids=ids, labels=labels, loss_only=True).logits is None


def test_label_logps_equal_log_softmax_over_several_chunks_with_their_gradients():
    """Per-row summed label log-probabilities (the preference objectives') against log_softmax over whole logits,
    written out here, on more label rows than one chunk holds (the backward recomputes each chunk)."""
    from tuneport.models.loss import LOSS_CHUNK, label_logps

    torch.manual_seed(0)
    hidden = torch.randn(3, 200, 16, requires_grad=True)
    weight = (torch.randn(50, 16) * 0.5).requires_grad_()
    labels = torch.randint(0, 50, (3, 200))
    labels[:, :40] = -100
    labels[1, 150:] = -100
    out = label_logps(hidden, weight, labels)
    targets = labels[:, 1:]
    keep = targets != -100
    assert int(keep.sum()) > 2 * LOSS_CHUNK
    full = torch.log_softmax(hidden[:, :-1] @ weight.T, dim=-1).gather(-1, targets.clamp(min=0)[..., None])[..., 0]
    expected = (full * keep).sum(dim=1)
    torch.testing.assert_close(out.logps, expected, atol=1e-4, rtol=1e-6)
    assert out.label_counts.tolist() == keep.sum(dim=1).tolist()
    g = torch.tensor([0.5, -1.0, 2.0])
    got = torch.autograd.grad((out.logps * g).sum(), (hidden, weight))
    want = torch.autograd.grad((expected * g).sum(), (hidden, weight))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
