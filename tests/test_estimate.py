"""`tuneport estimate` against the memory a training step really takes: each configuration trains two
steps with tuneport's runtime in its own process, whose peak resident memory is the measurement.

The peak is the process's high-water mark of resident memory from just before the estimate (Linux's
VmHWM, reset through /proc/self/clear_refs). glibc keeps freed blocks below its mmap threshold, which
makes RSS overstate what a process holds; the workers fix M_MMAP_THRESHOLD at 1 MiB so that RSS follows
their allocations (tuneport itself leaves glibc's setting alone, which measured faster).
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tuneport.core.cli import main
from tuneport.core.config import load_recipe
from tuneport.frameworks.torch.estimate import estimate, largest_batch
from tuneport.models.chatglm3 import ChatGLMForConditionalGeneration
from tuneport.models.chatglm3.config import chatglm3_6b_config

WORKER = """
import json, sys
from pathlib import Path
import numpy as np
from tuneport.backends import get_backend
from tuneport.frameworks.torch.runtime import TorchRuntime
from tuneport.core.config import load_recipe
from tuneport.frameworks.torch.estimate import estimate
from tuneport.core.precision import resolve_precision
from tuneport.backends.cpu import set_mmap_threshold

set_mmap_threshold(1 << 20)  # resident memory follows what is allocated (see the module docstring)
recipe = load_recipe(json.loads(sys.argv[1]))
with open("/proc/self/clear_refs", "w") as f:  # the peak starts here, not at an import's passing spike
    f.write("5")
predicted = estimate(recipe, "cpu")  # its runtime part: the resident memory now, imports done
backend = get_backend("cpu")
backend.setup()  # as `tuneport train` does
runtime = TorchRuntime(recipe, backend, resolve_precision(recipe.precision, "cpu", backend.capabilities),
                       Path(recipe.model))
