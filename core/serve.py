"""`tuneport serve`: an OpenAI-compatible chat server for a base model and an optional tuned adapter.

Endpoints: `POST /v1/chat/completions` (streaming with server-sent events, or not), `GET /v1/models`,
`GET /health`. Tool calls follow the model family's chat protocol (ChatGLM3: the official OpenAI API
demo's). One worker thread runs the model, so requests never share a cache or a random generator;
waiting requests queue up to `--max-queue`, and past that the server answers 503. Errors are OpenAI's
JSON. It binds to localhost unless given an API key, which every request must then carry.

For many users on one machine, serve the exported model (`tuneport export`) with an engine that reads
the official layout (vLLM, vllm-ascend, MindIE); see the README.
"""


import asyncio
import contextlib
import hmac
import ipaddress
import json
import logging
import secrets
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

from .errors import RunError
from .loading import open_model, tuned_model
from ..models import family_for

log = logging.getLogger("tuneport.serve")
API_KEY_ENV = "TUNEPORT_API_KEY"
LOCAL_HOSTS = ("localhost",)


@dataclass(frozen=True)
class Limits:
    """What one request may ask for."""

    max_tokens: int = 1024  # the largest max_tokens a request may ask for (and the default)
    max_queue: int = 16  # requests waiting behind the one running
    max_request_bytes: int = 1 << 20
    max_model_len: int = 8192  # prompt plus reply, in tokens


class ApiError(Exception):
    """An error answered as OpenAI's JSON: {"error": {"message", "type", "param", "code"}}."""

    TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
             413: "invalid_request_error", 503: "server_busy", 500: "server_error"}

    def __init__(self, status: int, message: str, param: Optional[str] = None, code: Optional[str] = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.TYPES.get(self.status, "invalid_request_error"),
                          "param": self.param, "code": self.code}}


@dataclass
class Job:
    """One chat completion request, parsed and tokenized."""

    prompt_ids: list[int]
    max_tokens: int
    temperature: float
    top_p: float
    seed: int
    stop: list[str]
    tools: bool
    stream: bool
    prompt_text: str = ""
    id: str = field(default_factory=lambda: f"chatcmpl-{secrets.token_hex(12)}")
    created: int = field(default_factory=lambda: int(time.time()))
    started: float = field(default_factory=time.perf_counter)  # latency counts the wait in the queue


def is_local(host: str) -> bool:
    """Whether `host` is a loopback address (the only binds allowed without an API key)."""
    if host in LOCAL_HOSTS:
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _field(payload: dict, name: str, kind, default, need: str, check: Callable = lambda v: True):
    """payload[name] (default when absent or null), or ApiError 400 when it is not a `kind` passing `check`."""
    value = payload.get(name, default)
    if value is None:
        return default
    wrong_type = not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool)
    if wrong_type or not check(value):
        raise ApiError(400, f"{name}: {json.dumps(value)[:80]} is not valid; expected {need}", param=name)
    return value


