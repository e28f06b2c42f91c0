"""The torch ChatGLM3 against golden vectors from the official implementation (tests/golden),
loaded from both official checkpoint layouts. Tolerance 1e-4 in float32, as the golden README says."""

import json

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file

from tuneport.models.chatglm3 import load_model

TOL = dict(atol=1e-4, rtol=1e-4)
LAYOUTS = {
    "safetensors": ["model.safetensors.index.json", "model-00001-of-00002.safetensors",
                    "model-00002-of-00002.safetensors"],
    "bin": ["pytorch_model.bin.index.json", "pytorch_model-00001-of-00002.bin", "pytorch_model-00002-of-00002.bin"],
}


@pytest.fixture(scope="module", params=sorted(LAYOUTS))
def checkpoint(request, golden, tmp_path_factory):
    """A folder holding only one weight layout of the golden checkpoint."""
    folder = tmp_path_factory.mktemp(request.param)
    for name in ["config.json", "tokenizer.model", "tokenizer_config.json", *LAYOUTS[request.param]]:
        (folder / name).symlink_to(golden / "checkpoint" / name)
    return folder


@pytest.fixture(scope="module")
def cases(golden):
    return load_file(golden / "cases.safetensors")


@pytest.fixture(scope="module")
def model(checkpoint):
    return load_model(checkpoint)


def assert_logits(logits, cases, name):
    torch.testing.assert_close(logits[..., :1024], cases[f"{name}_head"], **TOL)
    torch.testing.assert_close(torch.logsumexp(logits.float(), dim=-1), cases[f"{name}_logsumexp"], **TOL)


@torch.no_grad()
def test_logits(model, cases):
    assert_logits(model(cases["input_ids"]).logits, cases, "logits")


@torch.no_grad()
def test_left_padded_logits(model, cases):
    out = model(cases["padded_input_ids"], attention_mask=cases["padded_attention_mask"])
    assert_logits(out.logits, cases, "padded_logits")


@torch.no_grad()
def test_loss(model, cases):
    loss = model(cases["input_ids"], labels=cases["labels"]).loss
    torch.testing.assert_close(loss.reshape(1), cases["loss"], **TOL)


@torch.no_grad()
def test_kv_cache_prefill_then_decode(model, cases):
    ids = cases["input_ids"]
    out = model(ids[:, :10], use_cache=True)
    assert_logits(out.logits, cases, "prefill_logits")
    steps = []
    past = out.past_key_values
    for i in (10, 11):
        out = model(ids[:, i: i + 1], past_key_values=past, use_cache=True)
        past = out.past_key_values
        steps.append(out.logits)
    assert_logits(torch.cat(steps, dim=1), cases, "decode_logits")


@torch.no_grad()
def test_greedy_generate(model, cases):
    prompt = cases["greedy_prompt"]
    out = model.generate(prompt, do_sample=False, max_new_tokens=cases["greedy_ids"].shape[1])
    assert out[:, prompt.shape[1]:].tolist() == cases["greedy_ids"].tolist()


def test_lora_adapter_logits_loss_and_grads(model, golden, cases):
    peft_model = PeftModel.from_pretrained(model, str(golden / "lora_adapter"), is_trainable=True)
    try:
        out = peft_model(cases["input_ids"], labels=cases["labels"], use_cache=False)
        assert_logits(out.logits.detach(), cases, "lora_logits")
        torch.testing.assert_close(out.loss.detach().reshape(1), cases["lora_loss"], **TOL)
        out.loss.backward()
        expected = load_file(golden / "lora_grads.safetensors")
        grads = {"grad." + n.replace(".default", ""): p.grad for n, p in peft_model.named_parameters()
                 if p.requires_grad}
        assert sorted(grads) == sorted(expected)
        for name, grad in grads.items():
            torch.testing.assert_close(grad, expected[name], **TOL, msg=name)
    finally:
        peft_model.unload()


def test_lora_grads_with_gradient_checkpointing(checkpoint, golden, cases):
    model = load_model(checkpoint)
    model.gradient_checkpointing_enable()
    assert model.transformer.encoder.gradient_checkpointing
    peft_model = PeftModel.from_pretrained(model, str(golden / "lora_adapter"), is_trainable=True)
    peft_model.train()
    peft_model(cases["input_ids"], labels=cases["labels"]).loss.backward()
    expected = load_file(golden / "lora_grads.safetensors")
    for name, p in peft_model.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p.grad, expected["grad." + name.replace(".default", "")], **TOL)


@torch.no_grad()
def test_prefix_encoder_logits(checkpoint, golden, cases):
    prefix_config = json.loads((golden / "prefix_config.json").read_text())
    model = load_model(checkpoint, **prefix_config)
    result = model.load_state_dict(load_file(golden / "prefix_encoder.safetensors"), strict=False)
    assert not result.unexpected_keys
    assert all(not k.startswith("transformer.prefix_encoder") for k in result.missing_keys)
    assert_logits(model(cases["input_ids"]).logits, cases, "prefix_logits")
    # With the KV cache the prefix is fed once and the logits are the same.
    ids = cases["input_ids"]
    first = model(ids[:, :10], use_cache=True)
    second = model(ids[:, 10:], past_key_values=first.past_key_values, use_cache=True)
    assert_logits(torch.cat([first.logits, second.logits], dim=1), cases, "prefix_logits")
