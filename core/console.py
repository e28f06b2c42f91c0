"""`tuneport console`: a local web page to start, watch, compare and try the runs under one folder.

Everything it shows is read from the run folders (core/runs.py); it keeps no state of its own. It starts
`tuneport train` (and `tuneport estimate`) as child processes, the command line's own code path: the same
validation, lock and folder rules, and the same one-line errors. Stop sends the run SIGINT, so it saves a
checkpoint and can be resumed. Chat loads a run's adapter (or its base) on demand through `tuneport serve`'s
engine, and unloads it when idle.

The page and its assets ship in the package (core/console_static/): nothing is fetched from another host, and
the Content-Security-Policy forbids the browser to. Security is `tuneport serve`'s: localhost by default, a key
for any other address (sent as `Authorization: Bearer KEY`, or once as `/?key=KEY`, which sets a cookie), and
bounded request sizes. A request naming another Host (DNS rebinding) or posting from another Origin is refused.
"""


import asyncio
import contextlib
import hmac
import json
import logging
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from ..backends import available_backends
from . import runs
from .config import BUILTIN
from .errors import RunError
from .rundir import read_json_object
from .serve import ApiError, Limits, check_listen, is_local, load_engine, run_job

log = logging.getLogger("tuneport.console")
KEY_ENV = "TUNEPORT_CONSOLE_KEY"
COOKIE = "tuneport_console_key"
STATIC = Path(__file__).with_name("console_static")
RECIPES = Path(__file__).resolve().parent.parent / "recipes"
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
MAX_REQUEST_BYTES = 1 << 20
STARTED_WITHIN_S = 600  # a start that neither fails nor takes its folder's lock by then is reported as starting
CSP = ("default-src 'self'; img-src 'self' data:; style-src 'self' 'unsafe-inline'; connect-src 'self'; "
       "frame-ancestors 'none'; base-uri 'none'; form-action 'self'")


@dataclass
class Child:
    """A command the console started: its process and its output (an unlinked temporary file the child keeps
    writing to after the console is gone, so a run outlives the console)."""

    process: subprocess.Popen
    output: int  # the file descriptor, read with pread so that the child's write offset never moves
    argv: list

    def tail(self, size: int = 16384) -> str:
        end = os.fstat(self.output).st_size
        text = os.pread(self.output, size, max(0, end - size)).decode(errors="replace")
        return "\n".join(line.rsplit("\r", 1)[-1] for line in text.splitlines())  # a progress bar's last state

    def error(self) -> str:
        """The command's `error:` lines (its one-line errors), or the end of its output."""
        lines = self.tail().splitlines()
        errors = [line for line in lines if line.startswith("error:")]
        return "\n".join(errors) or "\n".join(lines[-5:]) or f"exit status {self.process.returncode}"


def start_child(argv: list[str]) -> Child:
    output = tempfile.TemporaryFile()
    process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=output, stderr=subprocess.STDOUT,
                               start_new_session=True,  # the console's Ctrl-C is not the run's
                               env={**os.environ, "PYTHONUNBUFFERED": "1"})
    fd = os.dup(output.fileno())
    output.close()
    return Child(process, fd, argv)


def tuneport_argv(*args: str) -> list[str]:
    """The `tuneport` command line, run by this Python (its environment's tuneport)."""
    return [sys.executable, "-m", "tuneport.core.entry", *args]


@dataclass
class Loaded:
    engine: object
    used: float = field(default_factory=time.monotonic)


