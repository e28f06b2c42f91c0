"""`tuneport train` end to end on the CPU: the golden wiring, accumulation, exact resume after SIGKILL,
atomic checkpoints, every shipped recipe and method, the demo, and clean errors for bad data."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file

from tuneport.backends import get_backend
from tuneport.core.cli import main
from tuneport.core.config import load_recipe
from tuneport.core.precision import resolve_precision
from tuneport.frameworks.torch.build import load_tuned_model
from tuneport.frameworks.torch.runtime import TorchRuntime
from tuneport.core.trainer import label_tokens
from tuneport.models.chatglm3 import load_model

REPO = Path(__file__).resolve().parents[1]
DEMO = "builtin:demo.yaml"


def train(out: Path, *overrides: str, recipe: str = DEMO) -> int:
    return main(["train", recipe, f"output_dir={out}", *overrides])


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def adapter_weights(out: Path) -> dict:
    return load_file(out / "adapter" / "adapter_model.safetensors")


def test_one_step_matches_golden_lora_loss_and_grads(golden):
    recipe = load_recipe(DEMO, (f"model={golden / 'checkpoint'}", "tokenizer=null", "method.r=4", "method.alpha=8",
                                "method.dropout=0", "method.target_modules=[query_key_value]"))
    backend = get_backend("cpu")
    runtime = TorchRuntime(recipe, backend, resolve_precision("fp32", "cpu", backend.capabilities),
                           golden / "checkpoint")
    adapter = load_file(golden / "lora_adapter" / "adapter_model.safetensors")
    with torch.no_grad():
        for name, param in runtime.trainable.items():
            param.copy_(adapter[name.replace(".default", "")])
    cases = load_file(golden / "cases.safetensors")
    batch = {"input_ids": cases["input_ids"].numpy(), "labels": cases["labels"].numpy(),
             "attention_mask": np.ones_like(cases["input_ids"].numpy())}
    loss = runtime.forward_backward(batch, label_tokens(batch))
    torch.testing.assert_close(torch.tensor([loss]), cases["lora_loss"], atol=1e-4, rtol=1e-4)
    grads = load_file(golden / "lora_grads.safetensors")
    assert len(runtime.trainable) == len(grads)
    for name, param in runtime.trainable.items():
        torch.testing.assert_close(param.grad, grads["grad." + name.replace(".default", "")], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("device", [pytest.param(d, marks=pytest.mark.device(d)) for d in ("cuda", "npu")])
def test_one_lora_step_on_the_device_in_bf16_matches_the_cpu_in_fp32(golden, device):
    """Hardware truth (`pytest -m device`): one LoRA step of the golden model in bf16 on the device against
    the same step in fp32 on the CPU. Stated tolerance: loss within 2% and each gradient within 5% of its
    norm (bf16 keeps 8 bits of mantissa; the fp32 step itself matches the official one at 1e-4)."""
    cases = load_file(golden / "cases.safetensors")
    batch = {"input_ids": cases["input_ids"].numpy(), "labels": cases["labels"].numpy(),
             "attention_mask": np.ones_like(cases["input_ids"].numpy())}
    recipe = load_recipe(DEMO, (f"model={golden / 'checkpoint'}", "tokenizer=null", "method.r=4", "method.alpha=8",
                                "method.dropout=0", "method.target_modules=[query_key_value]"))
    steps = {}
    for name, precision in (("cpu", "fp32"), (device, "bf16")):
        backend = get_backend(name)
        runtime = TorchRuntime(recipe, backend, resolve_precision(precision, name, backend.capabilities),
                               golden / "checkpoint")
        loss = runtime.forward_backward(batch, label_tokens(batch))
        steps[name] = loss, {n: p.grad.float().cpu() for n, p in runtime.trainable.items()}
    (cpu_loss, cpu_grads), (dev_loss, dev_grads) = steps["cpu"], steps[device]
    assert dev_loss == pytest.approx(cpu_loss, rel=2e-2)
    for name, grad in cpu_grads.items():
        assert (dev_grads[name] - grad).norm() <= 5e-2 * grad.norm() + 1e-8, name


def test_accumulation_is_token_normalised(tmp_path):
    """4 micro-batches of 1 accumulate to the same update as 1 micro-batch of 4 (samples differ in length).

    At the official demo's scale of learning rate (Adam turns tiny float differences of near-zero
    gradients into differences of order lr, so the demo's 3e-3 would test float noise, not the maths).
    """
    common = ("train.max_steps=3", "save.every=0", "train.warmup_steps=0", "train.lr=1e-4")
    assert train(tmp_path / "a", *common, "train.micro_batch_size=1", "train.grad_accum=4") == 0
    assert train(tmp_path / "b", *common, "train.micro_batch_size=4", "train.grad_accum=1") == 0
    a, b = adapter_weights(tmp_path / "a"), adapter_weights(tmp_path / "b")
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=1e-5, rtol=1e-5)
    for x, y in zip(metrics(tmp_path / "a"), metrics(tmp_path / "b")):
        assert x["loss"] == pytest.approx(y["loss"], abs=1e-5)
        assert x["grad_norm"] == pytest.approx(y["grad_norm"], rel=1e-4)  # same gradient scale


KILLER = str(Path(__file__).parent / "killer.py")  # runs `tuneport` and SIGKILLs it at a chosen point


def killed_run(out: Path, mode: str, at: int, *overrides: str) -> None:
    args = [sys.executable, KILLER, mode, str(at), "train", DEMO, f"output_dir={out}", *overrides]
    result = subprocess.run(args, capture_output=True, text=True, timeout=300)
    assert result.returncode == -9, result.stderr[-2000:]


@pytest.mark.parametrize("mode,at", [("step", 12), ("checkpoint", 15)])
def test_resume_after_sigkill_is_bitwise_exact(tmp_path, mode, at):
    common = ("train.max_steps=20", "save.every=5", "method.dropout=0.1")  # dropout: the RNG must resume too
    assert train(tmp_path / "straight", *common) == 0
    killed_run(tmp_path / "killed", mode, at, *common)
    ckpts = sorted(p.name for p in (tmp_path / "killed" / "checkpoints").iterdir())
    assert "step-10" in ckpts and "step-15" not in ckpts and not (tmp_path / "killed" / "adapter").exists()
    assert main(["train", "--resume", str(tmp_path / "killed")]) == 0
    straight, resumed = adapter_weights(tmp_path / "straight"), adapter_weights(tmp_path / "killed")
    assert straight.keys() == resumed.keys()
    for name in straight:
        assert torch.equal(straight[name], resumed[name]), name
    assert [r["loss"] for r in metrics(tmp_path / "straight")] == [r["loss"] for r in metrics(tmp_path / "killed")]
    assert [r["step"] for r in metrics(tmp_path / "killed")] == list(range(1, 21))
    assert not list((tmp_path / "killed" / "checkpoints").glob(".*.tmp"))


def test_run_records(tmp_path):
    out = tmp_path / "run"
    assert train(out, "train.max_steps=4", "save.every=2", "save.keep_last=1", "data.eval=builtin:demo/data.jsonl",
                 "eval.every=2", "eval.max_batches=1") == 0
    records = metrics(out)
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    assert {"loss", "lr", "grad_norm", "tokens_per_s", "padding", "peak_memory"} <= records[0].keys()
    assert all(0 <= r["padding"] < 1 for r in records) and any(r["padding"] > 0 for r in records)
    assert "eval_loss" in records[1] and "eval_loss" not in records[0]
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step-4"]  # keep_last 1
    run = json.loads((out / "run.json").read_text())
    from importlib.metadata import version

    assert run["versions"]["torch"] == version("torch") and run["versions"]["peft"] == version("peft")
    assert run["device"] == "cpu" and run["precision"]["compute"] == "fp32"
    assert len(run["sha256"]["data"]["builtin:demo/data.jsonl"]) == 64 and "config.json" in run["sha256"]["model"]
    assert (out / "loss.png").stat().st_size > 1000 and list((out / "tensorboard").iterdir())
    assert load_recipe(out / "recipe.yaml").train.max_steps == 4
    # An existing run is never overwritten by accident.
    assert train(out, "train.max_steps=4") == 2


def test_adapter_loads_with_peft_and_matches_training_model(tmp_path):
    out = tmp_path / "run"
    assert train(out, "train.max_steps=5") == 0
    base = load_model(out / "base_model")
    model = PeftModel.from_pretrained(base, str(out / "adapter"))
    ids = torch.tensor([[1000, 1001, 5, 6, 7]])
    with torch.no_grad():
        tuned = model(ids).logits
        plain = load_model(out / "base_model")(ids).logits
    assert not torch.allclose(tuned, plain)
    torch.testing.assert_close(load_tuned_model(out / "base_model", out / "adapter")(ids).logits, tuned)


SHIPPED = [p.stem for p in sorted((REPO / "recipes").glob("chatglm3_6b_*.yaml"))]
SCHEDULE = {"chatglm3_6b_adalora": ("method.tinit=0", "method.tfinal=0")}  # its 3000-step budget, fitted to 2 steps
PAIRS = REPO / "recipes" / "demo"  # preference pairs for the DPO recipe


@pytest.mark.parametrize("recipe", SHIPPED)
def test_shipped_6b_recipes_run_on_the_golden_checkpoint(tmp_path, golden, datasets, recipe):
    """The tiny golden model has the 6B folder's layout, so it stands in for it."""
    out = tmp_path / recipe
    code = train(out, f"model={golden / 'checkpoint'}", "train.max_steps=2", "device=cpu", "precision=fp32",
                 *SCHEDULE.get(recipe, ()),
                 *((f"data.train={PAIRS / 'pairs.jsonl'}", f"data.eval={PAIRS / 'pairs_eval.jsonl'}") if "dpo" in recipe
                   else (f"data.train={datasets / 'advertisegen/train.json'}",
                         f"data.eval={datasets / 'advertisegen/dev.json'}")),
                 "train.epochs=null", "eval.max_batches=1", "train.micro_batch_size=2",
                 recipe=f"recipes/{recipe}.yaml")
    assert code == 0
    records = metrics(out)
    assert len(records) == 2 and all(np.isfinite(r["loss"]) for r in records) and "eval_loss" in records[-1]
    ids = torch.tensor([[64790, 64792, 36474, 54591]])
    with torch.no_grad():
        tuned = load_tuned_model(golden / "checkpoint", out / "adapter")(ids).logits
    assert torch.isfinite(tuned).all()


