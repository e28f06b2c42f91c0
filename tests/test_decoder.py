"""Every transformers decoder entry on the backends' kernels, on a tiny random model per family saved as a Hugging
Face folder, each with its family's shape quirks: grouped KV heads, tied or untied embeddings, biased q/k/v,
Llama 3's rope scaling, Qwen3's QK-norm, GLM's partial interleaved rotary, Mistral's and Gemma's sliding window,
Gemma's 1 + weight norm, scaled embeddings and soft-capping, Qwen3-MoE's routed experts beside a dense layer.

The reference, independent of tuneport's code: transformers' own class of each model type with
attn_implementation="eager" (logits, loss, padded batches, KV-cache decode, generation, LoRA gradients through
peft, at 1e-5), on the CPU backend's kernels and on the FAKE torch_npu's fused operators (which stand in for
Ascend hardware, tests/fakes/torch_npu.py), asserting the fused operators ran.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch
import transformers
from peft import LoraConfig, get_peft_model

from tuneport.backends import get_backend
from tuneport.backends.cpu import CPUBackend
from tuneport.models import CheckpointError, family_for, get_family
from tuneport.models.decoder.checkpoint import load_model
from tuneport.models.decoder.entries import ENTRIES
from tuneport.models.decoder.model import KernelAttention, KernelNorm

FAKE_PATH = Path(__file__).parent / "fakes" / "torch_npu.py"
TOL = dict(atol=1e-5, rtol=1e-5)
VOCAB = 120
SMALL = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=128, initializer_range=0.2, tie_word_embeddings=False,
             pad_token_id=0, bos_token_id=1, eos_token_id=2)
# model_type -> its tiny config's values (SMALL with each family's quirks)
CONFIGS = {
    "llama": dict(rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                "original_max_position_embeddings": 16}, rope_theta=500000.0),
    "qwen2": dict(tie_word_embeddings=True),
    "qwen3": dict(head_dim=32),  # QK-norm over a head_dim other than hidden / heads
    "glm4": dict(partial_rotary_factor=0.5, attention_bias=True, head_dim=16),
    "glm": dict(partial_rotary_factor=0.5, attention_bias=True, head_dim=16),
    "mistral": dict(sliding_window=4),
    "gemma2": dict(head_dim=16, query_pre_attn_scalar=24, sliding_window=4, attn_logit_softcapping=5.0,
                   final_logit_softcapping=3.0, tie_word_embeddings=True),
    "gemma3_text": dict(head_dim=16, query_pre_attn_scalar=24, sliding_window=4, tie_word_embeddings=True,
                        layer_types=["sliding_attention", "full_attention"]),
    "qwen3_moe": dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, mlp_only_layers=[1],
                      norm_topk_prob=True),
}
# The fused operators each family reaches on the FAKE NPU (Gemma 2 caps its attention scores: transformers' eager)
FUSED = {name: ("npu_rms_norm", "npu_rotary_mul", "npu_fusion_attention") for name in CONFIGS}
FUSED["gemma2"] = ("npu_rms_norm", "npu_rotary_mul")


def tiny_config(model_type: str):
    return transformers.CONFIG_MAPPING[model_type](**{**SMALL, **CONFIGS[model_type]})


def write_model(folder: Path, model_type: str) -> Path:
    """A tiny random model of `model_type` saved by transformers into `folder`."""
    torch.manual_seed(0)
    model = ENTRIES[model_type].model(tiny_config(model_type))
    with torch.no_grad():  # transformers initialises biases and norms to constants; make them count
        for name, param in model.named_parameters():
            if name.endswith("bias") or "norm" in name or "experts" in name or "gate.weight" in name:
                param.add_(torch.randn_like(param) * 0.1)
    model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def folder(request, tmp_path_factory) -> Path:
    return write_model(tmp_path_factory.mktemp(request.param), request.param)


def reference(folder: Path):
    """transformers' own eager model, from the same folder."""
    model_type = json.loads((folder / "config.json").read_text())["model_type"]
    return ENTRIES[model_type].model.from_pretrained(folder, attn_implementation="eager", dtype=torch.float32).eval()


