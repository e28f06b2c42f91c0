"""Sharded training on the CPU (gloo): FSDP2 and DeepSpeed ZeRO-3 on the golden ChatGLM3 model learn as one
process with the same global batch does, shard every weight, resume exactly after a SIGKILL, resume on
another number of processes, and write the adapter a single process writes."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from tuneport.core.cli import main

REPO = Path(__file__).resolve().parents[1]
GOLDEN = REPO / "tests" / "golden" / "chatglm3" / "checkpoint"
# fp32, no dropout (each process draws its own masks), the official demo's scale of learning rate (see
# test_distributed.py), and a checkpoint every 2 steps.
COMMON = (f"model={GOLDEN}", f"tokenizer={GOLDEN}", "data.train=builtin:demo/data.jsonl", "train.max_steps=4",
          "train.lr=1e-4", "train.warmup_steps=0", "precision=fp32", "device=cpu", "method.dropout=0.0",
          "save.every=2", "data.group_by_length=false")
TORCHRUN = (sys.executable, "-m", "torch.distributed.run", "--standalone")


def launch(nproc: int, *args: str, env: dict = None, expect: int = 0) -> subprocess.CompletedProcess:
    result = subprocess.run([*TORCHRUN, "--nproc_per_node", str(nproc), *args], capture_output=True, text=True,
                            timeout=600, env={**os.environ, "TORCH_EXTENSIONS_DIR": "/nonexistent", **(env or {})})
    assert result.returncode == expect, result.stderr[-3000:]
    return result


def train(nproc: int, out: Path, *overrides: str, **kwargs) -> Path:
    launch(nproc, "-m", "tuneport.core.cli", "train", "builtin:demo.yaml", f"output_dir={out}", *COMMON, *overrides,
           **kwargs)
    return out


def losses(out: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]


def weights(out: Path, file: str = "adapter_model.safetensors") -> dict:
    return load_file(out / "adapter" / file)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Runs made once, on demand, shared by the tests: name -> output folder."""
    root, made = tmp_path_factory.mktemp("sharded"), {}

    def run(name: str) -> Path:
        if name not in made:
            made[name] = MAKERS[name](root / name)
        return made[name]

    return run


def one_process(out: Path, *overrides: str) -> Path:
    assert main(["train", "builtin:demo.yaml", f"output_dir={out}", *COMMON, "train.micro_batch_size=4",
                 *overrides]) == 0
    return out


MAKERS = {
    "one": one_process,
    "fsdp": lambda out: train(2, out, "train.micro_batch_size=2", "train.strategy=fsdp"),
    "zero3": lambda out: train(2, out, "train.micro_batch_size=2", "deepspeed=builtin:deepspeed/zero3.json"),
    "zero3_offload": lambda out: train(2, out, "train.micro_batch_size=2",
                                       "deepspeed=builtin:deepspeed/zero3_offload.json"),
    "one_packed": lambda out: one_process(out, "data.packing=true"),
    "fsdp_packed": lambda out: train(2, out, "train.micro_batch_size=2", "train.strategy=fsdp", "data.packing=true"),
}


def assert_close_losses(a: Path, b: Path) -> None:
    assert len(losses(a)) == len(losses(b)) == 4
    torch.testing.assert_close(torch.tensor(losses(a)), torch.tensor(losses(b)), atol=1e-5, rtol=0)


@pytest.mark.parametrize("strategy", ["fsdp", "zero3", "zero3_offload", "fsdp_packed"])
def test_two_sharded_processes_learn_as_one_with_the_same_global_batch(runs, strategy):
    if strategy.startswith("zero"):
        pytest.importorskip("deepspeed", reason="DeepSpeed is in the dev extra; install tuneport[deepspeed]")
    assert_close_losses(runs("one_packed" if strategy.endswith("packed") else "one"), runs(strategy))


