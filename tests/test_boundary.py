"""The device boundary: torch.cuda, .cuda(, torch.npu, torch_npu and mindspore appear in code only
inside backends/ (and the MindSpore model file). Comments and strings do not count; tests are exempt
(they name these modules to fake or skip them)."""

import io
import tokenize
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
FORBIDDEN_NAMES = {"torch_npu", "mindspore"}
FORBIDDEN_ATTRIBUTES = {("torch", "cuda"), ("torch", "npu")}


def checked_files() -> list[Path]:
    """Every project .py file that must keep to the boundary (hidden folders such as .venv skipped)."""
    files = []
    for top in sorted(REPO.iterdir()):
        if top.name.startswith(".") or top.name in ("backends", "tests", "build"):
            continue
        candidates = [top] if top.suffix == ".py" else sorted(top.rglob("*.py")) if top.is_dir() else []
        files += [p for p in candidates if not (p.parts[len(REPO.parts)] == "models" and "mindspore" in p.stem)]
    return files


def violations(source: str) -> list[str]:
    """Forbidden uses in code tokens (names and attribute chains), ignoring comments and strings."""
    tokens = [t for t in tokenize.generate_tokens(io.StringIO(source).readline)
              if t.type in (tokenize.NAME, tokenize.OP)]
    found = []
    for i, tok in enumerate(tokens):
        line = tok.start[0]
        after_dot = i > 0 and tokens[i - 1].string == "."  # tuneport.backends.mindspore is our own module
        if tok.type == tokenize.NAME and tok.string in FORBIDDEN_NAMES and not after_dot:
            found.append(f"line {line}: {tok.string}")
        if tok.string == "." and 0 < i < len(tokens) - 1:
            before, after = tokens[i - 1].string, tokens[i + 1].string
            if (before, after) in FORBIDDEN_ATTRIBUTES:
                found.append(f"line {line}: {before}.{after}")
            if after == "cuda" and i + 2 < len(tokens) and tokens[i + 2].string == "(":
                found.append(f"line {line}: .cuda(")
    return found


def test_checker_catches_each_pattern():
    code = "import torch_npu\nx = torch.cuda.is_available()\ny = t.cuda()\nz = torch.npu.device_count()\n" \
           "from mindspore import nn\n# torch.cuda in a comment\ns = 'torch_npu in a string'\n" \
           "from tuneport.backends.mindspore import MindSporeDevice\n"
    assert violations(code) == ["line 1: torch_npu", "line 2: torch.cuda", "line 3: .cuda(", "line 4: torch.npu",
                                "line 5: mindspore"]


@pytest.mark.parametrize("path", checked_files(),
                         ids=lambda p: str(p.relative_to(REPO)))
def test_no_device_calls_outside_backends(path):
    assert violations(path.read_text(encoding="utf-8")) == [], f"{path.relative_to(REPO)}: move these into backends/"
