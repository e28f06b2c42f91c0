"""The Qwen2 family on a tiny random Qwen2 (2 layers, grouped KV heads) saved as a Hugging Face folder with
a small byte-level BPE tokenizer made here with the `tokenizers` library.

References, each independent of tuneport's code: transformers' own Qwen2ForCausalLM with
attn_implementation="eager" (logits, loss, padded batches, KV-cache decode, generation, LoRA gradients
through peft, at 1e-5), on the CPU backend's kernels and on the FAKE torch_npu's fused operators (which
stand in for Ascend hardware, tests/fakes/torch_npu.py); transformers' chat-template renderer running
Qwen2.5's own chat_template (for the chat format, tool calls included); the peft adapter `tuneport train`
writes, loaded by peft on plain transformers."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch
import transformers
from peft import LoraConfig, PeftModel, get_peft_model

from tuneport.backends import get_backend
from tuneport.backends.cpu import CPUBackend
from tuneport.frameworks.torch.build import load_tuned_model
from tuneport.core.cli import main
from tuneport.core.data import to_messages
from tuneport.models import CheckpointError, family_for
from tuneport.models.qwen2.checkpoint import load_model
from tuneport.models.qwen2.family import LINEAR_LAYERS
from tuneport.models.qwen2.model import Attention, RMSNorm
from tuneport.models.qwen2.tokenizer import load_tokenizer

REPO = Path(__file__).resolve().parents[1]
FAKE_PATH = Path(__file__).parent / "fakes" / "torch_npu.py"
TOL = dict(atol=1e-5, rtol=1e-5)

# The chat_template of Qwen/Qwen2.5-7B-Instruct's tokenizer_config.json (the same in every Qwen2.5 instruct
# release, e.g. Qwen/Qwen2.5-0.5B-Instruct at 7ae557604adf67be50417f59c2c2f167def9a775, line 198).
QWEN25_TEMPLATE = """{%- if tools %}
    {{- '<|im_start|>system\\n' }}
    {%- if messages[0]['role'] == 'system' %}
        {{- messages[0]['content'] }}
    {%- else %}
        {{- 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' }}
    {%- endif %}
    {{- "\\n\\n# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\nYou are provided with function signatures within <tools></tools> XML tags:\\n<tools>" }}
    {%- for tool in tools %}
        {{- "\\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\\n<tool_call>\\n{\\"name\\": <function-name>, \\"arguments\\": <args-json-object>}\\n</tool_call><|im_end|>\\n" }}
{%- else %}
    {%- if messages[0]['role'] == 'system' %}
        {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}
    {%- else %}
        {{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\\n' }}
    {%- endif %}
{%- endif %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or (message.role == "assistant" and not message.tool_calls) %}
        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>' + message.role }}
        {%- if message.content %}
            {{- '\\n' + message.content }}
        {%- endif %}
        {%- for tool_call in message.tool_calls %}
            {%- if tool_call.function is defined %}
                {%- set tool_call = tool_call.function %}
            {%- endif %}
            {{- '\\n<tool_call>\\n{"name": "' }}
            {{- tool_call.name }}
            {{- '", "arguments": ' }}
            {{- tool_call.arguments | tojson }}
            {{- '}\\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\\n' }}
    {%- elif message.role == "tool" %}
        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\\n<tool_response>\\n' }}
        {{- message.content }}
        {{- '\\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
{%- endif %}
"""
# Qwen2's pre-tokenizer split (its tokenizer.json), before the byte-level mapping.
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
               r"\s*[\r\n]+|\s+(?!\S)|\s+")
CORPUS = ["You are Qwen, created by Alibaba Cloud. You are a helpful assistant.",
          "What is the weather like in Beijing today? It is sunny and 25 degrees.",
          '{"name": "get_weather", "arguments": {"city": "Beijing", "unit": "celsius"}}',
          "# Tools\n\nYou may call one or more functions to assist with the user query.",
          "类型#裤*版型#宽松*风格#性感 宽松的阔腿裤穿起来很舒服，显得腿长。", "我需要为约翰生成一张发票。"]


def write_tokenizer(folder: Path) -> int:
    """A byte-level BPE trained on CORPUS with Qwen2's split, ChatML specials and the tool tags (added, not
    special, as in Qwen2.5); returns its size."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from tokenizers.trainers import BpeTrainer

    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated"),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    tok.train_from_iterator(CORPUS, BpeTrainer(vocab_size=400, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                               special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"]))
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in ("<tool_call>", "</tool_call>")])
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>", "chat_template": QWEN25_TEMPLATE}))
    return tok.get_vocab_size()


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("qwen2_tiny")
    size = write_tokenizer(folder)
    config = transformers.Qwen2Config(
        vocab_size=size + 8, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, rope_theta=10000.0, rms_norm_eps=1e-6,
        initializer_range=0.2, tie_word_embeddings=False)  # large weights: attention far from uniform
    torch.manual_seed(0)
    model = transformers.Qwen2ForCausalLM(config)
    with torch.no_grad():  # transformers initialises biases and norms to constants; make them count
        for name, param in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                param.add_(torch.randn_like(param) * 0.1)
    model.save_pretrained(folder)
    return folder


