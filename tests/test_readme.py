"""The README stays true: its Python example runs (on the golden checkpoint) and CI runs its commands."""

import re
from pathlib import Path


README = Path(__file__).resolve().parents[1] / "README.md"


def python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(encoding="utf-8"), flags=re.S)


def test_chat_example_runs(golden, capsys):
    (example,) = python_blocks()
    assert 'path = "/models/chatglm3-6b"' in example
    exec(example.replace("/models/chatglm3-6b", str(golden / "checkpoint")), {})
    printed = capsys.readouterr().out
    assert printed.strip()  # the tiny random model says something; the stop tokens end it


def test_ci_runs_the_readme_commands():
    install, tests = re.search(r"```bash\n(.*?)\n(.*?)\n```", README.read_text(encoding="utf-8")).groups()
    ci = (README.parent / ".ci" / "run").read_text()
    commands = install.split("&& ", 2)[2]  # after creating and activating the virtual environment
    assert commands == "pip install torch==2.13.0 && pip install -e '.[dev]' && tuneport demo"
    assert commands in ci
    assert tests in ci
    # One command for the extras: onnx added after mindspore would break MindSpore's numpy (README).
    mindspore = "pip install -e '.[mindspore,onnx,serve,eval,trl,console]'"
    assert mindspore in README.read_text(encoding="utf-8") and mindspore in ci


def test_the_readmes_pictures_are_in_the_repository():
    pictures = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", README.read_text(encoding="utf-8"))
    assert "docs/console.png" in pictures
    for picture in pictures:
        path = README.parent / picture
        assert path.is_file() and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", picture
