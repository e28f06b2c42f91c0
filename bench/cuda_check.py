"""CUDA check and benchmark, for a machine with an NVIDIA GPU. Not a test.

1. Every CUDA kernel against the eager reference, in fp32 and bf16 (max absolute error).
2. A ChatGLM3-6B-size LoRA training run with random weights (bf16, sequence 2048, micro-batch 1,
   LoRA r 8 on query_key_value, AdamW), first with the reference kernels (the named baseline), then
   with the CUDA backend's kernels: tokens/s, model FLOP utilisation against the card's peak, peak
   memory, and the speed-up ratio.
3. The same run through the model's standard forward with full logits (what transformers.Trainer +
   peft and the official code compute), against tuneport's label-only loss: the tokens/s and peak
   memory ratios.
4. With `--packing`, real AdvertiseGen samples (tests/data) at the official demo's LoRA setting (rows of
   256 + 512 + 1 tokens, micro-batch 4, checkpointing): tuneport's packed rows with its label-only loss
   against the same samples padded four to a batch in file order with full logits (the HF / official
   path); real (non-padding) tokens/s, peak memory and its ratio to the bf16 weights' own size.
5. With `--profile`, the top kernels of one step of the CUDA-kernel run by device time (torch.profiler).
6. With `--candidates`, the step's speed-ups not yet taken, each against the CUDA-kernel run above: AdamW's
   fused kernel (`fused=True`) and regional `torch.compile` of each transformer block. Each becomes a
   runtime option only once it measures faster here.

Issue 23's goals, printed at the end: (a) packed / padded full-logits real tokens/s >= 2; (b) >= 22,000
tokens/s at sequence 2048 without checkpointing; (c) peak memory at the demo's setting <= 1.1x the bf16
weights.

    python bench/cuda_check.py --packing --profile [--steps 20] [--json out.json]   (everything, on one GPU)
    python bench/cuda_check.py --seq 768 --batch 4 --checkpointing        (the official demo's LoRA setting)
    python bench/cuda_check.py --device cpu --layers 1 --seq 64 --steps 2 --fp32 --packing --profile
                                                                           (smoke test of the script)
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import torch

from tuneport.backends import get_backend
from tuneport.backends.reference import REFERENCE_KERNELS
from tuneport.models.chatglm3 import ChatGLMForConditionalGeneration, chatglm3_6b_config

TESTS = Path(__file__).resolve().parents[1] / "tests"
DEMO_LENGTHS = (256, 512)  # the official demo's max input and output tokens


def kernel_errors(backend) -> dict:
    """Max |cuda kernel - reference| per kernel and dtype, on ChatGLM3-6B-shaped inputs."""
    device = backend.device()
    g = torch.Generator(device=device).manual_seed(0)
    results = {}
    for dtype in (torch.float32, torch.bfloat16):
        def rand(*shape):
            return torch.randn(*shape, generator=g, device=device).to(dtype)

        x = rand(2, 256, 4096)
        w = rand(4096)
        q, k, v = rand(2, 32, 256, 128), rand(2, 2, 256, 128), rand(2, 2, 256, 128)
        xr = rand(2, 256, 32, 128)
        gate_up = rand(2, 256, 2 * 13696)
        angles = torch.rand(2, 256, 32, generator=g, device=device) * 6
        padding = torch.ones(2, 1, 1, 256, dtype=torch.bool, device=device)
        padding[0, ..., -17:] = False  # right padding: every query keeps a key (as in the model)
        cuts = torch.tensor([0, 100, 256, 300, 512], dtype=torch.int32)  # rows of 256: samples of 100, 156 | 44, 212
        cases = {
            "rms_norm": lambda kern: kern.rms_norm(x, w, 1e-5),
            "rotary": lambda kern: kern.rotary(xr, angles.cos(), angles.sin()),
            "attention_causal": lambda kern: kern.attention(q, k, v, causal=True),
            "attention_padded": lambda kern: kern.attention(q, k, v, mask=padding, causal=True),
            "attention_kv_cache": lambda kern: kern.attention(q[:, :, -8:], k, v, causal=True),
            "packed_attention": lambda kern: kern.packed_attention(q, k, v, cuts),
            "swiglu": lambda kern: kern.swiglu(gate_up),
        }
        for name, run in cases.items():
            got, ref = run(backend.kernels), run(REFERENCE_KERNELS)
            results[f"{name}/{str(dtype).split('.')[-1]}"] = (got.float() - ref.float()).abs().max().item()
    return results


def random_batches(seq: int, batch: int) -> list[dict]:
    """One batch of random tokens whose first third is a prompt without labels, as in fine-tuning data."""
    ids = np.random.default_rng(0).integers(0, 64789, (batch, seq))
    labels = ids.copy()
    labels[:, :seq // 3] = -100
    return [{"input_ids": ids, "labels": labels}]


def advertisegen_batches(batch: int, packed: bool) -> list[dict]:
    """AdvertiseGen's training samples (tests/data), tokenized as `tuneport train` does at the official demo's
    lengths: four to a batch in file order, right-padded (the HF / official path), or (`packed`) packed
    first-fit decreasing into rows of 769 tokens, four rows to a batch."""
    from tuneport.core.data import collate, collate_packed, encode_dataset, pack
    from tuneport.models.chatglm3.files import load_tokenizer

    tokenizer = load_tokenizer(TESTS / "golden" / "chatglm3" / "checkpoint")
    samples = encode_dataset(TESTS / "data" / "advertisegen" / "train.json", tokenizer, "advertisegen",
                             *DEMO_LENGTHS).samples
    if not packed:
        return [collate(samples[i:i + batch], tokenizer.pad_token_id) for i in range(0, len(samples), batch)]
    rows = [[samples[i] for i in row] for row in pack([len(ids) for ids, _ in samples], sum(DEMO_LENGTHS) + 1)]
    return [collate_packed(rows[i:i + batch], tokenizer.pad_token_id) for i in range(0, len(rows), batch)]


def lora_run(backend, kernels, steps: int, batches: list[dict], layers: int, dtype: torch.dtype,
             loss_only: bool = True, checkpointing: bool = False, profile: bool = False, fused_adamw: bool = False,
             compile_blocks: bool = False) -> dict:
    """Train LoRA on a random-weight ChatGLM3-6B for `steps` steps over `batches` (numpy, as the trainer's; taken
    in turn); returns speed (real tokens: padding not counted) and memory, and with `profile` the top kernels
    of one more step. `loss_only`: tuneport's label-only loss; False: the model's standard forward with full
    logits, the path of transformers.Trainer + peft and the official code. `fused_adamw`, `compile_blocks`: the
    candidates of `--candidates`."""
    from peft import LoraConfig, get_peft_model

    device = backend.device()
    backend.empty_cache()
    backend.reset_peak_memory()
    torch.manual_seed(0)
    with device:
        model = ChatGLMForConditionalGeneration(chatglm3_6b_config(num_layers=layers)).to(dtype)
    model.set_kernels(kernels)
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=32, lora_dropout=0.1, target_modules=["query_key_value"]))
    if checkpointing:  # after peft, as the trainer turns it on
        model.get_base_model().gradient_checkpointing_enable()
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        p.data = p.data.float()  # trainable weights in fp32, as the trainer keeps them
    optimizer = torch.optim.AdamW(params, lr=5e-5, **({"fused": True} if fused_adamw else {}))
    if compile_blocks:  # regional compilation: each block compiled in place, the same code for every layer
        for block in model.get_base_model().transformer.encoder.layers:
            block.compile()
    backend.reset_peak_memory()  # the training step's peak, not the float32 model's before its cast

    def step(batch: dict) -> torch.Tensor:
        inputs = {k: torch.from_numpy(v) if k == "cu_seq_lens" else torch.from_numpy(v).to(device)
                  for k, v in batch.items() if k != "attention_mask" or "cu_seq_lens" not in batch}
        with backend.autocast(dtype):
            loss = model(**inputs, use_cache=False, loss_only=loss_only).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss

    timings, tokens = [], []
    for i in range(steps):
        batch = batches[i % len(batches)]
        backend.synchronize()
        start = time.perf_counter()
        loss = step(batch)
        backend.synchronize()
        timings.append(time.perf_counter() - start)
        tokens.append(int(batch["attention_mask"].sum()) if "attention_mask" in batch else batch["input_ids"].size)
    warm = min(3, steps - 1)  # the first steps include allocator and kernel warm-up
    seconds = sum(timings[warm:]) / len(timings[warm:])
    seq = max(b["input_ids"].shape[1] for b in batches)
    n_params = sum(p.numel() for p in model.parameters()) - 2 * 65024 * 4096  # without embedding/output
    config = chatglm3_6b_config(num_layers=layers)
    # LoRA: forward 2N, backward 2N for input gradients (frozen weights get none), plus causal attention
    # (QK^T and AV: 4 * seq * hidden per token and layer forward, halved by causality, x2 for backward).
    flops_per_token = 4 * n_params + 2 * 65024 * 4096 * 2 + 4 * seq * 4096 * config.num_layers
    result = {"tokens_per_s": sum(tokens[warm:]) / sum(timings[warm:]), "step_s": seconds, "loss": loss.item(),
              "peak_memory_gib": backend.memory_stats().peak / 2**30, "flops_per_token": flops_per_token,
              "bf16_weights_gib": sum(p.numel() for p in model.parameters()) * 2 / 2**30}
    if profile:
        result["profile"] = profile_step(lambda: step(batches[0]), device.type)
    del model, optimizer
    backend.empty_cache()
    return result


def profile_step(step, device_type: str) -> str:
    """The top kernels of one call of `step` by their own device time (CPU time on the CPU), as a table."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device_type == "cuda" else [])
    with profile(activities=activities) as prof:
        step()
    key = "self_cuda_time_total" if device_type == "cuda" else "self_cpu_time_total"
    return prof.key_averages().table(sort_by=key, row_limit=15, max_name_column_width=50)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--batch", type=int, default=1, help="micro-batch (the official demo's LoRA setting: 4)")
    parser.add_argument("--checkpointing", action="store_true", help="gradient checkpointing (the official demo: on)")
    parser.add_argument("--peak-tflops", type=float, help="the card's dense bf16 peak (default: from its name)")
    parser.add_argument("--json", help="also write the results here")
    parser.add_argument("--device", default="cuda", help="cuda; cpu only to smoke-test this script")
    parser.add_argument("--layers", type=int, default=28, help="fewer layers only to smoke-test this script")
    parser.add_argument("--fp32", action="store_true", help="train in fp32 (smoke tests on CPUs without fast bf16)")
    parser.add_argument("--packing", action="store_true",
                        help="also the official demo's setting on AdvertiseGen: packed rows against padded full logits")
    parser.add_argument("--profile", action="store_true", help="print the top kernels of one CUDA-kernel step")
    parser.add_argument("--candidates", action="store_true",
                        help="also measure fused AdamW and regional torch.compile against the CUDA-kernel run")
    args = parser.parse_args()

    backend = get_backend(args.device)
    backend.setup()
    caps = backend.capabilities
    peak = args.peak_tflops or caps.peak_flops / 1e12 or math.nan
    print(f"device: {caps.device_name} x{caps.device_count}, {caps.memory_total / 2**30:.0f} GiB, bf16={caps.bf16}, "
          f"peak bf16 {peak} TFLOP/s, torch {torch.__version__}")

    errors = kernel_errors(backend)
    print("\nkernel max |cuda - reference|:")
    for name, err in errors.items():
        print(f"  {name:28s} {err:.3e}")

    runs = {}
    dtype = torch.float32 if args.fp32 else torch.bfloat16
    synthetic = random_batches(args.seq, args.batch)
    setting = f"seq {args.seq}, micro-batch {args.batch}, checkpointing {'on' if args.checkpointing else 'off'}"
    demo = f"AdvertiseGen at the official demo's setting ({sum(DEMO_LENGTHS) + 1} tokens, micro-batch 4, checkpointing)"
    variants = [("reference kernels (baseline)", REFERENCE_KERNELS, True, synthetic, args.checkpointing, setting, {}),
                ("cuda kernels", backend.kernels, True, synthetic, args.checkpointing, setting, {}),
                ("cuda kernels, full logits (the HF / official path)", backend.kernels, False, synthetic,
                 args.checkpointing, setting, {})]
    if args.candidates:
        variants += [("cuda kernels, fused AdamW", backend.kernels, True, synthetic, args.checkpointing, setting,
                      {"fused_adamw": True}),
                     ("cuda kernels, blocks compiled", backend.kernels, True, synthetic, args.checkpointing, setting,
                      {"compile_blocks": True})]
    if args.packing:
        variants += [("demo: padded, full logits (the HF / official path)", backend.kernels, False,
                      advertisegen_batches(4, packed=False), True, demo, {}),
                     ("demo: packed rows, label-only loss (tuneport)", backend.kernels, True,
                      advertisegen_batches(4, packed=True), True, demo, {})]
    for label, kernels, loss_only, batches, checkpointing, where, candidate in variants:
        r = lora_run(backend, kernels, args.steps, batches, args.layers, dtype, loss_only, checkpointing,
                     profile=args.profile and label == "cuda kernels", **candidate)
        r["mfu"] = r["tokens_per_s"] * r["flops_per_token"] / (peak * 1e12)
        runs[label] = r
        print(f"\nChatGLM3-6B LoRA, {'fp32' if args.fp32 else 'bf16'}, {where}, {args.steps} steps, {label}:")
        print(f"  {r['tokens_per_s']:.0f} real tokens/s, {r['step_s'] * 1000:.0f} ms/step, MFU {r['mfu'] * 100:.1f}%, "
              f"peak memory {r['peak_memory_gib']:.1f} GiB ({r['peak_memory_gib'] / r['bf16_weights_gib']:.2f}x the "
              f"bf16 weights), final loss {r['loss']:.3f}")
        if "profile" in r:
            print(f"\none step, top kernels by device time:\n{r.pop('profile')}")
    base, fast = runs["reference kernels (baseline)"], runs["cuda kernels"]
    hf = runs["cuda kernels, full logits (the HF / official path)"]
    print(f"\nspeed-up cuda/reference: {fast['tokens_per_s'] / base['tokens_per_s']:.2f}x; "
          f"peak memory ratio {fast['peak_memory_gib'] / base['peak_memory_gib']:.2f}")
    print(f"tokens/s ratio tuneport/hf: {fast['tokens_per_s'] / hf['tokens_per_s']:.2f}, "
          f"peak memory ratio: {fast['peak_memory_gib'] / hf['peak_memory_gib']:.2f} (label-only loss against full logits)")
    for label in ("cuda kernels, fused AdamW", "cuda kernels, blocks compiled") if args.candidates else ():
        print(f"candidate {label[14:]}: {runs[label]['tokens_per_s'] / fast['tokens_per_s']:.2f}x the tokens/s, "
              f"{runs[label]['peak_memory_gib'] / fast['peak_memory_gib']:.2f}x the peak memory")
    if args.packing:
        padded, packed = runs["demo: padded, full logits (the HF / official path)"], \
            runs["demo: packed rows, label-only loss (tuneport)"]
        print(f"\nissue 23 (a) packed/padded full-logits real tokens/s: {packed['tokens_per_s'] / padded['tokens_per_s']:.2f}x "
              f"(goal >= 2); (c) peak memory at the demo's setting {packed['peak_memory_gib']:.1f} GiB = "
              f"{packed['peak_memory_gib'] / packed['bf16_weights_gib']:.2f}x the bf16 weights (goal <= 1.1)")
    print(f"issue 23 (b) {setting}: {fast['tokens_per_s']:.0f} tokens/s (goal >= 22,000 at seq 2048, no checkpointing)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": caps.device_name, "kernel_errors": errors, "runs": runs}, f, indent=2)


if __name__ == "__main__":
    main()