def reference(folder: Path):
    """transformers' own eager Qwen2, from the same folder."""
    return transformers.Qwen2ForCausalLM.from_pretrained(folder, attn_implementation="eager",
                                                         dtype=torch.float32).eval()


def _load_fake():
    spec = importlib.util.spec_from_file_location("tuneport_tests_fake_torch_npu_qwen2", FAKE_PATH)
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


def fused_ops_ran(mod) -> None:
    if mod is not None:
        calls = mod.fake_state.calls
        assert min(calls[op] for op in ("npu_rms_norm", "npu_rotary_mul", "npu_fusion_attention")) > 0, calls


def batch(seed: int, rows: int = 2, length: int = 9, vocab: int = 300) -> torch.Tensor:
    return torch.randint(0, vocab, (rows, length), generator=torch.Generator().manual_seed(seed))


# --- numerics ----------------------------------------------------------------------------------------------
def test_logits_and_loss_match_transformers_eager(folder, backend):
    backend, mod = backend
    ours, theirs = load_model(folder, backend), reference(folder)
    assert isinstance(ours.model.norm, RMSNorm) and isinstance(ours.model.layers[0].self_attn, Attention)
    assert ours.config._attn_implementation == "tuneport" and ours.model.norm.kernels is backend.kernels
    ids = batch(1)
    labels = ids.clone()
    labels[0, :4] = -100  # a prompt without loss
    with torch.no_grad():
        got, expected = ours(ids, labels=labels), theirs(ids, labels=labels)
        loss_only = ours(ids, labels=labels, loss_only=True)
    torch.testing.assert_close(got.logits, expected.logits, **TOL)
    torch.testing.assert_close(got.loss, expected.loss, **TOL)
    assert loss_only.logits is None
    torch.testing.assert_close(loss_only.loss, expected.loss, **TOL)
    fused_ops_ran(mod)


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
    fused_ops_ran(mod)


def test_kv_cache_decode_and_generation_match_transformers_eager(folder, backend):
    backend, mod = backend
    ours, theirs = load_model(folder, backend), reference(folder)
    ids, mask = batch(3, length=6), torch.ones(2, 6, dtype=torch.long)
    mask[1, :2] = 0  # left padding, as for generation
    with torch.no_grad():
        caches, tokens = {}, ids
        for step in range(5):  # the prompt, then four single tokens from the cache
            outs = {}
            for name, model in (("ours", ours), ("theirs", theirs)):
                out = model(input_ids=tokens, attention_mask=mask, cache=caches.get(name), use_cache=True)
                outs[name], caches[name] = out.logits[:, -1], out.cache
            torch.testing.assert_close(outs["ours"], outs["theirs"], **TOL)
            tokens = outs["theirs"].argmax(-1, keepdim=True)
            mask = torch.cat((mask, torch.ones(2, 1, dtype=torch.long)), dim=1)
        settings = dict(attention_mask=mask[:, :6], max_new_tokens=5, do_sample=False, pad_token_id=0)
        assert ours.generate(ids, **settings).tolist() == theirs.generate(ids, **settings).tolist()
    fused_ops_ran(mod)


