"""The architecture opens without edits to core/: a device backend defined here, in tests/, is one
class plus one registry call, and `tuneport train` trains the golden model on it."""

import json
from collections import Counter
from dataclasses import fields

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
                 "train.max_steps=2", "train.micro_batch_size=2", f"output_dir={out}"]) == 0
    assert set(counting_backend) == {f.name for f in fields(Kernels)} and min(counting_backend.values()) > 0
    assert json.loads((out / "run.json").read_text())["device"] == "counting"
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 2
    assert (out / "adapter" / "adapter_model.safetensors").is_file()


def test_a_method_a_framework_lacks_is_refused_before_anything_loads(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", DEMO, "method.name=qlora", "--framework", "mindspore", f"output_dir={out}"]) == 2
    assert "method.name: qlora does not run with framework mindspore; it runs with torch" in capsys.readouterr().err
    assert not out.exists()


def test_recipes_written_before_the_method_registry_still_load():
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
    assert load_recipe({**vars_of(recipe), "method": ptuning}).method == PtuningV2Config(num_virtual_tokens=16)


def vars_of(recipe) -> dict:
    from tuneport.core.config import recipe_to_dict

    return recipe_to_dict(recipe)
