"""The peft methods beside LoRA (DoRA, AdaLoRA, IA3, prompt tuning, P-tuning, prefix tuning) on the golden
ChatGLM3 model: training, exact resume after SIGKILL, a standard peft adapter that reproduces the trained
model, parameter counts against peft's own, and `tuneport methods`."""

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import peft
import pytest
import torch
import transformers
from safetensors.torch import load_file

from tuneport.backends import get_backend
from tuneport.frameworks.torch.runtime import TorchRuntime
from tuneport.core.cli import main
from tuneport.core.config import load_recipe
from tuneport.core.precision import resolve_precision
from tuneport.models.chatglm3 import load_model


DEMO = "builtin:demo.yaml"
KILLER = str(Path(__file__).parent / "killer.py")
# Each method at small sizes; AdaLoRA reallocates its budget from step 1 on (tinit 0, every step) and
# takes its final allocation at step 3 of 4 (tfinal 1), so a kill at step 2 lands past the first reallocation.
METHODS = {
    "dora": ("method.r=4", "method.alpha=8", "method.dropout=0.1", "method.target_modules=[query_key_value,dense]"),
    "adalora": ("method.init_r=6", "method.target_r=2", "method.tinit=0", "method.tfinal=1", "method.delta_t=1",
                "method.dropout=0.1"),
    "ia3": (),
    "prompt_tuning": ("method.num_virtual_tokens=4",),
    "ptuning": ("method.num_virtual_tokens=4", "method.encoder_hidden_size=16"),
    "prefix_tuning": ("method.num_virtual_tokens=4",),
}
STEPS = 4


def overrides(golden: Path, method: str, out: Path) -> list[str]:
    return [f"model={golden / 'checkpoint'}", "tokenizer=null", f"method.name={method}", *METHODS[method],
            f"train.max_steps={STEPS}", "save.every=1", "train.lr=1e-2", "train.micro_batch_size=2",
            f"output_dir={out}"]


def run(args: list[str], killer: bool = False) -> None:
    """`tuneport ARGS` in a new process (with `killer`, SIGKILLed where tests/killer.py is told to)."""
    command = [sys.executable, KILLER] if killer else [sys.executable, "-m", "tuneport.core.cli"]
    result = subprocess.run([*command, *args], capture_output=True, text=True, timeout=300)
    assert result.returncode == (-9 if killer else 0), result.stderr[-2000:]


