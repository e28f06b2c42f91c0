"""Preference objectives (DPO, IPO, ORPO, SimPO) against TRL, and their runs.

TRL (a test-only dependency, the `trl` extra) is the reference: on a tiny ChatGLM3 and a tiny Qwen2 with the same
LoRA weights, one batch of pairs gives the same loss, rewards and LoRA gradients within 1e-5 in fp32 through
TRL's own code: `DPOTrainer._compute_loss` (sigmoid and IPO; its model with TRL's fused LM head), and for ORPO and
SimPO TRL's `get_batch_logps`, `ORPOTrainer.odds_ratio_loss` and `CPOTrainer.cpo_loss`. The trainers are not
built (they need datasets and an accelerator state); their methods run on a stub holding the attributes they read.
TRL 1.16's DPO sigmoid loss has no label smoothing, so cDPO's is checked against the paper's formula, written out.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from collections import defaultdict
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from peft import LoraConfig, get_peft_model

from tuneport.core.cli import main
from tuneport.core.objectives import ObjectiveConfig
from tuneport.core.preference import collate_pairs
from tuneport.frameworks.torch.objectives import make_objective
from tuneport.models.chatglm3 import chatglm3_tiny
from tuneport.models.chatglm3.model import ChatGLMForConditionalGeneration
from tuneport.models.decoder.checkpoint import load_model
from tuneport.models.decoder.entries import ENTRIES

trl = pytest.importorskip("trl", reason="TRL is the reference here: pip install 'tuneport[trl]'")
from transformers.modeling_outputs import BaseModelOutput  # noqa: E402
from trl import DPOTrainer  # noqa: E402
from trl.experimental.cpo import CPOTrainer  # noqa: E402
from trl.experimental.orpo import ORPOTrainer  # noqa: E402
from trl.trainer.utils import add_fused_lm_head  # noqa: E402

TOL = dict(atol=1e-5, rtol=1e-5)
VOCAB = 120
DEMO = "builtin:demo_dpo.yaml"
KILLER = str(Path(__file__).parent / "killer.py")


def _decoder_tests():
    """tests/test_decoder.py, for its tiny Qwen2 (tests import by path here)."""
    spec = importlib.util.spec_from_file_location("tuneport_tests_decoder_pref", Path(__file__).parent / "test_decoder.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def pairs_batch() -> dict:
    """Three pairs of random tokens: a prompt without labels, then replies of different lengths."""
    g = torch.Generator().manual_seed(3)
    found = []
    for prompt_len, chosen_len, rejected_len in ((4, 5, 3), (6, 2, 6), (3, 7, 4)):
        prompt = torch.randint(3, VOCAB, (prompt_len,), generator=g).tolist()
        replies = [torch.randint(3, VOCAB, (n,), generator=g).tolist() for n in (chosen_len, rejected_len)]
        rows = [(prompt + r, [-100] * prompt_len + r) for r in replies]
        found.append((*rows[0], *rows[1]))
    return {k: torch.from_numpy(v) for k, v in collate_pairs(found, pad_id=0).items()}


class ChatGLMForTRL(ChatGLMForConditionalGeneration):
    """ChatGLM3 whose backbone answers as a transformers backbone (`last_hidden_state`), which TRL's fused LM head
    reads; the same modules and weights."""

    @property
    def base_model(self):
        transformer = self.transformer
        return lambda input_ids=None, attention_mask=None, **kwargs: BaseModelOutput(
            last_hidden_state=transformer(input_ids=input_ids, attention_mask=attention_mask))


def model_pair(kind: str, tmp_path: Path):
    """(TRL's model, ours): the same weights and LoRA adapter (its B matrices random, so policy and reference
    differ), in training mode without dropout."""
    if kind == "chatglm3":
        torch.manual_seed(0)
        ours = chatglm3_tiny(padded_vocab_size=VOCAB)
        theirs = ChatGLMForTRL(ours.config)
        theirs.load_state_dict(ours.state_dict())
        targets = ["query_key_value", "dense"]
    else:
        folder = _decoder_tests().write_model(tmp_path / "qwen2", "qwen2")
        ours = load_model(folder, dtype=torch.float32)
        theirs = ENTRIES["qwen2"].model.from_pretrained(folder, attn_implementation="eager", dtype=torch.float32)
        targets = ["q_proj", "v_proj"]
    add_fused_lm_head(theirs, outputs=("log_probs", "entropy", "mean_logits", "is_top1"))
    config = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=targets, task_type="CAUSAL_LM")
    theirs, ours = get_peft_model(theirs, config), get_peft_model(ours, config)
    with torch.no_grad():
        for name, param in theirs.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=torch.Generator().manual_seed(len(name))) * 0.3)
    ours.load_state_dict(theirs.state_dict(), strict=False)
    return theirs.train(), ours.train()


@contextmanager
def adapter_off(model):
    with model.disable_adapter():
        yield model


def ours_loss(model, batch: dict, objective: ObjectiveConfig) -> tuple[torch.Tensor, dict, dict]:
    pairs = batch["labels"].shape[0] // 2
    units = {"pairs": pairs, "chosen_tokens": int((batch["labels"][:pairs, 1:] != -100).sum())}
    loss, metrics = make_objective(objective, lambda: adapter_off(model)).loss(model, batch, units)
    loss.backward()
    return loss.detach(), {k: v / pairs for k, v in metrics.items()}, lora_grads(model)


def lora_grads(model) -> dict:
    return {n.split("base_model.model.")[-1]: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def assert_same(ours: tuple, loss: torch.Tensor, grads: dict) -> None:
    torch.testing.assert_close(ours[0], loss.detach(), **TOL)
    assert grads.keys() == ours[2].keys() and len(grads) >= 4
    for name in grads:
        torch.testing.assert_close(ours[2][name], grads[name], **TOL, msg=name)


def dpo_stub(model, loss_type: str, beta: float) -> SimpleNamespace:
    """The attributes `DPOTrainer._compute_loss` reads, for one process without an accelerator."""
    same = lambda t: t  # noqa: E731
    return SimpleNamespace(
        model=model, ref_model=None, accelerator=SimpleNamespace(device=torch.device("cpu"), unwrap_model=same,
                                                                 gather_for_metrics=same, gather=same),
        aux_loss_enabled=False, ld_alpha=None, precompute_ref_logps=False, args=SimpleNamespace(
            gradient_checkpointing_kwargs=None), f_divergence_type="reverse_kl", loss_types=[loss_type],
        loss_weights=[1.0], beta=beta, label_smoothing=0.0, use_weighting=False,
        _metrics=defaultdict(lambda: defaultdict(list)), _total_train_tokens=0, _tp_size=1)


@pytest.mark.parametrize("kind", ["chatglm3", "qwen2"])
@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo"])
def test_dpo_equals_trls_loss_rewards_and_lora_gradients(kind, loss_type, tmp_path):
    theirs, ours = model_pair(kind, tmp_path)
    batch = pairs_batch()
    stub = dpo_stub(theirs, loss_type, beta=0.1)
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"],
              "completion_mask": (batch["labels"] != -100).long()}
    loss = DPOTrainer._compute_loss(stub, theirs, inputs, False)
    loss.backward()
    got = ours_loss(ours, batch, ObjectiveConfig(name="dpo", beta=0.1, loss_type=loss_type))
    assert_same(got, loss, lora_grads(theirs))
    logged = {k: v[-1] for k, v in stub._metrics["train"].items()}
    for ours_name, trl_name in (("rewards_chosen", "rewards/chosen"), ("rewards_rejected", "rewards/rejected"),
                                ("margin", "rewards/margins"), ("accuracy", "rewards/accuracies"),
                                ("logps_chosen", "logps/chosen"), ("logps_rejected", "logps/rejected")):
        assert got[1][ours_name] == pytest.approx(logged[trl_name], abs=1e-5), ours_name
    assert 0 < got[1]["accuracy"] < 1  # the random adapter prefers some chosen replies, not all


def full_logits_logps(model, batch: dict, average: bool) -> torch.Tensor:
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return ORPOTrainer.get_batch_logps(logits, batch["labels"], average_log_prob=average), logits


@pytest.mark.parametrize("kind", ["chatglm3", "qwen2"])
def test_orpo_equals_trls_odds_ratio_loss(kind, tmp_path):
    theirs, ours = model_pair(kind, tmp_path)
    batch = pairs_batch()
    average, logits = full_logits_logps(theirs, batch, average=True)
    pairs = batch["labels"].shape[0] // 2
    chosen_logits, chosen_labels = logits[:pairs, :-1], batch["labels"][:pairs, 1:]
    nll = F.cross_entropy(chosen_logits.flatten(0, 1), chosen_labels.flatten(), ignore_index=-100)  # TRL's mean
    stub = SimpleNamespace(beta=0.1, accelerator=SimpleNamespace(device=torch.device("cpu")))
    losses, rewards_c, rewards_r, _, _ = ORPOTrainer.odds_ratio_loss(stub, *average.chunk(2))
    loss = nll - losses.mean()
    loss.backward()
    got = ours_loss(ours, batch, ObjectiveConfig(name="orpo", orpo_lambda=0.1))
    assert_same(got, loss, lora_grads(theirs))
    assert got[1]["rewards_chosen"] == pytest.approx(float(rewards_c.mean()), abs=1e-5)
    assert got[1]["rewards_rejected"] == pytest.approx(float(rewards_r.mean()), abs=1e-5)


@pytest.mark.parametrize("kind", ["chatglm3", "qwen2"])
@pytest.mark.parametrize("smoothing", [0.0, 0.2])
def test_simpo_equals_trls_cpo_loss(kind, smoothing, tmp_path):
    theirs, ours = model_pair(kind, tmp_path)
    batch = pairs_batch()
    average, _ = full_logits_logps(theirs, batch, average=True)
    stub = SimpleNamespace(alpha=0.0, beta=2.0, simpo_gamma=0.5, loss_type="simpo", label_smoothing=smoothing,
                           accelerator=SimpleNamespace(device=torch.device("cpu")))
    losses, rewards_c, rewards_r = CPOTrainer.cpo_loss(stub, *average.chunk(2))
    loss = losses.mean()  # SimPO is TRL's CPO with cpo_alpha 0: no NLL term
    loss.backward()
    got = ours_loss(ours, batch, ObjectiveConfig(name="simpo", beta=2.0, gamma=0.5, label_smoothing=smoothing))
    assert_same(got, loss, lora_grads(theirs))
    assert got[1]["rewards_chosen"] == pytest.approx(float(rewards_c.mean()), abs=1e-5)


def test_label_smoothed_dpo_is_the_cdpo_formula(tmp_path):
    """cDPO (Mitchell, 2023): -(1 - e) log sigmoid(beta d) - e log sigmoid(-beta d), d the log-ratio margin; TRL
    1.16's sigmoid loss has no smoothing, so the formula is written out here, on full-logits log-probabilities."""
    _, ours = model_pair("chatglm3", tmp_path)
    batch = pairs_batch()
    summed, _ = full_logits_logps(ours, batch, average=False)
    with torch.no_grad(), ours.disable_adapter():
        reference, _ = full_logits_logps(ours, batch, average=False)
    chosen, rejected = (summed - reference).chunk(2)
    d, e, beta = chosen - rejected, 0.2, 0.1
    expected = (-(1 - e) * F.logsigmoid(beta * d) - e * F.logsigmoid(-beta * d)).mean()
    expected.backward()
    grads = lora_grads(ours)
    ours.zero_grad()
    assert_same(ours_loss(ours, batch, ObjectiveConfig(name="dpo", beta=beta, label_smoothing=e)), expected, grads)


