"""Training throughput and memory: tuneport's loop against transformers.Trainer + peft. Not a test.

Both train the same ChatGLM3-architecture model (identical initial weights, saved once) on AdvertiseGen
with the same LoRA settings (r 8 on query_key_value), AdamW, learning rate, precision and number of
samples. The HF path takes the batches in file order, padded to their longest row; tuneport takes them
as `tuneport train` does, shuffled and grouped by length (less padding), so the two learn from different
batches and their eval losses compare; with `--same-batches` tuneport takes the HF path's batches, and
the per-step losses compare too. Both are evaluated on the same AdvertiseGen dev batches.
  (a) tuneport: `TorchRuntime.forward_backward` + `optimizer_step`, as `tuneport train` runs them;
  (b) hf: `transformers.Trainer` over a `peft` model calling the model's standard forward with labels
      (full logits), the path every transformers user gets and the official fine-tuning demo runs.
  (c) with `--packing`, tuneport again with `data.packing`: the samples of (b)'s batches packed first-fit
      decreasing into rows of `--pack-length` tokens (default: the longest a sample may be), as many rows a
      micro-batch as hold (b)'s real tokens a step, so it learns from the same samples in about as many steps.
Each run is its own process, so peak memory is that path's alone (peak RSS on the CPU, the backend's
peak on an accelerator); the paths alternate for `--rounds` rounds, as machines are noisy. `--profile`
prints the top operators of one tuneport step (torch.profiler), to see what bounds it.
Reported: median tokens/s after warm-up (non-padding tokens), peak memory, per-step losses, and the eval
loss on held-out batches after the same samples.

    python bench/train_throughput.py --size small                 (the CPU comparison of issue 11)
    python bench/train_throughput.py --size tiny --rounds 1 --steps 6
    python bench/train_throughput.py --size small --packing --profile   (packing against both, issue 23)
    python bench/train_throughput.py --size 6b --device cuda --precision bf16

Last line: `tokens/s ratio tuneport/hf: X.XX, peak memory ratio: Y.YY, eval loss delta: Z`; with --packing,
the same for the packed path against hf, and against tuneport unpacked, on the lines before it.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TESTS = Path(__file__).resolve().parents[1] / "tests"
DATA = TESTS / "data" / "advertisegen"
TOKENIZER = TESTS / "golden" / "chatglm3" / "checkpoint" / "tokenizer.model"
SIZES = {  # ChatGLM3's architecture and its real 65,024-word vocabulary
    "tiny": dict(num_layers=2, hidden_size=256, ffn_hidden_size=688, num_attention_heads=4, kv_channels=64),
    "small": dict(num_layers=4, hidden_size=1024, ffn_hidden_size=3424, num_attention_heads=8, kv_channels=128),
    "6b": {},
}
LR = 1e-3
LENGTHS = (128, 128)  # max input and output tokens


def build_model(size: str, folder: Path, dtype: str) -> None:
    """The benchmark's base model, with fixed random weights, saved in the official layout."""
    import torch

    from tuneport.models.chatglm3 import ChatGLMForConditionalGeneration
    from tuneport.models.chatglm3.config import chatglm3_6b_config

    torch.manual_seed(0)
    name = {"fp32": "float32", "bf16": "bfloat16"}[dtype]
    config = chatglm3_6b_config(seq_length=2048, dtype=name, **SIZES[size])
    torch.set_default_dtype(getattr(torch, name))
    model = ChatGLMForConditionalGeneration(config)
    torch.set_default_dtype(torch.float32)
    model.save_pretrained(folder)
    (folder / "tokenizer.model").write_bytes(TOKENIZER.read_bytes())


def batches(folder: Path, batch: int, count: int, split: str = "train", grouped: bool = False):
    """`count` right-padded batches of AdvertiseGen (the official demo's data): in file order, or (`grouped`)
    as `tuneport train` takes them, shuffled with seed 0 and grouped by length."""
    from tuneport.core.data import collate, encode_dataset
    from tuneport.core.trainer import Position, micro_batches
    from tuneport.models.chatglm3.files import load_tokenizer

    tokenizer = load_tokenizer(folder)
    data = encode_dataset(DATA / f"{split}.json", tokenizer, "advertisegen", *LENGTHS)
    if grouped:
        stream = micro_batches(data, batch, 0, tokenizer.pad_token_id, Position(), group=batch)
        return [next(stream) for _ in range(count)]
    return [collate(data.samples[i * batch:(i + 1) * batch], tokenizer.pad_token_id) for i in range(count)]


