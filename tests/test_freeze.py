"""Freeze tuning (`method.name: freeze`, LLaMA-Factory's): only the last blocks, or the named modules of
them, train; the rest stays bit for bit the base. Added as one file per framework
(frameworks/torch/methods/freeze.py, frameworks/mindspore/methods/freeze.py): this checks both, their
agreement with each other, exact resume, and the trainable count `tuneport methods` prints."""

import json
import re

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file

from tuneport.core.cli import main

DEMO = "builtin:demo.yaml"
COMMON = ("method.name=freeze", "train.scheduler=constant", "train.weight_decay=0.01")
BLOCK = re.compile(r"transformer\.encoder\.layers\.(\d+)\.(.+)")  # the demo model's (ChatGLM3's) names


def weights(folder):
    return load_file(str(folder / "model.safetensors"))


def changed(before: dict, after: dict) -> set:
    """The weights of `after` that differ from `before` (MindSpore saves no buffers: its keys may be fewer)."""
    assert after.keys() <= before.keys()
    return {n for n in after if not np.array_equal(before[n], after[n])}


def test_freeze_trains_the_last_block_only_and_resumes_exactly(tmp_path):
    """The demo model has 2 blocks: with trainable_layers=1 every weight outside block 1 comes back bit for bit,
    and every weight of block 1 moved. Stopped after step 2 and resumed, the result equals the straight run."""
    args = (*COMMON, "method.trainable_layers=1", "save.every=2")
    assert main(["train", DEMO, f"output_dir={tmp_path / 'straight'}", "train.max_steps=4", *args]) == 0
    assert main(["train", DEMO, f"output_dir={tmp_path / 'resumed'}", "train.max_steps=2", *args]) == 0
    assert main(["train", "--resume", str(tmp_path / "resumed"), "train.max_steps=4"]) == 0
    base = weights(tmp_path / "straight" / "base_model")
    tuned = weights(tmp_path / "straight" / "adapter")
    block_1 = {n for n in base if (m := BLOCK.fullmatch(n)) and m[1] == "1"}
    assert block_1 and changed(base, tuned) == block_1
    resumed = weights(tmp_path / "resumed" / "adapter")
    assert changed(tuned, resumed) == set()


def test_freeze_trains_only_the_named_modules_of_those_blocks(tmp_path):
    out = tmp_path / "run"
    assert main(["train", DEMO, f"output_dir={out}", "train.max_steps=2", *COMMON, "method.trainable_layers=2",
                 "method.trainable_modules=[mlp]"]) == 0
    moved = changed(weights(out / "base_model"), weights(out / "adapter"))
    assert moved == {n for n in weights(out / "base_model") if (m := BLOCK.fullmatch(n)) and m[2].startswith("mlp.")}
    assert len(moved) == 4  # dense_h_to_4h and dense_4h_to_h of blocks 0 and 1


def test_freeze_refuses_what_it_cannot_train(tmp_path, capsys):
    assert main(["train", DEMO, f"output_dir={tmp_path / 'a'}", *COMMON, "method.trainable_layers=3"]) == 2
    assert "method.trainable_layers: 3 but the model has 2 blocks" in capsys.readouterr().err
    assert main(["train", DEMO, f"output_dir={tmp_path / 'b'}", *COMMON, "method.trainable_modules=[nothing]"]) == 2
    assert "method.trainable_modules: ['nothing'] match no parameter" in capsys.readouterr().err
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_methods_table_counts_the_last_two_blocks_of_the_6b(capsys):
    """freeze's default (the last 2 of ChatGLM3-6B's 28 blocks), counted here from the model's own parameters."""
    from tuneport.models.chatglm3 import ChatGLMForConditionalGeneration
    from tuneport.models.chatglm3.config import chatglm3_6b_config

    with torch.device("meta"):
        model = ChatGLMForConditionalGeneration(chatglm3_6b_config())
    expected = sum(p.numel() for n, p in model.named_parameters()
                   if n.startswith(("transformer.encoder.layers.26.", "transformer.encoder.layers.27.")))
    assert main(["methods", "--family", "chatglm"]) == 0
    row = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("freeze "))
    assert "torch, mindspore" in row
    assert int(re.findall(r"[\d,]{2,}", row)[0].replace(",", "")) == expected


def test_mindspore_freeze_trains_the_same_as_torch_and_resumes_exactly(tmp_path):
    """5 steps of freeze tuning in each framework from the same base: the same losses and weights (as LoRA's
    parity test); then MindSpore's run stopped after step 2 and resumed equals its straight run."""
    pytest.importorskip("mindspore", reason="MindSpore is not installed (pip install 'tuneport[mindspore]')")
    args = (*COMMON, "method.trainable_layers=1", "train.lr=1e-3", "save.every=2")
    for framework in ("torch", "mindspore"):
        assert main(["train", DEMO, f"output_dir={tmp_path / framework}", f"framework={framework}",
                     "train.max_steps=5", *args]) == 0
    losses = {f: [json.loads(line)["loss"] for line in (tmp_path / f / "metrics.jsonl").read_text().splitlines()]
              for f in ("torch", "mindspore")}
    np.testing.assert_allclose(losses["mindspore"], losses["torch"], atol=1e-4, rtol=0)
    a, b = weights(tmp_path / "torch" / "adapter"), weights(tmp_path / "mindspore" / "adapter")
    assert b.keys() <= a.keys() and {n.rsplit(".", 1)[-1] for n in a.keys() - b.keys()} <= {"inv_freq"}  # torch's buffer
    for name in b:
        np.testing.assert_allclose(b[name], a[name], atol=1e-4, rtol=1e-4, err_msg=name)
    assert changed(weights(tmp_path / "mindspore" / "base_model"), b)  # it trained

    straight, resumed = tmp_path / "ms-straight", tmp_path / "ms-resumed"
    ms = ("framework=mindspore", *args)
    assert main(["train", DEMO, f"output_dir={straight}", "train.max_steps=4", *ms]) == 0
    assert main(["train", DEMO, f"output_dir={resumed}", "train.max_steps=2", *ms]) == 0
    assert main(["train", "--resume", str(resumed), "train.max_steps=4"]) == 0
    assert changed(weights(straight / "adapter"), weights(resumed / "adapter")) == set()