@pytest.mark.parametrize("method", METHODS)
def test_method_trains_resumes_exactly_and_saves_a_peft_adapter(tmp_path, golden, method):
    # Each run is a fresh process, as a real resume is: after many other tests, a run inside the test process
    # was seen to round the last bit of some AdaLoRA weights differently from fresh processes.
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    run(["train", DEMO, *overrides(golden, method, straight)])
    run(["step", "2", "train", DEMO, *overrides(golden, method, killed)], killer=True)
    run(["train", "--resume", str(killed)])

    losses = [[json.loads(x)["loss"] for x in (folder / "metrics.jsonl").read_text().splitlines()]
              for folder in (straight, killed)]
    assert losses[0] == losses[1] and len(losses[0]) == STEPS
    a, b = (load_file(folder / "adapter" / "adapter_model.safetensors") for folder in (straight, killed))
    assert a.keys() == b.keys()
    assert [(k, float((a[k] - b[k]).abs().max())) for k in a if not torch.equal(a[k], b[k])] == []
    assert json.loads((straight / "adapter" / "adapter_config.json").read_text())["peft_type"] == \
        {"dora": "LORA", "ptuning": "P_TUNING"}.get(method, method.upper())

    # The trained model (the last checkpoint, as training held it) against the adapter loaded by plain peft.
    recipe = load_recipe(straight / "recipe.yaml")
    backend = get_backend("cpu")
    runtime = TorchRuntime(recipe, backend, resolve_precision("fp32", "cpu", backend.capabilities),
                           golden / "checkpoint")
    runtime.load_state(straight / "checkpoints" / f"step-{STEPS}")
    loaded = peft.PeftModel.from_pretrained(load_model(golden / "checkpoint"), str(straight / "adapter")).eval()
    cases = load_file(golden / "cases.safetensors")
    ids = cases["input_ids"]
    runtime.model.eval()
    with torch.no_grad():
        trained, reloaded = runtime.model(input_ids=ids).logits, loaded(input_ids=ids).logits
        base = load_model(golden / "checkpoint")(input_ids=ids).logits
    torch.testing.assert_close(reloaded, trained, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(trained[:, -ids.shape[1]:], base, atol=1e-4)  # tuning changed the model

    # `tuneport export` merges what merges into the weights, and refuses virtual tokens with one line.
    code = main(["export", "--model", str(golden / "checkpoint"), "--adapter", str(straight / "adapter"),
                 "--out", str(tmp_path / "merged")])
    if loaded.active_peft_config.is_prompt_learning:
        assert code == 2 and not (tmp_path / "merged").exists()
        return
    assert code == 0
    with torch.no_grad():
        merged = load_model(tmp_path / "merged")(input_ids=ids).logits
    torch.testing.assert_close(merged, trained, atol=1e-4, rtol=1e-4)


def test_adalora_prunes_to_its_budget_and_saves_the_allocated_ranks(tmp_path, golden):
    """After the final allocation, 2 of 6 ranks per adapted layer on average survive (the others are zeroed
    in training and cut from the saved adapter), as peft's schedule says, unevenly: the budget moved."""
    out = tmp_path / "run"
    assert main(["train", DEMO, *overrides(golden, "adalora", out)]) == 0
    config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    kept = [sum(mask) for mask in config["rank_pattern"].values()]
    adapted = load_model(golden / "checkpoint").config.num_layers * 4  # the demo adapts all 4 linear layers
    assert len(kept) == adapted and sum(kept) == 2 * adapted and len(set(kept)) > 1
    weights = load_file(out / "adapter" / "adapter_model.safetensors")
    e = sorted(k for k in weights if "lora_E" in k)
    assert [weights[k].shape[0] for k in e] == kept


def peft_reference(method: str):
    """The peft config a user would write for each method on ChatGLM3, independently of tuneport's."""
    kv = dict(num_attention_heads=2, token_dim=2 * 128)  # ChatGLM3-6B: 2 KV groups of 128 channels
    return {
        "lora": peft.LoraConfig(r=8, target_modules=["query_key_value"], task_type="CAUSAL_LM"),
        "dora": peft.LoraConfig(r=8, use_dora=True, target_modules=["query_key_value"], task_type="CAUSAL_LM"),
        "adalora": peft.AdaLoraConfig(init_r=12, target_r=8, target_modules=["query_key_value"], total_step=2000,
                                      task_type="CAUSAL_LM"),
        "ia3": peft.IA3Config(target_modules=["query_key_value", "dense_4h_to_h"], feedforward_modules=["dense_4h_to_h"],
                              task_type="CAUSAL_LM"),
        "prompt_tuning": peft.PromptTuningConfig(num_virtual_tokens=20, task_type="CAUSAL_LM"),
        "ptuning": peft.PromptEncoderConfig(num_virtual_tokens=20, encoder_hidden_size=128, task_type="CAUSAL_LM"),
        "prefix_tuning": peft.PrefixTuningConfig(num_virtual_tokens=20, task_type="CAUSAL_LM", **kv),
    }[method]


def chatglm(row: str) -> int:
    """The ChatGLM3-6B column of a `tuneport methods` row (the Qwen2.5-7B one follows it)."""
    return int(re.findall(r"[\d,]{2,}|-", row)[-2].replace(",", ""))


def test_methods_table_counts_what_peft_counts(capsys):
    """`tuneport methods` on the 6B config (meta device) against peft's own count on the same model."""
    from tuneport.models.chatglm3 import ChatGLMForConditionalGeneration
    from tuneport.models.chatglm3.config import chatglm3_6b_config

    assert main(["methods", "--family", "chatglm", "--family", "llama"]) == 0
    rows = {line.split()[0]: line for line in capsys.readouterr().out.splitlines()[2:]}
    assert {"lora", "qlora", "dora", "adalora", "ia3", "prompt_tuning", "ptuning", "prefix_tuning", "ptuning_v2",
            "full"} <= rows.keys()
    assert "mindspore" in rows["ia3"] and "mindspore" not in rows["adalora"]
    for method in ("lora", "dora", "adalora", "ia3", "prompt_tuning", "ptuning", "prefix_tuning"):
        with torch.device("meta"):
            model = peft.get_peft_model(ChatGLMForConditionalGeneration(chatglm3_6b_config()), peft_reference(method))
        trainable, _ = model.get_nb_trainable_parameters()  # what print_trainable_parameters prints
        assert chatglm(rows[method]) == trainable, method
    assert chatglm(rows["qlora"]) == chatglm(rows["lora"])
    assert chatglm(rows["prefix_tuning"]) == 20 * 28 * 2 * 256  # tokens x layers x (k, v) x kv width
    assert rows["ptuning_v2"].split()[-1] == "-"  # ChatGLM's own prefix encoder: no Llama count
    # Llama-3.1-8B (meta-llama/Llama-3.1-8B-Instruct's config.json) with LoRA r8 on every projection
    values = dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                  num_attention_heads=32, num_key_value_heads=8)
    with torch.device("meta"):
        llama = peft.get_peft_model(transformers.LlamaForCausalLM(transformers.LlamaConfig(**values)), peft.LoraConfig(
            r=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]))
    assert int(rows["lora"].split()[-1].replace(",", "")) == llama.get_nb_trainable_parameters()[0] == 20_971_520