def _load_fake():
    spec = importlib.util.spec_from_file_location("tuneport_tests_fake_torch_npu_decoder", FAKE_PATH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


fake = _load_fake()


class OnCPU(CPUBackend):
    """The CPU device running another backend's kernel table (the fake NPU's ops run on CPU tensors)."""

    def __init__(self, kernels):
        self.kernels = kernels


@pytest.fixture(params=["cpu", "npu-910B"])
def backend(request, monkeypatch):
    """(backend, fake torch_npu or None): the CPU backend, or the NPU backend's fused kernels on a FAKE 910B."""
    if request.param == "cpu":
        return get_backend("cpu"), None
    mod = fake.install(monkeypatch, "910B")
    return OnCPU(get_backend("npu").kernels), mod


def fused_ops_ran(mod, folder: Path) -> None:
    if mod is not None:
        calls = mod.fake_state.calls
        ops = FUSED[json.loads((folder / "config.json").read_text())["model_type"]]
        assert min(calls[op] for op in ops) > 0, calls


def batch(seed: int, rows: int = 2, length: int = 9) -> torch.Tensor:
    return torch.randint(0, VOCAB, (rows, length), generator=torch.Generator().manual_seed(seed))


# --- numerics ----------------------------------------------------------------------------------------------
def test_logits_and_loss_match_transformers_eager(folder, backend):
    backend, mod = backend
    ours, theirs = load_model(folder, backend), reference(folder)
    assert type(ours).__name__ == type(theirs).__name__  # save_pretrained writes the official architecture
    assert any(isinstance(m, KernelNorm) for m in ours.modules())
    assert any(isinstance(m, KernelAttention) and m.kernels is backend.kernels for m in ours.modules())
    ids = batch(1, length=11)  # past Mistral's and Gemma's 4-token window
    labels = ids.clone()
    labels[0, :4] = -100  # a prompt without loss
    with torch.no_grad():
        got, expected = ours(ids, labels=labels), theirs(ids, labels=labels)
        loss_only = ours(ids, labels=labels, loss_only=True)
    torch.testing.assert_close(got.logits, expected.logits, **TOL)
    torch.testing.assert_close(got.loss, expected.loss, **TOL)
    assert loss_only.logits is None
    torch.testing.assert_close(loss_only.loss, expected.loss, **TOL)
    fused_ops_ran(mod, folder)


@pytest.mark.parametrize("side", ["right", "left"])
def test_padded_batches_match_transformers_eager(folder, backend, side):
    backend, mod = backend
    ours, theirs = load_model(folder, backend), reference(folder)
    ids, mask = batch(2), torch.ones(2, 9, dtype=torch.long)
    pad = slice(6, None) if side == "right" else slice(0, 3)
    mask[0, pad] = 0
    labels = ids.masked_fill(mask == 0, -100)
    labels[:, 1:][mask[:, :-1] == 0] = -100  # nor is a token after padding predicted (from a padded position)
    with torch.no_grad():
        got, expected = ours(ids, attention_mask=mask, labels=labels), theirs(ids, attention_mask=mask, labels=labels)
    real = mask.bool()  # padded positions' outputs are defined by no one (and never read)
    torch.testing.assert_close(got.logits[real], expected.logits[real], **TOL)
    torch.testing.assert_close(got.loss, expected.loss, **TOL)
    fused_ops_ran(mod, folder)


def test_kv_cache_decode_and_generation_match_transformers_eager(folder, backend):
    backend, mod = backend
    ours, theirs = load_model(folder, backend), reference(folder)
    ids, mask = batch(3, length=6), torch.ones(2, 6, dtype=torch.long)
    mask[1, :2] = 0  # left padding, as for generation
    with torch.no_grad():
        caches, tokens = {}, ids
        for step in range(6):  # the prompt, then five single tokens from the cache
            outs = {}
            for name, model in (("ours", ours), ("theirs", theirs)):
                out = model(input_ids=tokens, attention_mask=mask, cache=caches.get(name), use_cache=True)
                outs[name], caches[name] = out.logits[:, -1], out.cache
            torch.testing.assert_close(outs["ours"], outs["theirs"], **TOL)
            tokens = outs["theirs"].argmax(-1, keepdim=True)
            mask = torch.cat((mask, torch.ones(2, 1, dtype=torch.long)), dim=1)
        settings = dict(attention_mask=mask[:, :6], max_new_tokens=5, do_sample=False, pad_token_id=0)
        assert ours.generate(ids, **settings).tolist() == theirs.generate(ids, **settings).tolist()
    fused_ops_ran(mod, folder)


def test_lora_gradients_match_transformers_eager_through_peft(folder, backend):
    backend, mod = backend
    entry = ENTRIES[json.loads((folder / "config.json").read_text())["model_type"]]
    config = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=list(entry.lora_targets))
    ours, theirs = get_peft_model(load_model(folder, backend), config), get_peft_model(reference(folder), config)
    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():  # peft starts B at zero, which would leave A without a gradient
        for (name, a), (other, b) in zip(ours.named_parameters(), theirs.named_parameters()):
            assert name == other
            if "lora_" in name:
                a.copy_(torch.randn(a.shape, generator=generator) * 0.1)
                b.copy_(a)
    ids, mask = batch(4, length=10), torch.ones(2, 10, dtype=torch.long)
    mask[1, 7:] = 0  # right padding, as training batches
    labels = ids.masked_fill(mask == 0, -100)
    labels[:, :3] = -100
    items = int((labels[:, 1:] != -100).sum())
    ours.train(), theirs.train()
    got = ours(input_ids=ids, attention_mask=mask, labels=labels, num_items_in_batch=items, loss_only=True).loss
    expected = theirs(input_ids=ids, attention_mask=mask, labels=labels, num_items_in_batch=items).loss
    torch.testing.assert_close(got, expected, **TOL)
    got.backward(), expected.backward()
    grads = {n: p.grad for n, p in theirs.named_parameters() if p.requires_grad}
    assert len(grads) >= 2 * 4 * 2  # A and B of at least the attention's projections of both blocks
    for name, param in ours.named_parameters():
        if param.requires_grad:
            torch.testing.assert_close(param.grad, grads[name], **TOL)
    fused_ops_ran(mod, folder)