def test_demo_learns_and_reproduces_answers_offline(tmp_path, monkeypatch, capsys):
    import socket

    def no_network(*args, **kwargs):
        raise AssertionError("the demo touched the network")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    monkeypatch.chdir(tmp_path)
    assert main(["demo"]) == 0
    printed = capsys.readouterr().out
    assert "3/3 answers reproduce the trained ones" in printed
    losses = [r["loss"] for r in metrics(tmp_path / "outputs" / "demo")]
    assert losses[-1] < 0.5 < 5 < losses[0]
    demo = tmp_path / "outputs" / "demo"
    assert main(["chat", "--model", str(demo / "base_model"), "--adapter", str(demo / "adapter"),
                 "--prompt", "你是谁？"]) == 0
    assert "我是 tuneport 演示助手，一个在本机用 LoRA 微调出来的小模型。" in capsys.readouterr().out
    assert main(["train", "train.max_steps=20"]) == 0  # no recipe: the demo again, replacing the first
    assert len(metrics(demo)) == 20 and "answers reproduce the trained ones" in capsys.readouterr().out


def test_padded_batch_gives_the_same_per_sample_losses(tmp_path):
    """Right padding with pad id and label -100 leaves every sample's token losses unchanged."""
    from tuneport.core.data import collate, encode_dataset
    from tuneport.models.chatglm3.builders import build_model_folder
    from tuneport.models.chatglm3 import load_tokenizer

    build_model_folder("demo", tmp_path / "base")
    tokenizer = load_tokenizer(tmp_path / "base")
    model = load_model(tmp_path / "base")
    samples = encode_dataset(REPO / "recipes/demo/data.jsonl", tokenizer, "conversations", 64, 64).samples[:4]
    assert len({len(ids) for ids, _ in samples}) > 1  # lengths differ, so the batch is padded

    def token_losses(batch):
        logits = model(torch.from_numpy(batch["input_ids"]), attention_mask=torch.from_numpy(batch["attention_mask"]),
                       use_cache=False).logits[:, :-1]
        labels = torch.from_numpy(batch["labels"])[:, 1:]
        losses = torch.nn.functional.cross_entropy(logits.transpose(1, 2), labels, reduction="none")
        return [row[mask] for row, mask in zip(losses, labels != -100)]

    with torch.no_grad():
        batched = token_losses(collate(samples, tokenizer.pad_token_id))
        for i, sample in enumerate(samples):
            torch.testing.assert_close(batched[i], token_losses(collate([sample], tokenizer.pad_token_id))[0],
                                       atol=1e-5, rtol=1e-5)