def test_lora_gradients_match_transformers_eager_through_peft(folder, backend):
    backend, mod = backend
    config = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=list(LINEAR_LAYERS))
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
    assert len(grads) == 2 * len(LINEAR_LAYERS) * 2  # A and B of every linear layer of both blocks
    for name, param in ours.named_parameters():
        if param.requires_grad:
            torch.testing.assert_close(param.grad, grads[name], **TOL)
    fused_ops_ran(mod)


# --- the chat format ---------------------------------------------------------------------------------------
TOOLS = [{"name": "get_weather", "description": "Weather of a city",
          "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}]
CONVERSATIONS = {
    "no system prompt": [{"role": "user", "content": "类型#裤*版型#宽松"},
                         {"role": "assistant", "content": "宽松的阔腿裤穿起来很舒服。"}],
    "system and two turns": [{"role": "system", "content": "You answer briefly."},
                             {"role": "user", "content": "What is the weather like?"},
                             {"role": "assistant", "content": "It is sunny."},
                             {"role": "user", "content": "And tomorrow?"},
                             {"role": "assistant", "content": "Rain, 18 degrees."}],
    "two tool calls and their results": [
        {"role": "system", "content": "You are a weather bot.", "tools": TOOLS},
        {"role": "user", "content": "Weather in Beijing and Shanghai?"},
        {"role": "assistant", "content": "Let me check.", "tool_calls": [
            {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Beijing"}}},
            {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "上海"}}}]},
        {"role": "tool", "content": '{"temperature": 25}'},
        {"role": "tool", "content": '{"temperature": 28}'},
        {"role": "assistant", "content": "Beijing 25, Shanghai 28 degrees."}],
}


def official(tokenizer, messages: list[dict], **kwargs) -> str:
    """Qwen2.5's chat_template, rendered by transformers (tools passed as the template expects them)."""
    tools = messages[0].get("tools") if messages and messages[0]["role"] == "system" else None
    if tools and messages[0].get("content") is None:
        messages = messages[1:]  # no system prompt of our own: the template's default
    return tokenizer.apply_chat_template(messages, tools=tools, tokenize=False, **kwargs)


def assistant_replies(messages: list[dict]) -> list[str]:
    """What each assistant turn writes, as the template writes it after `<|im_start|>assistant\\n`."""
    replies = []
    for m in messages:
        if m["role"] == "assistant":
            calls = "".join(f'\n<tool_call>\n{{"name": "{c["function"]["name"]}", "arguments": '
                            f'{json.dumps(c["function"]["arguments"], ensure_ascii=False)}}}\n</tool_call>'
                            for c in m.get("tool_calls", []))
            replies.append((m["content"] + calls if m["content"] else calls[1:]) + "<|im_end|>")
    return replies


def check_encoding(tokenizer, hf, messages, expected_messages) -> None:
    ids, labels = tokenizer.encode_conversation(messages, 10_000, 0)
    assert ids == hf(official(hf, expected_messages), add_special_tokens=False)["input_ids"]
    runs, current = [], []
    for i, label in enumerate(labels):
        if label != -100:
            assert label == ids[i]
            current.append(label)
        elif current:
            runs.append(current)
            current = []
    runs += [current] if current else []
    assert [hf.decode(run) for run in runs] == assistant_replies(expected_messages)


@pytest.mark.parametrize("case", CONVERSATIONS)
def test_encode_conversation_is_qwen25s_template_with_loss_on_replies(folder, case):
    tokenizer = load_tokenizer(folder)
    hf = transformers.PreTrainedTokenizerFast(tokenizer_file=str(folder / "tokenizer.json"),
                                              chat_template=QWEN25_TEMPLATE)
    check_encoding(tokenizer, hf, CONVERSATIONS[case], CONVERSATIONS[case])
    history, query = CONVERSATIONS[case][:-2], CONVERSATIONS[case][-2]
    prompt = tokenizer.build_chat_input(query["content"], history=history, role="user")["input_ids"][0].tolist()
    if query["role"] == "user":
        expected = official(hf, [*history, query], add_generation_prompt=True)
        assert prompt == hf(expected, add_special_tokens=False)["input_ids"]
    assert tokenizer.stop_token_ids == [tokenizer.convert_tokens_to_ids(t) for t in ("<|im_end|>", "<|endoftext|>")]
    assert tokenizer.decode(prompt, skip_special_tokens=True).startswith("system\n")


def test_sharegpt_tool_calls_from_the_data_pipeline(folder):
    """A ShareGPT record (glaive_toolcall style) goes through core/data.py into ChatGLM3's message form (a tool
    call as `metadata` + tool_call(...)); the tokenizer writes it as Qwen2.5's template writes the same talk."""
    record = {"conversations": [
        {"from": "human", "value": "给约翰开一张发票"},
        {"from": "function_call", "value": json.dumps({"name": "generate_invoice", "arguments": {
            "customer_name": "约翰", "items": [{"name": "苹果", "quantity": 2, "price": 0.5}], "paid": True}},
            ensure_ascii=False)},
        {"from": "observation", "value": '{"invoice_id": "INV12345"}'},
        {"from": "gpt", "value": "发票已生成，编号 INV12345。"}], "tools": json.dumps(TOOLS)}
    messages = to_messages(record, "sharegpt")
    assert messages[2]["metadata"] == "generate_invoice"  # ChatGLM3's form, as data.py writes it
    call = json.loads(record["conversations"][1]["value"])
    expected = [{"role": "system", "content": None, "tools": TOOLS},
                {"role": "user", "content": "给约翰开一张发票"},
                {"role": "assistant", "content": "", "tool_calls": [{"type": "function", "function": call}]},
                {"role": "tool", "content": '{"invoice_id": "INV12345"}'},
                {"role": "assistant", "content": "发票已生成，编号 INV12345。"}]
    hf = transformers.PreTrainedTokenizerFast(tokenizer_file=str(folder / "tokenizer.json"),
                                              chat_template=QWEN25_TEMPLATE)
    check_encoding(load_tokenizer(folder), hf, messages, expected)


# --- loading, errors, the recipe ------------------------------------------------------------------------------
def test_unknown_model_type_is_one_line_before_any_weights_load(tmp_path, capsys):
    folder = tmp_path / "llama"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 64}))
    (folder / "model.safetensors").write_bytes(b"not weights")  # reading it would fail otherwise
    out = tmp_path / "run"
    assert main(["train", str(REPO / "recipes/qwen2_5_7b_lora.yaml"), f"model={folder}", "device=cpu",
                 f"output_dir={out}"]) == 2
    err = capsys.readouterr().err
    assert err == "error: model_type 'llama' is not supported; tuneport knows: chatglm, qwen2\n"
    assert not out.exists()


