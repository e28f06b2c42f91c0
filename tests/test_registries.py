"""The architecture opens without edits to core/: a device backend and a model family defined here, in
tests/, each registered with one call, train with `tuneport train`; methods come from their registry."""

import json
import shutil
from collections import Counter
from dataclasses import fields, replace
from pathlib import Path

import pytest

import tuneport.backends as backends
from tuneport.backends import Kernels, register_backend
from tuneport.backends.cpu import CPUBackend
from tuneport.backends.reference import REFERENCE_KERNELS
from tuneport.core.cli import main

DEMO = "builtin:demo.yaml"


class CountingBackend(CPUBackend):
    """A throwaway device for this test: the CPU, running the reference kernels and counting each call
    (so the test can see that the model ran on this backend's kernel table, not on the CPU's)."""

    name = "counting"

    def __init__(self, calls: Counter):
        def counted(kernel: str):
            def call(*args, **kwargs):
                calls[kernel] += 1
                return getattr(REFERENCE_KERNELS, kernel)(*args, **kwargs)
            return call

        self.kernels = Kernels(**{f.name: counted(f.name) for f in fields(Kernels)})


@pytest.fixture
def counting_backend():
    calls = Counter()
    register_backend("counting", lambda: CountingBackend(calls))  # the one registry line
    yield calls
    backends._BACKENDS.pop("counting")


def test_a_backend_from_outside_the_package_trains_the_golden_model(counting_backend, golden, tmp_path):
    out = tmp_path / "run"
    assert main(["train", DEMO, f"model={golden / 'checkpoint'}", "tokenizer=null", "--device", "counting",
                 "train.max_steps=2", "train.micro_batch_size=2", "data.packing=true",
                 "data.eval=builtin:demo/data.jsonl", "eval.max_batches=1", f"output_dir={out}"]) == 0
    # every kernel ChatGLM3 runs on (rotary_half is the rotate-half rope of the transformers-native families):
    # packed rows in training, plain attention in evaluation
    assert set(counting_backend) == {f.name for f in fields(Kernels)} - {"rotary_half"}
    assert min(counting_backend.values()) > 0
    assert json.loads((out / "run.json").read_text())["device"] == "counting"
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 2
    assert (out / "adapter" / "adapter_model.safetensors").is_file()


class PeakBackend(CPUBackend):
    """A throwaway device for this test: the CPU, with a data-sheet peak of 1 TFLOP/s, as an accelerator has."""

    name = "peaked"

    @property
    def capabilities(self):
        return replace(super().capabilities, peak_flops=1e12)


def test_model_flop_utilisation_is_shown_where_the_peak_is_known(tmp_path):
    from safetensors.torch import load_file

    from tuneport.models.chatglm3 import load_model

    register_backend("peaked", PeakBackend)
    try:
        out = tmp_path / "run"
        assert main(["train", DEMO, "--device", "peaked", "train.max_steps=2", f"output_dir={out}"]) == 0
    finally:
        backends._BACKENDS.pop("peaked")
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    base = load_model(out / "base_model")
    weights = sum(p.numel() for p in base.parameters()) - base.get_input_embeddings().weight.numel()
    trained = sum(t.numel() for t in load_file(out / "adapter" / "adapter_model.safetensors").values())
    for record in records:  # README "Speed": 4 N + 2 N_trained FLOPs a token
        assert record["mfu"] == pytest.approx(record["tokens_per_s"] * (4 * (weights + trained) + 2 * trained) / 1e12)
    assert main(["train", DEMO, "train.max_steps=1", f"output_dir={tmp_path / 'cpu'}"]) == 0
    assert "mfu" not in json.loads((tmp_path / "cpu" / "metrics.jsonl").read_text())  # no peak known for a CPU