# --- model types without an entry ------------------------------------------------------------------------------
def test_a_native_model_type_without_an_entry_runs_on_the_backends_attention(tmp_path, monkeypatch, caplog):
    """Phi-3 (fused qkv_proj, no entry): transformers' own modules, the kernels' attention, one line saying so."""
    config = transformers.Phi3Config(**{**SMALL, "pad_token_id": 0})
    torch.manual_seed(0)
    transformers.Phi3ForCausalLM(config).save_pretrained(tmp_path)
    mod = fake.install(monkeypatch, "910B")
    with caplog.at_level("WARNING"):
        family = family_for(tmp_path)
        ours = load_model(tmp_path, OnCPU(get_backend("npu").kernels))
    assert "phi3: no tuneport entry; training on transformers' own modules" in caplog.text
    assert family.lora_targets == ("down_proj", "gate_up_proj", "o_proj", "qkv_proj")  # every linear layer of a block
    theirs = transformers.Phi3ForCausalLM.from_pretrained(tmp_path, attn_implementation="eager").eval()
    ids = batch(8)
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, theirs(ids).logits, **TOL)
    assert mod.fake_state.calls["npu_fusion_attention"] > 0 and mod.fake_state.calls["npu_rms_norm"] == 0


def test_a_model_type_without_a_transformers_class_is_one_line(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "internlm2", "auto_map": {}}))
    with pytest.raises(CheckpointError) as e:
        family_for(tmp_path)
    assert str(e.value) == ("model_type 'internlm2' has no transformers causal-LM class (tuneport runs no code from a "
                            "checkpoint); tuneport knows chatglm, " + ", ".join(ENTRIES) + " and every other decoder "
                            "transformers implements")


def test_the_registry_names_every_entry():
    from tuneport.models import DECODERS

    assert DECODERS == tuple(ENTRIES)
    assert get_family("qwen3").supports >= {"torch", "freeze", "export", "onnx", "serve", "estimate", "template"}
    assert "onnx" not in get_family("mistral").supports and "mindspore" not in get_family("qwen3").supports


def test_export_merges_lora_into_the_familys_own_layout(folder, tmp_path):
    """A LoRA adapter (peft's, random) merged by `tuneport export` reloads in plain transformers'
    AutoModelForCausalLM and gives the adapted model's logits at 1e-4; unmergeable results are refused."""
    from tuneport.core.export import export

    entry = ENTRIES[json.loads((folder / "config.json").read_text())["model_type"]]
    tuned = get_peft_model(reference(folder), LoraConfig(r=4, lora_alpha=8, target_modules=list(entry.lora_targets)))
    with torch.no_grad():
        for name, param in tuned.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=torch.Generator().manual_seed(len(name))) * 0.1)
    tuned.save_pretrained(tmp_path / "adapter")
    record = export(folder, tmp_path / "adapter", tmp_path / "out")
    assert record["format"] == "safetensors" and "model.safetensors" in record["sha256"]
    merged = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out", attn_implementation="eager").eval()
    assert type(merged) is entry.model
    ids = batch(9)
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, tuned.eval()(ids).logits, atol=1e-4, rtol=1e-4)