class Console:
    """The run folders under `root`, the commands started from the page, and the models loaded for chat."""

    def __init__(self, root: Path, device: str, unload_after_s: float):
        self.root, self.device, self.unload_after_s = root.resolve(), device, unload_after_s
        self.children: dict[Path, Child] = {}
        self.models: dict[tuple, Loaded] = {}
        self.worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tuneport-chat")  # one model thread

    # --- runs ------------------------------------------------------------------------------------------
    def folder(self, name: str) -> Path:
        """The run folder `name` under RUNS_DIR; a 404 otherwise, with the error of the command started here for it
        (a new run that fails before training removes the folder it made)."""
        try:
            return runs.run_folder(self.root, name)
        except runs.RunNotFound as e:
            child = self.children.get(self.root / name)
            failed = child is not None and child.process.poll() not in (None, 0)
            raise ApiError(404, f"{e}; the command started here for it failed: {child.error()}" if failed else str(e)) \
                from None

    def list_runs(self) -> list[dict]:
        for child in self.children.values():
            child.process.poll()  # collect the exit status of those that ended
        return [runs.summary(self.root, f) for f in runs.find_runs(self.root)]

    def details(self, name: str) -> dict:
        folder = self.folder(name)
        found = runs.details(self.root, folder)
        child = self.children.get(folder)
        if child is not None:
            found["output"] = child.tail(4096)
        return found

    def recipes(self) -> list[dict]:
        """The shipped recipes, and each run's recipe.yaml (a run's recipe, to start another like it)."""
        shipped = [{"value": f"{BUILTIN}{p.name}", "label": f"shipped: {p.name}"} for p in sorted(RECIPES.glob("*.yaml"))]
        saved = [{"value": str(f / "recipe.yaml"), "label": f"run: {f.relative_to(self.root).as_posix()}"}
                 for f in runs.find_runs(self.root) if (f / "recipe.yaml").is_file()]
        return shipped + saved

    def recipe_argument(self, value: str) -> str:
        if value not in {r["value"] for r in self.recipes()}:
            raise ApiError(400, f"recipe: {value!r} is not a shipped recipe or a run's recipe.yaml under {self.root}")
        return value

    def command_arguments(self, body: dict) -> list[str]:
        """A start or estimate form as `tuneport` arguments: the recipe, then each override (one `key=value` per
        line), the model folder and data file as overrides, and --device."""
        overrides = [line.strip() for line in str(body.get("overrides") or "").splitlines() if line.strip()]
        for line in overrides:
            key = line.partition("=")[0].strip()
            if "=" not in line or not key:
                raise ApiError(400, f"overrides: {line!r} is not key=value (one per line, e.g. train.lr=1e-4)")
            if key == "output_dir":
                raise ApiError(400, "overrides: output_dir is the run's name here; give the name instead")
        for key, name in (("model", "model"), ("data", "data.train")):
            if str(body.get(key) or "").strip():
                overrides.append(f"{name}={str(body[key]).strip()}")
        device = str(body.get("device") or "").strip()
        return [self.recipe_argument(str(body.get("recipe", ""))), *overrides, *(["--device", device] if device else [])]

    async def start(self, body: dict) -> dict:
        """Start `tuneport train` into RUNS_DIR/NAME; answers once it holds its folder's lock, or with its error."""
        name = str(body.get("name") or "").strip()
        if not NAME.match(name):
            raise ApiError(400, f"name: {name!r}: use letters, digits, '.', '_' and '-' (up to 64), e.g. lora-lr2e-4")
        folder = self.root / name
        argv = tuneport_argv("train", *self.command_arguments(body), f"output_dir={folder}")
        return await self.launch(folder, argv, name)

    async def resume(self, name: str) -> dict:
        folder = self.folder(name)
        return await self.launch(folder, tuneport_argv("train", "--resume", str(folder)), name)

    async def launch(self, folder: Path, argv: list[str], name: str) -> dict:
        """Start the command; its own checks (the folder's lock among them) refuse what may not run."""
        child = start_child(argv)
        earlier = self.children.get(folder)
        if earlier is not None:
            os.close(earlier.output)
        self.children[folder] = child
        log.info("started %s (PID %d)", " ".join(argv[2:]), child.process.pid)
        deadline = time.monotonic() + STARTED_WITHIN_S
        while time.monotonic() < deadline:
            if child.process.poll() is not None:
                if child.process.returncode == 0:  # finished already (a very short run)
                    return {"name": name, "pid": child.process.pid, "status": "finished"}
                raise ApiError(400, child.error())
            if runs.lock_holder(folder) == child.process.pid:
                return {"name": name, "pid": child.process.pid, "status": "running"}
            await asyncio.sleep(0.1)
        return {"name": name, "pid": child.process.pid, "status": "starting"}

    def stop(self, name: str) -> dict:
        folder = self.folder(name)
        pid = runs.lock_holder(folder)
        if pid is None or pid <= 0:
            raise ApiError(409, f"{name}: not running")
        os.kill(pid, signal.SIGINT)  # the run saves a checkpoint after its current step, and can be resumed
        return {"name": name, "pid": pid, "signal": "SIGINT"}

    async def estimate(self, body: dict) -> dict:
        """`tuneport estimate` for the start form: its table, and whether the recipe fits `memory`."""
        memory = str(body.get("memory") or "").strip()
        argv = tuneport_argv("estimate", *self.command_arguments(body), *(["--memory", memory] if memory else []))
        process = await asyncio.create_subprocess_exec(*argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                                       stdin=subprocess.DEVNULL)
        out, err = await process.communicate()
        text, errors = out.decode(errors="replace"), err.decode(errors="replace").splitlines()
        if process.returncode not in (0, 1):
            raise ApiError(400, "\n".join(line for line in errors if line.startswith("error:")) or "\n".join(errors[-5:]))
        return {"output": text, "fits": None if not memory else process.returncode == 0}

    # --- chat ------------------------------------------------------------------------------------------
    def engine(self, folder: Path, side: str):
        """The run's adapter (side "adapter") or its base ("base") ready to generate, loaded on first use."""
        model = read_json_object(folder / "run.json").get("model_dir")
        adapter = folder / "adapter" if side == "adapter" else None
        if not model or not Path(model).is_dir():
            raise ApiError(400, f"{folder.name}: run.json names no model folder that exists here ({model})")
        if adapter is not None and not adapter.is_dir():
            raise ApiError(400, f"{folder.name}: has no adapter yet (it is written when the run finishes)")
        key = (model, str(adapter))
        if key not in self.models:
            engine = load_engine(Path(model), adapter, self.device, Limits(max_tokens=512), name=f"{folder.name}:{side}")
            self.models[key] = Loaded(engine)
        loaded = self.models[key]
        loaded.used = time.monotonic()
        return loaded.engine

    def unload_idle(self) -> None:
        now = time.monotonic()
        for key in [k for k, m in self.models.items() if now - m.used > self.unload_after_s]:
            log.info("unloaded %s after %.0f s idle", self.models[key].engine.name, self.unload_after_s)
            del self.models[key]