def test_methods_table_on_a_folder_and_bad_schedules(golden, capsys, tmp_path):
    assert main(["methods", "--model", str(golden / "checkpoint")]) == 0
    assert capsys.readouterr().out.splitlines()[1].split()[-1] == "checkpoint"
    # AdaLoRA's budget needs the run's length: epochs alone, or a tinit past the end, are refused up front.
    assert main(["train", DEMO, "method.name=adalora", "train.max_steps=null", "train.epochs=1"]) == 2
    assert "give train.max_steps" in capsys.readouterr().err
    assert main(["train", DEMO, "method.name=adalora", "train.max_steps=100"]) == 2
    err = capsys.readouterr().err
    assert "method.tinit: 200 leaves no budgeting phase" in err and len(err.strip().splitlines()) == 1
    # peft would set the final budget at step 1 with no importance scored before it (a KeyError in mask_to_budget)
    assert main(["train", DEMO, "method.name=adalora", "method.tinit=0", "method.tfinal=1", "train.max_steps=2"]) == 2
    err = capsys.readouterr().err
    assert err.strip().splitlines() == [
        "error: command line: method.tfinal: 1 leaves no step to score importance before the final budget is set at "
        "step 1: train.max_steps - method.tfinal (2 - 1) must be at least 2; lower tfinal or raise train.max_steps"]
    assert main(["train", DEMO, "method.name=adalora", "method.tinit=0", "deepspeed=builtin:deepspeed/zero2.json"]) == 2
    assert "adalora does not run under deepspeed" in capsys.readouterr().err
    assert main(["train", DEMO, f"model={golden / 'checkpoint'}", "tokenizer=null", "method.name=ia3",
                 "method.target_modules=[query_key_value]", "method.feedforward_modules=[dense_h_to_4h]", "train.max_steps=1", f"output_dir={tmp_path / 'ia3'}"]) == 2
    err = capsys.readouterr().err
    assert "method.feedforward_modules: ['dense_h_to_4h'] are not in the targets" in err
    assert len(err.strip().splitlines()) == 1


def test_adalora_accumulation_makes_the_same_update(tmp_path, golden):
    """4 micro-batches of 1 make the same step as 1 of 4: the task loss is token-normalised over the step,
    and peft's orthogonality penalty, added to every micro-batch's loss, counts once per step."""
    common = [f"model={golden / 'checkpoint'}", "tokenizer=null", "method.name=adalora", "method.init_r=6",
              "method.target_r=2", "method.tinit=0", "method.tfinal=1", "method.delta_t=1", "method.dropout=0",
              "train.max_steps=3", "train.lr=1e-3", "save.every=0"]
    assert main(["train", DEMO, *common, f"output_dir={tmp_path / 'a'}", "train.micro_batch_size=1",
                 "train.grad_accum=4"]) == 0
    assert main(["train", DEMO, *common, f"output_dir={tmp_path / 'b'}", "train.micro_batch_size=4",
                 "train.grad_accum=1"]) == 0
    losses = [[json.loads(x)["loss"] for x in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
              for run in ("a", "b")]
    assert losses[0] == pytest.approx(losses[1], abs=1e-5)  # the penalty once per step, not once per micro-batch
    a, b = (load_file(tmp_path / run / "adapter" / "adapter_model.safetensors") for run in ("a", "b"))
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=1e-5, rtol=1e-5)
    config = json.loads((tmp_path / "a" / "adapter" / "adapter_config.json").read_text())
    assert config["orth_reg_weight"] == 0.5  # the recipe's weight, not the per-micro-batch share


