"""`tuneport console` in a real browser: headless Chromium from the system's packages (`apt-get install chromium`),
driven by Playwright, against a console serving real demo runs trained by the real CLI. Each browser test saves a
screenshot in its temporary folder, and fails on any page request to a host other than the console's own.

The security tests and the run-folder reading need no browser.
"""

import http.client
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import zipfile
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urlparse

import pytest

from tuneport.core import runs
from tuneport.core.cli import main
from tuneport.core.console import Console
from tuneport.core.errors import RunError, Stopped
from tuneport.core.run import record_outcome
from tuneport.core.rundir import RunLock

pytest.importorskip("fastapi", reason="the console extra is not installed: pip install -e '.[console]'")
pytest.importorskip("uvicorn", reason="the console extra is not installed: pip install -e '.[console]'")

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--no-first-run", "--disable-sync"]  # no calls home: this machine has no network beside registries
pytestmark = pytest.mark.xdist_group("console")  # one worker: the demo runs and the console are made once
ENTRY = [sys.executable, "-m", "tuneport.core.entry"]
PROMPT = "你是谁？"  # the demo data's first question


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tuneport(capsys, *args: str) -> tuple[int, str, str]:
    """The command line in this process, as `tuneport ARGS` runs it: (exit status, stdout, stderr)."""
    capsys.readouterr()
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def demo(folder: Path, *overrides: str) -> subprocess.Popen:
    return subprocess.Popen([*ENTRY, "train", "builtin:demo.yaml", f"output_dir={folder}", "save.every=60", *overrides],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def wait_for(check, timeout: float = 120, what: str = "the condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = check()
        if found:
            return found
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


@contextmanager
def console_server(root: Path, *args: str):
    port = free_port()
    process = subprocess.Popen([*ENTRY, "console", str(root), "--port", str(port), "--device", "cpu", *args],
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        def up():
            assert process.poll() is None, process.stdout.read()
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/static/console.css", timeout=2)
                return True
            except urllib.error.HTTPError:
                return True  # it answers (a key is required)
            except OSError:
                return False

        wait_for(up, 60, "the console to answer")
        yield f"http://127.0.0.1:{port}"
    finally:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    """A runs folder with a finished and a diverged demo run, trained side by side by the CLI."""
    folder = tmp_path_factory.mktemp("runs")
    finished = demo(folder / "finished", "train.max_steps=120")
    diverged = demo(folder / "diverged", "train.max_steps=30", "train.lr=1e12")
    assert finished.wait(600) == 0, finished.stderr.read()
    assert diverged.wait(600) == 3, diverged.stderr.read()  # exit status 3: diverged
    return folder


@pytest.fixture(scope="module")
def console(root):
    with console_server(root) as url:
        yield url


@pytest.fixture(scope="module")
def browser():
    if CHROMIUM is None:
        pytest.skip("headless Chromium is not installed: apt-get install chromium (CI's .ci/run installs it)")
    playwright = pytest.importorskip("playwright.sync_api", reason="playwright is not installed: pip install -e '.[dev]'")
    with playwright.sync_playwright() as p:
        launched = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield launched
        launched.close()


def guarded_page(browser, console: str, bypass_csp: bool = False):
    """A new page on which a request to another host is refused and recorded in `page.foreign`: one the browser
    attempts (caught by the route), or one the console's Content-Security-Policy stopped first (its console error)."""
    own = urlparse(console).netloc
    context = browser.new_context(viewport={"width": 1300, "height": 1000}, bypass_csp=bypass_csp)
    opened = context.new_page()
    opened.foreign, opened.errors = [], []

    def guard(route):
        if urlparse(route.request.url).netloc == own:
            route.continue_()
        else:
            opened.foreign.append(route.request.url)
            route.abort()

    opened.route("**/*", guard)
    opened.on("console", lambda m: "Content Security Policy" in m.text and opened.foreign.append(m.text))
    opened.on("pageerror", lambda e: opened.errors.append(str(e)))
    opened.set_default_timeout(60_000)
    return opened


@pytest.fixture
def page(browser, console, tmp_path):
    """A guarded page on the console; a request to another host fails the test. Saved as tmp_path/screenshot.png."""
    opened = guarded_page(browser, console)
    yield opened
    opened.screenshot(path=str(tmp_path / "screenshot.png"), full_page=True)
    opened.context.close()
    assert not opened.errors, opened.errors
    assert not opened.foreign, f"the page fetched from other hosts: {opened.foreign}"


def points(page, chart: str = "#loss-chart") -> int:
    """How many loss values the page's chart shows (the page's CSP forbids evaluated strings: read the attribute)."""
    shown = page.locator(chart)
    return int(shown.get_attribute("data-points") or 0) if shown.count() else 0


def wait_points(page, more_than: int) -> int:
    return wait_for(lambda: points(page) > more_than and points(page), 120, f"more than {more_than} loss points")


# --- the browser tests ---------------------------------------------------------------------------------
@pytest.mark.browser
def test_the_runs_list_shows_each_status_and_a_running_runs_curve_gains_points(page, console, root):
    process = demo(root / "running", "train.max_steps=100000", "save.every=100000")
    try:
        wait_for(lambda: runs.lock_holder(root / "running") == process.pid, 120, "the run to take its lock")
        page.goto(f"{console}/#/")
        row = page.locator('#runs tr[data-name="running"]')
        row.wait_for()
        statuses = {name: page.locator(f'#runs tr[data-name="{name}"]').get_attribute("data-status")
                    for name in ("finished", "running", "diverged")}
        assert statuses == {"finished": "finished", "running": "running", "diverged": "diverged"}
        assert f"PID {process.pid}" in row.locator(".status").inner_text()
        assert page.locator('#runs tr[data-name="finished"] td.num').first.inner_text() == "120 / 120"
        row.locator("a").click()  # the run's page: its loss curve grows while the test watches
        page.locator("#loss-chart[data-points]").wait_for()
        seen = points(page)
        shown = wait_points(page, seen + 5)
        assert shown <= len(runs.read_metrics(root / "running")[0])  # each point is a line the run wrote
        assert page.locator("#status").get_attribute("data-status") == "running"
    finally:
        process.send_signal(signal.SIGINT)
        process.wait(120)


@pytest.mark.browser
def test_a_run_started_from_the_page_stops_with_a_checkpoint_and_resumes(page, console, root, capsys):
    page.goto(f"{console}/#/start")
    page.locator("#name").fill("started")
    page.locator("#device").select_option("cpu")
    page.locator("#overrides").fill("train.max_steps=100000\nsave.every=100000")
    page.locator("#memory").fill("2GiB")
    page.locator("#estimate").click()  # tuneport estimate's table and verdict, before starting
    assert page.locator("#fits").inner_text() == "fits in 2GiB"
    code, out, _ = tuneport(capsys, "estimate", "builtin:demo.yaml", "train.max_steps=100000", "save.every=100000",
                            "--device", "cpu", "--memory", "2GiB")
    shown = page.locator("#start-result pre").inner_text().splitlines()
    verdict = [line for line in out.splitlines() if "fits in 2 GiB" in line]
    assert code == 0 and shown[0] == out.splitlines()[0]  # the same estimate (its runtime share is measured)
    assert verdict == ["the recipe (checkpointing auto: off) fits in 2 GiB: yes"] and verdict[0] in shown
    page.locator("#start").click()
    page.wait_for_url("**/#/run/started")
    folder = root / "started"
    assert runs.lock_holder(folder) is not None  # the child holds the folder's lock, as `tuneport train` does
    wait_points(page, 2)
    page.locator("#stop").click()
    page.locator("#resume").wait_for()  # SIGINT: the run saved a checkpoint, and the page offers Resume
    assert page.locator("#status").get_attribute("data-status") == "stopped"
    saved = runs.checkpoints.latest_checkpoint(folder / "checkpoints")
    step = json.loads((saved / runs.checkpoints.STATE_FILE).read_text())["step"]
    assert saved.name == f"step-{step}" and step >= 3
    assert page.locator("#resume-command").inner_text() == f"tuneport train --resume {folder}"
    page.locator("#resume").click()
    page.locator('#status[data-status="running"]').wait_for()
    wait_points(page, step + 2)
    record = json.loads((folder / "run.json").read_text())
    assert len(record["resumes"]) == 1 and "outcome" not in record
    lines = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines[:step + 3]] == list(range(1, step + 4))  # it continued from the checkpoint
    page.locator("#stop").click()
    page.locator('#status[data-status="stopped"]').wait_for()


@pytest.mark.browser
def test_a_bad_override_shows_the_clis_one_line_error_and_writes_nothing(page, console, root, tmp_path, capsys):
    before = sorted(p.name for p in root.iterdir())
    page.goto(f"{console}/#/start")
    page.locator("#name").fill("bad")
    page.locator("#overrides").fill("train.lr=fast")
    page.locator("#start").click()
    shown = page.locator("#start-error")
    shown.wait_for()
    code, _, err = tuneport(capsys, "train", "builtin:demo.yaml", "train.lr=fast", f"output_dir={tmp_path / 'bad'}")
    expected = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == 2 and len(expected) == 1 and "train.lr" in expected[0]
    assert shown.inner_text() == expected[0]
    assert sorted(p.name for p in root.iterdir()) == before and not (tmp_path / "bad").exists()


@pytest.mark.browser
def test_the_compare_view_lists_the_recipe_keys_that_differ(page, console):
    page.goto(f"{console}/#/compare/finished,diverged")
    page.locator("#differing").wait_for()
    keys = page.locator("#differing tr[data-key]").evaluate_all("rows => rows.map(r => r.dataset.key)")
    assert sorted(keys) == ["output_dir", "train.lr", "train.max_steps"]  # what the two demo commands set apart
    assert page.locator("#compare-chart canvas").count() == 1


@pytest.mark.browser
def test_the_chat_panel_streams_the_adapters_greedy_reply_as_tuneport_chat_gives_it(page, console, root, capsys):
    folder = root / "finished"
    code, out, err = tuneport(capsys, "chat", "--model", str(folder / "base_model"), "--adapter", str(folder / "adapter"),
                              "--device", "cpu", "--prompt", PROMPT)
    assert code == 0, err
    expected = out.strip()
    assert expected  # the demo adapter answers its training question
    page.goto(f"{console}/#/run/finished")
    page.locator("#chat-input").fill(PROMPT)
    page.locator("#chat-send").click()
    reply = page.locator("#chat-adapter .reply[data-done]")
    reply.wait_for()
    assert reply.inner_text() == expected
    page.locator("#chat-base .reply[data-done]").wait_for()  # the base answers beside it
    # Streamed: the reply came in more than one piece.
    request = urllib.request.Request(f"{console}/api/runs/finished/chat/adapter", method="POST",
                                     data=json.dumps({"messages": [{"role": "user", "content": PROMPT}]}).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=120) as response:
        events = [json.loads(line[6:]) for line in response.read().decode().splitlines() if line.startswith("data: ")]
    pieces = [e["content"] for e in events if "content" in e]
    assert len(pieces) > 1 and "".join(pieces) == expected and events[-1]["finish_reason"] == "stop"


@pytest.mark.browser
def test_the_run_page_shows_the_runs_eval_scores_and_parity_report(page, console, root, capsys):
    folder = root / "finished"
    model, adapter = str(folder / "base_model"), str(folder / "adapter")
    code, _, err = tuneport(capsys, "eval", "--model", model, "--adapter", adapter, "--data", "builtin:demo/data.jsonl",
                            "--device", "cpu", "--max-new-tokens", "32")  # into RUN/eval/, its default
    assert code == 0, err
    code, _, err = tuneport(capsys, "parity", "--model", model, "--adapter", adapter, "--a", "cpu", "--b", "cpu",
                            "--dtype-b", "bf16", "--out", str(folder / "parity"))
    assert code in (0, 1), err  # the report is written either way; 1: some row is past its bf16 tolerance
    scored = json.loads((folder / "eval" / "eval.json").read_text())["metrics"]
    page.goto(f"{console}/#/run/finished")
    cells = page.locator("#eval tr td")
    cells.first.wait_for()
    names = page.locator("#eval th").all_inner_texts()
    assert sorted(names) == sorted(scored) and cells.all_inner_texts() == [f"{round(scored[k], 2):g}" for k in names]
    report = json.loads((folder / "parity" / "parity.json").read_text())
    assert page.locator("#parity tr td:first-child").all_inner_texts() == [r["row"] for r in report["rows"]]
    verdict = "every row passes" if report["passed"] else "some rows fail"
    assert report["passed"] == (code == 0) and verdict in page.locator("h2", has_text="tuneport parity").inner_text()
    plot = page.locator('img[alt="parity plot"]')
    plot.wait_for()
    assert plot.evaluate("img => img.complete && img.naturalWidth > 0")


@pytest.mark.browser
def test_the_page_guard_catches_a_request_to_another_host(browser, console, tmp_path):
    for bypass_csp in (False, True):  # stopped by the console's CSP, and (without it) by the route
        planted = guarded_page(browser, console, bypass_csp)
        planted.goto(f"{console}/#/")
        planted.locator("#runs").wait_for()
        planted.evaluate("fetch('http://example.invalid/x.png').catch(() => {})")
        wait_for(lambda: planted.foreign, 10, "the guard to see the planted request")
        planted.screenshot(path=str(tmp_path / f"screenshot-{bypass_csp}.png"))
        assert all("http://example.invalid/x.png" in seen for seen in planted.foreign)
        planted.context.close()


def test_the_page_and_its_assets_ship_in_the_wheel_and_name_no_other_host(tmp_path):
    repo = Path(__file__).resolve().parent.parent
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                            str(tmp_path), str(repo)], capture_output=True, text=True, timeout=300)
    assert built.returncode == 0, built.stderr
    with zipfile.ZipFile(next(tmp_path.glob("tuneport-*.whl"))) as wheel:
        shipped = {Path(n).name: wheel.read(n).decode() for n in wheel.namelist() if "/console_static/" in n}
    assert set(shipped) == {"index.html", "console.js", "console.css", "uPlot.iife.min.js", "uPlot.min.css",
                            "uPlot.LICENSE"}
    for name in ("index.html", "console.js", "console.css", "uPlot.min.css"):
        assert not re.search(r"(https?:)?//[a-z0-9.-]+\.[a-z]{2,}", shipped[name]), name
    assert re.findall(r"https?://[^\s\"')]+", shipped["uPlot.iife.min.js"]) == ["https://github.com/leeoniya/uPlot"]
    assert shipped["uPlot.LICENSE"].startswith("The MIT License")


