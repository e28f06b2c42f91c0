"""Run folders written before the frameworks/ refactor resume bit-exactly after it.

Each case in tests/data/old_runs/ holds `run/`, a run folder as a SIGKILLed `tuneport train` left it (newest
checkpoint `checkpoints/step-2` of a 4-step run, metrics.jsonl still holding the lost step 3, no adapter), and
`reference/`, what the same recipe trained without a stop: the adapter's weights and config and metrics.jsonl.
The test copies `run/` to tmp_path, resumes it with the current code through the CLI
(`tuneport train --resume DIR`) and asks for the reference bit for bit: every adapter tensor (dtype, shape and
bytes), the adapter's config, and each step's loss, learning rate, gradient norm and eval loss.

Provenance: written on 2026-12-03 by commit a2dfb1a (the last before the refactor) with torch 2.13.0+cpu,
peft 0.21.2, transformers 5.24.0 and mindspore 2.10.0 on the CPU, by tests/data/old_runs/generate.sh, which
checks a2dfb1a out in a worktree (/tmp/oldcode), makes Python import it (PYTHONPATH=/tmp/oldpkg, where
tuneport/{core,backends,models,recipes} link to the worktree; the script asserts every tuneport module comes
from there) and runs, from the worktree's root, for each case:
    python -m tuneport.core.entry train RECIPE COMMON EXTRA output_dir=.../straight      (the reference)
    python tests/killer.py step 3 train RECIPE COMMON EXTRA output_dir=.../interrupted   (stored as run/)
    python -m tuneport.core.entry train --resume <copy of interrupted>  (the old code checks itself: bit-exact)
with COMMON = model=tests/golden/chatglm3/checkpoint data.train=tests/data/advertisegen/train.json
data.eval=tests/data/advertisegen/dev.json data.max_input_length=64 data.max_output_length=64
train.micro_batch_size=2 train.max_steps=4 save.every=2 eval.every=2 eval.max_batches=1 device=cpu precision=fp32
and the cases below. The stored recipe.yaml therefore names the model and data relative to the repository
root, so the test resumes from there. Regenerate (only if a format change is intended): see
tests/data/old_runs/README.md.
"""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml
from safetensors.numpy import load_file

from tuneport.core.cli import main

OLD_RUNS = Path(__file__).parent / "data" / "old_runs"

# case: (framework, how it was made: RECIPE and EXTRA above)
CASES = {
    "lora_torch": ("torch", "recipes/chatglm3_6b_lora.yaml method.dropout=0.1 (dropout: the RNG must resume too)"),
    "ptuning_v2_torch": ("torch", "recipes/chatglm3_6b_ptuning_v2.yaml framework=torch (128 virtual tokens)"),
    "lora_mindspore": ("mindspore", "recipes/chatglm3_6b_lora.yaml framework=mindspore method.dropout=0 "
                                    "(MindSpore resumes bit-exactly only without dropout)"),
}
# What a PEFT LoRA config says about the adapter (not the paths or the peft version that wrote it).
LORA_KEYS = ("peft_type", "task_type", "r", "lora_alpha", "lora_dropout", "target_modules", "bias", "fan_in_fan_out",
             "use_rslora", "use_dora", "modules_to_save")
NOT_REPRODUCIBLE = {"tokens_per_s", "peak_memory"}  # timings and memory, not what was learned


def records(path: Path) -> list[dict]:
    return [{k: v for k, v in json.loads(line).items() if k not in NOT_REPRODUCIBLE}
            for line in path.read_text().splitlines()]


def assert_same_tensors(expected: dict, got: dict, what: str) -> None:
    assert sorted(got) == sorted(expected), what
    for name, value in expected.items():
        assert got[name].dtype == value.dtype and got[name].shape == value.shape, f"{what}: {name}"
        assert got[name].tobytes() == value.tobytes(), (
            f"{what}: {name} differs (max |diff| {np.abs(got[name].astype(np.float64) - value).max():.3g})")


def assert_matches_reference(run: Path, reference: Path) -> None:
    """The resumed `run` holds what `reference` (the uninterrupted run of the old code) holds, bit for bit."""
    weights = sorted(reference.glob("*.safetensors"))
    assert weights, reference
    for file in weights:
        assert_same_tensors(load_file(str(file)), load_file(str(run / "adapter" / file.name)), file.name)
    for file in reference.glob("*_config.json"):
        expected, got = json.loads(file.read_text()), json.loads((run / "adapter" / file.name).read_text())
        if expected.get("peft_type") == "LORA":
            expected, got = ({k: c.get(k) for k in LORA_KEYS} for c in (expected, got))
        assert got == expected, file.name
    expected, got = records(reference / "metrics.jsonl"), records(run / "metrics.jsonl")
    assert [r["step"] for r in got] == [1, 2, 3, 4]
    # loss, lr, grad_norm, eval_loss: equal floats (fields added to the records since are not in the reference)
    differ = [(e, g) for e, g in zip(expected, got) if e != {k: v for k, v in g.items() if k in e}]
    assert all(set(g) - set(e) <= {"padding"} for e, g in zip(expected, got))  # the one field added since
    assert not differ, f"metrics.jsonl differs from the reference: {differ[:1]}"


@pytest.mark.parametrize("case", sorted(CASES))
def test_a_run_folder_from_before_the_refactor_resumes_bit_exactly(case, tmp_path, monkeypatch, golden, datasets):
    framework, _ = CASES[case]
    if framework == "mindspore":
        pytest.importorskip("mindspore", reason="MindSpore is not installed (pip install 'tuneport[mindspore]'): "
                                                "the stored MindSpore run folder cannot be resumed here")
    stored = OLD_RUNS / case
    run = tmp_path / "run"
    shutil.copytree(stored / "run", run)
    assert (run / "checkpoints" / "step-2").is_dir() and not (run / "adapter").exists()
    # The stored recipe names the golden checkpoint and the data relative to the repository root.
    root = golden.parents[2]
    recipe = yaml.safe_load((run / "recipe.yaml").read_text())
    assert recipe["framework"] == framework
    assert (root / recipe["model"]).resolve() == (golden / "checkpoint").resolve()
    for path in (recipe["data"]["train"], recipe["data"]["eval"]):
        assert (root / path).resolve().is_relative_to(datasets.resolve()) and (root / path).is_file(), path
    monkeypatch.chdir(root)

    assert main(["train", "--resume", str(run)]) == 0

    assert_matches_reference(run, stored / "reference")
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-2", "step-4"]
