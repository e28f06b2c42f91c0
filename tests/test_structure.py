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

    def save(self, model, build, folder, trained, weights=None):
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


# --- the import graph -----------------------------------------------------------------------------------------
# The only files whose functions import the project's own modules: registries, loading an entry when it is asked
# for (so that `tuneport --help` and recipe checks import no framework). Registries that load by name
# (importlib: the frameworks, the command table) have no import statement to list.
REGISTRIES = {
    "backends/__init__.py": "the device registry: a backend's module loads when the device is asked for",
    "models/__init__.py": "the model family registry: a family's module loads when its model_type is asked for",
    "models/chatglm3/family.py": "ChatGLM3's registry entry: its parts load when the family is built",
    "models/chatglm3/__init__.py": "the family's lazy exports (its MindSpore model runs without torch)",
    "core/entry.py": "the console script: its start-up signal guard is installed before anything is imported",
}


def module_of(rel: str) -> str:
    parts = rel[:-3].split("/")
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def own_imports(module: str, source: str, is_package: bool, known: set) -> list[tuple[str, int, bool]]:
    """(imported module, line, inside a function) for each import of a module in `known`."""
    tree = ast.parse(source)
    inside = {id(n) for f in ast.walk(tree) if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))
              for n in ast.walk(f)}
    found = []
    for node in ast.walk(tree):
        targets = []
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".") if is_package else module.split(".")[:-1]
                base = base[:len(base) - (node.level - 1)]
            elif (node.module or "").startswith("tuneport."):
                base = []
            else:
                continue
            target = ".".join(base + ((node.module or "").removeprefix("tuneport.").split(".") if node.module else []))
            submodules = [f"{target}.{a.name}" for a in node.names if f"{target}.{a.name}" in known]
            targets = submodules + ([target] if len(submodules) < len(node.names) and target in known else [])
        elif isinstance(node, ast.Import):
            targets = [a.name.removeprefix("tuneport.") for a in node.names if a.name.removeprefix("tuneport.") in known]
        found += [(t, node.lineno, id(node) in inside) for t in targets if t != module]
    return found


def import_problems(sources: dict[str, str]) -> list[str]:
    """For {file path relative to the package root: source}: own-module imports inside functions outside the
    registries, and every import cycle (imports inside functions count), as lines of text."""
    modules = {module_of(rel): rel for rel in sources}
    graph: dict[str, set] = {m: set() for m in modules}
    problems = []
    for module, rel in modules.items():
        for target, line, inner in own_imports(module, sources[rel], rel.endswith("__init__.py"), set(modules)):
            graph[module].add(target)
            if inner and rel not in REGISTRIES:
                problems.append(f"{rel}:{line}: imports {target} inside a function; import it at the top")
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for n in sorted(graph[m]):
            if state.get(n) == 1:
                problems.append("import cycle: " + " -> ".join(path[path.index(n):] + [m, n]) if n in path
                                else f"import cycle: {m} -> {n}")
            elif n not in state:
                visit(n, path + [m])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [])
    return problems


def package_sources() -> dict[str, str]:
    return {str(p.relative_to(REPO)): p.read_text(encoding="utf-8") for p in package_files()}


def test_the_import_checker_catches_a_planted_cycle_and_a_hidden_import():
    planted = {"core/__init__.py": "", "core/a.py": "from .b import x\n", "core/c.py": "def f():\n    from . import a\n",
               "core/b.py": "def g():\n    from .c import y\n"}
    problems = import_problems(planted)
    assert "core/b.py:2: imports core.c inside a function; import it at the top" in problems
    assert any(p.startswith("import cycle:") and {"core.a", "core.b", "core.c"} <= set(p[14:].split(" -> "))
               for p in problems), problems


def test_the_package_imports_form_no_cycle_and_hide_no_import():
    assert import_problems(package_sources()) == []


# --- ChatGLM's names --------------------------------------------------------------------------------------------
# ChatGLM3's module and config attribute names: only models/chatglm3/ may use them; framework and core code reach
# a model's internals through its family (ModelFamily.blocks, .prefix_encoder, get_output_embeddings, ...).
CHATGLM_NAMES = {"transformer", "encoder", "prefix_encoder", "query_key_value", "dense_h_to_4h", "dense_4h_to_h",
                 "output_layer", "word_embeddings", "rotary_pos_emb", "self_attention", "final_layernorm",
                 "padded_vocab_size", "kv_channels", "multi_query_group_num", "num_layers", "seq_length",
                 "ffn_hidden_size", "kv_heads", "pre_seq_len"}
