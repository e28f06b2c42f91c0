"""`tuneport serve` with a transformers decoder family: the openai client gets a tool call back.

A tiny Qwen2 with a byte-level BPE and Qwen2.5-7B-Instruct's chat template (tests/test_decoder.py
`chat_folder`) is trained by the real `tuneport train` (LoRA, 15 steps at lr 2e-2, seed 42 from the recipe) on
one conversation: tools [get_weather(city)], "What is the weather like in Beijing today?", a call of
get_weather(city="Beijing"), given in ChatGLM3's form as tuneport's data pipeline reads it. That fixes its greedy
reply to Qwen2.5's `<tool_call>\\n{"name": "get_weather", "arguments": {"city": "Beijing"}}\\n</tool_call>`
(loss 7.24 -> 0.08; an untrained model writes no such thing). `tuneport serve` runs base plus adapter as a
subprocess (tests/test_serve.py `server`), and the official `openai` client asks with the same tools in OpenAI's
form: the answer, whole and streamed, is that call as OpenAI's `tool_calls`, parsed by models/decoder/chat.py's
"qwen" protocol.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from tuneport.core.cli import main

HERE = Path(__file__).parent


def _load(name: str):
    """A sibling test module (tests/ is no package; pytest runs with --import-mode=importlib)."""
    spec = importlib.util.spec_from_file_location(f"tuneport_tests_{name}_for_serve_decoder", HERE / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


serving = _load("test_serve")  # skips this module, as that one, without the dev and serve extras
decoders = _load("test_decoder")

TOOL = {"name": "get_weather", "description": "Get the weather of a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}
QUERY = "What is the weather like in Beijing today?"
# ChatGLM3's tool call (metadata + tool_call(...) code) in the `conversations` format: the tokenizer writes it as
# Qwen2.5's <tool_call> JSON (tests/test_templates.py test_chatglm3_tool_calls_and_observations_are_converted).
RECORD = {"tools": [TOOL], "conversations": [
    {"role": "user", "content": QUERY},
    {"role": "assistant", "metadata": "get_weather", "content": "```python\ntool_call(city='Beijing')\n```"}]}
CALL = ("get_weather", {"city": "Beijing"})


@pytest.fixture(scope="module")
def tool_server(tmp_path_factory):
    """(base URL, log) of `tuneport serve` running the tiny Qwen2 with its adapter trained to call get_weather."""
    tmp = tmp_path_factory.mktemp("serve_decoder")
    folder = decoders.chat_folder(tmp / "qwen2", "qwen2")
    # The tiny config's context is 128 positions; Qwen2.5's tool prompt alone is 467 tokens of this small BPE.
    # Rotary positions have no weights, so a longer context changes none (serve caps requests by it).
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "max_position_embeddings": 1024}))
    data = tmp / "tool_call.jsonl"
    data.write_text(json.dumps(RECORD) + "\n")
    run = tmp / "run"
    assert main(["train", "builtin:qwen2_5_7b_lora.yaml", f"model={folder}", "method.target_modules=null",
                 "device=cpu", "precision=fp32", f"data.train={data}", "data.eval=null", "data.format=conversations",
                 "data.max_input_length=512", "train.max_steps=15", "train.micro_batch_size=1", "train.grad_accum=1",
                 "train.warmup_steps=0", "train.lr=2e-2", "train.gradient_checkpointing=false",
                 f"output_dir={run}"]) == 0
    with serving.server(tmp, "--model", str(folder), "--adapter", str(run / "adapter"), "--device", "cpu") as s:
        yield s


def ask(url: str, **kwargs):
    return serving.client(url).chat.completions.create(
        model="qwen2", messages=[{"role": "user", "content": QUERY}], tools=[{"type": "function", "function": TOOL}],
        temperature=0, max_tokens=48, **kwargs)


def test_the_openai_client_gets_the_tool_call(tool_server):
    url, _ = tool_server
    answer = ask(url)
    choice = answer.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    (call,) = choice.message.tool_calls
    assert call.type == "function" and call.id.startswith("call_")
    assert (call.function.name, json.loads(call.function.arguments)) == CALL
    assert answer.usage.completion_tokens == 30  # the call and <|im_end|>, nothing after it
    assert answer.usage.prompt_tokens == 467


def test_a_streamed_answer_is_the_same_tool_call(tool_server):
    url, _ = tool_server
    chunks = list(ask(url, stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks) == ""  # <tool_call> opens it: no text
    streamed = [tc for ch in chunks for tc in ch.choices[0].delta.tool_calls or []]
    assert [(tc.index, tc.function.name, json.loads(tc.function.arguments)) for tc in streamed] == [(0, *CALL)]
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
