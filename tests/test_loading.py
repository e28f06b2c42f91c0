"""Checkpoint loading: layouts, dtype, clear errors for bad folders, no code from the folder, no network."""

import json
import shutil
import socket

import pytest
import torch
from safetensors.torch import load_file, save_file

from tuneport.models.chatglm3 import (
    CheckpointError,
    ChatGLMForConditionalGeneration,
    chatglm3_6b,
    chatglm3_tiny,
    load_model,
)


@pytest.fixture
def folder(golden, tmp_path):
    """A writable copy of the golden checkpoint's safetensors layout."""
    src = golden / "checkpoint"
    for name in ["config.json", "tokenizer.model", "model.safetensors.index.json",
                 "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]:
        shutil.copy(src / name, tmp_path / name)
    return tmp_path


def test_6b_parameter_count_on_meta():
    with torch.device("meta"):
        model = chatglm3_6b()
    assert sum(p.numel() for p in model.parameters()) == 6_243_584_000


def test_tiny_builder_runs():
    torch.manual_seed(0)
    model = chatglm3_tiny()
    out = model(torch.tensor([[64790, 64792, 5, 6]]), labels=torch.tensor([[-100, -100, 5, 6]]))
    assert out.logits.shape == (1, 4, 65024) and torch.isfinite(out.loss)


def test_single_file_and_dtype(folder, golden):
    state = {}
    for shard in ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]:
        state.update(load_file(folder / shard))
        (folder / shard).unlink()
    (folder / "model.safetensors.index.json").unlink()
    save_file(state, folder / "model.safetensors")
    model = load_model(folder, dtype="bf16")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    reference = load_model(golden / "checkpoint")
    ids = torch.tensor([[64790, 64792, 36474, 54591]])
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits.float(), reference(ids).logits, atol=0.1, rtol=0.05)


def test_no_weights(folder):
    for f in folder.glob("model*"):
        f.unlink()
    with pytest.raises(CheckpointError, match="no weights found; expected one of model.safetensors.index.json"):
        load_model(folder)


def test_missing_and_unexpected_keys_are_listed(folder):
    shard = folder / "model-00002-of-00002.safetensors"
    state = load_file(shard)
    dropped = sorted(state)[0]
    state.pop(dropped)
    state["transformer.encoder.layers.9.extra.weight"] = torch.zeros(2)
    save_file(state, shard)
    with pytest.raises(CheckpointError) as e:
        load_model(folder)
    assert f"missing keys: {dropped}" in str(e.value)
    assert "unexpected keys: transformer.encoder.layers.9.extra.weight" in str(e.value)


def test_shape_mismatch_names_tensor_and_shapes(folder):
    config = json.loads((folder / "config.json").read_text())
    config["ffn_hidden_size"] = 48
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"layers\.0\.mlp\.dense_4h_to_h\.weight \(expected \[32, 48\], found \[32, 64\]"):
        load_model(folder)


def test_corrupt_shard_names_the_file(folder):
    shard = folder / "model-00002-of-00002.safetensors"
    shard.write_bytes(shard.read_bytes()[: 5000])
    with pytest.raises(CheckpointError, match="model-00002-of-00002.safetensors: cannot be read"):
        load_model(folder)


def test_corrupt_bin_shard_names_the_file(golden, tmp_path):
    src = golden / "checkpoint"
    for name in ["config.json", "pytorch_model.bin.index.json", "pytorch_model-00001-of-00002.bin"]:
        shutil.copy(src / name, tmp_path / name)
    (tmp_path / "pytorch_model-00002-of-00002.bin").write_bytes(b"not a zip")
    with pytest.raises(CheckpointError, match="pytorch_model-00002-of-00002.bin: cannot be read") as caught:
        load_model(tmp_path)
    assert "damaged" in str(caught.value) and "weights_only" not in str(caught.value)


def test_invalid_config_json_names_line(folder):
    (folder / "config.json").write_text('{\n  "num_layers": 2,\n  "hidden_size": \n}')
    with pytest.raises(CheckpointError, match=r"config.json: line 4: invalid JSON"):
        load_model(folder)


