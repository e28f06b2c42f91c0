"""`tuneport serve`: the real server, started as a subprocess on a free localhost port, called with the
official `openai` client (and with raw HTTP for the malformed requests a client would never send).

The answers are checked against greedy decoding with transformers' `generate` on the same model in
this process, and the tool-call round trip against a model trained here to call a tool.
"""

import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Optional

import pytest
import torch

from tuneport.core.cli import main
from tuneport.core.serve import Admission, ApiError, Reply, is_local
from tuneport.models.chatglm3 import chat
from tuneport.models.chatglm3 import load_model
from tuneport.models.chatglm3.builders import build_model_folder
from tuneport.models.chatglm3.files import load_tokenizer

openai = pytest.importorskip("openai", reason="the dev extra is not installed: pip install -e '.[dev]'")
pytest.importorskip("fastapi", reason="the serve extra is not installed: pip install -e '.[serve]'")
pytest.importorskip("uvicorn", reason="the serve extra is not installed: pip install -e '.[serve]'")

KEY = "test-key-0123456789"
MARKER = "zebra-marker-for-the-log"
PROMPTS = ["hello", "What is LoRA?", "你好", "1 + 1 =", "tell me a story", "why", "Ascend 910", MARKER]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def server(tmp_path: Path, *args: str):
    """`tuneport serve ARGS` on a free port until the block ends; yields (base URL, log file)."""
    with serving(tmp_path, *args) as (url, log, _):
        yield url, log


@contextmanager
def serving(tmp_path: Path, *args: str):
    """As `server`, yielding (base URL, log file, the server's process)."""
    port = free_port()
    log = tmp_path / f"serve-{port}.log"
    env = {k: v for k, v in os.environ.items() if k != "TUNEPORT_API_KEY"}
    with open(log, "w") as out:
        process = subprocess.Popen([sys.executable, "-m", "tuneport.core.cli", "serve", *args, "--port", str(port)],
                                   stdout=out, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert process.poll() is None, log.read_text()[-3000:]
            try:
                request = urllib.request.Request(f"{url}/health", headers={"Authorization": f"Bearer {KEY}"})
                with urllib.request.urlopen(request, timeout=5) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            assert time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.2)
        yield url, log, process
    finally:
        process.terminate()
        process.wait(timeout=30)


def client(url: str, key: str = KEY):
    return openai.OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0, timeout=120)