FILE_TYPES = {"json", "jsonl", "safetensors", "bin", "pt", "model", "py", "yaml", "txt", "png"}
# Names that stay, with the reason: recipe files written before methods had their own configs carry LoRA's old
# default target (core/methods.py LEGACY_DEFAULTS), a fact about those files, not about the model.
ALLOWED_NAMES = {("core/methods.py", "query_key_value")}


def chatglm_names(source: str) -> list[str]:
    """"line N: name" for each ChatGLM3 name used as an attribute, a keyword, or a dotted-name string (file names,
    messages, comments and docstrings do not count)."""
    tree = ast.parse(source)
    docstrings = {id(node.body[0].value) for node in ast.walk(tree)
                  if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
                  and node.body and isinstance(node.body[0], ast.Expr) and isinstance(node.body[0].value, ast.Constant)}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and node.attr in CHATGLM_NAMES:
            found.append(f"line {node.lineno}: {node.attr}")
        elif isinstance(node, ast.keyword) and node.arg in CHATGLM_NAMES:
            found.append(f"line {node.value.lineno}: {node.arg}")
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings:
            parts = node.value.strip(".").split(".")
            if all(p.isidentifier() for p in parts) and parts[-1] not in FILE_TYPES:
                found += [f"line {node.lineno}: {p}" for p in parts if p in CHATGLM_NAMES]
    return found


PLANTED_NAMES = {
    "h = model.transformer(ids)": "transformer",
    "w = {n: p for n, p in named if n.startswith('transformer.prefix_encoder.')}": "transformer",
    "config = dict(pre_seq_len=128)": "pre_seq_len",
    "rows = config['padded_vocab_size']": "padded_vocab_size",
    "layer = getattr(block, 'self_attention')": "self_attention",
}


# Each checker of this file on a planted case: what it must report.
PLANTED = {**{code: (method_name_branches, what) for code, what in PLANTED_BRANCHES.items()},
           **{code: (chatglm_names, name) for code, name in PLANTED_NAMES.items()}}


@pytest.mark.parametrize("code", PLANTED)
def test_each_checker_catches_its_planted_case(code):
    checker, expected = PLANTED[code]
    assert expected in [found.split(": ", 1)[1] for found in checker(code)]


def test_the_name_checker_leaves_file_names_messages_and_docstrings_alone():
    code = ('"""Uses transformer.encoder.layers."""\nf = "prefix_encoder.safetensors"\n'
            'e = f"method.target_modules: e.g. [query_key_value]"\n# model.transformer\n')
    assert chatglm_names(code) == []


def outside_chatglm(parts: tuple) -> bool:
    return parts[:2] == ("models", "chatglm3")


@pytest.mark.parametrize("path", package_files(outside_chatglm), ids=lambda p: str(p.relative_to(REPO)))
def test_no_chatglm_name_outside_its_folder(path):
    rel = str(path.relative_to(REPO))
    found = [f for f in chatglm_names(path.read_text(encoding="utf-8")) if (rel, f.split(": ", 1)[1]) not in ALLOWED_NAMES]
    assert found == [], f"{rel}: ask the model's family (models/__init__.py ModelFamily) instead"


# --- each input once ------------------------------------------------------------------------------------------
def test_a_training_run_reads_its_inputs_once(golden, tmp_path, monkeypatch):
    """One `tuneport train`: tuneport parses config.json once (run.json also hashes its bytes; peft reads it again
    when it saves the adapter), reads each weight file's header once (the checkpoint check), and makes one backend."""
    import functools

    from tuneport import backends
    from tuneport.models import family
    from tuneport.models.chatglm3 import checkpoint

    parses, headers, made = [], [], []
    checkpoint.check_checkpoint.cache_clear()  # as in a fresh process
    parse = family._parsed_json.__wrapped__
    monkeypatch.setattr(family, "_parsed_json", functools.lru_cache(lambda stamp: parses.append(stamp[0]) or parse(stamp)))
    real_shapes = checkpoint.shard_shapes
    monkeypatch.setattr(checkpoint, "shard_shapes", lambda file: headers.append(file.name) or real_shapes(file))
    cpu = backends._BACKENDS["cpu"]
    monkeypatch.setitem(backends._BACKENDS, "cpu", backends.Entry(lambda: made.append(1) or cpu.factory(),
                                                                  cpu.auto_rank, cpu.doctor))
    assert main(["train", DEMO, f"model={golden / 'checkpoint'}", "tokenizer=null", "train.max_steps=1",
                 "device=cpu", f"output_dir={tmp_path / 'run'}"]) == 0
    config = str((golden / "checkpoint" / "config.json").resolve())
    assert parses.count(config) == 1, parses
    assert sorted(headers) == ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"], headers
    assert len(made) == 1