def test_qlora_without_4bit_kernels_is_a_clear_error(tmp_path, golden):
    """A backend without bitsandbytes kernels (as on Ascend) refuses QLoRA and names the fix."""
    from dataclasses import replace

    from tuneport.backends.cpu import CPUBackend
    from tuneport.core.errors import MethodUnavailable

    class NoBitsAndBytes(CPUBackend):  # stands in for a device without 4-bit kernels
        @property
        def capabilities(self):
            return replace(super().capabilities, bnb_4bit=False)

    recipe = load_recipe("recipes/chatglm3_6b_qlora.yaml", (f"model={golden / 'checkpoint'}",))
    backend = NoBitsAndBytes()
    with pytest.raises(MethodUnavailable, match="pip install 'bitsandbytes>=0.45'"):
        TorchRuntime(recipe, backend, resolve_precision("fp32", "cpu", backend.capabilities), golden / "checkpoint")


BAD_DATA = {
    "invalid JSON": (b'{"conversations": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}\n'
                     b'{"conversations": [\n', "line 2"),
    "unknown role": (b'{"conversations": [{"role": "bot", "content": "hi"}]}\n', "line 1"),
    "missing field": (b'{"conversations": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}\n'
                      b'{"conversations": [{"role": "user"}]}\n', "line 2"),
    "empty file": (b"", "line 1"),
    "non-UTF-8": (b'{"conversations": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}\n'
                  b'{"conversations": [{"role": "user", "content": "\xff\xfe"}]}\n', "line 2"),
    "tools not JSON": (b'{"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"}], '
                       b'"tools": "[{not json"}\n', "line 1"),
}