def test_bad_config_and_weights_are_clear_errors(folder, tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    for name in ("model.safetensors", "tokenizer.json"):
        (bad / name).symlink_to(folder / name)
    values = json.loads((folder / "config.json").read_text())
    (bad / "config.json").write_text(json.dumps({**values, "num_key_value_heads": 3, "rms_norm_eps": -1}))
    with pytest.raises(CheckpointError) as e:
        load_model(bad)
    assert str(e.value) == (f"{bad / 'config.json'}: num_key_value_heads: 3; expected a positive integer dividing "
                            "num_attention_heads (4); rms_norm_eps: -1; expected a positive number")
    (bad / "config.json").write_text(json.dumps({**values, "intermediate_size": 96}))
    with pytest.raises(CheckpointError) as e:
        family_for(bad).check_checkpoint(bad)
    assert str(e.value).startswith(f"{bad}: the weights do not match config.json (shape mismatches: ")
    shape = "model.layers.0.mlp.gate_proj.weight (expected [96, 64], found [128, 64] in model.safetensors)"
    assert shape in str(e.value)
    with pytest.raises(CheckpointError, match="Qwen2 has no pre_seq_len, prefix_projection"):
        load_model(folder, pre_seq_len=8, prefix_projection=False)


def test_tied_and_sharded_folders_load(tmp_path):
    """Qwen2.5-0.5B to 3B tie the output layer to the embedding; the 7B ships in shards with an index."""
    config = transformers.Qwen2Config(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    torch.manual_seed(1)
    transformers.Qwen2ForCausalLM(config).save_pretrained(tmp_path, max_shard_size="20KB")
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1 and "lm_head.weight" not in index["weight_map"]
    ours = load_model(tmp_path)
    assert ours.lm_head.weight is ours.model.embed_tokens.weight
    ids = batch(7, vocab=96)
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, reference(tmp_path)(ids).logits, **TOL)
    index["weight_map"]["lm_head.weight"] = "../elsewhere.safetensors"
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=r"weight_map names shard files outside the checkpoint folder "
                                              r"\(../elsewhere.safetensors\)"):
        load_model(tmp_path)