# --- tuneport train, offline, on every entry ---------------------------------------------------------------------
TEMPLATES = {"qwen2": "qwen2.5", "qwen3": "qwen3", "qwen3_moe": "qwen3", "llama": "llama3.1", "glm4": "glm4",
             "glm": "glm4", "mistral": "mistral", "gemma2": "gemma3", "gemma3_text": "gemma3"}


def templates_module():
    spec = importlib.util.spec_from_file_location("tuneport_tests_templates", Path(__file__).parent / "test_templates.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def chat_folder(folder: Path, model_type: str, template: bool = True) -> Path:
    """A tiny `model_type` with a byte-level BPE tokenizer and a chat template in its family's published format
    (tests/test_templates.py writes both; `template` False: none in the folder)."""
    templates_module().write_folder(folder, TEMPLATES[model_type], template=template)
    size = len(json.loads((folder / "tokenizer.json").read_text())["model"]["vocab"]) + 16
    eos = json.loads((folder / "generation_config.json").read_text())["eos_token_id"]
    torch.manual_seed(0)
    config = transformers.CONFIG_MAPPING[model_type](**{**SMALL, **CONFIGS[model_type], "vocab_size": size,
                                                        "eos_token_id": eos})
    ENTRIES[model_type].model(config).save_pretrained(folder)
    return folder


@pytest.mark.parametrize("model_type", sorted(CONFIGS))
def test_train_runs_offline_and_its_adapter_loads_in_plain_peft(model_type, tmp_path, monkeypatch):
    import socket

    from peft import PeftModel

    from tuneport.core.cli import main
    from tuneport.frameworks.torch.build import load_tuned_model

    def no_network(*args, **kwargs):
        raise AssertionError("tuneport train touched the network")

    folder = chat_folder(tmp_path / model_type, model_type)
    data = tmp_path / "data.jsonl"
    data.write_text("\n".join(json.dumps({"conversations": [
        {"role": "user", "content": f"What is the weather like in Beijing, day {i}?"},
        {"role": "assistant", "content": "It is sunny and 25 degrees."}]}) for i in range(3)))
    out = tmp_path / "run"
    command = ["train", "builtin:qwen2_5_7b_lora.yaml", f"model={folder}", "method.target_modules=null",
               "train.max_steps=2", "device=cpu", "precision=fp32", f"data.train={data}", "data.eval=null",
               "data.format=conversations", "train.micro_batch_size=2", "train.grad_accum=1", "train.warmup_steps=0",
               "train.lr=1e-2", f"output_dir={out}"]
    with monkeypatch.context() as offline:
        offline.setattr(socket.socket, "connect", no_network)
        offline.setattr(socket, "create_connection", no_network)
        assert main(command) == 0
    adapter = out / "adapter"
    targets = json.loads((adapter / "adapter_config.json").read_text())["target_modules"]
    assert set(targets) == set(ENTRIES[model_type].lora_targets)
    ids = torch.randint(0, 300, (2, 9), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        plain = PeftModel.from_pretrained(ENTRIES[model_type].model.from_pretrained(folder), adapter).eval()
        expected = plain(ids).logits
        base = reference(folder)(ids).logits
        got = load_tuned_model(folder, adapter)(ids).logits
    assert (expected - base).abs().max() > 1e-3  # the adapter learned something
    torch.testing.assert_close(got, expected, **TOL)


# --- folders ---------------------------------------------------------------------------------------------------
def test_bad_config_and_weights_are_clear_errors(tmp_path):
    folder = write_model(tmp_path / "qwen3", "qwen3")
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "model.safetensors").symlink_to(folder / "model.safetensors")
    values = json.loads((folder / "config.json").read_text())
    (bad / "config.json").write_text(json.dumps({**values, "num_key_value_heads": 3, "rms_norm_eps": -1}))
    with pytest.raises(CheckpointError) as e:
        load_model(bad)
    assert str(e.value) == (f"{bad / 'config.json'}: num_key_value_heads: 3; expected a positive integer dividing "
                            "num_attention_heads (4); rms_norm_eps: -1; expected a positive number")
    (bad / "config.json").write_text(json.dumps({**values, "intermediate_size": 64}))
    with pytest.raises(CheckpointError) as e:
        family_for(bad).check_checkpoint(bad)
    assert str(e.value).startswith(f"{bad}: the weights do not match config.json (shape mismatches: ")
    assert "model.layers.0.mlp.gate_proj.weight (expected [64, 64], found [96, 64] in model.safetensors)" in str(e.value)
    with pytest.raises(CheckpointError, match="qwen3 models have no pre_seq_len, prefix_projection"):
        load_model(folder, pre_seq_len=8, prefix_projection=False)


def test_tied_and_sharded_folders_load(tmp_path):
    """Qwen2.5-0.5B to 3B tie the output layer to the embedding; the 7B ships in shards with an index."""
    config = transformers.Qwen2Config(**{**SMALL, "tie_word_embeddings": True})
    torch.manual_seed(1)
    transformers.Qwen2ForCausalLM(config).save_pretrained(tmp_path, max_shard_size="40KB")
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1 and "lm_head.weight" not in index["weight_map"]
    ours = load_model(tmp_path)
    assert ours.lm_head.weight is ours.model.embed_tokens.weight
    ids = batch(7)
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, reference(tmp_path)(ids).logits, **TOL)
    index["weight_map"]["lm_head.weight"] = "../elsewhere.safetensors"
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=r"weight_map names shard files outside the checkpoint folder "
                                              r"\(../elsewhere.safetensors\)"):
        load_model(tmp_path)