# --- security (no browser) -----------------------------------------------------------------------------
def get(url: str, headers: dict = None, method: str = "GET", body: bytes = None):
    request = urllib.request.Request(url, headers=headers or {}, method=method, data=body)

    class Keep(urllib.request.HTTPRedirectHandler):
        def redirect_request(self, *args):
            return None  # see the redirect itself

    try:
        with urllib.request.build_opener(Keep).open(request, timeout=30) as response:
            return response.status, dict(response.headers), response.read(200)
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()


def test_a_public_bind_without_a_key_is_refused(root, capsys, monkeypatch):
    monkeypatch.delenv("TUNEPORT_CONSOLE_KEY", raising=False)
    assert main(["console", str(root), "--host", "0.0.0.0"]) == 2
    assert "needs a key: pass --key KEY" in capsys.readouterr().err


def test_with_a_key_the_page_its_api_and_its_events_refuse_a_missing_or_wrong_key(root):
    with console_server(root, "--host", "0.0.0.0", "--key", "s3cret") as url:
        for path in ("/", "/api/runs", "/api/runs/finished/events", "/static/console.js", "/?key=wrong"):
            assert get(url + path)[0] == 401, path
            assert get(url + path, {"Authorization": "Bearer wrong"})[0] == 401, path
            assert get(url + path, {"Cookie": "tuneport_console_key=wrong"})[0] == 401, path
        assert get(url + "/api/runs", {"Authorization": "Bearer s3cret"})[0] == 200
        status, headers, _ = get(url + "/?key=s3cret")
        assert status == 303 and headers["location"] == "/" and "tuneport_console_key=s3cret" in headers["set-cookie"]
        assert "HttpOnly" in headers["set-cookie"] and "SameSite=strict" in headers["set-cookie"]
        cookie = {"Cookie": "tuneport_console_key=s3cret"}
        assert get(url + "/", cookie)[0] == 200
        with urllib.request.urlopen(urllib.request.Request(url + "/api/runs/finished/events", headers=cookie),
                                    timeout=30) as stream:
            assert stream.status == 200 and stream.readline().startswith(b"event: ")