@pytest.mark.parametrize("case", sorted(BAD_DATA))
def test_bad_data_is_one_clear_line_and_writes_nothing(tmp_path, case):
    content, line = BAD_DATA[case]
    data = tmp_path / "bad.jsonl"
    data.write_bytes(content)
    out = tmp_path / "out"
    result = subprocess.run(
        [sys.executable, "-m", "tuneport.core.cli", "train", DEMO, f"output_dir={out}", f"data.train={data}",
         "data.format=auto"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and str(data) in last and line in last, last
    assert not out.exists()


def test_bad_recipe_reports_every_problem(tmp_path):
    with pytest.raises(Exception) as e:
        load_recipe(DEMO, ("train.lr=-1", "method.name=adapter", "train.micro_batchsize=2", "precision=fp8"))
    message = str(e.value)
    for expected in ["train.lr: -1", "method.name: 'adapter' is not one of lora", "did you mean train.micro_batch_size",
                     "precision: 'fp8'"]:
        assert expected in message


@pytest.mark.parametrize("path", sorted((REPO / "recipes").rglob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_recipe_validates(path):
    recipe = load_recipe(path)
    assert recipe.model and recipe.data.train
    assert path.read_text().startswith("# ")  # a header comment with the command
    assert "tuneport " in path.read_text().split("\n\n")[0]


def test_more_bad_inputs_are_one_line_errors(tmp_path, capsys):
    """Each mistake ends with exit 2 and one `error:` line; a start that failed can simply be rerun."""
    cases = {
        "device=gpu": "device: unknown device 'gpu'; expected one of: auto, cpu, cuda, npu",
        "method.target_modules=[dense": "is not valid YAML",
        "deepspeed=builtin:deepspeed/missing.json": "deepspeed: builtin:deepspeed/missing.json: file not found",
        "method.target_modules=[qkv]": "method.target_modules: ['qkv']",
    }
    for override, message in cases.items():
        assert main(["train", DEMO, f"output_dir={tmp_path / 'run'}", "train.max_steps=2", override]) == 2
        assert message in capsys.readouterr().err, override
    assert main(["train", DEMO, f"output_dir={tmp_path / 'run'}", "train.max_steps=2"]) == 0  # the failed start is replaced
    assert main(["train", str(tmp_path), f"output_dir={tmp_path / 'x'}"]) == 2
    assert "cannot be read as a YAML recipe" in capsys.readouterr().err
    zero3 = tmp_path / "zero3.json"
    zero3.write_text('{"zero_optimization": {"stage": 3,}}')
    assert main(["train", DEMO, f"output_dir={tmp_path / 'z'}", f"deepspeed={zero3}"]) == 2
    assert f"deepspeed: {zero3}: not a readable JSON config (Expecting property name enclosed in double quotes: " \
           "line 1 column 35" in capsys.readouterr().err


def test_qlora_trains_on_after_an_evaluation(tmp_path):
    """bitsandbytes repacks 4-bit weights for CPU inference in eval mode (where the CPU has AVX512-BF16) and
    keeps them so, which broke the training steps after an evaluation; a training model's layers never take
    that layout. (Found by DPO with QLoRA on the demo, whose baseline evaluates before step 1.)"""
    pytest.importorskip("bitsandbytes", reason="QLoRA needs bitsandbytes (tuneport[qlora])")
    out = tmp_path / "run"
    assert train(out, "method.name=qlora", "train.max_steps=2", "data.eval=builtin:demo/data.jsonl",
                 "eval.max_batches=1", "eval.every=1") == 0
    assert [r["step"] for r in metrics(out)] == [1, 2] and all("eval_loss" in r for r in metrics(out))