@pytest.mark.parametrize("method", ["dora", "adalora", "ia3", "prompt_tuning", "ptuning", "prefix_tuning"])
def test_every_peft_method_trains_and_generates_as_the_uncached_model(method, tmp_path):
    """One step of each method on a Qwen2 (the prefix must reach the loss: prefix tuning's gradient is not
    zero, so checkpointing, which transformers' layers would run without the prefix, stays off), then cached
    greedy generation against the reference: the whole sequence re-run without a cache."""
    from tuneport.core.config import load_recipe
    from tuneport.core.precision import resolve_precision
    from tuneport.frameworks.torch.runtime import TorchRuntime

    folder = write_model(tmp_path, "qwen2")
    schedule = ("method.tinit=0", "method.tfinal=0") if method == "adalora" else ()
    tokens = ("method.num_virtual_tokens=4",) if "tuning" in method or method == "ptuning" else ()
    recipe = load_recipe("builtin:demo.yaml", (f"model={folder}", "tokenizer=null", f"method.name={method}",
                                               "method.target_modules=null", *schedule, *tokens))
    cpu = get_backend("cpu")
    runtime = TorchRuntime(recipe, cpu, resolve_precision("fp32", "cpu", cpu.capabilities), folder)
    ids = batch(1).numpy()
    runtime.forward_backward({"input_ids": ids, "labels": ids, "attention_mask": ids * 0 + 1}, int(ids[:, 1:].size))
    moved = [p.grad is not None and bool(p.grad.abs().sum() > 0) for p in runtime.trainable.values()]
    # every prompt parameter reaches the loss; adapters start as identity, so some factors' first gradients are 0
    assert all(moved) if tokens else any(moved)
    runtime.optimizer_step(1e-2, 1.0)
    prompt = [5, 6, 7, 8]
    generated = runtime.generate(prompt, 5, stop_ids=[10**6], pad_id=0)
    reference_ids = list(prompt)
    runtime.model.eval()
    with torch.no_grad():
        for _ in range(5):
            reference_ids.append(int(runtime.model(input_ids=torch.tensor([reference_ids]), use_cache=False)
                                     .logits[0, -1].argmax()))
    assert generated == reference_ids[len(prompt):]