def post(url: str, body: bytes, key: str = KEY) -> tuple[int, dict]:
    """A raw POST to /v1/chat/completions: (status, JSON body)."""
    request = urllib.request.Request(f"{url}/v1/chat/completions", data=body, method="POST",
                                     headers={"Authorization": f"Bearer {KEY if key is None else key}",
                                              "Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=120) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


@pytest.fixture(scope="module")
def golden_server(golden, tmp_path_factory):
    with server(tmp_path_factory.mktemp("serve"), "--model", str(golden / "checkpoint"), "--device", "cpu",
                "--api-key", KEY, "--max-queue", "7", "--max-tokens", "200", "--max-request-bytes", "20000") as s:
        yield s


@pytest.fixture(scope="module")
def reference(golden):
    """Greedy answers from transformers' `generate` on the same model: what the server must say."""
    model = load_model(golden / "checkpoint").eval()
    tokenizer = load_tokenizer(golden / "checkpoint")

    @torch.no_grad()
    def answer(prompt: str, max_tokens: int) -> str:
        inputs = tokenizer.build_chat_input(prompt)
        out = model.generate(**inputs, max_new_tokens=max_tokens, do_sample=False,
                             eos_token_id=tokenizer.stop_token_ids, pad_token_id=tokenizer.pad_token_id)
        return tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True).strip()

    return answer


def ask(c, prompt: str, **kwargs):
    kwargs = {"temperature": 0, "max_tokens": 16, **kwargs}
    return c.chat.completions.create(model="checkpoint", messages=[{"role": "user", "content": prompt}], **kwargs)


def test_streaming_and_not_give_the_reference_answer(golden_server, reference):
    url, _ = golden_server
    c = client(url)
    assert [m.id for m in c.models.list().data] == ["checkpoint"]
    whole = ask(c, "hello")
    assert whole.choices[0].message.content == reference("hello", 16)
    assert whole.choices[0].finish_reason == "length" and whole.usage.completion_tokens == 16
    chunks = list(ask(c, "hello", stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    streamed = "".join(ch.choices[0].delta.content or "" for ch in chunks)
    assert len(chunks) > 3 and streamed == whole.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == "length"


def test_stop_strings_and_seeds(golden_server, reference):
    url, _ = golden_server
    c = client(url)
    full = reference("What is LoRA?", 16)
    stop = full[len(full) // 2:len(full) // 2 + 2]
    cut = ask(c, "What is LoRA?", stop=[stop])
    assert cut.choices[0].message.content == full[:full.index(stop)].strip()
    assert cut.choices[0].finish_reason == "stop"
    streamed = "".join(ch.choices[0].delta.content or "" for ch in ask(c, "What is LoRA?", stop=[stop], stream=True))
    assert streamed == cut.choices[0].message.content
    sampled = [ask(c, "hello", temperature=1.0, top_p=0.9, seed=seed).choices[0].message.content for seed in (7, 7, 8)]
    assert sampled[0] == sampled[1] != sampled[2]


def test_eight_concurrent_requests_equal_eight_sequential(golden_server):
    url, log = golden_server
    c = client(url)
    sequential = [ask(c, p, max_tokens=24).choices[0].message.content for p in PROMPTS]
    with ThreadPoolExecutor(8) as pool:
        concurrent = list(pool.map(lambda p: ask(c, p, max_tokens=24).choices[0].message.content, PROMPTS))
    assert concurrent == sequential and len(set(sequential)) == len(PROMPTS)
    lines = [line for line in log.read_text().splitlines() if "prompt_tokens=" in line]
    assert len(lines) >= 16 and all("completion_tokens=" in line and "latency_s=" in line for line in lines)
    assert MARKER not in log.read_text()  # prompts are logged only with --log-prompts


def test_rejected_requests_are_logged_without_their_messages(golden_server):
    url, log = golden_server
    post(url, json.dumps({"messages": [{"role": "robot", "content": MARKER}]}).encode())
    line = [line for line in log.read_text().splitlines() if "rejected" in line and "'robot'" in line][-1]
    assert "status=400" in line and MARKER not in log.read_text()


def test_bad_requests_get_openai_errors(golden_server):
    url, _ = golden_server
    with pytest.raises(openai.AuthenticationError):
        ask(client(url, key="wrong-key"), "hello")
    assert post(url, b'{"messages": [', key="")[0] == 401  # no key at all: refused before anything else
    status, body = post(url, b'{"messages": [')
    assert status == 400 and "not valid JSON" in body["error"]["message"]
    status, body = post(url, json.dumps({"messages": [{"role": "robot", "content": "hi"}]}).encode())
    assert status == 400 and "'robot' is not one of" in body["error"]["message"]
    status, body = post(url, json.dumps({"messages": [{"role": "user", "content": "word " * 400}]}).encode())
    assert status == 400 and body["error"]["code"] == "context_length_exceeded" and "at most 255" in body["error"]["message"]
    status, body = post(url, json.dumps({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 201}).encode())
    assert status == 400 and "from 1 to 200" in body["error"]["message"]
    status, body = post(url, json.dumps({"messages": [{"role": "user", "content": "x" * 30000}]}).encode())
    assert status == 413 and "20000" in body["error"]["message"]
    malformed = [{"messages": [{"role": ["user"], "content": "hi"}]},
                 {"messages": [{"role": "assistant", "tool_calls": 5}, {"role": "user", "content": "hi"}]},
                 {"messages": [{"role": "assistant", "tool_calls": [{"function": {"name": "f", "arguments": {"a": 1}}}]},
                               {"role": "user", "content": "hi"}]},
                 {"messages": [{"role": "user", "content": "hi"}], "seed": 2**64},
                 {"messages": [{"role": "user", "content": "hi"}], "n": 2},
                 {"messages": "hi"}]
    for request in malformed:
        status, body = post(url, json.dumps(request).encode())
        assert status == 400 and body["error"]["type"] == "invalid_request_error", (request, body)
    assert post(url, b"[" * 5000)[0] == 400  # nesting deeper than the JSON parser goes


def test_a_chunked_body_past_the_limit_is_cut_off(golden_server):
    """No Content-Length to check: the server stops reading at the limit rather than at the end."""
    import http.client

    url, _ = golden_server
    connection = http.client.HTTPConnection(url.removeprefix("http://"), timeout=60)
    connection.putrequest("POST", "/v1/chat/completions")
    connection.putheader("Authorization", f"Bearer {KEY}")
    connection.putheader("Transfer-Encoding", "chunked")
    connection.endheaders()
    piece = b"x" * 4096
    for _ in range(25):  # 100 KiB of a body that never ends; the limit is 20,000 bytes
        connection.send(b"%x\r\n%s\r\n" % (len(piece), piece))
    connection.sock.settimeout(20)  # the answer comes without the body's end (a server reading it all would hang)
    response = connection.getresponse()
    assert response.status == 413 and "20000" in json.loads(response.read())["error"]["message"]


def test_a_full_queue_gets_503(golden_server):
    url, _ = golden_server
    body = json.dumps({"messages": [{"role": "user", "content": "hello"}], "max_tokens": 200, "temperature": 0})
    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(lambda _: post(url, body.encode()), range(16)))
    statuses = [status for status, _ in results]
    assert 503 in statuses and 200 in statuses and set(statuses) == {200, 503}, statuses
    assert statuses.count(200) <= 8  # one running and seven waiting at most
    busy = next(body for status, body in results if status == 503)
    assert busy["error"]["code"] == "queue_full" and "--max-queue" in busy["error"]["message"]


@pytest.mark.parametrize("text, stop", [
    ("\nHello \n\n world", ["world"]), ("\nHello there, world.", ["lo t", "xyz"]), ("\n 你好，世界 ", []),
    ("\nsay STOP now", ["STOP"]), ("\nabc", ["abcd"]),
])
def test_streamed_deltas_add_up_to_the_final_content(golden, text, stop):
    """Token by token, as the server streams: the deltas and the final content must be the same text."""
    tokenizer = load_tokenizer(golden / "checkpoint")
    reply = Reply(tokenizer, chat, stop, tools=False)
    streamed = ""
    for token in tokenizer.sp.encode(text):
        delta, stopped = reply.add(token)
        streamed += delta
        if stopped:
            break
    message, tail = reply.finish()
    expected = text.strip()
    for s in stop:
        expected = expected.split(s)[0].strip() if s in expected else expected
    assert streamed + tail == message["content"] == expected


def test_the_tool_protocol(golden):
    tools = [{"type": "function", "function": {"name": "f", "parameters": {}}}]
    history, query, role = chat.history_from_openai(
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"},
         {"role": "assistant", "tool_calls": [{"id": "1", "type": "function",
                                               "function": {"name": "f", "arguments": '{"x": [1, "a"]}'}}]},
         {"role": "tool", "content": "42"}], tools)
    # The official demo's order: ChatGLM3's tool prompt with the tools, then the caller's system message.
    assert history == [{"role": "system", "content": None, "tools": [tools[0]["function"]]},
                       {"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"},
                       {"role": "assistant", "metadata": "f", "content": "```python\ntool_call(x=[1, 'a'])\n```"}]
    assert (query, role) == ("42", "observation")
    assert chat.parse_tool_call("```python\ntool_call(x=[1, 'a'], y={'k': None})\n```") == {"x": [1, "a"],
                                                                                          "y": {"k": None}}
    for body in ("tool_call(x={1, 2})", "tool_call(x=b'1')", "tool_call(x=1e999)", "tool_call(1)",
                 "tool_call(x=__import__('os').system('touch /tmp/pwned'))", "print(1)", "tool_call(**{'a': 1})"):
        assert chat.parse_tool_call(f"```python\n{body}\n```") is None, body


def test_a_public_bind_needs_a_key(golden, tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("TUNEPORT_API_KEY", raising=False)
    assert main(["serve", "--model", str(golden / "checkpoint"), "--host", "0.0.0.0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--host 0.0.0.0: not a loopback address" in err[0] and "TUNEPORT_API_KEY" in err[0]
    assert is_local("127.0.0.1") and is_local("::1") and is_local("localhost") and is_local("127.0.0.2")
    assert not is_local("0.0.0.0") and not is_local("10.1.2.3") and not is_local("::") and not is_local("example.com")


TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Current weather of a city",
                                           "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                                          "required": ["city"]}}}]
TOOL_DATA = [
    {"tools": [TOOLS[0]["function"]], "conversations": [
        {"role": "user", "content": "What is the weather in Paris?"},
        {"role": "assistant", "metadata": "get_weather", "content": "```python\ntool_call(city='Paris')\n```"},
        {"role": "observation", "content": '{"temperature": 21}'},
        {"role": "assistant", "content": "It is 21 degrees in Paris."}]},
    {"conversations": [{"role": "user", "content": "Who are you?"},
                       {"role": "assistant", "content": "I am a tuned demo model."}]},
]


def test_tool_call_round_trip_with_a_model_trained_to_call_a_tool(tmp_path):
    base = tmp_path / "base"
    build_model_folder("demo", base)
    config = json.loads((base / "config.json").read_text())
    config["seq_length"] = 2048  # the demo's context is 256; the tool prompt alone is 373 tokens (no weight changes)
    (base / "config.json").write_text(json.dumps(config))
    data = tmp_path / "tools.jsonl"
    data.write_text("".join(json.dumps(record) + "\n" for record in TOOL_DATA))
    run = tmp_path / "run"
    assert main(["train", "builtin:demo.yaml", f"model={base}", f"data.train={data}", "data.max_input_length=1024",
                 "data.max_output_length=128", "train.max_steps=150", "train.micro_batch_size=2",
                 f"output_dir={run}"]) == 0
    with server(tmp_path, "--model", str(base), "--adapter", str(run / "adapter"), "--device", "cpu") as (url, _):
        c = client(url)
        messages = [{"role": "user", "content": "What is the weather in Paris?"}]
        first = c.chat.completions.create(model="base", messages=messages, tools=TOOLS, temperature=0)
        assert first.choices[0].finish_reason == "tool_calls"
        (call,) = first.choices[0].message.tool_calls
        assert call.function.name == "get_weather" and json.loads(call.function.arguments) == {"city": "Paris"}
        chunks = list(c.chat.completions.create(model="base", messages=messages, tools=TOOLS, temperature=0,
                                                stream=True))
        streamed = [tc for ch in chunks for tc in ch.choices[0].delta.tool_calls or []]
        assert [(tc.function.name, json.loads(tc.function.arguments)) for tc in streamed] == [("get_weather", {"city": "Paris"})]
        assert chunks[-1].choices[0].finish_reason == "tool_calls"
        messages += [first.choices[0].message.model_dump(exclude_none=True),
                     {"role": "tool", "tool_call_id": call.id, "content": '{"temperature": 21}'}]
        second = c.chat.completions.create(model="base", messages=messages, tools=TOOLS, temperature=0)
        assert second.choices[0].message.content == "It is 21 degrees in Paris."
        assert second.choices[0].finish_reason == "stop"
        plain = c.chat.completions.create(model="base", messages=[{"role": "user", "content": "Who are you?"}],
                                          temperature=0)
        assert plain.choices[0].message.content == "I am a tuned demo model." and not plain.choices[0].message.tool_calls


def resident_bytes(pid: int) -> int:
    """The resident memory of process `pid` (VmRSS of /proc/PID/status)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for process {pid}")


def request_once(url: str, i: int) -> tuple[int, Optional[str]]:
    """One short chat request (prompts of several lengths, 6 new tokens): (status, its Retry-After header)."""
    prompt = PROMPTS[i % len(PROMPTS)] * (1 + i % 5)
    body = json.dumps({"model": "checkpoint", "messages": [{"role": "user", "content": prompt}], "max_tokens": 6,
                       "temperature": 0}).encode()
    request = urllib.request.Request(f"{url}/v1/chat/completions", data=body, method="POST",
                                     headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as r:
            json.loads(r.read())
            return r.status, None
    except urllib.error.HTTPError as e:
        e.read()
        return e.code, e.headers.get("Retry-After")


@pytest.mark.slow
def test_a_soak_of_700_requests_keeps_memory_flat_and_every_answer_200_or_503(golden, tmp_path):
    """500 sequential then 200 concurrent requests (32 at a time against a queue of 4), all on localhost and
    bounded: resident memory after them is within 5% of resident memory after the first 50, and every
    response is a 200 or a 503 that says when to retry."""
    with serving(tmp_path, "--model", str(golden / "checkpoint"), "--device", "cpu", "--api-key", KEY,
                 "--max-queue", "4") as (url, log, process):
        statuses = [request_once(url, i) for i in range(50)]
        warm = resident_bytes(process.pid)
        statuses += [request_once(url, i) for i in range(50, 500)]
        assert {status for status, _ in statuses} == {200}  # one at a time never waits past the queue
        with ThreadPoolExecutor(32) as pool:
            burst = list(pool.map(lambda i: request_once(url, i), range(500, 700)))
        after = resident_bytes(process.pid)
        assert process.poll() is None, log.read_text()[-3000:]
    assert all(status == 200 or (status == 503 and retry == "1") for status, retry in burst), burst
    assert sum(status == 200 for status, _ in burst) >= 1 + 4  # at least the running request and a full queue
    print(f"resident memory: {warm / 2**20:.1f} MiB after 50 requests, {after / 2**20:.1f} MiB after 700 "
          f"({after / warm - 1:+.2%}); the burst: {sum(s == 200 for s, _ in burst)} answered, "
          f"{sum(s == 503 for s, _ in burst)} told to retry")
    assert abs(after / warm - 1) <= 0.05


def test_admission_takes_the_running_request_and_a_full_queue_then_refuses_until_one_finishes():
    admission = Admission(max_queue=2)
    for _ in range(3):  # the running one and two waiting
        admission.admit()
    with pytest.raises(ApiError) as refused:
        admission.admit()
    assert refused.value.status == 503 and "--max-queue" in refused.value.message
    admission.release()
    admission.admit()
    assert admission.pending == 3