def test_loading_runs_no_folder_code_and_no_network(folder, tmp_path_factory, monkeypatch):
    marker = tmp_path_factory.mktemp("marker") / "executed"
    trap = f"open({str(marker)!r}, 'w').write('ran')\n"
    for name in ["modeling_chatglm.py", "configuration_chatglm.py", "tokenization_chatglm.py"]:
        (folder / name).write_text(trap)

    def no_network(*args, **kwargs):
        raise AssertionError("network access during loading")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    from transformers import AutoModelForCausalLM

    from tuneport.models.chatglm3 import load_tokenizer

    load_model(folder)
    load_tokenizer(folder)
    auto = AutoModelForCausalLM.from_pretrained(folder)
    assert isinstance(auto, ChatGLMForConditionalGeneration)
    assert not marker.exists()


def test_save_pretrained_round_trip(golden, tmp_path):
    model = load_model(golden / "checkpoint")
    model.save_pretrained(tmp_path)
    again = load_model(tmp_path)
    for (name, a), (_, b) in zip(model.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a, b), name


def test_the_demo_builder_writes_save_pretrained_files_without_importing_deepspeed(tmp_path):
    """The builder writes what `save_pretrained` would, byte for byte, but not through it: transformers'
    save_pretrained unwraps the model through accelerate, which imports DeepSpeed wherever it is installed."""
    import filecmp
    import subprocess
    import sys

    from tuneport.models.chatglm3.builders import builder_config

    script = ("import sys; from pathlib import Path; from tuneport.models.chatglm3.builders import build_model_folder; "
              f"build_model_folder('demo', Path({str(tmp_path / 'built')!r})); print('deepspeed' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and result.stdout.split()[-1] == "False", result.stderr[-2000:]
    torch.manual_seed(0)  # as the builder
    ChatGLMForConditionalGeneration(builder_config("demo")).save_pretrained(tmp_path / "reference")
    names = sorted(f.name for f in (tmp_path / "reference").iterdir())
    assert names == ["config.json", "generation_config.json", "model.safetensors"]
    assert all(filecmp.cmp(tmp_path / "reference" / n, tmp_path / "built" / n, shallow=False) for n in names)


def prefix_adapter(golden, folder, rename=None):
    """A P-tuning v2 result folder made from the golden prefix encoder (keys optionally renamed)."""
    folder.mkdir()
    shutil.copy(golden / "prefix_config.json", folder / "prefix_config.json")
    weights = load_file(golden / "prefix_encoder.safetensors")
    save_file({(rename(k) if rename else k): v for k, v in weights.items()}, folder / "prefix_encoder.safetensors")
    return folder


def test_ptuning_result_loads_strictly(golden, tmp_path):
    from tuneport.frameworks.torch.build import load_tuned_model

    good = load_tuned_model(golden / "checkpoint", prefix_adapter(golden, tmp_path / "good"))
    expected = load_file(golden / "prefix_encoder.safetensors")
    state = good.state_dict()
    assert all(torch.equal(state[k], v) for k, v in expected.items())
    renamed = prefix_adapter(golden, tmp_path / "bad", rename=lambda k: k.replace("prefix_encoder", "prompt_encoder"))
    with pytest.raises(CheckpointError, match="prefix encoder does not fit"):
        load_tuned_model(golden / "checkpoint", renamed)


def test_convert_bin_to_safetensors_and_back_through_load_model(golden, tmp_path, capsys):
    from tuneport.core.cli import main

    source = tmp_path / "bin"
    shutil.copytree(golden / "checkpoint", source,
                    ignore=shutil.ignore_patterns("*.safetensors", "model.safetensors.index.json"))
    assert main(["convert", str(source), str(tmp_path / "st")]) == 0
    assert sorted(p.name for p in (tmp_path / "st").glob("*.safetensors")) == [
        "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    assert not list((tmp_path / "st").glob("*.bin"))
    from_bin, from_st = load_model(source).state_dict(), load_model(tmp_path / "st").state_dict()
    assert from_bin.keys() == from_st.keys() and all(torch.equal(from_bin[k], from_st[k]) for k in from_bin)
    assert main(["convert", str(source), str(tmp_path / "st")]) == 2  # never onto an existing folder
    assert "already exists" in capsys.readouterr().err
