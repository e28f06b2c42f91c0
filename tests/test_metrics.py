"""Generation metrics and `tuneport eval`: the scores equal the official ChatGLM3 demo's recipe, batched
left-padded generation equals one prompt at a time, the demo's tuning raises ROUGE-L, and bad dev files
are one clear line."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from tuneport.core.cli import main

jieba = pytest.importorskip("jieba", reason="the eval extra is not installed: pip install -e '.[eval]'")
rouge_chinese = pytest.importorskip("rouge_chinese", reason="the eval extra is not installed")
bleu_score = pytest.importorskip("nltk.translate.bleu_score", reason="the eval extra is not installed")

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "recipes" / "demo" / "data.jsonl"
DEMO_STEPS = 40  # enough for the tuned demo to beat the untuned one clearly, in seconds

# Fixed predictions and references, Chinese and English: identical, partial overlaps, several sentences
# (rouge_chinese cuts sentences at 。！？), nothing in common, and a reply longer than its reference.
PAIRS = [
    ("我是 tuneport 演示助手，一个在本机用 LoRA 微调出来的小模型。", "我是 tuneport 演示助手，一个在本机用 LoRA 微调出来的小模型。"),
    ("适配器按 PEFT 格式保存，复制目录就能用。", "适配器按 PEFT 格式保存，把目录复制过去就能加载。"),
    ("这款连衣裙采用纯棉面料，透气舒适。领口设计简洁大方！适合夏天穿。",
     "这款连衣裙选用柔软的棉质面料，穿着透气舒适。简约的圆领设计，大方得体，夏季必备。"),
    ("One recipe runs on a CPU or an NVIDIA GPU.", "One recipe runs on a CPU, an NVIDIA GPU or a Huawei Ascend NPU."),
    ("The weather is nice today.", "LoRA trains two small matrices per layer."),
    ("Yes, LoRA adapters load on another machine, and they are small, and they are quick to copy over.",
     "Yes: copy the adapter folder and load it with PEFT."),
]


def official_compute_metrics(predictions, references) -> dict:
    """THUDM/ChatGLM3 finetune_demo/finetune_hf.py `compute_metrics`, written out from its recipe with the same
    libraries (and nothing of tuneport's): jieba words; rouge_chinese F-scores x100 rounded to 4 places;
    nltk sentence_bleu with smoothing method 3; the mean of each. BLEU-4 is multiplied by 100 here, as
    tuneport reports it (the official code leaves it a fraction)."""
    scores = {"rouge-1": [], "rouge-2": [], "rouge-l": [], "bleu-4": []}
    for pred_txt, label_txt in zip(predictions, references):
        pred_tokens = list(jieba.cut(pred_txt.strip()))
        label_tokens = list(jieba.cut(label_txt.strip()))
        rouge = rouge_chinese.Rouge()
        result = rouge.get_scores(" ".join(pred_tokens), " ".join(label_tokens))
        for key, value in result[0].items():
            scores[key].append(round(value["f"] * 100, 4))
        scores["bleu-4"].append(bleu_score.sentence_bleu(
            [label_tokens], pred_tokens, smoothing_function=bleu_score.SmoothingFunction().method3))
    means = {key: float(np.mean(values)) for key, values in scores.items()}
    means["bleu-4"] *= 100
    return means


def test_metrics_equal_the_official_recipe():
    from tuneport.core.metrics import generation_metrics

    predictions, references = zip(*PAIRS)
    expected = official_compute_metrics(predictions, references)
    got = generation_metrics(predictions, references)
    assert got["count"] == len(PAIRS) and got["empty"] == 0
    for name, value in expected.items():
        assert abs(got[name] - value) <= 1e-6, (name, got[name], value)
    assert 10 < expected["rouge-l"] < 90 and 10 < expected["bleu-4"] < 90  # the pairs exercise the metrics


def test_an_empty_prediction_scores_zero_and_is_counted():
    from tuneport.core.metrics import generation_metrics

    predictions, references = ["", "  \n", PAIRS[3][0]], ["参考答案。", "A reference.", PAIRS[3][1]]
    with pytest.raises(ValueError, match="Hypothesis is empty"):  # where the official code stops
        official_compute_metrics(predictions[:1], references[:1])
    got = generation_metrics(predictions, references)
    assert got["count"] == 3 and got["empty"] == 2
    one = official_compute_metrics(predictions[2:], references[2:])
    for name, value in one.items():
        assert abs(got[name] - value / 3) <= 1e-6, name
    with pytest.raises(ValueError, match="reference 1 is empty"):
        generation_metrics(["a"], [" "])


def test_missing_libraries_name_the_install_command(monkeypatch):
    import sys

    from tuneport.core.metrics import MissingDependency, generation_metrics

    monkeypatch.setitem(sys.modules, "rouge_chinese", None)  # stands in for a machine without the eval extra
    with pytest.raises(MissingDependency, match=r"pip install 'tuneport\[eval\]'"):
        generation_metrics(["a"], ["a"])


# --- the demo model ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> Path:
    """The demo recipe trained for DEMO_STEPS steps: base_model/ (untuned) and adapter/ (tuned)."""
    out = tmp_path_factory.mktemp("demo") / "run"
    assert main(["train", "builtin:demo.yaml", f"output_dir={out}", f"train.max_steps={DEMO_STEPS}",
                 f"save.every={DEMO_STEPS}"]) == 0
    return out


def demo_prompts(tokenizer) -> list[list[int]]:
    from tuneport.core.evaluate import prompt_ids, read_dev_set, reply_start

    samples, _, _ = read_dev_set(DATA)
    return [prompt_ids(tokenizer, s.context, 256, reply_start(tokenizer))[0] for s in samples]


@pytest.mark.parametrize("tuned", [False, True], ids=["untuned", "tuned"])
def test_batched_left_padded_generation_equals_one_prompt_at_a_time(demo, tuned):
    """ChatGLM3 keeps positions unshifted under left padding (as the official model); greedy replies of a
    padded batch must still be those of each prompt alone. Attending to the padding would change them."""
    from tuneport.frameworks.torch.build import load_tuned_model
    from tuneport.frameworks.torch.generate import generate_replies
    from tuneport.models import family_for

    tokenizer = family_for(demo / "base_model").load_tokenizer(demo / "base_model")
    model = load_tuned_model(demo / "base_model", demo / "adapter" if tuned else None, "cpu").eval()
    prompts = demo_prompts(tokenizer)[:16]
    assert len({len(p) for p in prompts[:8]}) > 1  # the batches are padded
    args = (tokenizer.stop_token_ids, tokenizer.pad_token_id, 12)
    batched = generate_replies(model, prompts, *args, batch_size=8)
    alone = generate_replies(model, prompts, *args, batch_size=1)
    assert batched == alone
    assert sum(map(len, batched)) > 2 * len(prompts)  # replies, not immediate stops

    # The control: the same batch with padding attended to gives other replies, so the check can fail.
    width = max(map(len, prompts[:8]))
    ids = torch.tensor([[tokenizer.pad_token_id] * (width - len(p)) + p for p in prompts[:8]])
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=12,
                             eos_token_id=tokenizer.stop_token_ids, pad_token_id=tokenizer.pad_token_id)
    stops = set(tokenizer.stop_token_ids)
    unmasked = [row[width:].tolist() for row in out]
    assert [r[:next((k for k, t in enumerate(r) if t in stops), len(r))] for r in unmasked] != alone[:8]


def read_eval(folder: Path) -> tuple[dict, list[dict]]:
    record = json.loads((folder / "eval.json").read_text(encoding="utf-8"))
    rows = [json.loads(line) for line in (folder / "predictions.jsonl").read_text(encoding="utf-8").splitlines()]
    return record, rows


def test_eval_scores_the_tuned_demo_above_the_untuned_one(demo, tmp_path, capsys):
    common = ["--data", str(DATA), "--device", "cpu", "--max-new-tokens", "32"]
    assert main(["eval", "--model", str(demo / "base_model"), "--out", str(tmp_path / "untuned"), *common]) == 0
    assert main(["eval", "--model", str(demo / "base_model"), "--adapter", str(demo / "adapter"), *common]) == 0
    printed = capsys.readouterr().out
    assert "rouge-l" in printed and "bleu-4" in printed
    untuned, untuned_rows = read_eval(tmp_path / "untuned")
    tuned, rows = read_eval(demo / "eval")  # default: beside the adapter
    assert tuned["metrics"]["rouge-l"] > untuned["metrics"]["rouge-l"] + 2
    assert tuned["adapter"] == str((demo / "adapter").resolve()) and untuned["adapter"] is None
    assert tuned["data"]["samples"] == len(rows) == len(untuned_rows) == 24
    from tuneport.core.data import file_sha256

    assert tuned["data"]["sha256"] == file_sha256(DATA)
    assert tuned["settings"]["max_new_tokens"] == 32 and tuned["settings"]["decoding"] == "greedy"
    first = json.loads(DATA.read_text(encoding="utf-8").splitlines()[0])["conversations"]
    assert rows[0]["prompt"] == first[0]["content"] and rows[0]["reference"] == first[1]["content"]
    from tuneport.core.metrics import generation_metrics

    again = generation_metrics([r["prediction"] for r in rows], [r["reference"] for r in rows])
    assert again == tuned["metrics"]  # eval.json scores exactly the predictions it wrote beside it

    # An earlier eval folder is replaced (--limit: the first K samples); a folder of someone else's is not.
    assert main(["eval", "--model", str(demo / "base_model"), "--limit", "3", "--out", str(tmp_path / "untuned"),
                 *common]) == 0
    assert len(read_eval(tmp_path / "untuned")[1]) == 3
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("mine")
    capsys.readouterr()
    assert main(["eval", "--model", str(demo / "base_model"), "--out", str(mine), *common]) == 2
    assert "is not empty and holds no earlier tuneport eval" in capsys.readouterr().err
    assert sorted(p.name for p in mine.iterdir()) == ["notes.txt"]


@pytest.mark.parametrize("records", [
    [{"conversations": [{"role": "user", "content": "你是谁？"}]}] * 3,
    [{"conversations": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "  "}]}],
], ids=["no reply", "empty reply"])
def test_a_dev_file_without_references_is_one_line_and_exit_2(tmp_path, capsys, records):
    from tuneport.models.chatglm3.builders import build_model_folder

    build_model_folder("demo", tmp_path / "base")
    data = tmp_path / "dev.jsonl"
    data.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    assert main(["eval", "--model", str(tmp_path / "base"), "--data", str(data), "--out", str(tmp_path / "e")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: {data}: line 1: ") and "reference" in err[0], err
    assert not (tmp_path / "e").exists()


def official_eval_input(tokenizer, conversation: list[dict], max_input_length: int) -> list[int]:
    """The official `process_batch_eval` (THUDM/ChatGLM3 finetune_demo/finetune_hf.py) for the last assistant
    turn of a conversation: the prompt so far cut to max_input_length, then `<|assistant|>`."""
    input_ids, last = tokenizer.get_prefix_tokens(), None
    for message in conversation:
        new_input_ids = tokenizer.build_single_message(message["role"], "", message["content"])
        if message["role"] == "assistant":
            last = input_ids[:max_input_length] + new_input_ids[:1]
        input_ids += new_input_ids
    return last


@pytest.mark.parametrize("max_input_length", [256, 12])
def test_prompts_are_the_official_eval_inputs(golden, tmp_path, max_input_length):
    """With the real ChatGLM3 tokenizer: a multi-turn dev sample, uncut and cut."""
    from tuneport.core.evaluate import prompt_ids, read_dev_set, reply_start
    from tuneport.models import family_for

    conversation = [{"role": "system", "content": "You are a helpful assistant."},
                    {"role": "user", "content": "你好"}, {"role": "assistant", "content": "你好，有什么可以帮你？"},
                    {"role": "user", "content": "Which hardware can tuneport fine-tune on?"},
                    {"role": "assistant", "content": "CPU, NVIDIA GPU and Ascend NPU."}]
    data = tmp_path / "dev.json"
    data.write_text(json.dumps([{"conversations": conversation}], ensure_ascii=False), encoding="utf-8")
    (sample,), fmt, _ = read_dev_set(data)
    assert fmt == "conversations" and sample.reference == conversation[-1]["content"]
    tokenizer = family_for(golden / "checkpoint").load_tokenizer(golden / "checkpoint")
    start = reply_start(tokenizer)
    assert start == [tokenizer.get_command("<|assistant|>")]
    ids, cut = prompt_ids(tokenizer, sample.context, max_input_length, start)
    assert ids == official_eval_input(tokenizer, conversation, max_input_length)
    assert cut == (max_input_length == 12)


def test_importing_the_command_is_light():
    """core/cli.py imports core/evaluate.py for `tuneport --help`: no framework, numpy or metric library."""
    import subprocess
    import sys

    script = ("import sys, tuneport.core.evaluate; print(sorted({m.partition('.')[0] for m in sys.modules} & "
              "{'torch', 'numpy', 'transformers', 'jieba', 'nltk', 'rouge_chinese'}))")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stdout.strip() == "[]", result.stdout + result.stderr