def test_a_folder_without_a_template_trains_with_the_recipes_and_serves_with_it(tmp_path, capsys):
    """No chat_template in the folder: refused in one line; `data.template` trains, the adapter keeps the template,
    and `tuneport chat` with that adapter renders with it (without the adapter: the refusal again)."""
    from tuneport.core.cli import main
    from tuneport.core.loading import load

    folder = chat_folder(tmp_path / "qwen2", "qwen2", template=False)
    capsys.readouterr()  # transformers' progress bar
    template = tmp_path / "chatml.jinja"
    template.write_text(templates_module().FAMILIES["qwen2.5"][0])
    data = tmp_path / "data.jsonl"
    data.write_text(json.dumps({"conversations": [{"role": "user", "content": "Hello"},
                                                  {"role": "assistant", "content": "Hello! How can I help?"}]}))
    command = ["train", "builtin:qwen2_5_7b_lora.yaml", f"model={folder}", "method.target_modules=null",
               "train.max_steps=1", "device=cpu", "precision=fp32", f"data.train={data}", "data.eval=null",
               "data.format=conversations", "train.micro_batch_size=1", "train.grad_accum=1", "train.warmup_steps=0",
               "train.gradient_checkpointing=false"]
    assert main([*command, f"output_dir={tmp_path / 'refused'}"]) == 2
    assert capsys.readouterr().err == (f"error: {folder}: has no chat_template (tokenizer_config.json or "
                                       "chat_template.jinja); name one in the recipe: data.template: FILE.jinja\n")
    assert not (tmp_path / "refused").exists()
    assert main([*command, f"data.template={template}", f"output_dir={tmp_path / 'run'}"]) == 0
    adapter = tmp_path / "run" / "adapter"
    assert (adapter / "chat_template.jinja").read_text() == template.read_text()
    prompt = load(folder, adapter, device="cpu").tokenizer.build_chat_input("Hello")["input_ids"][0].tolist()
    hf = transformers.PreTrainedTokenizerFast.from_pretrained(folder, chat_template=template.read_text())
    text = hf.apply_chat_template([{"role": "user", "content": "Hello"}], tokenize=False, add_generation_prompt=True)
    assert prompt == hf(text, add_special_tokens=False)["input_ids"]
    with pytest.raises(CheckpointError, match="has no chat_template"):
        load(folder, device="cpu")


@pytest.mark.parametrize("model_type", ["llama", "glm4"])
def test_onnx_export_generates_as_torch(model_type, tmp_path):
    """`tuneport export --format onnx` for a decoder that exports with its cache (rotate-half and GLM's
    interleaved rotary): onnxruntime's logits equal torch's at real positions of a left-padded prompt and a
    cached step (export.json), and `onnx_generate` decodes what transformers' greedy generate does."""
    pytest.importorskip("onnxruntime")
    from tuneport.core.export import export
    from tuneport.core.onnx_generate import onnx_generate

    folder = write_model(tmp_path / model_type, model_type)
    record = export(folder, None, tmp_path / "onnx", fmt="onnx")
    assert record["onnx_max_abs_diff"] < 1e-4
    ids = batch(10, rows=1, length=6)
    expected = reference(folder).generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert onnx_generate(tmp_path / "onnx", ids.tolist(), 6).tolist() == expected.tolist()


def test_onnx_export_is_refused_where_the_cache_does_not_trace(tmp_path):
    from tuneport.core.errors import Unsupported
    from tuneport.core.export import export

    folder = write_model(tmp_path / "mistral", "mistral")
    with pytest.raises(Unsupported) as e:
        export(folder, None, tmp_path / "onnx", fmt="onnx")
    assert str(e.value).startswith(f"tuneport export --model {folder} --format onnx: mistral models do not support "
                                   "onnx; they support ")
    assert not (tmp_path / "onnx").exists()


@pytest.mark.parametrize("model_type", ["llama", "glm4", "qwen3_moe"])
def test_estimate_builds_the_release_from_config_json_on_the_meta_device(model_type, tmp_path):
    """`tuneport estimate` for a released size (config.json alone): its weights are transformers' own count of
    the model's parameters in bf16 plus the LoRA factors in fp32 (peft's count on the meta device) and its buffers."""
    from tuneport.core.config import load_recipe
    from tuneport.frameworks.torch.estimate import ADAM_STATES, estimate
    from tuneport.models.decoder.checkpoint import reference_config

    config = reference_config(model_type)
    config.save_pretrained(tmp_path)
    recipe = load_recipe("builtin:qwen2_5_7b_lora.yaml", (f"model={tmp_path}", "method.target_modules=null",
                                                          "method.r=8", "precision=bf16"))
    with torch.device("meta"):
        model = get_peft_model(ENTRIES[model_type].model(config), LoraConfig(
            r=8, target_modules=list(ENTRIES[model_type].lora_targets)))
    trained, total = model.get_nb_trainable_parameters()
    buffers = sum(b.numel() * 2 for b in model.buffers())  # the rotary's inverse frequencies, built in bf16
    got = estimate(recipe, "cuda", runtime=0)
    assert got.weights == (total - trained) * 2 + trained * 4 + buffers
    assert got.activations > 0 and got.gradients == trained * 4 and got.optimizer >= trained * 4 * ADAM_STATES