def test_a_method_a_framework_lacks_is_refused_before_anything_loads(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", DEMO, "method.name=qlora", "--framework", "mindspore", f"output_dir={out}"]) == 2
    assert "method.name: qlora does not run with framework mindspore; it runs with torch" in capsys.readouterr().err
    assert not out.exists()


def test_recipes_written_before_the_method_registry_still_load(caplog):
    """A resolved recipe.yaml of an earlier tuneport lists every method's fields under `method:`."""
    from tuneport.core.config import load_recipe
    from tuneport.core.methods import LoraConfig, PtuningV2Config

    earlier = {"name": "lora", "r": 16, "alpha": 32.0, "dropout": 0.0, "target_modules": ["dense"],
               "num_virtual_tokens": 128, "prefix_projection": False, "quant_type": "nf4", "double_quant": True,
               "init_from": None}
    recipe = load_recipe(DEMO, ())
    assert load_recipe({**vars_of(recipe), "method": earlier}).method == LoraConfig(
        r=16, alpha=32.0, dropout=0.0, target_modules=["dense"])
    ptuning = {**earlier, "name": "ptuning_v2", "r": 8, "dropout": 0.1, "target_modules": ["query_key_value"],
               "num_virtual_tokens": 16}
    caplog.clear()
    assert load_recipe({**vars_of(recipe), "method": ptuning}).method == PtuningV2Config(num_virtual_tokens=16)
    assert "ignored" not in caplog.text  # the old defaults of other methods' fields pass silently


def vars_of(recipe) -> dict:
    from tuneport.core.config import recipe_to_dict

    return recipe_to_dict(recipe)


# --- a second model family, defined here -------------------------------------------------------------
def toy_family():
    """A toy model family for this test: two residual tanh layers over token embeddings (each position
    predicts the next token from itself alone), registered under model_type "toygpt". It reuses the
    ChatGLM3 tokenizer class for its chat template, as a real family may reuse any tokenizer."""
    import torch
    from safetensors.torch import load_file
    from torch import nn
    from transformers import GenerationMixin, PretrainedConfig, PreTrainedModel
    from transformers.modeling_outputs import CausalLMOutput

    from tuneport.models import CheckpointError, ModelFamily, read_json
    from tuneport.models.chatglm3 import load_tokenizer

    class ToyConfig(PretrainedConfig):
        model_type = "toygpt"

        def __init__(self, vocab_size=1024, hidden_size=32, num_layers=2, **kwargs):
            super().__init__(**kwargs)
            self.vocab_size, self.hidden_size, self.num_layers = vocab_size, hidden_size, num_layers

    class Block(nn.Module):
        def __init__(self, width):
            super().__init__()
            self.mix = nn.Linear(width, width)

    class ToyModel(PreTrainedModel, GenerationMixin):
        config_class = ToyConfig

        def __init__(self, config):
            super().__init__(config)
            self.embed = nn.Embedding(config.vocab_size, config.hidden_size)
            self.blocks = nn.ModuleList(Block(config.hidden_size) for _ in range(config.num_layers))
            self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)

        def forward(self, input_ids, attention_mask=None, labels=None, num_items_in_batch=None, **kwargs):
            h = self.embed(input_ids)
            for block in self.blocks:
                h = h + torch.tanh(block.mix(h))
            logits = self.lm_head(h)
            loss = None
            if labels is not None:
                token_losses = nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(),
                                                           ignore_index=-100, reduction="sum")
                loss = token_losses / (num_items_in_batch or (labels[:, 1:] != -100).sum())
            return CausalLMOutput(loss=loss, logits=logits)

    def check_checkpoint(folder, **overrides):
        folder = Path(folder)
        values = {k: v for k, v in read_json(folder / "config.json").items() if k != "model_type"}
        if not (folder / "model.safetensors").is_file():
            raise CheckpointError(f"{folder}: no model.safetensors")
        return ToyConfig(**values, **overrides), [folder / "model.safetensors"], []

    def load_model(folder, backend, dtype=None, device_index=0, **overrides):
        config, (weights,), _ = check_checkpoint(folder, **overrides)
        model = ToyModel(config)
        model.load_state_dict(load_file(weights))
        return model.to(backend.device(device_index)).eval()

    def check_vocabulary(tokenizer, config, tokenizer_path, model_path):
        if len(tokenizer) > config.vocab_size:
            raise CheckpointError(f"{tokenizer_path}: more tokens than {model_path} has rows")

    def write_folder(folder: Path) -> None:
        from safetensors.torch import save_file

        from tuneport.models.chatglm3.builders import demo_tokenizer

        torch.manual_seed(0)
        model = ToyModel(ToyConfig())
        model.config.save_pretrained(folder)
        save_file(model.state_dict(), folder / "model.safetensors")
        shutil.copy(demo_tokenizer(), folder / "tokenizer.model")

    family = ModelFamily(model_type="toygpt", check_checkpoint=check_checkpoint, load_model=load_model,
                         load_tokenizer=load_tokenizer, check_vocabulary=check_vocabulary, lora_targets=("mix",),
                         linear_layers=("mix", "lm_head"))
    return family, write_folder


