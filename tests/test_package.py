"""The installed package: imports from anywhere, and the console script answers."""

import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

import tuneport.backends


def run(args, cwd):
    return subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=120)


def test_imports_from_another_directory(tmp_path):
    result = run([sys.executable, "-c", "from tuneport.models.chatglm3 import load_model, load_tokenizer"], tmp_path)
    assert result.returncode == 0, result.stderr


def test_console_script_version_and_help(tmp_path):
    result = run([sys.executable, "-m", "tuneport.core.cli", "--version"], tmp_path)
    assert result.returncode == 0 and result.stdout.strip() == f"tuneport {version('tuneport')}"
    result = run([sys.executable, "-m", "tuneport.core.cli", "--help"], tmp_path)
    assert result.returncode == 0 and "usage: tuneport" in result.stdout


def test_help_imports_no_heavy_library(tmp_path):
    """`tuneport --help` stays fast: the argument builders import no framework or optional library."""
    script = ("import sys; from tuneport.core.cli import main\ntry: main(['--help'])\nexcept SystemExit: pass\n"
              "print(sorted({m.partition('.')[0] for m in sys.modules} & {'torch', 'transformers', 'peft', 'numpy', "
              "'deepspeed', 'bitsandbytes', 'matplotlib', 'tensorboardX', 'fastapi'}))")
    result = run([sys.executable, "-c", script], tmp_path)
    assert result.returncode == 0 and result.stdout.splitlines()[-1] == "[]", result.stdout + result.stderr


def test_the_package_names_its_python_api():
    """`tuneport` was an implicit namespace package; it now has an __init__ for the Python API (core/api.py),
    whose names load on first use (`tuneport --help` above stays light)."""
    import tuneport

    assert {"train", "load", "evaluate", "export"} <= set(tuneport.__all__) and callable(tuneport.train)
    assert tuneport.backends.get_backend("cpu").name == "cpu"


def test_installed_console_script(tmp_path):
    from pathlib import Path

    script = Path(sys.executable).parent / "tuneport"
    result = run([str(script), "--version"], tmp_path)
    assert result.returncode == 0 and result.stdout.startswith("tuneport ")


def tuneport(tmp_path, *args: str) -> subprocess.CompletedProcess:
    """The console script's entry point in a fresh process (warnings are shown once per process)."""
    return run([sys.executable, "-c", "import sys; from tuneport.core.entry import main; sys.exit(main())", *args],
               tmp_path)


def test_normal_output_carries_no_third_party_warning(tmp_path):
    """`methods`, `estimate` and a demo run print tables and progress, not library warnings (the known-harmless
    ones are filtered by message and category in core/quiet.py); `--verbose` shows them again."""
    repo = Path(__file__).resolve().parents[1]
    estimate = ["estimate", str(repo / "recipes" / "chatglm3_6b_lora.yaml"),
                f"model={repo / 'tests' / 'golden' / 'chatglm3' / 'checkpoint'}"]
    methods = ["methods", "--family", "chatglm", "--family", "qwen3"]  # a family of each kind (all ten take 45 s)
    for args in (methods, estimate, ["demo", f"output_dir={tmp_path / 'demo'}", "train.max_steps=3"]):
        result = tuneport(tmp_path, *args)
        assert result.returncode == 0, result.stderr
        noisy = [line for line in (result.stdout + result.stderr).splitlines() if "Warning" in line or "warnings.warn" in line]
        assert noisy == [], args
    verbose = tuneport(tmp_path, *methods, "--verbose")
    assert verbose.returncode == 0 and "FutureWarning: `is_gradient_checkpointing` is deprecated" in verbose.stderr