# --- runs ------------------------------------------------------------------------------------------------------
def run(args: list[str], killer: bool = False) -> None:
    """`tuneport ARGS` in a new process (with `killer`, SIGKILLed where tests/killer.py is told to)."""
    command = [sys.executable, KILLER] if killer else [sys.executable, "-m", "tuneport.core.cli"]
    result = subprocess.run([*command, *args], capture_output=True, text=True, timeout=300)
    assert result.returncode == (-9 if killer else 0), result.stderr[-2000:]


def records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def held_out(out: Path) -> tuple[float, float]:
    """The held-out pairs' preference accuracy before training and after (run.json's forgetting record)."""
    change = json.loads((out / "run.json").read_text())["forgetting"]["eval_preference"]
    return change["before"], change["after"]


def test_dpo_on_the_demo_pairs_learns_the_preference_and_a_swapped_control_unlearns_it(tmp_path, capsys):
    out = tmp_path / "dpo"
    assert main(["demo", "--objective", "dpo", f"output_dir={out}", "eval.every=0"]) == 0
    printed = capsys.readouterr().out
    assert "held-out preference accuracy " in printed and "reward margin 0.00 -> " in printed
    before, after = held_out(out)
    assert 0.2 <= before <= 0.8 and after > 0.9, (before, after)
    assert records(out)[-1]["margin"] > records(out)[0]["margin"]
    # `tuneport eval --preference` scores the same held-out pairs the same way, with the adapter and without
    for adapter, expected in ((["--adapter", str(out / "adapter")], after), ([], before)):
        scored = tmp_path / f"eval{len(adapter)}"
        assert main(["eval", "--preference", "--model", str(out / "base_model"), *adapter, "--data",
                     "builtin:demo/pairs_eval.jsonl", "--max-input-length", "64", "--max-new-tokens", "64",
                     "--out", str(scored)]) == 0
        metrics = json.loads((scored / "eval.json").read_text())["metrics"]
        assert metrics["preference_accuracy"] == pytest.approx(expected, abs=1e-6)
    swapped = tmp_path / "swapped.jsonl"
    rows = [json.loads(line) for line in (Path(__file__).parents[1] / "recipes" / "demo" / "pairs.jsonl")
            .read_text().splitlines()]
    swapped.write_text("".join(json.dumps({**r, "chosen": r["rejected"], "rejected": r["chosen"]}) + "\n"
                               for r in rows))
    control = tmp_path / "control"
    assert main(["train", DEMO, f"output_dir={control}", f"data.train={swapped}", "eval.every=0"]) == 0
    assert held_out(control)[0] == before and held_out(control)[1] < before


