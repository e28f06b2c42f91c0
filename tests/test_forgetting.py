"""Forgetting: general-domain data scored before and after tuning (`eval.general`), and mixed into the
training batches (`data.mix`) at a seeded ratio that a resumed run replays exactly."""

import copy
import json
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

from tuneport.core.cli import main
from tuneport.core.data import EncodedData
from tuneport.core.trainer import Position, micro_batches

DEMO = "builtin:demo.yaml"
KILLER = str(Path(__file__).parent / "killer.py")


def marked(count: int, start: int) -> EncodedData:
    """Samples whose single token is their identity (task ids from 0, general ids from 10,000)."""
    return EncodedData(samples=[([start + i], [start + i]) for i in range(count)], format="test", records=count, truncated=0, dropped=0)


def ids(batch) -> list[int]:
    return batch["input_ids"][:, 0].tolist()


def test_mixing_draws_the_configured_share_and_covers_the_task_data():
    task, general = marked(37, 0), marked(23, 10_000)
    stream = micro_batches(task, 4, seed=7, pad_id=0, pos=Position(), mix=general, mix_ratio=0.25)
    drawn = [i for _ in range(1000) for i in ids(next(stream))]
    share = sum(i >= 10_000 for i in drawn) / len(drawn)
    assert share == pytest.approx(0.25, abs=0.02)
    task_drawn = [i for i in drawn if i < 10_000]
    first_epoch = task_drawn[:37]  # the task stream still runs whole epochs: each sample once
    assert sorted(first_epoch) == list(range(37))
    assert {i for i in drawn if i >= 10_000} == set(range(10_000, 10_023))
    # Without data.mix, the stream is the task data alone.
    plain = micro_batches(task, 4, seed=7, pad_id=0, pos=Position())
    assert all(i < 10_000 for _ in range(50) for i in ids(next(plain)))


def test_mixing_resumes_exactly_from_a_saved_position():
    task, general = marked(37, 0), marked(23, 10_000)
    pos = Position()
    stream = micro_batches(task, 4, seed=3, pad_id=0, pos=pos, rank=0, world_size=1, mix=general, mix_ratio=0.3)
    for _ in range(57):
        next(stream)
    saved = copy.deepcopy(pos)  # what a checkpoint stores
    straight = [ids(next(stream)) for _ in range(40)]
    resumed_stream = micro_batches(task, 4, seed=3, pad_id=0, pos=Position(**vars(saved)), mix=general, mix_ratio=0.3)
    assert [ids(next(resumed_stream)) for _ in range(40)] == straight
    assert saved.mix_offset or saved.mix_epoch  # the general stream had moved on, and was restored too


def test_demo_reports_forgetting_and_a_mixed_run_resumes_bit_exactly(tmp_path, datasets, capsys):
    general = datasets / "alpaca_zh" / "train.json"
    common = ["train.max_steps=6", "save.every=2", "eval.max_batches=2", f"eval.general={general}",
              "data.eval=builtin:demo/data.jsonl", f"data.mix={general}", "data.mix_ratio=0.25"]
    assert main(["train", DEMO, f"output_dir={tmp_path / 'straight'}", *common]) == 0
    out = capsys.readouterr().out
    run = json.loads((tmp_path / "straight" / "run.json").read_text())
    before, change = run["baseline"], run["forgetting"]
    assert before.keys() == {"eval_loss", "general_loss"} and change.keys() == before.keys()
    last = [json.loads(x) for x in (tmp_path / "straight" / "metrics.jsonl").read_text().splitlines()][-1]
    assert change["general_loss"]["after"] == last["general_loss"] and change["eval_loss"]["after"] == last["eval_loss"]
    assert change["eval_loss"]["after"] < change["eval_loss"]["before"]  # the task improved
    g = change["general_loss"]
    assert g["change"] == pytest.approx(g["after"] / g["before"] - 1)
    assert (f"general loss {g['before']:.2f} → {g['after']:.2f} ({g['change']:+.1%})") in out
    assert len(run["sha256"]["data"][str(general)]) == 64

    killed = subprocess.run([sys.executable, KILLER, "step", "3", "train", DEMO, f"output_dir={tmp_path / 'killed'}",
                             *common], capture_output=True, text=True, timeout=300)
    assert killed.returncode == -9, killed.stderr[-2000:]
    assert main(["train", "--resume", str(tmp_path / "killed")]) == 0
    a, b = (load_file(tmp_path / run / "adapter" / "adapter_model.safetensors") for run in ("straight", "killed"))
    assert all(a[k].equal(b[k]) for k in a)
    assert json.loads((tmp_path / "killed" / "run.json").read_text())["forgetting"] == change


def test_bad_mix_ratio_is_one_line(capsys):
    assert main(["train", DEMO, "data.mix=builtin:demo/data.jsonl", "data.mix_ratio=1.5"]) == 2
    assert "data.mix_ratio: 1.5 must be in [0, 1)" in capsys.readouterr().err


def test_generation_metrics_in_training_equal_tuneport_eval_of_the_saved_adapter(tmp_path, capsys):
    """eval.generate scores the training model's greedy replies at each evaluation; at the last step that is
    what `tuneport eval` gives for the saved adapter with the same prompts, lengths and samples."""
    pytest.importorskip("jieba")
    out = tmp_path / "run"
    assert main(["train", DEMO, f"output_dir={out}", "train.max_steps=30", "data.eval=builtin:demo/data.jsonl",
                 "eval.every=15", "eval.generate=true", "eval.generate_samples=6", "eval.max_batches=1"]) == 0
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    scored = [r for r in records if "rouge-l" in r]
    assert [r["step"] for r in scored] == [15, 30]
    baseline = json.loads((out / "run.json").read_text())["baseline"]
    assert scored[-1]["rouge-l"] > baseline["rouge-l"]  # tuning improved the replies
    assert main(["eval", "--model", str(out / "base_model"), "--adapter", str(out / "adapter"), "--data",
                 "builtin:demo/data.jsonl", "--limit", "6", "--max-new-tokens", "64", "--max-input-length", "64",
                 "--out", str(tmp_path / "eval")]) == 0
    metrics = json.loads((tmp_path / "eval" / "eval.json").read_text())["metrics"]
    for name in ("rouge-1", "rouge-2", "rouge-l", "bleu-4"):
        assert scored[-1][name] == pytest.approx(metrics[name], abs=1e-6), name
    assert main(["train", DEMO, f"output_dir={tmp_path / 'bad'}", "eval.generate=true"]) == 2
    assert "eval.generate: true needs data.eval" in capsys.readouterr().err