@pytest.mark.parametrize("strategy", ["fsdp", "zero3"])
def test_the_sharded_adapter_loads_with_plain_peft_and_gives_the_single_process_logits(runs, strategy):
    if strategy.startswith("zero"):
        pytest.importorskip("deepspeed", reason="DeepSpeed is in the dev extra; install tuneport[deepspeed]")
    from peft import PeftModel

    from tuneport.models.chatglm3 import load_model

    ids = torch.tensor([[64790, 64792, 30910, 13, 64795, 30910, 13, 307, 5004, 542]])
    logits = []
    for run in (runs("one"), runs(strategy)):
        model = PeftModel.from_pretrained(load_model(GOLDEN), str(run / "adapter")).eval()
        with torch.no_grad():
            logits.append(model(input_ids=ids).logits)
    with torch.no_grad():
        base = load_model(GOLDEN)(input_ids=ids).logits
    assert (logits[0] - base).abs().max() > 1e-4  # the adapter changes the logits: the comparison can fail
    torch.testing.assert_close(logits[1], logits[0], atol=1e-5, rtol=0)


def test_fsdp_holds_half_of_every_weight_on_each_of_two_processes(every_method):
    tmp_path, _ = every_method
    ranks = [json.loads((tmp_path / "two" / f"shards-rank{r}.json").read_text()) for r in (0, 1)]
    frozen = [n for n, (_, _, trained) in ranks[0].items() if not trained]
    assert any(n.endswith(".layers.1.mlp.dense_h_to_4h.weight") for n in frozen)  # the base, not only LoRA
    assert any("word_embeddings" in n for n in frozen)
    for name, (local, shape, _) in ranks[0].items():
        whole, row = torch.Size(shape).numel(), torch.Size(shape[1:]).numel()
        assert local + ranks[1][name][0] == whole, name  # the two shards make the weight, once
        assert abs(local - whole / 2) <= row, name  # each about half: rows split between the processes


def test_fsdp_resumes_bit_exactly_after_one_process_is_killed(runs, tmp_path):
    """Rank 1 SIGKILLs itself after step 3 (the checkpoint of step 2 is the newest); --resume with 2 processes
    ends where the unbroken run ends, bit for bit."""
    out = tmp_path / "killed"
    launch(2, str(REPO / "tests" / "killer.py"), "step", "3", "train", "builtin:demo.yaml", f"output_dir={out}",
           *COMMON, "train.micro_batch_size=2", "train.strategy=fsdp", env={"KILL_RANK": "1"}, expect=1)
    assert not (out / "adapter").exists()
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-2"]
    shutil.copytree(out, tmp_path / "copy")
    launch(2, "-m", "tuneport.core.cli", "train", "--resume", str(out))
    straight = runs("fsdp")
    assert losses(out) == losses(straight)
    a, b = weights(out), weights(straight)
    assert a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)

    # The same checkpoint on 1 process: DCP reshards it; the global batch stays 4 samples.
    fewer = tmp_path / "copy"
    launch(1, "-m", "tuneport.core.cli", "train", "--resume", str(fewer), "train.micro_batch_size=4")
    torch.testing.assert_close(torch.tensor(losses(fewer)), torch.tensor(losses(straight)), atol=1e-5, rtol=0)
    resumes = json.loads((fewer / "run.json").read_text())["resumes"]
    assert resumes[-1]["world_size"] == [2, 1]


def test_a_zero3_run_resumes_bit_exactly_from_its_deepspeed_checkpoint(runs, tmp_path):
    """The ZeRO-3 run cut back to its step-2 checkpoint (as a kill after it leaves it), resumed on 2 processes."""
    pytest.importorskip("deepspeed", reason="DeepSpeed is in the dev extra; install tuneport[deepspeed]")
    straight, cut = runs("zero3"), tmp_path / "cut"
    shutil.copytree(straight, cut)
    for later in (cut / "checkpoints" / "step-4", cut / "adapter"):
        shutil.rmtree(later)
    launch(2, "-m", "tuneport.core.cli", "train", "--resume", str(cut))
    assert losses(cut) == losses(straight)
    a, b = weights(cut), weights(straight)
    assert a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)