d, b = recipe.data, recipe.train.micro_batch_size
seq = d.max_input_length + d.max_output_length + 1
ids = np.random.default_rng(0).integers(0, 60000, (b, seq))
labels = ids.copy()
labels[:, :d.max_input_length + 1] = -100
batch = {"input_ids": ids, "labels": labels, "attention_mask": np.ones_like(ids)}
if d.packing:  # rows of whole samples of 100 tokens, half of them labelled
    from tuneport.core.data import collate_packed
    sample = (list(range(1, 101)), [-100] * 50 + list(range(51, 101)))
    batch = collate_packed([[sample] * (d.row_tokens // 100)] * b, 0)
for _ in range(2):
    runtime.forward_backward(batch, int((labels[:, 1:] != -100).sum()))
    runtime.optimizer_step(1e-4, 1.0)
peak_kib = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM:"))
print(json.dumps({"measured": peak_kib * 1024,
                  "predicted": predicted.peak, "parts": vars(predicted)}))
"""

SIZES = {"h256": dict(num_layers=2, hidden_size=256, ffn_hidden_size=688, num_attention_heads=4, kv_channels=64),
         "h512": dict(num_layers=3, hidden_size=512, ffn_hidden_size=1376, num_attention_heads=8, kv_channels=64)}
CONFIGS = [  # size, method, batch, input + output tokens, checkpointing
    ("h256", "lora", 4, (64, 191), False),
    ("h256", "lora", 4, (64, 191), True),
    ("h512", "lora", 8, (128, 383), False),
    ("h512", "ptuning_v2", 2, (256, 255), False),
    ("h256", "full", 2, (32, 95), False),
    ("h512", "lora", 1, (512, 511), True),
    ("h256", "lora", 2, (64, 191), False, 1024),  # packed rows of 1024 tokens
]


def recipe_for(folder, method, batch, lengths, checkpointing, pack=None):
    methods = {"lora": {"name": "lora", "r": 8, "alpha": 16, "target_modules": ["query_key_value"]},
               "ptuning_v2": {"name": "ptuning_v2", "num_virtual_tokens": 16}, "full": {"name": "full"}}
    return {"model": str(folder), "method": methods[method], "precision": "fp32", "device": "cpu",
            "data": {"train": "unused.jsonl", "max_input_length": lengths[0], "max_output_length": lengths[1],
                     "packing": pack is not None, "pack_length": pack},
            "train": {"micro_batch_size": batch, "gradient_checkpointing": checkpointing, "max_steps": 1}}


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    made = {}
    for name, size in SIZES.items():
        torch.manual_seed(0)
        made[name] = tmp_path_factory.mktemp(name)
        ChatGLMForConditionalGeneration(chatglm3_6b_config(dtype="float32", **size)).save_pretrained(made[name])
    return made


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux's /proc peak-memory reset")
@pytest.mark.parametrize("size, method, batch, lengths, checkpointing, pack", [(*c, None)[:6] for c in CONFIGS])
def test_estimate_is_near_the_measured_peak(folders, size, method, batch, lengths, checkpointing, pack):
    recipe = recipe_for(folders[size], method, batch, lengths, checkpointing, pack)
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    done = subprocess.run([sys.executable, "-c", WORKER, json.dumps(recipe)], capture_output=True, text=True,
                          env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    ratio = result["predicted"] / result["measured"]
    print(f"\nestimate: {size} {method} batch {batch} seq {pack or sum(lengths) + 1} checkpointing {checkpointing}: predicted "
          f"{result['predicted'] / 2**20:.0f} MiB, measured {result['measured'] / 2**20:.0f} MiB, ratio {ratio:.3f}")
    assert 0.8 < ratio < 1.2  # generous: the README's table gives the measured ratios


def test_estimate_parts_and_the_largest_batch(folders):
    recipe = load_recipe(recipe_for(folders["h512"], "lora", 4, (128, 383), False))
    plain = estimate(recipe, "cpu", runtime=0)
    checkpointed = estimate(recipe, "cpu", checkpointing=True, runtime=0)
    assert checkpointed.activations < plain.activations / 2 and checkpointed.weights == plain.weights
    # LoRA r 8 on query_key_value of 3 layers: r x (in 512 + out 8 x 64 + 2 x 2 x 64), float32
    assert plain.gradients == 4 * 3 * 8 * (512 + 512 + 2 * 2 * 64)
    assert plain.optimizer == 3 * plain.gradients  # AdamW's two moments, and the one temporary of its step
    memory = plain.peak
    assert largest_batch(recipe, "cpu", memory, runtime=0) == 4  # the estimated batch is the largest that fits
    assert largest_batch(recipe, "cpu", plain.weights, runtime=0) == 0


def test_estimate_command(folders, tmp_path, capsys):
    recipe_file = tmp_path / "recipe.json"
    recipe_file.write_text(json.dumps(recipe_for(folders["h256"], "lora", 4, (64, 191), False)))
    assert main(["estimate", str(recipe_file), "--memory", "64GiB"]) == 0
    out = capsys.readouterr().out
    assert "weights" in out and "activations" in out and "fits in 64 GiB: yes" in out
    assert main(["estimate", str(recipe_file), "--memory", "100MiB"]) == 1
    assert "fits in 100 MiB: no" in capsys.readouterr().out
    assert main(["estimate", str(recipe_file), "--memory", "lots"]) == 2
    assert "--memory lots: not an amount of memory" in capsys.readouterr().err


def test_gradient_checkpointing_auto_follows_the_estimate(folders):
    from tuneport.core.config import RecipeError
    from tuneport.frameworks.torch.estimate import choose_checkpointing

    values = recipe_for(folders["h256"], "lora", 4, (64, 191), "auto")
    recipe = load_recipe(values)
    without = estimate(recipe, "cpu", checkpointing=False).peak
    assert choose_checkpointing(recipe, "cpu", 2 * without) is False  # fits: the faster way
    assert choose_checkpointing(recipe, "cpu", without) is True  # past 90% of the memory: checkpointing
    assert choose_checkpointing(recipe, "cpu", 0) is True  # memory unknown: the safe way
    qlora = load_recipe({**values, "method": {"name": "qlora", "r": 8, "target_modules": ["query_key_value"]}})
    assert choose_checkpointing(qlora, "cpu", 2 * without) is True  # not estimated: the safe way
    with pytest.raises(RecipeError, match="train.gradient_checkpointing: 'sometimes' is not one of auto"):
        load_recipe({**values, "train": {**values["train"], "gradient_checkpointing": "sometimes"}})


SHARDED_WORKER = """
import json, sys
from pathlib import Path
import numpy as np
from tuneport.backends import get_backend
from tuneport.core.config import load_recipe
from tuneport.core.distributed import init_distributed
from tuneport.core.precision import resolve_precision
from tuneport.frameworks.torch.estimate import estimate
from tuneport.frameworks.torch.runtime import TorchRuntime
from tuneport.backends.cpu import set_mmap_threshold

values, strategy = json.loads(sys.argv[1]), sys.argv[2]
if strategy.startswith("zero"):
    import deepspeed  # imported before the estimate, whose runtime part is the resident memory then
    values.update(deepspeed=f"builtin:deepspeed/{strategy}.json")
else:
    values["train"]["strategy"] = strategy
recipe = load_recipe(values)
backend = get_backend("cpu")
backend.setup()
set_mmap_threshold(1 << 20)  # resident memory follows what is allocated (see the module docstring)
dist = init_distributed("gloo", backend.device, process_group_alone=True)
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")
predicted = estimate(recipe, "cpu", nproc=dist.world_size, strategy=strategy)
runtime = TorchRuntime(recipe, backend, resolve_precision(recipe.precision, "cpu", backend.capabilities),
                       Path(recipe.model), dist)
d, b = recipe.data, recipe.train.micro_batch_size
seq = d.max_input_length + d.max_output_length + 1
ids = np.random.default_rng(dist.rank).integers(0, 60000, (b, seq))
labels = ids.copy()
labels[:, :d.max_input_length + 1] = -100
batch = {"input_ids": ids, "labels": labels, "attention_mask": np.ones_like(ids)}
for _ in range(2):
    runtime.forward_backward(batch, dist.world_size * int((labels[:, 1:] != -100).sum()))
    runtime.optimizer_step(1e-4, 1.0)
peak_kib = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM:"))
if dist.rank == 0:
    print(json.dumps({"measured": peak_kib * 1024, "predicted": predicted.peak, "parts": vars(predicted)}))
"""


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux's /proc peak-memory reset")
@pytest.mark.parametrize("strategy", ["ddp", "fsdp", "zero2", "zero3"])
def test_the_per_card_estimate_of_each_strategy_is_near_the_peak_of_two_processes(folders, tmp_path, strategy):
    """Full fine-tuning, so that what the engines divide (weights, gradients, optimizer state) is most of it."""
    if strategy.startswith("zero"):
        pytest.importorskip("deepspeed", reason="DeepSpeed is in the dev extra; install tuneport[deepspeed]")
    (tmp_path / "worker.py").write_text(SHARDED_WORKER)
    recipe = recipe_for(folders["h256"], "full", 2, (32, 95), False)
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "TORCH_EXTENSIONS_DIR": str(tmp_path / "ext")}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(tmp_path / "worker.py"), json.dumps(recipe), strategy], capture_output=True, text=True,
                          env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(next(line for line in done.stdout.splitlines() if line.startswith("{")))
    ratio = result["predicted"] / result["measured"]
    print(f"\nestimate --nproc 2 --strategy {strategy}: predicted {result['predicted'] / 2**20:.0f} MiB, measured "
          f"{result['measured'] / 2**20:.0f} MiB, ratio {ratio:.3f}")
    assert 0.8 < ratio < 1.2


def test_sharing_divides_what_each_engine_divides(tmp_path):
    chatglm3_6b_config().save_pretrained(tmp_path)  # config.json alone: all the estimate reads
    recipe = load_recipe(recipe_for(tmp_path, "full", 2, (32, 95), False))
    alone = estimate(recipe, "cpu", runtime=0)
    per = {s: estimate(recipe, "cpu", runtime=0, nproc=8, strategy=s) for s in ("ddp", "fsdp", "zero2", "zero3")}
    assert per["ddp"].weights == alone.weights and per["ddp"].optimizer == alone.optimizer
    assert per["zero2"].weights == alone.weights and per["zero2"].optimizer < alone.optimizer / 4
    assert per["fsdp"].weights < alone.weights and per["fsdp"].optimizer == alone.optimizer // 8
    assert per["zero3"].weights < alone.weights
    assert all(p.activations == alone.activations for p in per.values())  # every card's own
    offload = estimate(recipe, "cpu", runtime=0, nproc=8, strategy="fsdp", offload=True)
    assert offload.optimizer == 0 and offload.weights < per["fsdp"].weights


def test_estimate_command_per_card_and_the_fewest_cards(tmp_path, capsys):
    chatglm3_6b_config().save_pretrained(tmp_path)
    values = recipe_for(tmp_path, "full", 1, (256, 512), True)
    recipe_file = tmp_path / "recipe.json"
    recipe_file.write_text(json.dumps(values))
    args = ["estimate", str(recipe_file), "--device", "cuda", "precision=bf16"]
    assert main([*args, "--memory", "32GB"]) == 1  # full fine-tuning of 6B does not fit one card of 32 GB
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("fewest cards of 32 GB: "))
    nproc, strategy = int(line.split(": ")[1].split()[0]), line.split("--strategy ")[1].split()[0].rstrip(",")
    order = [("ddp", False), ("zero2", False), ("fsdp", False), ("zero3", False), ("fsdp", True)]
    chosen = order.index((strategy, "--offload" in line))
    recipe = load_recipe(values, ("precision=bf16",))

    def fits(n, s, o):
        return estimate(recipe, "cuda", nproc=n, strategy=s, offload=o).peak <= 32e9

    assert fits(nproc, *order[chosen])  # the advice fits, and nothing before it in the order does
    assert not any(fits(nproc, *choice) for choice in order[:chosen])
    assert nproc == 1 or not any(fits(nproc // 2, *choice) for choice in order)
    assert main([*args, "--nproc", "8", "--strategy", "fsdp", "--memory", "32GB"]) == 0
    assert "per card of 8 (fsdp)" in capsys.readouterr().out
    assert main([*args, "--offload"]) == 2
    assert "--offload: host-memory offload is fsdp's; add --strategy fsdp" in capsys.readouterr().err
