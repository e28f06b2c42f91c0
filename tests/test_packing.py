"""Packing (`data.packing`): several samples a row, none seeing another.

The exactness reference is the same samples unpacked (right-padded rows, one sample each): a packed micro-batch
must give the same loss and gradients within 1e-5 in fp32, for ChatGLM3 and every transformers decoder entry, on
the reference kernels, the CPU backend's and the FAKE torch_npu's TND `npu_fusion_attention` (tests/fakes stands
in for Ascend hardware). A control shows the test can fail: the same packed rows with attention that crosses the
samples give another loss.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from tuneport.backends import get_backend
from tuneport.backends.reference import REFERENCE_KERNELS
from tuneport.core.cli import main
from tuneport.core.config import load_recipe
from tuneport.core.data import IGNORE_INDEX, EncodedData, collate, collate_packed, pack, packed_rows
from tuneport.core.errors import RecipeError
from tuneport.core.trainer import Position, micro_batches, total_steps
from tuneport.models.chatglm3 import chatglm3_tiny
from tuneport.models.decoder.checkpoint import load_model


def _decoder_tests():
    """tests/test_decoder.py, for its tiny model of each entry and the FAKE NPU (tests import by path here)."""
    spec = importlib.util.spec_from_file_location("tuneport_tests_decoder", Path(__file__).parent / "test_decoder.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


decoders = _decoder_tests()
CONFIGS, OnCPU, fake, write_model = decoders.CONFIGS, decoders.OnCPU, decoders.fake, decoders.write_model
TOL = dict(atol=1e-5, rtol=1e-5)
VOCAB = 120
LENGTHS = [9, 5, 12, 3, 7, 6, 10]  # packed into rows of 16: [12, 3], [10, 6], [9, 7], [5]
KILLER = str(Path(__file__).parent / "killer.py")
DEMO = "builtin:demo.yaml"


def samples(lengths=LENGTHS, seed=0) -> list[tuple[list[int], list[int]]]:
    """Random samples whose first half (at least one token) carries no loss, as a prompt."""
    rng = np.random.default_rng(seed)
    found = []
    for n in lengths:
        ids = rng.integers(3, VOCAB, n).tolist()
        prompt = max(1, n // 2)
        found.append((ids, [IGNORE_INDEX] * prompt + ids[prompt:]))
    return found


def tensors(batch: dict) -> dict:
    return {k: torch.from_numpy(v) for k, v in batch.items()}


# --- the data side ------------------------------------------------------------------------------------------------
def test_first_fit_decreasing_fills_rows_and_refuses_a_sample_too_long():
    assert pack(LENGTHS, 16) == [[2, 3], [6, 5], [0, 4], [1]]
    with pytest.raises(ValueError, match="17 tokens does not fit in a packed row of 16"):
        pack([17], 16)


def test_a_packed_batch_keeps_each_samples_positions_and_cuts_at_every_sample_and_padding():
    rows = [[(s, s) for s in ([5, 6, 7], [8, 9])], [([10, 11, 12, 13], [10, 11, 12, 13])]]
    batch = collate_packed(rows, pad_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8, 9], [10, 11, 12, 13, 0]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1], [0, 1, 2, 3, 0]]
    # a sample's first label is never a target (the previous sample's last token must not predict it)
    assert batch["labels"].tolist() == [[-100, 6, 7, -100, 9], [-100, 11, 12, 13, -100]]
    assert batch["cu_seq_lens"].tolist() == [0, 3, 5, 9, 10] and batch["cu_seq_lens"].dtype == np.int32
    assert batch["attention_mask"].tolist() == [[1] * 5, [1, 1, 1, 1, 0]]


def test_each_epoch_packs_every_sample_once_by_seed_and_epoch_alone():
    lengths = np.random.default_rng(1).integers(2, 40, 300).tolist()
    rows = packed_rows(300, 7, 0, lengths, 64, window=50)
    assert sorted(i for row in rows for i in row) == list(range(300))
    assert all(sum(lengths[i] for i in row) <= 64 for row in rows)
    assert rows == packed_rows(300, 7, 0, lengths, 64, window=50)
    assert rows != packed_rows(300, 7, 1, lengths, 64, window=50)
    # first-fit decreasing within windows of 50 leaves little room: under 8% of the row tokens
    assert 1 - sum(lengths) / (64 * len(rows)) < 0.08


def test_micro_batches_of_packed_rows_resume_from_a_saved_position():
    data = EncodedData(samples(np.random.default_rng(2).integers(2, 12, 40).tolist()), "conversations", 40, 0, 0)
    pos = Position()
    stream = micro_batches(data, 2, seed=3, pad_id=0, pos=pos, group=2, pack=16)
    first = [next(stream) for _ in range(3)]
    saved = Position(**vars(pos))
    after = [next(stream) for _ in range(4)]
    resumed = micro_batches(data, 2, seed=3, pad_id=0, pos=saved, group=2, pack=16)
    for a, b in zip(after, [next(resumed) for _ in range(4)]):
        assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    assert all(b["input_ids"].shape[0] == 2 and b["input_ids"].shape[1] <= 16 for b in first + after)


def test_mixed_general_rows_come_packed_too_and_resume_exactly():
    task = EncodedData(samples([6] * 30, seed=3), "conversations", 30, 0, 0)
    general = EncodedData(samples([5] * 30, seed=4), "conversations", 30, 0, 0)
    general_ids = {tuple(ids) for ids, _ in general.samples}
    pos = Position()
    stream = micro_batches(task, 4, seed=5, pad_id=0, pos=pos, group=4, mix=general, mix_ratio=0.5, pack=16)
    first = [next(stream) for _ in range(3)]
    saved = Position(**vars(pos))
    after = [next(stream) for _ in range(3)]
    resumed = micro_batches(task, 4, seed=5, pad_id=0, pos=saved, group=4, mix=general, mix_ratio=0.5, pack=16)
    for a, b in zip(after, [next(resumed) for _ in range(3)]):
        assert all(np.array_equal(a[k], b[k]) for k in a)
    rows = [row for batch in first + after for row in batch["input_ids"].tolist()]
    # rows of general samples and rows of task samples, both drawn
    kinds = {tuple(row[:5]) in general_ids for row in rows}
    assert kinds == {True, False} and pos.mix_offset > 0


# --- exactness ------------------------------------------------------------------------------------------------
KERNELS = ["reference", "cpu", "npu-910B"]


@pytest.fixture(params=KERNELS)
def kernels(request, monkeypatch):
    """(kernel table, fake torch_npu or None)."""
    if request.param == "reference":
        return REFERENCE_KERNELS, None
    if request.param == "cpu":
        return get_backend("cpu").kernels, None
    mod = fake.install(monkeypatch, "910B")
    return OnCPU(get_backend("npu").kernels).kernels, mod


def loss_and_grads(model, batch: dict, num_items: int) -> tuple[torch.Tensor, dict]:
    model.zero_grad(set_to_none=True)
    loss = model(**tensors(batch), num_items_in_batch=num_items, use_cache=False, loss_only=True).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def check_packed_equals_unpacked(model, mod, fused: bool = True) -> None:
    """Packed against unpacked; with the FAKE NPU, whether the TND kernel ran (`fused`)."""
    data = samples()
    unpacked = collate(data, pad_id=0)
    packed = collate_packed([[data[i] for i in row] for row in pack(LENGTHS, 16)], pad_id=0)
    num_items = int((unpacked["labels"][:, 1:] != IGNORE_INDEX).sum())
    assert num_items == int((packed["labels"][:, 1:] != IGNORE_INDEX).sum())
    if mod is not None:
        mod.fake_state.calls.clear()
    loss, grads = loss_and_grads(model, unpacked, num_items)
    packed_loss, packed_grads = loss_and_grads(model, packed, num_items)
    if mod is not None:
        assert (mod.fake_state.calls["npu_fusion_attention TND"] > 0) == fused, mod.fake_state.calls
    torch.testing.assert_close(packed_loss, loss, **TOL)
    assert packed_grads.keys() == grads.keys() and len(grads) > 4
    for name in grads:
        torch.testing.assert_close(packed_grads[name], grads[name], **TOL, msg=name)

    # The control: the same rows with attention across their samples (no cuts) give another loss.
    crossing = {k: v for k, v in packed.items() if k != "cu_seq_lens"}
    crossing["attention_mask"] = np.ones_like(crossing["attention_mask"])  # one sequence a row
    with torch.no_grad():
        crossed = model(**tensors(crossing), num_items_in_batch=num_items, use_cache=False, loss_only=True).loss
    assert abs(float(crossed) - float(loss)) > 1e-3


def test_chatglm3_packed_equals_unpacked(kernels):
    table, mod = kernels
    torch.manual_seed(0)
    model = chatglm3_tiny(padded_vocab_size=VOCAB)
    model.set_kernels(table)
    check_packed_equals_unpacked(model, mod)


# Entries whose packed rows take transformers' block-diagonal mask instead of the packed kernel
MASKED = {"gemma2": "capped scores: transformers' eager attention",
          "mistral": "every layer's sliding window (4 tokens here) is shorter than the rows"}


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    """Each entry's tiny model, written before a test installs the FAKE torch_npu (saving with it installed
    imports DeepSpeed, which would take the fake for a device)."""
    return {name: write_model(tmp_path_factory.mktemp(name), name) for name in CONFIGS}


@pytest.mark.parametrize("model_type", sorted(CONFIGS))
def test_every_decoder_packed_equals_unpacked(model_type, folders, kernels):
    table, mod = kernels
    model = load_model(folders[model_type], dtype=torch.float32)
    model.set_kernels(table)
    check_packed_equals_unpacked(model, mod, model_type not in MASKED)


# --- recipes, runs, resume ------------------------------------------------------------------------------------
def run(args: list[str], killer: bool = False) -> None:
    """`tuneport ARGS` in a new process (with `killer`, SIGKILLed where tests/killer.py is told to)."""
    command = [sys.executable, KILLER] if killer else [sys.executable, "-m", "tuneport.core.cli"]
    result = subprocess.run([*command, *args], capture_output=True, text=True, timeout=300)
    assert result.returncode == (-9 if killer else 0), result.stderr[-2000:]


def test_a_packed_run_killed_mid_run_resumes_bit_exactly_with_less_padding(tmp_path):
    common = ["data.packing=true", "train.max_steps=4", "save.every=1", "train.micro_batch_size=2",
              "train.grad_accum=2"]
    straight, killed, padded = tmp_path / "straight", tmp_path / "killed", tmp_path / "padded"
    # the straight run in a process of its own too: a run inside the test process, after other tests, may round
    # the last bit of some weights otherwise (as test_methods.py notes)
    run(["train", DEMO, *common, f"output_dir={straight}"])
    run(["step", "2", "train", DEMO, *common, f"output_dir={killed}"], killer=True)
    run(["train", "--resume", str(killed)])
    assert main(["train", DEMO, *common[1:], f"output_dir={padded}"]) == 0
    records = {folder.name: [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
               for folder in (straight, killed, padded)}
    assert [r["loss"] for r in records["straight"]] == [r["loss"] for r in records["killed"]]
    a, b = (load_file(folder / "adapter" / "adapter_model.safetensors") for folder in (straight, killed))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # micro-batches of 2 rows: packed, a row of 129 tokens holds several of the demo's short samples
    tokens = {name: sum(r["tokens"] for r in found) for name, found in records.items()}
    assert tokens["straight"] > 2 * tokens["padded"], tokens
    assert max(r["padding"] for r in records["straight"]) < 0.1


@pytest.mark.parametrize("method", ["prompt_tuning", "ptuning", "prefix_tuning", "ptuning_v2"])
def test_methods_that_put_virtual_tokens_before_each_sample_refuse_packing(method, tmp_path):
    with pytest.raises(RecipeError, match=f"data.packing: method {method} puts its virtual tokens before each "
                                          "sample"):
        load_recipe(DEMO, [f"method.name={method}", "data.packing=true", f"output_dir={tmp_path}"])


def test_a_row_shorter_than_a_sample_may_be_is_refused(tmp_path):
    with pytest.raises(RecipeError, match=r"data.pack_length: 100 is shorter than a sample may be \(max_input_length "
                                          r"\+ max_output_length \+ 1 = 129\)"):
        load_recipe(DEMO, ["data.packing=true", "data.pack_length=100", "data.max_input_length=64",
                           "data.max_output_length=64", f"output_dir={tmp_path}"])


def test_epochs_count_packed_rows():
    recipe = load_recipe(DEMO, ["train.max_steps=null", "train.epochs=2", "train.micro_batch_size=2",
                                "data.packing=true", "data.max_input_length=32", "data.max_output_length=31"])
    data = EncodedData(samples([20] * 12), "conversations", 12, 0, 0)  # three of 20 tokens a row of 64
    assert total_steps(recipe, data) == 4  # 2 epochs of 4 rows, 2 rows a step
