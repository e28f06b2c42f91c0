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


def test_namespace_package_has_no_init():
    import tuneport

    assert getattr(tuneport, "__file__", None) is None  # implicit namespace package
    assert tuneport.backends.get_backend("cpu").name == "cpu"


def test_installed_console_script(tmp_path):
    from pathlib import Path

    script = Path(sys.executable).parent / "tuneport"
    result = run([str(script), "--version"], tmp_path)
    assert result.returncode == 0 and result.stdout.startswith("tuneport ")
