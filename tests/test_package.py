"""The installed package: imports from anywhere, and the console script answers."""

import subprocess
import sys
from importlib.metadata import version

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


def test_namespace_package_has_no_init():
    import tuneport

    assert getattr(tuneport, "__file__", None) is None  # implicit namespace package
    assert tuneport.backends.get_backend("cpu").name == "cpu"


def test_installed_console_script(tmp_path):
    from pathlib import Path

    script = Path(sys.executable).parent / "tuneport"
    result = run([str(script), "--version"], tmp_path)
    assert result.returncode == 0 and result.stdout.startswith("tuneport ")