def packed_batches(folder: Path, batch: int, count: int, length: int) -> list[dict]:
    """The samples of `batches(folder, batch, count)` packed first-fit decreasing into rows of `length` tokens,
    as many rows a micro-batch as hold those batches' real tokens on average (so the steps learn from as many
    tokens as theirs, and as many steps take them; the last may hold fewer)."""
    from tuneport.core.data import collate_packed, encode_dataset, pack
    from tuneport.models.chatglm3.files import load_tokenizer

    tokenizer = load_tokenizer(folder)
    samples = encode_dataset(DATA / "train.json", tokenizer, "advertisegen", *LENGTHS).samples[:batch * count]
    lengths = [len(ids) for ids, _ in samples]
    rows = [[samples[i] for i in row] for row in pack(lengths, length)]
    size = max(1, round(sum(lengths) / count / length))
    return [collate_packed(rows[i:i + size], tokenizer.pad_token_id) for i in range(0, len(rows), size)]


def profile_step(step) -> str:
    """The top operators of one call of `step` by their own time (torch.profiler), as a table."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12, max_name_column_width=40)


def peak_memory(device: str) -> float:
    """Peak memory of this process in MiB: the backend's peak on an accelerator, peak RSS on the CPU."""
    import resource

    if device != "cpu":
        from tuneport.backends import get_backend

        return get_backend(device).memory_stats().peak / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def tuneport_checkpointing(args):
    """tuneport's setting: `--tuneport-checkpointing` (auto: its memory policy), else the shared one."""
    choice = args.tuneport_checkpointing
    return args.checkpointing if choice is None else {"on": True, "off": False, "auto": "auto"}[choice]


MALLOC = ("setup", "mmap-1m", "mmap-4m", "mmap-32m", "trim")


def malloc_setting(choice: str, backend):
    """The C allocator's setting for the tuneport run: "setup" as `tuneport train` has it (the backend's setup:
    glibc's own moving mmap threshold); "mmap-1m" (tuneport's setting before 2026-12-03), "mmap-4m", "mmap-32m"
    a threshold fixed at that size; "trim" glibc's own with malloc_trim(0) after every step. Returns malloc_trim
    when it is to run after each step."""
    import ctypes

    from tuneport.backends.cpu import set_mmap_threshold

    if choice == "setup":
        backend.setup()  # as `tuneport train` does
    elif choice.startswith("mmap-"):
        set_mmap_threshold(int(choice[5:-1]) << 20)
    return ctypes.CDLL(None).malloc_trim if choice == "trim" else None


def run_tuneport(folder: Path, args) -> dict:
    from tuneport.backends import get_backend
    from tuneport.frameworks.torch.runtime import TorchRuntime
    from tuneport.core.config import load_recipe
    from tuneport.core.precision import resolve_precision
    from tuneport.core.trainer import label_tokens

    recipe = load_recipe({"model": str(folder), "method": {"name": "lora", "r": 8, "alpha": 16, "dropout": 0.0,
                                                         "target_modules": ["query_key_value"]},
                          "train": {"max_steps": args.steps, "micro_batch_size": args.batch, "lr": LR,
                                    "gradient_checkpointing": tuneport_checkpointing(args), "seed": 0,
                                    "grad_clip": 1.0},
                          "data": {"train": str(DATA / "train.json"), "format": "advertisegen",
                                   "max_input_length": LENGTHS[0], "max_output_length": LENGTHS[1],
                                   "packing": args.worker == "packed", "pack_length": args.pack_length},
                          "precision": args.precision, "device": args.device})
    backend = get_backend(args.device)
    trim = malloc_setting(args.malloc, backend)
    precision = resolve_precision(args.precision, args.device, backend.capabilities)
    runtime = TorchRuntime(recipe, backend, precision, folder)
    if args.worker == "packed":
        train = packed_batches(folder, args.batch, args.steps, recipe.data.row_tokens)
    else:
        train = batches(folder, args.batch, args.steps, grouped=not args.same_batches)
    times, losses = [], []

    def step(batch: dict) -> float:
        loss = runtime.forward_backward(batch, label_tokens(batch))
        runtime.optimizer_step(LR, 1.0)
        backend.synchronize()
        return loss

    for batch in train:
        start = time.perf_counter()
        losses.append(step(batch))
        if trim:
            trim(0)
        times.append(time.perf_counter() - start)
    profiled = profile_step(lambda: step(train[-1])) if args.profile else None
    total, count = 0.0, 0
    for batch in batches(folder, args.batch, args.eval_batches, "dev"):
        loss, n = runtime.eval_loss(batch)
        total, count = total + loss, count + n
    return {"times": times, "losses": losses, "tokens": [int(b["attention_mask"].sum()) for b in train],
            "positions": [b["attention_mask"].size for b in train], "eval_loss": total / count, "profile": profiled}