def create_app(console: Console, key: Optional[str], allowed_hosts: Optional[set]):
    """The FastAPI application. `key`: required of every request when given. `allowed_hosts`: the Host header
    values accepted (None: any, for a bind to every address, where the key guards)."""
    from fastapi import FastAPI, Request
    from fastapi.responses import FileResponse, JSONResponse, RedirectResponse, StreamingResponse
    from fastapi.staticfiles import StaticFiles
    from starlette.exceptions import HTTPException

    @contextlib.asynccontextmanager
    async def lifespan(app):
        async def unload():
            while True:
                await asyncio.sleep(min(30.0, console.unload_after_s))
                console.unload_idle()

        task = asyncio.create_task(unload())
        yield
        task.cancel()

    app = FastAPI(title="tuneport console", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)

    def refuse(status: int, message: str) -> JSONResponse:
        return JSONResponse({"error": message}, status_code=status, headers={"Content-Security-Policy": CSP})

    @app.exception_handler(ApiError)
    async def api_error(request: Request, e: ApiError):
        return refuse(e.status, e.message)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, e: HTTPException):
        return refuse(e.status_code, str(e.detail))

    @app.middleware("http")
    async def guard(request: Request, call_next):
        host = request.headers.get("host", "")
        if allowed_hosts is not None and host not in allowed_hosts:
            return refuse(421, f"Host {host!r} is not this console's address")
        if key is not None:
            given = request.query_params.get("key") if request.url.path == "/" else None
            scheme, _, bearer = request.headers.get("authorization", "").partition(" ")
            token = given or (bearer.strip() if scheme.lower() == "bearer" else "") or request.cookies.get(COOKIE, "")
            if not hmac.compare_digest(token.encode(), key.encode()):
                return refuse(401, "this console needs its key: open /?key=KEY, or send 'Authorization: Bearer KEY'")
            if given:  # the key leaves the address bar for a cookie the browser sends only to this console
                response = RedirectResponse("/", status_code=303)
                response.set_cookie(COOKIE, key, httponly=True, samesite="strict")
                return response
        if request.method == "POST":
            origin = request.headers.get("origin")
            if origin is not None and origin.partition("://")[2] != host:
                return refuse(403, f"Origin {origin!r} is not this console")
            if request.headers.get("content-type", "").partition(";")[0] != "application/json":
                return refuse(415, "send the body as application/json")
            size = request.headers.get("content-length")
            if size is None or not size.isdigit() or int(size) > MAX_REQUEST_BYTES:
                return refuse(413, f"the body must say its length and be at most {MAX_REQUEST_BYTES} bytes")
        response = await call_next(request)
        response.headers["Content-Security-Policy"] = CSP
        response.headers["X-Content-Type-Options"] = "nosniff"
        return response

    async def body_of(request: Request) -> dict:
        try:
            body = json.loads(await request.body())
        except ValueError:
            raise ApiError(400, "the body is not valid JSON") from None
        if not isinstance(body, dict):
            raise ApiError(400, "the body must be a JSON object")
        return body

    @app.get("/")
    async def page():
        return FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-store"})

    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.get("/api/runs")
    async def list_runs():
        return {"root": str(console.root), "runs": console.list_runs()}

    @app.get("/api/options")
    async def options():
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        return {"recipes": console.recipes(), "devices": available_backends(),
                "host_memory": f"{memory / 2**30:.0f}GiB"}

    @app.get("/api/runs/{name:path}/events")
    async def events(name: str, request: Request):
        folder = console.folder(name)

        async def stream():
            offset, inode, last = 0, None, None
            while not await request.is_disconnected():
                records, offset, inode, reset = runs.read_metrics(folder, offset, inode)
                if records or reset:
                    yield f"event: metrics\ndata: {json.dumps({'records': records, 'reset': reset})}\n\n"
                now = console.details(name)
                shown = json.dumps(now, sort_keys=True, default=str)
                if shown != last:
                    yield f"event: run\ndata: {shown}\n\n"
                    last = shown
                await asyncio.sleep(0.5)

        return StreamingResponse(stream(), media_type="text/event-stream", headers={"Cache-Control": "no-store"})

    @app.get("/api/runs/{name:path}/metrics")
    async def metrics(name: str):
        return {"records": runs.read_metrics(console.folder(name))[0]}

    @app.get("/api/runs/{name:path}/parity.png")
    async def parity_plot(name: str):
        plot = console.folder(name) / runs.PARITY_FOLDER / "parity.png"
        if not plot.is_file():
            raise ApiError(404, f"{name}: no parity plot")
        return FileResponse(plot)

    @app.get("/api/runs/{name:path}")
    async def run(name: str):
        return console.details(name)

    @app.get("/api/compare")
    async def compare(names: str):
        folders = [console.folder(n) for n in names.split(",") if n]
        if len(folders) < 2:
            raise ApiError(400, "names: give two or more runs, separated by commas")
        return runs.compare(console.root, folders)

    @app.post("/api/start")
    async def start(request: Request):
        return await console.start(await body_of(request))

    @app.post("/api/estimate")
    async def estimate(request: Request):
        return await console.estimate(await body_of(request))

    @app.post("/api/runs/{name:path}/stop")
    async def stop(name: str):
        return console.stop(name)

    @app.post("/api/runs/{name:path}/resume")
    async def resume(name: str):
        return await console.resume(name)

    @app.post("/api/runs/{name:path}/chat/{side}")
    async def chat(name: str, side: str, request: Request):
        """Stream a reply (server-sent events: {"content"} deltas, then {"finish_reason", "usage"}) from the
        run's adapter or base; the body is the OpenAI chat request's (messages, max_tokens, temperature, seed)."""
        if side not in ("adapter", "base"):
            raise ApiError(404, f"{side}: chat with 'adapter' or 'base'")
        folder = console.folder(name)
        body = {**await body_of(request), "stream": True, "model": None}
        body.setdefault("temperature", 0)  # greedy, as `tuneport chat`
        loop = asyncio.get_running_loop()
        engine = await loop.run_in_executor(console.worker, console.engine, folder, side)
        job = engine.parse(json.dumps(body).encode())

        async def stream():
            async for kind, item in run_job(engine, job, console.worker):
                if kind == "delta":
                    yield f"data: {json.dumps(item, ensure_ascii=False)}\n\n"
                elif kind == "tick" and await request.is_disconnected():
                    return
                elif kind == "done" and item.exception() is not None:
                    log.error("chat failed: %r", item.exception())
                    yield f"data: {json.dumps({'error': 'generation failed; see the console log'})}\n\n"
                elif kind == "done":
                    result = item.result()
                    yield f"data: {json.dumps({'finish_reason': result['finish_reason'], 'usage': result['usage']})}\n\n"

        return StreamingResponse(stream(), media_type="text/event-stream")

    return app