class Engine:
    """The model, its tokenizer and chat protocol, and the generation loop (run on the worker thread)."""

    def __init__(self, model, tokenizer, chat, name: str, limits: Limits, log_prompts: bool = False, device: str = ""):
        self.model, self.tokenizer, self.chat, self.name, self.limits = model, tokenizer, chat, name, limits
        self.device = device  # its name, as the user gave it (cpu, cuda:1, ...)
        self.stop_ids = set(tokenizer.stop_token_ids)
        self.log_prompts = log_prompts

    # --- requests (event loop) ----------------------------------------------------------------------
    def parse(self, body: bytes) -> Job:
        """A request body as a Job; every problem is an ApiError 400 (404 for another model's name)."""
        try:
            payload = json.loads(body)
        except (ValueError, RecursionError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
            raise ApiError(400, f"the body is not valid JSON ({getattr(e, 'msg', e)})") from None
        if not isinstance(payload, dict):
            raise ApiError(400, "the body must be a JSON object")
        model = payload.get("model")
        if model not in (None, self.name):
            raise ApiError(404, f"model {model!r} is not served here; GET /v1/models lists {self.name!r}",
                           param="model", code="model_not_found")
        _field(payload, "n", int, 1, "1 (one choice per request)", lambda v: v == 1)
        tools = None if payload.get("tool_choice") == "none" else payload.get("tools")
        try:
            history, query, role = self.chat.history_from_openai(payload.get("messages"), tools)
        except self.chat.ChatFormatError as e:
            raise ApiError(400, str(e), param="messages") from None
        prompt_ids = self.tokenizer.build_chat_input(query, history=history, role=role)["input_ids"][0].tolist()
        limits = self.limits
        room = limits.max_model_len - len(prompt_ids)
        if room < 1:
            raise ApiError(400, f"the prompt is {len(prompt_ids)} tokens; this server takes at most "
                           f"{limits.max_model_len - 1} (context {limits.max_model_len}: --max-model-len, at most the "
                           "model's seq_length); shorten the messages",
                           param="messages", code="context_length_exceeded")
        cap = f"an integer from 1 to {limits.max_tokens} (--max-tokens)"
        max_tokens = _field(payload, "max_tokens", int, None, cap, lambda v: 1 <= v <= limits.max_tokens)
        max_tokens = _field(payload, "max_completion_tokens", int, max_tokens, cap, lambda v: 1 <= v <= limits.max_tokens)
        if max_tokens is not None and max_tokens > room:
            raise ApiError(400, f"the prompt is {len(prompt_ids)} tokens and max_tokens {max_tokens}: more than the "
                           f"{limits.max_model_len}-token context this server takes; ask for at most {room}",
                           param="max_tokens", code="context_length_exceeded")
        stop = payload.get("stop")
        stop = [stop] if isinstance(stop, str) else stop or []
        if not (isinstance(stop, list) and len(stop) <= 4 and all(isinstance(s, str) and s for s in stop)):
            raise ApiError(400, "stop: expected a string or a list of up to 4 non-empty strings", param="stop")
        return Job(
            prompt_ids=prompt_ids,
            max_tokens=max_tokens or min(limits.max_tokens, room),
            temperature=float(_field(payload, "temperature", (int, float), 1.0, "0 to 2", lambda v: 0 <= v <= 2)),
            top_p=float(_field(payload, "top_p", (int, float), 1.0, "a number in (0, 1]", lambda v: 0 < v <= 1)),
            seed=_field(payload, "seed", int, secrets.randbits(63), "an integer from 0 to 2**63 - 1",
                        lambda v: 0 <= v < 2**63),
            stop=stop, tools=bool(tools),
            stream=_field(payload, "stream", bool, False, "true or false"),
            prompt_text=json.dumps(payload.get("messages"), ensure_ascii=False) if self.log_prompts else "",
        )

    # --- generation (worker thread) -----------------------------------------------------------------
    def tokens(self, job: Job, cancelled: threading.Event):
        """Generated token ids, one at a time, ending at a stop token, max_tokens, or cancellation."""
        import torch

        device = self.model.device
        generator = torch.Generator(device=device).manual_seed(job.seed)
        with torch.inference_mode():
            out = self.model(input_ids=torch.tensor([job.prompt_ids], device=device), use_cache=True, logits_to_keep=1)
            for i in range(job.max_tokens):
                token = pick(out.logits[0, -1].float(), job.temperature, job.top_p, generator)
                yield token
                if token in self.stop_ids or cancelled.is_set() or i + 1 == job.max_tokens:
                    return
                out = self.model(input_ids=torch.tensor([[token]], device=device), past_key_values=out.cache,
                                 use_cache=True)

    def run(self, job: Job, emit: Callable[[dict], None], cancelled: threading.Event) -> dict:
        """Generate the reply; `emit` gets each content delta ({"content": text}); returns the final
        message, finish_reason and usage."""
        reply = Reply(self.tokenizer, self.chat, job.stop, job.tools)
        count, finish = 0, "length"
        for token in self.tokens(job, cancelled):
            count += 1
            if token in self.stop_ids:
                finish = "stop"
                break
            delta, stopped = reply.add(token)
            if delta:
                emit({"content": delta})
            if stopped:
                finish = "stop"
                break
        message, tail = reply.finish()
        if tail:
            emit({"content": tail})
        if message.get("tool_calls"):
            finish = "tool_calls"
        elif cancelled.is_set() and finish == "length":
            finish = "cancelled"  # the client went away; logged, never sent
        usage = {"prompt_tokens": len(job.prompt_ids), "completion_tokens": count,
                 "total_tokens": len(job.prompt_ids) + count}
        prompt = f" prompt={job.prompt_text}" if self.log_prompts else ""
        log.info("%s finish=%s prompt_tokens=%d completion_tokens=%d latency_s=%.3f%s", job.id, finish,
                 usage["prompt_tokens"], count, time.perf_counter() - job.started, prompt)
        return {"message": message, "finish_reason": finish, "usage": usage}


def pick(logits, temperature: float, top_p: float, generator) -> int:
    """The next token: greedy at temperature 0 (below 1e-5), else sampled from the top-p nucleus."""
    import torch

    if temperature < 1e-5:
        return int(logits.argmax())
    probs = torch.softmax(logits / temperature, dim=-1)
    if top_p < 1.0:
        sorted_probs, order = probs.sort(descending=True)
        keep = sorted_probs.cumsum(0) - sorted_probs < top_p  # the smallest set reaching top_p
        probs = torch.zeros_like(probs).scatter(0, order[keep], sorted_probs[keep])
    return int(torch.multinomial(probs, 1, generator=generator))


class Reply:
    """Generated tokens as the reply: content deltas to stream (stop strings and trailing space held
    back until they are settled) and, at the end, the message with content or a tool call.

    With tools in the request, a reply whose first line names a tool is held to the end and parsed by
    the family's chat protocol; one that does not parse is answered as plain text.
    """

    def __init__(self, tokenizer, chat, stop: list[str], tools: bool):
        self.tokenizer, self.chat, self.stop, self.tools = tokenizer, chat, stop, tools
        self.ids: list[int] = []
        self.text = ""
        self.sent = ""

    def _visible(self) -> Optional[str]:
        """The answer so far; None while it may still be a tool call."""
        if not self.tools:
            return self.text.lstrip()
        split = self.chat.split_reply(self.text)
        return None if split is None or split[0] else split[1].lstrip()

    def _settled(self, content: str) -> str:
        """`content` without its trailing space and without an ending that may begin a stop string."""
        content = content.rstrip()
        for stop in self.stop:
            for k in range(min(len(stop) - 1, len(content)), 0, -1):
                if content.endswith(stop[:k]):
                    content = content[:-k].rstrip()
                    break
        return content

    def _cut(self, content: str) -> tuple[str, bool]:
        """`content` up to the first stop string, and whether there was one."""
        ends = [i for i in (content.find(s) for s in self.stop) if i >= 0]
        return (content[:min(ends)], True) if ends else (content, False)

    def add(self, token: int) -> tuple[str, bool]:
        """Take one token; returns (text to stream now, whether a stop string ended the reply)."""
        self.ids.append(token)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if text.endswith("\ufffd"):  # half of a multi-byte character
            return "", False
        self.text = text
        visible = self._visible()
        if visible is None:
            return "", False
        safe, stopped = self._cut(visible)
        safe = safe.rstrip() if stopped else self._settled(safe)
        if not safe.startswith(self.sent):
            return "", stopped
        delta, self.sent = safe[len(self.sent):], safe
        return delta, stopped

    def finish(self) -> tuple[dict, str]:
        """(the assistant message, the content not yet streamed)."""
        split = self.chat.split_reply(self.text) if self.tools else None
        arguments = self.chat.parse_tool_call(split[1]) if split is not None and split[0] else None
        if arguments is not None:
            call = {"id": f"call_{secrets.token_hex(12)}", "type": "function",
                    "function": {"name": split[0], "arguments": json.dumps(arguments, ensure_ascii=False)}}
            return {"role": "assistant", "content": None, "tool_calls": [call]}, ""
        visible = self._visible()
        content = self._cut(self.text.lstrip() if visible is None else visible)[0].strip()
        tail = content[len(self.sent):] if content.startswith(self.sent) else ""
        return {"role": "assistant", "content": content}, tail


# --- the web application ----------------------------------------------------------------------------------
class Admission:
    """Who may wait for the one model thread: the running request and up to `max_queue` behind it; past that,
    a request is refused with 503. Admitted on the event loop, released from the worker's callback."""

    def __init__(self, max_queue: int):
        self.max_queue = max_queue
        self.pending = 0  # admitted and not finished: the running one plus the queue
        self._lock = threading.Lock()

    def admit(self) -> None:
        """Take a place, or raise ApiError 503 (`Retry-After`) when the queue is full."""
        with self._lock:
            if self.pending > self.max_queue:
                raise ApiError(503, f"the server is busy: {self.max_queue} requests are waiting (--max-queue); "
                                    "retry later", code="queue_full")
            self.pending += 1

    def release(self) -> None:
        with self._lock:
            self.pending -= 1


def create_app(engine: Engine, api_key: Optional[str]):
    """The FastAPI application serving `engine`; `api_key`, when given, is required of every request."""
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse, StreamingResponse
    from starlette.exceptions import HTTPException

    app = FastAPI(title="tuneport", docs_url=None, redoc_url=None, openapi_url=None)
    worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tuneport-model")
    limits = engine.limits
    admission = Admission(limits.max_queue)

    def too_big() -> ApiError:
        return ApiError(413, f"the request is larger than {limits.max_request_bytes} bytes, the most this server "
                             "takes (--max-request-bytes)")

    def error(e: ApiError, request: Optional[Request] = None) -> JSONResponse:
        """The error's JSON answer, and its log line (status and message; never the request's messages)."""
        where = f"{request.method} {request.url.path}" if request is not None else ""
        log.info("rejected %s status=%d %s", where, e.status, e.message)
        headers = {"Retry-After": "1"} if e.status == 503 else None
        return JSONResponse(e.body(), status_code=e.status, headers=headers)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, e: HTTPException):
        return error(ApiError(e.status_code, str(e.detail)), request)

    @app.exception_handler(Exception)
    async def server_error(request: Request, e: Exception):
        log.exception("request failed")
        return error(ApiError(500, f"internal error ({type(e).__name__}); see the server log"), request)

    @app.middleware("http")
    async def guard(request: Request, call_next):
        if api_key is not None:
            scheme, _, token = request.headers.get("authorization", "").partition(" ")
            if not (scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), api_key.encode())):
                return error(ApiError(401, "invalid or missing API key: send 'Authorization: Bearer KEY'",
                                      code="invalid_api_key"), request)
        size = request.headers.get("content-length")
        if size is not None and (not size.isdigit() or int(size) > limits.max_request_bytes):
            return error(too_big(), request)
        return await call_next(request)

    async def read_body(request: Request) -> bytes:
        """The body, read no further than the limit (a chunked body has no Content-Length to check)."""
        body = bytearray()
        async for piece in request.stream():
            body += piece
            if len(body) > limits.max_request_bytes:
                raise too_big()
        return bytes(body)

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": engine.name, "pending": admission.pending}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": engine.name, "object": "model", "created": 0,
                                            "owned_by": "tuneport"}]}

    def chunk(job: Job, delta: dict, finish: Optional[str] = None) -> str:
        body = {"id": job.id, "object": "chat.completion.chunk", "created": job.created, "model": engine.name,
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
        return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        try:
            job = engine.parse(await read_body(request))
            admission.admit()
        except ApiError as e:
            return error(e, request)
        events = run_job(engine, job, worker, admission.release)
        if not job.stream:
            async for kind, item in events:
                if kind == "tick" and await request.is_disconnected():  # frees its place in the queue
                    await events.aclose()
                    return None
                if kind == "done":
                    result = item.result()
            return {"id": job.id, "object": "chat.completion", "created": job.created, "model": engine.name,
                    "choices": [{"index": 0, "message": result["message"], "finish_reason": result["finish_reason"]}],
                    "usage": result["usage"]}

        async def stream():
            async with contextlib.aclosing(events):  # a client that went away stops the generation
                yield chunk(job, {"role": "assistant", "content": ""})
                async for kind, item in events:
                    if kind == "delta":
                        yield chunk(job, item)
                    elif kind == "done" and item.exception() is not None:
                        log.error("%s failed: %r", job.id, item.exception())
                        failure = ApiError(500, "internal error during generation; see the server log")
                        yield f"data: {json.dumps(failure.body())}\n\n"
                    elif kind == "done":
                        result = item.result()
                        calls = result["message"].get("tool_calls")
                        if calls:
                            yield chunk(job, {"tool_calls": [{"index": i, **c} for i, c in enumerate(calls)]})
                        yield chunk(job, {}, result["finish_reason"])
                        yield "data: [DONE]\n\n"

        return StreamingResponse(stream(), media_type="text/event-stream")

    return app


async def run_job(engine: Engine, job: Job, worker: ThreadPoolExecutor, release: Callable[[], None] = lambda: None):
    """Generate `job`'s reply on `worker` (the one model thread), from the event loop. Yields ("delta", {"content":
    text}) as a streamed reply grows, ("tick", None) every half second without news (to check the client is still
    there), and last ("done", the future of the result: message, finish_reason, usage). `release` runs when the
    generation ends. Closing the generator early stops the generation at its next token."""
    loop = asyncio.get_running_loop()
    cancelled = threading.Event()
    events: asyncio.Queue = asyncio.Queue()

    def put(item) -> None:  # from the worker thread
        loop.call_soon_threadsafe(events.put_nowait, item)

    def finished(future) -> None:
        release()
        put(("done", future))

    emit = (lambda delta: put(("delta", delta))) if job.stream else (lambda delta: None)
    loop.run_in_executor(worker, engine.run, job, emit, cancelled).add_done_callback(finished)
    try:
        while True:
            try:
                kind, item = await asyncio.wait_for(events.get(), 0.5)
            except asyncio.TimeoutError:
                kind, item = "tick", None
            yield kind, item
            if kind == "done":
                return
    finally:
        cancelled.set()


def load_engine(model: Path, adapter: Optional[Path], device: str, limits: Limits, name: Optional[str] = None,
                log_prompts: bool = False) -> Engine:
    """The model with its tuned result merged where its method allows, ready to serve; `limits.max_model_len` is
    lowered to the model's context.

    Raises:
        RunError: a bad device, or a family that cannot serve.
        CheckpointError: a bad model or adapter.
    """
    family_for(model).require("serve", f"tuneport serve --model {model}")
    opened = open_model(model, device, adapter)
    tuned = tuned_model(opened, adapter, merge=True)  # served as it is where its method cannot merge
    context = getattr(opened.config, "max_position_embeddings", None) or limits.max_model_len
    limits = Limits(limits.max_tokens, limits.max_queue, limits.max_request_bytes, min(limits.max_model_len, context))
    return Engine(tuned, opened.tokenizer, opened.family.chat(), name or model.resolve().name, limits, log_prompts,
                  opened.device)


def check_listen(command: str, host: str, port: int, key: Optional[str], needs: str, key_env: str) -> str:
    """Before anything is loaded: a host that is not loopback needs a key (`needs` says which option gives it),
    FastAPI and uvicorn (the `command` extra) must be installed, and the port must be free. Returns the host
    without the brackets of a URL ([::1]).

    Raises:
        RunError: saying which of them failed, and the fix.
    """
    import importlib.util

    host = host.strip("[]")
    if not is_local(host) and not key:
        raise RunError(f"--host {host}: not a loopback address, so {needs} or set {key_env} (or bind to 127.0.0.1)")
    missing = [m for m in ("fastapi", "uvicorn") if importlib.util.find_spec(m) is None]
    if missing:
        raise RunError(f"tuneport {command} needs {' and '.join(missing)}: pip install 'tuneport[{command}]'")
    check_port(host, port)
    return host


def check_port(host: str, port: int) -> None:
    """RunError if `host:port` cannot be bound, found before the model is loaded."""
    import socket

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as e:
            raise RunError(f"--host {host} --port {port}: cannot listen there ({e.strerror}); choose another "
                           "--port, or stop what is using it") from None


def serve(model: Path, adapter: Optional[Path], device: str, host: str, port: int, api_key: Optional[str],
          limits: Limits, name: Optional[str] = None, log_prompts: bool = False) -> int:
    """Load the model and serve it until interrupted.

    Args:
        model: the base checkpoint folder (or an export).
        adapter: a tuned result for it, or None.
        device: "auto" or a registered device name.
        host, port: where to listen; a host that is not loopback needs `api_key`.
        api_key: the key every request must send, or None (loopback only).
        limits: the request limits (`max_model_len` is lowered to the model's seq_length).
        name: the model id clients use (default: the folder's name).
        log_prompts: log each request's messages.

    Returns:
        0 once the server has stopped.

    Raises:
        RunError: a public bind without a key, a missing extra, a busy port, or a bad device.
        CheckpointError: a bad model or adapter.
    """
    host = check_listen("serve", host, port, api_key, "the server needs an API key: pass --api-key KEY", API_KEY_ENV)
    engine = load_engine(model, adapter, device, limits, name, log_prompts)
    limits = engine.limits

    import uvicorn

    shown = f"[{host}]" if ":" in host else host
    print(f"tuneport serve: {engine.name} on http://{shown}:{port}/v1 ({engine.device}; queue {limits.max_queue}, "
          f"max_tokens {limits.max_tokens}, context {limits.max_model_len})", flush=True)
    uvicorn.run(create_app(engine, api_key), host=host, port=port, log_level="warning", access_log=False)
    return 0