def run_hf(folder: Path, args) -> dict:
    import torch
    from peft import LoraConfig, get_peft_model
    from torch.utils.data import Dataset, SequentialSampler
    from transformers import Trainer, TrainerCallback, TrainingArguments

    from tuneport.models.chatglm3 import load_model

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.precision]
    torch.manual_seed(0)  # the same LoRA initialisation as tuneport's: seed 0, load, wrap
    model = load_model(folder, args.device, dtype=dtype)
    if args.checkpointing:
        model.gradient_checkpointing_enable()
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0,
                                             target_modules=["query_key_value"], task_type="CAUSAL_LM"))
    train = batches(folder, args.batch, args.steps)
    rows = [{k: torch.from_numpy(v[i]) for k, v in b.items()} for b in train for i in range(args.batch)]

    class Rows(Dataset):
        def __len__(self):
            return len(rows)

        def __getitem__(self, i):
            return rows[i]

    def collate(items):  # the batches above, unchanged (already padded to their longest row)
        return {k: torch.stack([item[k] for item in items]) for k in items[0]}

    class InOrder(Trainer):  # the same batches in the same order as tuneport's run
        def _get_train_sampler(self, *a, **k):
            return SequentialSampler(self.train_dataset)

    class Clock(TrainerCallback):
        def __init__(self):
            self.times, self.losses, self.start = [], [], 0.0

        def on_step_begin(self, *a, **k):
            self.start = time.perf_counter()

        def on_step_end(self, *a, **k):
            self.times.append(time.perf_counter() - self.start)

        def on_log(self, _args, state, control, logs=None, **k):
            if logs and "loss" in logs:
                self.losses.append(logs["loss"])

    clock = Clock()
    with tempfile.TemporaryDirectory() as out:
        training = TrainingArguments(
            output_dir=out, per_device_train_batch_size=args.batch, max_steps=args.steps, learning_rate=LR,
            lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0,
            optim="adamw_torch", logging_steps=1, report_to=[], save_strategy="no", seed=0,
            bf16=args.precision == "bf16", use_cpu=args.device == "cpu", dataloader_num_workers=0,
            remove_unused_columns=False, disable_tqdm=True)
        InOrder(model=model, args=training, train_dataset=Rows(), data_collator=collate,
                callbacks=[clock]).train()
    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for batch in batches(folder, args.batch, args.eval_batches, "dev"):
            inputs = {k: torch.from_numpy(v).to(model.device) for k, v in batch.items()}
            total += float(model(**inputs, num_items_in_batch=1, use_cache=False).loss)
            count += int((inputs["labels"][:, 1:] != -100).sum())
    return {"times": clock.times, "losses": clock.losses, "tokens": [int(b["attention_mask"].sum()) for b in train],
            "positions": [b["attention_mask"].size for b in train], "eval_loss": total / count}


def worker(args) -> None:
    result = (run_hf if args.worker == "hf" else run_tuneport)(Path(args.model_dir), args)
    result["peak_mib"] = peak_memory(args.device)
    print("RESULT " + json.dumps(result))