def test_path_parameters_cannot_leave_the_runs_folder(root, console, tmp_path):
    outside = root.parent / "outside-run"  # a real run folder beside the runs folder
    shutil.copytree(root / "diverged", outside, dirs_exist_ok=True)
    (root / "link").symlink_to(outside)
    for name in ("../outside-run", "..%2Foutside-run", "%2E%2E/outside-run", "link", "finished/../../outside-run",
                 "/etc", "%2Fetc"):
        for path in (f"/api/runs/{name}", f"/api/runs/{name}/metrics", f"/api/runs/{name}/events"):
            status, _, body = get(console + path)
            assert status == 404, (path, status, body)
        status, _, _ = get(f"{console}/api/runs/{name}/stop", {"Content-Type": "application/json"}, "POST", b"{}")
        assert status == 404
    assert get(console + "/api/runs/diverged")[0] == 200
    with pytest.raises(runs.RunNotFound):
        runs.run_folder(root, "../outside-run")


def test_other_hosts_and_origins_are_refused(console):
    assert get(console + "/api/runs", {"Host": "attacker.example:80"})[0] == 421  # DNS rebinding
    body = json.dumps({"name": "x"}).encode()
    json_type = {"Content-Type": "application/json"}
    assert get(console + "/api/start", {**json_type, "Origin": "http://attacker.example"}, "POST", body)[0] == 403
    assert get(console + "/api/start", {"Content-Type": "text/plain"}, "POST", body)[0] == 415
    for length in ({"Content-Length": str(2 << 20)}, {"Transfer-Encoding": "chunked"}):  # too long, or unsaid
        connection = http.client.HTTPConnection(urlparse(console).netloc, timeout=30)
        connection.putrequest("POST", "/api/start")
        for header, value in {**json_type, **length}.items():
            connection.putheader(header, value)
        connection.endheaders()  # refused on its headers, before any of the body is read
        assert connection.getresponse().status == 413
        connection.close()