def test_a_resume_on_another_number_of_processes_is_refused_unless_fsdp_keeps_the_batch(tmp_path):
    from tuneport.core.config import load_recipe
    from tuneport.core.precision import PrecisionPlan
    from tuneport.core.trainer import resume_problem

    state = {"world_size": 2, "micro_batch_size": 2, "grad_accum": 1, "precision": "fp32", "strategy": "fsdp"}
    fp32 = PrecisionPlan("fp32", False, "")

    def problem(world_size, *overrides, written=state):
        recipe = load_recipe("builtin:demo.yaml", ("precision=fp32", "train.micro_batch_size=2", *overrides))
        return resume_problem(written, recipe, world_size, fp32, tmp_path)

    assert problem(1, "train.strategy=fsdp", "train.micro_batch_size=4") is None
    assert problem(4, "train.strategy=fsdp", "train.micro_batch_size=1") is None
    assert "set train.micro_batch_size=4 to keep the batch of 4 samples" in problem(1, "train.strategy=fsdp")
    ddp = problem(1, "train.micro_batch_size=4", written={**state, "strategy": "ddp"})
    assert "world_size=2" in ddp and "train.strategy=fsdp resumes" in ddp  # ddp keeps refusing
    assert "strategy=fsdp" in problem(2)  # a checkpoint resumes under the strategy that wrote it
    assert problem(2, "train.strategy=fsdp") is None


@pytest.mark.parametrize("overrides, says", [
    (("train.strategy=fsdp",), "train.strategy: fsdp runs under a launcher, also for one device; run: torchrun"),
    (("train.strategy=fsdp", "train.offload=true"), "train.offload: the device is the host already"),
    (("train.strategy=fsdp", "method.name=adalora", "train.max_steps=3000"), "adalora does not run under fsdp"),
    (("train.strategy=fsdp", "method.name=qlora"), "qlora's 4-bit base cannot be sharded by fsdp"),
    (("train.offload=true",), "train.offload: true is FSDP's host-memory offload: set train.strategy=fsdp"),
    (("train.strategy=deepspeed",), "train.strategy: deepspeed needs deepspeed: its JSON config"),
    (("train.strategy=fsdp", "framework=mindspore"), "train.strategy: fsdp is not a strategy of framework mindspore"),
])
def test_what_a_strategy_cannot_do_is_refused_in_one_line_before_anything_is_written(tmp_path, capsys, overrides,
                                                                                      says):
    out = tmp_path / "run"
    assert main(["train", "builtin:demo.yaml", f"output_dir={out}", *overrides]) == 2
    err = capsys.readouterr().err
    assert says in err and len(err.strip().splitlines()) == 1, err
    assert not out.exists()


