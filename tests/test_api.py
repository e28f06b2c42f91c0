"""The Python API (`tuneport.train`, `load`, `evaluate`, `export`): the commands' steps as functions that return
results and raise tuneport's error types, checked against what the same run wrote to its folder."""

import json

import pytest
import torch
from safetensors.torch import load_file

import tuneport
from tuneport.core.errors import FolderError, RecipeError


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("api") / "run"
    return tuneport.train(overrides={"train.max_steps": 4, "save.every": 2, "output_dir": str(out)})


def test_train_returns_the_run_and_its_metrics(run):
    logged = [json.loads(line) for line in (run.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [m["loss"] for m in run.metrics] == [m["loss"] for m in logged if "loss" in m] and len(run.metrics) == 4
    assert run.final_loss == run.metrics[-1]["loss"]
    assert (run.adapter / "adapter_config.json").is_file() and (run.base_model / "config.json").is_file()


def test_train_resumes_and_raises_tuneports_errors(run, tmp_path):
    resumed = tuneport.train(resume=run.run_dir, overrides=["train.max_steps=6"])
    assert resumed.run_dir == run.run_dir and [m["step"] for m in resumed.metrics] == [1, 2, 3, 4, 5, 6]
    assert [m["loss"] for m in resumed.metrics[:4]] == [m["loss"] for m in run.metrics]  # the run's whole record
    with pytest.raises(RecipeError, match="train.lr"):
        tuneport.train(overrides={"train.lr": "fast", "output_dir": str(tmp_path / "bad")})
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("a user's file")
    with pytest.raises(FolderError):
        tuneport.train(overrides={"output_dir": str(tmp_path / "mine")})
    assert (tmp_path / "mine" / "notes.txt").read_text() == "a user's file"


def test_load_applies_the_adapter_and_chats(run):
    tuned = tuneport.load(run.base_model, adapter=run.adapter, device="cpu")
    trained = load_file(run.adapter / "adapter_model.safetensors")
    params = dict(tuned.model.named_parameters())
    name = next(iter(trained))
    loaded = next(p for n, p in params.items() if n.replace(".default", "").endswith(name.split("base_model.model.")[-1]))
    assert torch.equal(loaded.detach(), trained[name])
    history = []
    reply = tuned.chat("你好", history, max_new_tokens=8)
    assert isinstance(reply, str) and [h["role"] for h in history] == ["user", "assistant"]
    assert tuned.device == "cpu" and tuned.family.model_type == "chatglm"


def test_export_and_evaluate_return_their_records(run, tmp_path):
    exported = tuneport.export(run.base_model, run.adapter, tmp_path / "merged")
    record = json.loads((tmp_path / "merged" / "export.json").read_text())
    assert exported.out == tmp_path / "merged" and exported.record["sha256"] == record["sha256"]
    pytest.importorskip("rouge_chinese", reason="tuneport.evaluate scores with the eval extra (tuneport[eval])")
    scores = tuneport.evaluate(run.base_model, "builtin:demo/data.jsonl", adapter=run.adapter, out=tmp_path / "eval",
                               device="cpu", limit=2, max_new_tokens=8)
    assert scores.metrics == json.loads((tmp_path / "eval" / "eval.json").read_text())["metrics"]
    with pytest.raises(Exception, match="unknown options"):
        tuneport.evaluate(run.base_model, "builtin:demo/data.jsonl", batchsize=2)