def summary(result: dict, warmup: int) -> tuple[float, float]:
    """(median tokens/s after warm-up, peak MiB)."""
    rates = [n / t for n, t in zip(result["tokens"][warmup:], result["times"][warmup:])]
    return statistics.median(rates), result["peak_mib"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", choices=SIZES, default="small")
    p.add_argument("--device", default="cpu")
    p.add_argument("--precision", choices=("fp32", "bf16"), default="fp32")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--eval-batches", type=int, default=4)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--checkpointing", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--tuneport-checkpointing", choices=("on", "off", "auto"),
                   help="tuneport's own setting (auto: its memory policy) against the HF path's --checkpointing")
    p.add_argument("--same-batches", action="store_true",
                   help="tuneport trains on the HF path's batches (file order, no length grouping), so per-step "
                        "losses compare; by default it takes them as `tuneport train` does (shuffled, grouped by length)")
    p.add_argument("--malloc", choices=MALLOC, default="setup",
                   help="the CPU allocator setting of the tuneport run (default: the backend's setup, as `tuneport "
                        "train`); the others measure alternatives")
    p.add_argument("--packing", action="store_true",
                   help="also run tuneport with data.packing on the same samples, and compare it with both")
    p.add_argument("--pack-length", type=int, help="tokens a packed row holds (default: the longest sample, "
                                                   f"{sum(LENGTHS) + 1})")
    p.add_argument("--profile", action="store_true", help="print the top operators of one tuneport step")
    p.add_argument("--worker", choices=("tuneport", "hf", "packed"), help=argparse.SUPPRESS)
    p.add_argument("--model-dir", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return worker(args)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / f"chatglm3-{args.size}"
        build_model(args.size, folder, args.precision)
        paths = ("tuneport", "hf", "packed") if args.packing else ("tuneport", "hf")
        results: dict[str, list[dict]] = {path: [] for path in paths}
        passthrough = sys.argv[1:]
        for round_ in range(args.rounds):
            for path in paths:
                done = subprocess.run([sys.executable, __file__, *passthrough, "--worker", path,
                                       "--model-dir", str(folder)], capture_output=True, text=True)
                line = [x for x in done.stdout.splitlines() if x.startswith("RESULT ")]
                if done.returncode or not line:
                    sys.exit(f"{path} run failed:\n{done.stderr[-3000:]}")
                result = json.loads(line[-1][7:])
                results[path].append(result)
                rate, peak = summary(result, args.warmup)
                padding = 1 - sum(result["tokens"]) / sum(result["positions"])
                print(f"round {round_ + 1} {path:8s}: {rate:8.1f} tokens/s, peak {peak:8.0f} MiB, padding "
                      f"{padding:.1%}, {len(result['losses'])} steps, eval loss {result['eval_loss']:.5f}, losses "
                      f"{' '.join(f'{x:.4f}' for x in result['losses'])}", flush=True)
        for path in paths:
            if results[path][-1].get("profile"):
                print(f"\none {path} step, top operators by their own time:\n{results[path][-1]['profile']}")
    ours, theirs = results["tuneport"][-1], results["hf"][-1]
    steps = min(len(ours["losses"]), len(theirs["losses"]))
    worst = max(abs(a - b) for a, b in zip(ours["losses"][:steps], theirs["losses"][:steps]))
    same = (f"largest per-step loss difference {worst:.2e}" if args.same_batches else
            "tuneport's batches grouped by length (per-step losses differ; eval loss compares)")
    medians = {path: (statistics.median(summary(r, args.warmup)[0] for r in runs),
                      statistics.median(r["peak_mib"] for r in runs)) for path, runs in results.items()}
    rate = medians["tuneport"][0] / medians["hf"][0]
    memory = medians["tuneport"][1] / medians["hf"][1]
    print(f"size {args.size}, {args.device}, {args.precision}, batch {args.batch}, checkpointing "
          f"{args.checkpointing} (tuneport: {tuneport_checkpointing(args)}), malloc {args.malloc}, {args.steps} steps x "
          f"{args.rounds} rounds; {same}")
    print("medians: " + "; ".join(f"{path} {r:.1f} tokens/s, {m:.0f} MiB" for path, (r, m) in medians.items())
          + f" (ratios {rate:.3f}, {memory:.3f})")
    if args.packing:
        packed = results["packed"][-1]
        for base in ("hf", "tuneport"):
            print(f"packed/{base}: tokens/s ratio {medians['packed'][0] / medians[base][0]:.2f}, peak memory ratio "
                  f"{medians['packed'][1] / medians[base][1]:.2f}, eval loss "
                  f"{(packed['eval_loss'] / results[base][-1]['eval_loss'] - 1) * 100:+.2f}%")
    print(f"tokens/s ratio tuneport/hf: {rate:.2f}, peak memory ratio: {memory:.2f}, "
          f"eval loss delta: {ours['eval_loss'] - theirs['eval_loss']:+.2e} "
          f"({(ours['eval_loss'] / theirs['eval_loss'] - 1) * 100:+.2f}%)")


if __name__ == "__main__":
    main()