METHODS_WORKER = """
import json, sys
from pathlib import Path
import numpy as np
import torch
from tuneport.backends import get_backend
from tuneport.core.config import load_recipe
from tuneport.core.distributed import Dist, init_distributed
from tuneport.core.precision import resolve_precision

values, out, methods = json.loads(sys.argv[1]), Path(sys.argv[2]), sys.argv[3].split(",")
backend = get_backend("cpu")
sharded = len(sys.argv) > 4
dist = init_distributed("gloo", backend.device, process_group_alone=True) if sharded else Dist()
from tuneport.frameworks.torch.runtime import TorchRuntime
rng = np.random.default_rng(0)
ids = rng.integers(5, 1000, (4, 12))
labels = ids.copy()
labels[:, :5] = -100
mine = slice(2 * dist.rank, 2 * dist.rank + 2) if sharded else slice(0, 4)
batch = {"input_ids": ids[mine], "labels": labels[mine], "attention_mask": np.ones_like(ids[mine])}
for name in methods:
    recipe = load_recipe({**values, "method": {"name": name, "dropout": 0.0}, "train": {**values["train"],
                          "strategy": "fsdp" if sharded else "ddp", "micro_batch_size": 4 // dist.world_size}})
    runtime = TorchRuntime(recipe, backend, resolve_precision("fp32", "cpu", backend.capabilities),
                           Path(recipe.model), dist)
    for module in runtime.model.modules():  # each process draws its own masks: no dropout, e.g. P-tuning v2's
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    (out / name).mkdir(parents=True, exist_ok=True)
    if sharded and name == "lora":  # what each process holds of every weight
        sizes = {n: [p.to_local().numel(), list(p.shape), p.requires_grad] for n, p in runtime.model.named_parameters()}
        (out / f"shards-rank{dist.rank}.json").write_text(json.dumps(sizes))
    losses = []
    for _ in range(2):
        losses += dist.all_sum([runtime.forward_backward(batch, int((labels[:, 1:] != -100).sum()))])
        runtime.optimizer_step(1e-4, 1.0)  # the scale of test_distributed.py: Adam magnifies rounding at larger ones
    if dist.is_main:
        (out / name / "losses.json").write_text(json.dumps(losses))
    runtime.save_state(out / name)  # each process its shard (a checkpoint's files) ...
    runtime.load_state(out / name)  # ... read back, resharded
    weights = runtime.gather()
    if dist.is_main:
        runtime.save_adapter(out / name / "adapter", weights)
"""


@pytest.fixture(scope="module")
def every_method(tmp_path_factory):
    """Each method fsdp does not refuse, 2 steps on 2 processes under fsdp and on 1 process with the same global
    batch: (folder, the methods)."""
    from tuneport.core.config import RecipeError, load_recipe
    from tuneport.core.methods import METHODS

    tmp_path = tmp_path_factory.mktemp("methods")
    values = {"model": str(GOLDEN), "tokenizer": str(GOLDEN), "data": {"train": "unused.jsonl"},
              "precision": "fp32", "device": "cpu", "train": {"max_steps": 2, "seed": 3}}
    sharding = []
    for name in METHODS:
        try:
            load_recipe({**values, "method": {"name": name}, "train": {**values["train"], "strategy": "fsdp"}})
            sharding.append(name)
        except RecipeError as e:
            assert "cannot be sharded by fsdp" in str(e) or "does not run under fsdp" in str(e)
    assert {"lora", "dora", "ia3", "prompt_tuning", "ptuning", "prefix_tuning", "ptuning_v2", "full",
            "freeze"} <= set(sharding)
    (tmp_path / "worker.py").write_text(METHODS_WORKER)
    args = [json.dumps(values), ",".join(sharding)]
    launch(2, str(tmp_path / "worker.py"), *args[:1], str(tmp_path / "two"), args[1], "fsdp")
    one = subprocess.run([sys.executable, str(tmp_path / "worker.py"), args[0], str(tmp_path / "one"), args[1]],
                         capture_output=True, text=True, timeout=600)
    assert one.returncode == 0, one.stderr[-3000:]
    return tmp_path, sharding


def test_every_method_that_shards_learns_under_fsdp_as_one_process(every_method):
    """The same per-step losses (LoRA, full fine-tuning and the rest), after a checkpoint's shards are written
    and read back the same saved result as a single process's."""
    tmp_path, sharding = every_method
    for name in sharding:
        one, two = (json.loads((tmp_path / run / name / "losses.json").read_text()) for run in ("one", "two"))
        torch.testing.assert_close(torch.tensor(two), torch.tensor(one), atol=1e-5, rtol=0, msg=name)
        files = sorted((tmp_path / "one" / name / "adapter").glob("*.safetensors"))
        assert files, name
        for file in files:
            a, b = load_file(file), load_file(tmp_path / "two" / name / "adapter" / file.name)
            assert a.keys() == b.keys(), name
            for key in a:
                torch.testing.assert_close(b[key], a[key], atol=1e-5, rtol=1e-5, msg=f"{name}: {key}")