# --- run folders as the console reads them --------------------------------------------------------------
def test_run_status_follows_the_lock_and_the_recorded_outcome(root, tmp_path):
    assert runs.status(root / "finished")["status"] == "finished"
    diverged = runs.status(root / "diverged")
    assert diverged["status"] == "diverged" and "training diverged" in diverged["message"]
    copy = tmp_path / "copy"
    shutil.copytree(root / "finished", copy)
    lock = RunLock(copy)  # a process holds the lock: running, with its PID
    try:
        assert runs.status(copy) == {"status": "running", "pid": os.getpid(), "message": ""}
    finally:
        lock.release()
    record = json.loads((copy / "run.json").read_text())
    del record["outcome"]  # a run killed outright records nothing: its files tell
    (copy / "run.json").write_text(json.dumps(record))
    assert runs.status(copy)["status"] == "finished"
    shutil.rmtree(copy / "adapter")
    assert runs.status(copy)["status"] == "stopped"
    shutil.rmtree(copy / "checkpoints")
    assert runs.status(copy)["status"] == "failed"


def test_runs_are_found_and_named_under_a_relative_folder(root, monkeypatch):
    monkeypatch.chdir(root.parent)  # `tuneport console outputs`
    found = runs.find_runs(Path(root.name))
    assert {runs.summary(Path(root.name), f)["name"] for f in found} >= {"finished", "diverged"}
    assert runs.run_folder(Path(root.name), "finished") == (root / "finished").resolve()


