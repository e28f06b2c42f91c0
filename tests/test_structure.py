"""The layers' rules, checked on the source with the AST (each checker is shown catching a planted
violation first):

- no code outside a method's own implementation (frameworks/*/methods/) decides by a method's name:
  no comparison with a method name, no isinstance() with a method's config class;
- a method is its config plus one implementation per framework: a throwaway one registered from here,
  without touching the package, trains the golden model.
"""

import ast
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from tuneport.core import methods
from tuneport.core.cli import main
from tuneport.core.methods import METHODS, MethodSettings, register_method
from tuneport.frameworks.torch.method import TorchMethod

REPO = Path(__file__).resolve().parents[1]
PACKAGE = ("backends", "core", "frameworks", "models", "recipes")
DEMO = "builtin:demo.yaml"


def package_files(exclude=lambda rel: False) -> list[Path]:
    return [p for top in PACKAGE for p in sorted((REPO / top).rglob("*.py"))
            if not exclude(p.relative_to(REPO).parts)]


# --- method names --------------------------------------------------------------------------------------------
METHOD_NAMES = {"lora", "qlora", "dora", "adalora", "ia3", "prompt_tuning", "ptuning", "prefix_tuning", "ptuning_v2",
                "full", "freeze"}
CONFIG_CLASSES = {cls.__name__ for cls in vars(methods).values() if isinstance(cls, type)
                  and issubclass(cls, MethodSettings) and cls is not MethodSettings}


def names_a_method(node: ast.AST) -> bool:
    if isinstance(node, ast.Constant):
        return node.value in METHOD_NAMES
    if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
        return any(names_a_method(e) for e in node.elts)
    return False


def method_name_branches(source: str) -> list[str]:
    """Every comparison with a method's name, and isinstance() with a method's config class, as "line N: ..."."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Compare) and any(names_a_method(n) for n in (node.left, *node.comparators)):
            found.append(f"line {node.lineno}: compares with a method name")
        elif isinstance(node, ast.MatchValue) and names_a_method(node.value):
            found.append(f"line {node.lineno}: matches a method name")
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "isinstance" \
                and len(node.args) == 2:
            classes = node.args[1].elts if isinstance(node.args[1], ast.Tuple) else [node.args[1]]
            if any(isinstance(c, (ast.Name, ast.Attribute)) and (c.id if isinstance(c, ast.Name) else c.attr)
                   in CONFIG_CLASSES for c in classes):
                found.append(f"line {node.lineno}: isinstance with a method's config")
    return found


PLANTED_BRANCHES = {
    'if recipe.method.name == "adalora": pass': "compares with a method name",
    'x = method.name in ("lora", "qlora")': "compares with a method name",
    'y = "full" != name': "compares with a method name",
    "match name:\n    case 'freeze': pass": "matches a method name",
    "z = isinstance(m, AdaLoraConfig)": "isinstance with a method's config",
    "z = isinstance(m, (int, methods.FullConfig))": "isinstance with a method's config",
}


@pytest.mark.parametrize("code,what", PLANTED_BRANCHES.items(), ids=list(PLANTED_BRANCHES))
def test_the_method_name_checker_catches_a_planted_branch(code, what):
    assert [found.split(": ", 1)[1] for found in method_name_branches(code)] == [what]


def test_the_method_name_checker_leaves_registry_lookups_alone():
    assert method_name_branches("x = METHODS[recipe.method.name]\ny = name in METHODS\nz = 'lora' + s\n") == []


def implementation_file(parts: tuple) -> bool:
    return parts[0] == "frameworks" and len(parts) == 4 and parts[2] == "methods"


@pytest.mark.parametrize("path", package_files(implementation_file), ids=lambda p: str(p.relative_to(REPO)))
def test_no_method_name_decides_outside_its_implementation(path):
    assert method_name_branches(path.read_text(encoding="utf-8")) == [], \
        f"{path.relative_to(REPO)}: give the method a hook in frameworks/*/method.py instead"


# --- a throwaway method ---------------------------------------------------------------------------------------
@dataclass
class NormTuningConfig(MethodSettings):
    """Train the normalisation layers' weights alone (LayerNorm tuning); a method this test adds."""

    name: str = "norm_tuning"


class NormTuning(TorchMethod):
    """Its torch implementation: what it trains, and its result as one safetensors file."""

    adapter_files = ("norms.safetensors",)

    def attach(self, model, build):
        for name, param in model.named_parameters():
            param.requires_grad_("norm" in name)
        return model

    def save(self, model, build, folder, trained):
        save_file({n: p.detach().contiguous() for n, p in trained.items()}, folder / "norms.safetensors")

    def load(self, base, adapter, load_base, family):
        model = load_base(base)
        model.load_state_dict(load_file(adapter / "norms.safetensors"), strict=False)
        return model


@pytest.fixture
def norm_tuning():
    register_method("norm_tuning", NormTuningConfig, {"torch": NormTuning()})
    yield
    METHODS.pop("norm_tuning")


def test_a_method_registered_from_outside_the_package_trains_the_golden_model(norm_tuning, golden, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", DEMO, f"model={golden / 'checkpoint'}", "tokenizer=null",
                 "method.name=norm_tuning", "train.max_steps=3", "train.lr=1e-2", f"output_dir={out}"]) == 0
    trained = load_file(out / "adapter" / "norms.safetensors")
    base = load_file(golden / "checkpoint" / "model-00001-of-00002.safetensors") | \
        load_file(golden / "checkpoint" / "model-00002-of-00002.safetensors")
    assert trained and all("norm" in n for n in trained)
    assert {n for n in base if "norm" in n} == set(trained)
    assert all(not torch.equal(trained[n], base[n]) for n in trained)  # every norm weight moved
    # chat loads the result through the method's own loader
    from tuneport.frameworks.torch.build import load_tuned_model

    loaded = dict(load_tuned_model(golden / "checkpoint", out / "adapter").named_parameters())
    assert all(torch.equal(loaded[n], trained[n]) for n in trained)
    assert main(["methods", "--model", str(golden / "checkpoint")]) == 0
    row = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("norm_tuning"))
    assert row.split()[1] == "torch" and int(row.split()[-1].replace(",", "")) == sum(t.numel() for t in trained.values())


def test_a_registered_method_is_refused_on_a_framework_without_its_implementation(norm_tuning, capsys):
    assert main(["train", DEMO, "method.name=norm_tuning", "framework=mindspore"]) == 2
    assert "method.name: norm_tuning does not run with framework mindspore; it runs with torch" in \
        capsys.readouterr().err