DEVICE_STEP = """
import sys
from pathlib import Path
import numpy as np
import torch
from safetensors.torch import load_file, save_file
from tuneport.backends import get_backend
from tuneport.core.config import load_recipe
from tuneport.core.distributed import init_distributed
from tuneport.core.precision import resolve_precision
from tuneport.core.trainer import label_tokens
from tuneport.frameworks.torch.runtime import TorchRuntime

device, golden, out = sys.argv[1], Path(sys.argv[2]), sys.argv[3]
backend = get_backend(device)
backend.setup()
dist = init_distributed(backend.capabilities.dist_backend, backend.device, process_group_alone=True)
backend.set_device(0)
cases = load_file(golden / "cases.safetensors")
batch = {"input_ids": cases["input_ids"].numpy(), "labels": cases["labels"].numpy(),
         "attention_mask": np.ones_like(cases["input_ids"].numpy())}
recipe = load_recipe("builtin:demo.yaml", (f"model={golden / 'checkpoint'}", "tokenizer=null", "method.r=4",
                     "method.alpha=8", "method.dropout=0", "method.target_modules=[query_key_value]",
                     "train.strategy=fsdp"))
runtime = TorchRuntime(recipe, backend, resolve_precision("bf16", device, backend.capabilities),
                       golden / "checkpoint", dist)
loss = runtime.forward_backward(batch, label_tokens(batch))
grads = {n: p.grad.full_tensor().float().cpu().contiguous() for n, p in runtime.trainable.items()}
save_file({"loss": torch.tensor([loss]), **grads}, out)
"""


@pytest.mark.parametrize("device", [pytest.param(d, marks=pytest.mark.device(d)) for d in ("cuda", "npu")])
def test_one_fsdp_lora_step_on_the_device_in_bf16_matches_the_cpu_in_fp32(golden, device, tmp_path):
    """Hardware truth (`pytest -m device`): one LoRA step of the golden model under fsdp (1 process, the
    device's collective, bf16 weights gathered) against the plain fp32 step on the CPU; the tolerance of
    test_train.py's device step: loss within 2%, each gradient within 5% of its norm."""
    from tuneport.backends import get_backend
    from tuneport.core.config import load_recipe
    from tuneport.core.precision import resolve_precision
    from tuneport.core.trainer import label_tokens
    from tuneport.frameworks.torch.runtime import TorchRuntime

    (tmp_path / "step.py").write_text(DEVICE_STEP)
    launch(1, str(tmp_path / "step.py"), device, str(golden), str(tmp_path / "step.safetensors"))
    on_device = load_file(tmp_path / "step.safetensors")
    cases = load_file(golden / "cases.safetensors")
    batch = {"input_ids": cases["input_ids"].numpy(), "labels": cases["labels"].numpy(),
             "attention_mask": np.ones_like(cases["input_ids"].numpy())}
    recipe = load_recipe("builtin:demo.yaml", (f"model={golden / 'checkpoint'}", "tokenizer=null", "method.r=4",
                                               "method.alpha=8", "method.dropout=0",
                                               "method.target_modules=[query_key_value]"))
    cpu = get_backend("cpu")
    runtime = TorchRuntime(recipe, cpu, resolve_precision("fp32", "cpu", cpu.capabilities), golden / "checkpoint")
    loss = runtime.forward_backward(batch, label_tokens(batch))
    assert float(on_device["loss"]) == pytest.approx(loss, rel=2e-2)
    assert on_device.keys() - {"loss"} == runtime.trainable.keys()
    for name, param in runtime.trainable.items():
        assert (on_device[name] - param.grad).norm() <= 5e-2 * param.grad.norm() + 1e-8, name