def test_recipe_trains_and_its_adapter_loads_with_peft_on_plain_transformers(folder, tmp_path, monkeypatch):
    import socket

    def no_network(*args, **kwargs):
        raise AssertionError("tuneport train touched the network")

    data = tmp_path / "data.jsonl"
    records = [{"conversations": [{"role": "user", "content": f"What is the weather like in Beijing, day {i}?"},
                                  {"role": "assistant", "content": "It is sunny and 25 degrees."}]} for i in range(3)]
    records.append({"tools": TOOLS, "conversations": [
        {"role": "user", "content": "Weather in Beijing?"},
        {"role": "assistant", "metadata": "get_weather", "content": "```python\ntool_call(city='Beijing')\n```"},
        {"role": "observation", "content": '{"temperature": 25}'},
        {"role": "assistant", "content": "It is 25 degrees."}]})
    data.write_text("\n".join(json.dumps(r) for r in records))
    out = tmp_path / "run"
    command = ["train", str(REPO / "recipes/qwen2_5_7b_lora.yaml"), f"model={folder}", "train.max_steps=2",
               "device=cpu", "precision=fp32", f"data.train={data}", "data.eval=null", "data.format=conversations",
               "train.micro_batch_size=2", "train.grad_accum=1", "train.warmup_steps=0", "train.lr=1e-2",
               f"output_dir={out}"]
    with monkeypatch.context() as offline:
        offline.setattr(socket.socket, "connect", no_network)
        offline.setattr(socket, "create_connection", no_network)
        assert main(command) == 0
    adapter = out / "adapter"
    assert sorted(json.loads((adapter / "adapter_config.json").read_text())["target_modules"]) == sorted(LINEAR_LAYERS)
    ids = batch(6)
    with torch.no_grad():
        plain = PeftModel.from_pretrained(transformers.Qwen2ForCausalLM.from_pretrained(folder), adapter).eval()
        expected = plain(ids).logits
        base = reference(folder)(ids).logits
        got = load_tuned_model(folder, adapter)(ids).logits
    assert (expected - base).abs().max() > 1e-2  # the adapter learned something
    torch.testing.assert_close(got, expected, **TOL)


@pytest.mark.parametrize("method", ["dora", "adalora", "ia3", "prompt_tuning", "ptuning", "prefix_tuning"])
def test_every_peft_method_trains_qwen2_and_generates_as_the_uncached_model(folder, method):
    """One step of each method on Qwen2 (the prefix must reach the loss: prefix tuning's gradient is not
    zero, so checkpointing, which transformers' Qwen2 layers would run without the prefix, stays off),
    then cached greedy generation against the reference: the whole sequence re-run without a cache."""
    from tuneport.backends import get_backend
    from tuneport.frameworks.torch.runtime import TorchRuntime
    from tuneport.core.config import load_recipe
    from tuneport.core.precision import resolve_precision

    schedule = ("method.tinit=0", "method.tfinal=0") if method == "adalora" else ()
    tokens = ("method.num_virtual_tokens=4",) if "tuning" in method or method == "ptuning" else ()
    recipe = load_recipe("builtin:demo.yaml", (f"model={folder}", "tokenizer=null", f"method.name={method}",
                                               "method.target_modules=null", *schedule, *tokens))
    cpu = get_backend("cpu")
    runtime = TorchRuntime(recipe, cpu, resolve_precision("fp32", "cpu", cpu.capabilities), folder)
    ids = batch(1).numpy()
    runtime.forward_backward({"input_ids": ids, "labels": ids, "attention_mask": ids * 0 + 1},
                             int(ids[:, 1:].size))
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