BAD = {
    "no reply": ({"prompt": "hi", "chosen": "hello"}, "line 2: record is not a preference pair"),
    "empty reply": ({"prompt": "hi", "chosen": "", "rejected": "go"}, "line 2: field 'chosen' holds no reply"),
    "same replies": ({"prompt": "hi", "chosen": "same", "rejected": "same"},
                     "line 2: fields 'chosen' and 'rejected' hold the same reply"),
    "long prompt": ({"prompt": "word " * 200, "chosen": "a", "rejected": "b"},
                    "line 2: field 'prompt' is"),
}


@pytest.mark.parametrize("case", BAD)
def test_a_bad_pair_is_one_line_exit_2_and_nothing_written(case, tmp_path, capsys):
    record, says = BAD[case]
    data = tmp_path / "pairs.jsonl"
    data.write_text(json.dumps({"prompt": "ok", "chosen": "yes", "rejected": "no"}) + "\n" + json.dumps(record) + "\n")
    out = tmp_path / "run"
    assert main(["train", DEMO, f"data.train={data}", "data.eval=null", f"output_dir={out}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"{data}: {says}" in err[0], err
    assert not out.exists()


def test_the_adapter_disabled_reference_adds_no_parameter_memory(tmp_path):
    from tuneport.backends import get_backend
    from tuneport.core.config import load_recipe
    from tuneport.core.precision import resolve_precision
    from tuneport.frameworks.torch.runtime import TorchRuntime

    assert main(["train", DEMO, "train.max_steps=1", "eval.every=0", "data.eval=null",
                 f"output_dir={tmp_path / 'base'}"]) == 0
    backend = get_backend("cpu")
    counted = {}
    for objective in ("sft", "dpo"):
        recipe = load_recipe(DEMO, [f"objective.name={objective}"])
        runtime = TorchRuntime(recipe, backend, resolve_precision("fp32", "cpu", backend.capabilities),
                               tmp_path / "base" / "base_model")
        modules = [runtime.model] + ([runtime.frozen] if runtime.frozen is not None else [])
        counted[objective] = sum(p.numel() * p.element_size() for m in modules for p in m.parameters())
    assert counted["dpo"] == counted["sft"]
    full = load_recipe(DEMO, ["method.name=full"])  # no adapter to disable: a frozen copy, the model's size again
    runtime = TorchRuntime(full, backend, resolve_precision("fp32", "cpu", backend.capabilities),
                           tmp_path / "base" / "base_model")
    assert sum(p.numel() for p in runtime.frozen.parameters()) == sum(p.numel() for p in runtime.model.parameters())


def test_a_dpo_run_killed_mid_run_resumes_bit_exactly(tmp_path):
    common = ["train.max_steps=4", "save.every=1", "eval.every=0", "data.eval=null"]

    straight, killed = tmp_path / "straight", tmp_path / "killed"
    run(["train", DEMO, *common, f"output_dir={straight}"])
    run(["step", "2", "train", DEMO, *common, f"output_dir={killed}"], killer=True)
    run(["train", "--resume", str(killed)])
    kept = ("loss", "grad_norm", "margin", "accuracy", "logps_chosen", "logps_rejected")
    assert [[r[k] for k in kept] for r in records(straight)] == [[r[k] for k in kept] for r in records(killed)]
    from safetensors.torch import load_file

    a, b = (load_file(out / "adapter" / "adapter_model.safetensors") for out in (straight, killed))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_trl_strings_trl_messages_and_sharegpt_pairs_encode_alike_with_labels_on_the_replies_only(tmp_path):
    from tuneport.core.preference import encode_pairs
    from tuneport.models.chatglm3.files import load_tokenizer

    tokenizer = load_tokenizer(Path(__file__).parents[1] / "recipes" / "demo")
    history = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]
    forms = {
        "trl strings": {"prompt": "What is LoRA?", "chosen": "Low-rank adapters.", "rejected": "No idea."},
        "trl messages": {"prompt": [{"role": "user", "content": "What is LoRA?"}],
                         "chosen": [{"role": "assistant", "content": "Low-rank adapters."}],
                         "rejected": [{"role": "assistant", "content": "No idea."}]},
        "sharegpt": {"conversations": [{"from": "human", "value": "What is LoRA?"}],
                     "chosen": {"from": "gpt", "value": "Low-rank adapters."},
                     "rejected": {"from": "gpt", "value": "No idea."}},
    }
    encoded = {}
    for name, record in forms.items():
        path = tmp_path / f"{name}.jsonl"
        path.write_text(json.dumps(record) + "\n")
        data = encode_pairs(path, tokenizer)
        assert data.pairs and data.format == name.split()[0]
        encoded[name] = data.samples[0]
    assert encoded["trl strings"] == encoded["trl messages"] == encoded["sharegpt"]
    chosen_ids, chosen_labels, rejected_ids, rejected_labels = encoded["sharegpt"]
    reply = tokenizer.encode_conversation(forms["trl messages"]["chosen"], 1 << 30, 0)[1]
    assert [x for x in chosen_labels if x != -100] == [x for x in reply if x != -100]  # the reply and its end
    # a multi-turn prompt: its earlier assistant turn carries no label
    path = tmp_path / "multi.jsonl"
    path.write_text(json.dumps({"prompt": history + [{"role": "user", "content": "And LoRA?"}],
                                "chosen": "Adapters.", "rejected": "Nothing."}) + "\n")
    ids, labels, _, _ = encode_pairs(path, tokenizer).samples[0]
    start = next(i for i, x in enumerate(labels) if x != -100)
    assert all(x != -100 for x in labels[start:]) and start > len(tokenizer.encode_conversation(history, 1 << 30, 0)[0])


def test_a_precomputed_reference_trains_as_the_live_one_and_its_pass_resumes_after_a_kill(tmp_path):
    """150 pairs: three parts of the reference pass; the run is killed after the first part is written."""
    rows = (Path(__file__).parents[1] / "recipes" / "demo" / "pairs.jsonl").read_text().splitlines()
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(line + "\n" for line in (rows * 3)[:150]))
    common = ["train.max_steps=3", "save.every=1", "eval.every=0", "data.eval=null", f"data.train={data}"]

    live, straight, killed = tmp_path / "live", tmp_path / "straight", tmp_path / "killed"
    precompute = "objective.precompute_reference=true"
    assert main(["train", DEMO, *common, f"output_dir={live}"]) == 0
    assert main(["train", DEMO, *common, precompute, f"output_dir={straight}"]) == 0
    run(["reference", "1", "train", DEMO, *common, precompute, f"output_dir={killed}"], killer=True)
    assert [p.name for p in (killed / "reference").glob("*.npy")] == ["train-00000.npy"]
    run(["train", "--resume", str(killed)])
    assert sorted(p.name for p in (killed / "reference").iterdir()) == [f"train-0000{k}.npy" for k in range(3)]
    losses = {out.name: [r["loss"] for r in records(out)] for out in (live, straight, killed)}
    assert losses["killed"] == losses["straight"]
    torch.testing.assert_close(torch.tensor(losses["straight"]), torch.tensor(losses["live"]), atol=1e-5, rtol=0)
