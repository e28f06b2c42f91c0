"""The boundaries, checked on the import graph and calls with the AST. Devices: only backends/ (and a
framework's own files: its package, frameworks/mindspore/, and its model files, models/*/mindspore.py) may import torch_npu or mindspore, reach
torch.cuda / torch.npu / torch.backends.cuda, call `.cuda()` / `.npu()`, or name the "cuda" / "npu"
devices in a call. Comments and strings elsewhere do not count; tests are exempt (they name these
modules to fake or skip them). Models: core/ reaches a model family only through the registry,
`tuneport.models`, never a family's folder."""

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
FORBIDDEN_MODULES = ("torch_npu", "mindspore", "torch.cuda", "torch.npu", "torch.backends.cuda",
                     "torch.backends.cudnn")
DEVICE_NAMES = ("cuda", "npu")
# Calls whose string arguments name a device or a module to import.
DEVICE_CALLS = {"to", "device", "autocast", "set_device", "import_module", "__import__", "get_device_module"}


def forbidden(module: str) -> bool:
    return any(module == m or module.startswith(m + ".") for m in FORBIDDEN_MODULES)


def dotted(node: ast.AST) -> str:
    """`torch.backends.cuda` for an attribute chain (empty when it is not a plain chain of names)."""
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        return ".".join([node.id, *reversed(parts)])
    return ""


def names_device(value: ast.AST) -> bool:
    return isinstance(value, ast.Constant) and isinstance(value.value, str) and (
        value.value.split(":")[0] in DEVICE_NAMES or forbidden(value.value))


def violations(source: str) -> list[str]:
    """Every boundary violation in `source`, as "line N: what"."""
    found = []
    for node in ast.walk(ast.parse(source)):
        line = getattr(node, "lineno", 0)
        if isinstance(node, ast.Import):
            found += [f"line {line}: import {a.name}" for a in node.names if forbidden(a.name)]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found += [f"line {line}: from {node.module} import {a.name}" for a in node.names
                      if forbidden(node.module) or forbidden(f"{node.module}.{a.name}")]
        elif isinstance(node, ast.Attribute) and forbidden(dotted(node)) and not forbidden(dotted(node.value)):
            found.append(f"line {line}: {dotted(node)}")
        elif isinstance(node, ast.Call):
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else ""
            if name in DEVICE_NAMES and isinstance(func, ast.Attribute):
                found.append(f"line {line}: .{name}()")
            if name in DEVICE_CALLS and any(names_device(a) for a in node.args):
                found.append(f"line {line}: {name}({next(a.value for a in node.args if names_device(a))!r})")
            found += [f"line {line}: {k.arg}={k.value.value!r}" for k in node.keywords
                      if k.arg in ("device", "device_type") and names_device(k.value)]
    return sorted(set(found), key=lambda v: int(v.split()[1].rstrip(":")))


def checked_files() -> list[Path]:
    """Every project .py file that must keep to the boundary (hidden folders such as .venv skipped)."""
    files = []
    for top in sorted(REPO.iterdir()):
        if top.name.startswith(".") or top.name in ("backends", "tests", "build"):
            continue
        candidates = [top] if top.suffix == ".py" else sorted(top.rglob("*.py")) if top.is_dir() else []
        files += [p for p in candidates if not (p.parts[len(REPO.parts)] == "models" and p.stem == "mindspore")
                  and p.parts[len(REPO.parts):len(REPO.parts) + 2] != ("frameworks", "mindspore")]
    return files


PLANTED = {
    "import torch_npu": "import torch_npu",
    "import mindspore.nn as nn": "import mindspore.nn",
    "from mindspore import Tensor": "from mindspore import Tensor",
    "from torch import cuda": "from torch import cuda",
    "from torch.cuda import amp": "from torch.cuda import amp",
    "import torch.cuda": "import torch.cuda",
    "x = torch.cuda.is_available()": "torch.cuda",
    "n = torch.npu.device_count()": "torch.npu",
    "torch.backends.cuda.matmul.allow_tf32 = True": "torch.backends.cuda",
    "y = t.cuda()": ".cuda()",
    "y = t.npu()": ".npu()",
    "y = t.to('cuda')": "to('cuda')",
    "y = t.to('npu:1')": "to('npu:1')",
    "d = torch.device('cuda', 0)": "device('cuda')",
    "y = torch.zeros(2, device='npu')": "device='npu'",
    "with torch.autocast('npu'): pass": "autocast('npu')",
    "m = importlib.import_module('torch_npu')": "import_module('torch_npu')",
    "m = __import__('mindspore')": "__import__('mindspore')",
}


@pytest.mark.parametrize("code,expected", PLANTED.items(), ids=list(PLANTED))
def test_the_checker_catches_each_planted_form(tmp_path, code, expected):
    planted = tmp_path / "planted.py"
    planted.write_text(f"import importlib\nimport torch\n{code}\n")
    assert violations(planted.read_text()) == [f"line 3: {expected}"]


def test_the_checker_leaves_comments_strings_and_our_own_modules_alone():
    code = ("# torch.cuda in a comment\ns = 'torch_npu in a string'\nprint('--device cuda')\n"
            "from ..backends.mindspore import MindSporeDevice\nfrom tuneport.backends.mindspore import x\n"
            "y = t.to(device)\nz = torch.device('cpu')\n")
    assert violations(code) == []


@pytest.mark.parametrize("path", checked_files(), ids=lambda p: str(p.relative_to(REPO)))
def test_no_device_calls_outside_backends(path):
    assert violations(path.read_text(encoding="utf-8")) == [], f"{path.relative_to(REPO)}: move these into backends/"


FAMILY_FOLDERS = {p.name for p in (REPO / "models").iterdir() if p.is_dir() and (p / "__init__.py").exists()}


def model_folder_imports(source: str) -> list[str]:
    """Imports of a model family's folder (`from ..models.chatglm3 import x`, `from ..models import chatglm3`,
    `tuneport.models.chatglm3`): core/ must ask the registry in `tuneport.models` instead."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom):
            module = ("tuneport." if node.level == 2 else "") + (node.module or "")
            if module.startswith("tuneport.models."):
                found.append(f"line {node.lineno}: from {module}")
            elif module == "tuneport.models":
                found += [f"line {node.lineno}: {a.name}" for a in node.names if a.name in FAMILY_FOLDERS]
        elif isinstance(node, ast.Import):
            found += [f"line {node.lineno}: import {a.name}" for a in node.names if a.name.startswith("tuneport.models.")]
    return found


def test_the_model_rule_catches_each_planted_form():
    planted = "from ..models.chatglm3 import load_model\nfrom ..models import chatglm3\nimport tuneport.models.chatglm3.model\n" \
              "from tuneport.models.chatglm3.files import x\nfrom ..models import family_for, CheckpointError\n"
    assert model_folder_imports(planted) == ["line 1: from tuneport.models.chatglm3", "line 2: chatglm3",
                                             "line 3: import tuneport.models.chatglm3.model",
                                             "line 4: from tuneport.models.chatglm3.files"]


@pytest.mark.parametrize("path", sorted((REPO / "core").glob("*.py")), ids=lambda p: p.name)
def test_core_reaches_models_only_through_the_registry(path):
    assert model_folder_imports(path.read_text(encoding="utf-8")) == [], f"core/{path.name}: use tuneport.models"