def test_a_second_model_family_trains_with_tuneport_train(tmp_path):
    from tuneport.models import _FAMILIES, register_family

    family, write_folder = toy_family()
    register_family("toygpt", lambda: family)  # the one registry line
    try:
        write_folder(tmp_path / "toy")
        out = tmp_path / "run"
        assert main(["train", DEMO, f"model={tmp_path / 'toy'}", "tokenizer=null", "method.target_modules=null",
                     "train.max_steps=30", "train.lr=3e-2", f"output_dir={out}"]) == 0
    finally:
        _FAMILIES.pop("toygpt")
    losses = [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == 30 and losses[-1] < losses[0] - 1.0  # it learns
    adapter = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert sorted(adapter["target_modules"]) == ["mix"]  # the family's default LoRA targets


def test_the_framework_names_recipes_check_are_the_registrys():
    from tuneport.core.config import FRAMEWORKS
    from tuneport.frameworks import FRAMEWORKS as REGISTRY

    assert tuple(REGISTRY) == FRAMEWORKS


class RecordingBackend(CPUBackend):
    """A throwaway device: the CPU, recording the calls a command makes on it, in order (setup, the device
    indices it asks for, set_device)."""

    name = "recording"

    def __init__(self, calls: list):
        self.calls = calls

    def setup(self) -> None:
        self.calls.append("setup")
        super().setup()

    def device(self, index: int = 0):
        self.calls.append(f"device {index}")
        return super().device(index)

    def set_device(self, index: int) -> None:
        self.calls.append(f"set_device {index}")


@pytest.fixture
def recording_backend():
    calls = []
    register_backend("recording", lambda: RecordingBackend(calls))
    yield calls
    backends._BACKENDS.pop("recording")


def test_train_on_device_1_of_a_named_device_uses_device_1(recording_backend, tmp_path):
    """`--device NAME:1` in one process trains on device 1 (the index was dropped before: device 0)."""
    assert main(["train", DEMO, "--device", "recording:1", "train.max_steps=1", f"output_dir={tmp_path / 'run'}"]) == 0
    assert recording_backend[0] == "setup"
    assert "set_device 1" in recording_backend
    used = {c for c in recording_backend if c.startswith("device ")}
    assert used == {"device 1"}, used


@pytest.mark.parametrize("command", ["chat", "eval", "export"])
def test_every_command_sets_its_device_up_before_using_it(recording_backend, golden, tmp_path, command, monkeypatch):
    """The Backend protocol's first call is setup(); chat (and serve, which opens its device the same way)
    skipped it before."""
    model = ["--model", str(golden / "checkpoint")]
    data = tmp_path / "dev.jsonl"
    data.write_text(json.dumps({"content": "类型#裤", "summary": "宽松"}, ensure_ascii=False) + "\n")
    if command == "export":  # export merges on the CPU: the CPU backend is the one it opens
        monkeypatch.setitem(backends._BACKENDS, "cpu", backends._BACKENDS["recording"])
    if command == "eval":
        pytest.importorskip("jieba", reason="the eval extra is not installed: pip install -e '.[eval]'")
    args = {"chat": ["chat", *model, "--prompt", "hi", "--max-new-tokens", "2", "--device", "recording:1"],
            "eval": ["eval", *model, "--data", str(data), "--max-new-tokens", "2", "--device", "recording:1",
                     "--out", str(tmp_path / "eval")],
            "export": ["export", *model, "--out", str(tmp_path / "export")]}[command]
    assert main(args) == 0
    assert recording_backend[0] == "setup"
    assert {c for c in recording_backend if c.startswith("device ")} == ({"device 0"} if command == "export"
                                                                         else {"device 1"})