def test_a_run_records_how_it_ended(root, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(root / "finished", copy)
    record_outcome(copy, RunError("data.train: file 'x.jsonl' line 3: not JSON\nmore"))
    assert runs.status(copy) == {"status": "failed", "pid": None, "message": "data.train: file 'x.jsonl' line 3: not JSON"}
    record_outcome(copy, Stopped(signal.SIGTERM, 60, copy / "checkpoints" / "step-60"))
    assert runs.status(copy)["status"] == "stopped" and "SIGTERM after step 60" in runs.status(copy)["message"]
    record_outcome(tmp_path / "not-a-run", None)  # a folder the run removed again: nothing is written
    assert not (tmp_path / "not-a-run").exists()


def test_chat_models_load_on_first_use_and_unload_when_idle(root):
    console = Console(root, "cpu", unload_after_s=600)
    engine = console.engine(root / "finished", "adapter")
    assert console.engine(root / "finished", "adapter") is engine and len(console.models) == 1
    base = console.engine(root / "finished", "base")
    assert base is not engine and len(console.models) == 2
    console.unload_idle()
    assert len(console.models) == 2  # used just now
    console.unload_after_s = 0.0
    console.unload_idle()
    assert console.models == {}
    assert console.engine(root / "finished", "adapter") is not engine  # loaded again


def test_metrics_are_read_as_they_grow_and_again_after_a_resume_rewrites_them(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "lo')
    records, offset, inode, reset = runs.read_metrics(tmp_path)
    assert records == [{"step": 1, "loss": 2.0}] and not reset
    with open(path, "a") as f:
        f.write('ss": 1.5}\n')
    records, offset, inode, reset = runs.read_metrics(tmp_path, offset, inode)
    assert records == [{"step": 2, "loss": 1.5}] and not reset
    replaced = tmp_path / "new"
    replaced.write_text('{"step": 1, "loss": 2.0}\n')
    os.replace(replaced, path)  # as a resume rewrites it
    records, _, _, reset = runs.read_metrics(tmp_path, offset, inode)
    assert reset and records == [{"step": 1, "loss": 2.0}]