def test_prefix_tuning_attends_to_its_prefix_under_checkpointing(golden):
    """peft passes the prefix as past keys and values; with gradient checkpointing the recomputed layers
    must see it too: the same loss and gradients with checkpointing on and off."""
    cases = load_file(golden / "cases.safetensors")
    batch = {"input_ids": cases["input_ids"].numpy(), "labels": cases["labels"].numpy(),
             "attention_mask": np.ones_like(cases["input_ids"].numpy())}
    results = []
    for on in (False, True):
        recipe = load_recipe(DEMO, (f"model={golden / 'checkpoint'}", "tokenizer=null", "method.name=prefix_tuning",
                                    "method.num_virtual_tokens=4", f"train.gradient_checkpointing={on}"))
        backend = get_backend("cpu")
        runtime = TorchRuntime(recipe, backend, resolve_precision("fp32", "cpu", backend.capabilities),
                               golden / "checkpoint")
        loss = runtime.forward_backward(batch, int((batch["labels"][:, 1:] != -100).sum()))
        results.append((loss, {n: p.grad.clone() for n, p in runtime.trainable.items()}))
    (loss_off, grads_off), (loss_on, grads_on) = results
    assert loss_on == pytest.approx(loss_off, abs=1e-6)
    assert grads_off.keys() == grads_on.keys() and all(g.abs().sum() > 0 for g in grads_off.values())
    for name in grads_off:
        torch.testing.assert_close(grads_on[name], grads_off[name], atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("method", ["prompt_tuning", "ptuning", "prefix_tuning"])
def test_prompt_methods_generate_as_the_uncached_model_does(golden, method):
    """Cached greedy generation (peft injects the virtual tokens once, on the first step) against the
    reference: the whole sequence re-run without a cache for every new token."""
    recipe = load_recipe(DEMO, (f"model={golden / 'checkpoint'}", "tokenizer=null", f"method.name={method}",
                                "method.num_virtual_tokens=4"))
    backend = get_backend("cpu")
    runtime = TorchRuntime(recipe, backend, resolve_precision("fp32", "cpu", backend.capabilities), golden / "checkpoint")
    prompt = [64790, 64792, 36474, 54591]
    generated = runtime.generate(prompt, 6, stop_ids=[-1], pad_id=0)
    ids = list(prompt)
    runtime.model.eval()
    with torch.no_grad():
        for _ in range(6):
            ids.append(int(runtime.model(input_ids=torch.tensor([ids]), use_cache=False).logits[0, -1].argmax()))
    assert generated == ids[len(prompt):]
    assert len(set(generated)) > 1  # not one token repeated (what a prefix injected at every step gave)
    # Batched (as eval.generate runs it) equals one by one: peft's virtual tokens sit before any left padding,
    # so prompt methods generate one prompt at a time.
    prompts = [prompt, prompt[:2], [64790, 64792, 30910]]
    assert runtime.generate_batch(prompts, 6, [-1], 0) == [runtime.generate(p, 6, [-1], 0) for p in prompts]



QLORA_AFTER_LORA = """
import sys, torch
from pathlib import Path
from tuneport.frameworks.torch.build import apply_method
from tuneport.frameworks.torch.methods.qlora import quantize_linear_4bit
from tuneport.core.methods import LoraConfig, QLoraConfig
from tuneport.models import family_for
from tuneport.models.chatglm3 import load_model
folder = Path(sys.argv[1])
apply_method(load_model(folder), LoraConfig(r=2), family_for(folder))
import peft.import_utils
print("after lora:", "bitsandbytes" in sys.modules, "peft sees it:", peft.import_utils.is_bnb_4bit_available())
quantize = lambda m: quantize_linear_4bit(m, "nf4", True, torch.float32, torch.device("cpu"))
qlora = apply_method(load_model(folder), QLoraConfig(r=2), family_for(folder), quantize)
print("qlora:", sorted({f"{name}:{type(m).__module__}.{type(m).__name__}" for name, m in qlora.named_modules()}))
"""


def test_lora_leaves_bitsandbytes_unimported_and_qlora_still_finds_it(golden):
    """peft imports bitsandbytes whenever it is installed; a run that quantizes nothing hides it (about 45 MiB
    and a second of start-up); afterwards peft finds it again, and a QLoRA model built in the same process is
    layer for layer the one built where bitsandbytes was never hidden (this process, which imported peft with it)."""
    pytest.importorskip("bitsandbytes", reason="shows only where bitsandbytes is installed (tuneport[qlora])")
    from tuneport.frameworks.torch.build import apply_method
    from tuneport.frameworks.torch.methods.qlora import quantize_linear_4bit
    from tuneport.core.methods import QLoraConfig
    from tuneport.models import family_for

    result = subprocess.run([sys.executable, "-c", QLORA_AFTER_LORA, str(golden / "checkpoint")],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "after lora: False peft sees it: True" in result.stdout
    quantize = lambda m: quantize_linear_4bit(m, "nf4", True, torch.float32, torch.device("cpu"))  # noqa: E731
    qlora = apply_method(load_model(golden / "checkpoint"), QLoraConfig(r=2), family_for(golden / "checkpoint"),
                         quantize)
    here = sorted({f"{name}:{type(m).__module__}.{type(m).__name__}" for name, m in qlora.named_modules()})
    assert any("bitsandbytes" in row for row in here)
    assert f"qlora: {here}" in result.stdout