def allowed(host: str, port: int, key: Optional[str]) -> Optional[set]:
    """The Host headers a console bound to `host` answers: with a key, any (the key guards); without one (loopback),
    only its own names, so that a page elsewhere cannot reach it through a name it points here (DNS rebinding)."""
    if key:
        return None
    names = {host, f"[{host}]"} | ({"localhost", "127.0.0.1", "[::1]"} if is_local(host) else set())
    return {f"{n}:{port}" for n in names} | names


def console(root: Path, host: str, port: int, key: Optional[str], device: str, unload_after_s: float) -> int:
    """Serve the console for the runs under `root` until interrupted.

    Raises:
        RunError: a non-loopback bind without a key, a missing extra, a busy port, a missing folder.
    """
    if not root.is_dir():
        raise RunError(f"RUNS_DIR {root}: not a folder; give the folder your runs' output_dir are in (e.g. outputs)")
    host = check_listen("console", host, port, key, "the console needs a key: pass --key KEY", KEY_ENV)
    app = create_app(Console(root, device, unload_after_s), key, allowed(host, port, key))

    import uvicorn

    shown = f"[{host}]" if ":" in host else host
    print(f"tuneport console: the runs under {root} on http://{shown}:{port}/"
          + (" (open it with ?key=KEY once)" if key else ""), flush=True)
    uvicorn.run(app, host=host, port=port, log_level="warning", access_log=False, timeout_graceful_shutdown=1)
    return 0
