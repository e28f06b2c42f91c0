"""CUDA check and benchmark, for a machine with an NVIDIA GPU. Not a test.

1. Every CUDA kernel against the eager reference, in fp32 and bf16 (max absolute error).
2. A ChatGLM3-6B-size LoRA training run with random weights (bf16, sequence 2048, micro-batch 1,
   LoRA r 8 on query_key_value, AdamW), first with the reference kernels (the named baseline), then
   with the CUDA backend's kernels: tokens/s, model FLOP utilisation against the card's peak, peak
   memory, and the speed-up ratio.
3. The same run through the model's standard forward with full logits (what transformers.Trainer +
   peft and the official code compute), against tuneport's label-only loss: the tokens/s and peak
   memory ratios.

    python bench/cuda_check.py [--steps 20] [--seq 2048] [--json out.json]
    python bench/cuda_check.py --seq 768 --batch 4 --checkpointing        (the official demo's LoRA setting)
    python bench/cuda_check.py --device cpu --layers 1 --seq 64 --steps 2 --fp32   (smoke test of the script)
"""

from __future__ import annotations

import argparse
import json
import math
import time

import torch

from tuneport.backends import get_backend
from tuneport.backends.reference import REFERENCE_KERNELS
from tuneport.models.chatglm3 import ChatGLMForConditionalGeneration, chatglm3_6b_config

# Dense bf16 tensor-core peaks (TFLOP/s) from NVIDIA's data sheets; matched by device-name substring.
PEAK_BF16_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A800": 312.0, "H800": 989.0}


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
        cases = {
            "rms_norm": lambda kern: kern.rms_norm(x, w, 1e-5),
            "rotary": lambda kern: kern.rotary(xr, angles.cos(), angles.sin()),
            "attention_causal": lambda kern: kern.attention(q, k, v, causal=True),
            "attention_padded": lambda kern: kern.attention(q, k, v, mask=padding, causal=True),
            "attention_kv_cache": lambda kern: kern.attention(q[:, :, -8:], k, v, causal=True),
            "swiglu": lambda kern: kern.swiglu(gate_up),
        }
        for name, run in cases.items():
            got, ref = run(backend.kernels), run(REFERENCE_KERNELS)
            results[f"{name}/{str(dtype).split('.')[-1]}"] = (got.float() - ref.float()).abs().max().item()
    return results


def lora_run(backend, kernels, steps: int, seq: int, layers: int, dtype: torch.dtype, loss_only: bool = True,
             batch: int = 1, checkpointing: bool = False) -> dict:
    """Train LoRA on a random-weight ChatGLM3-6B for `steps` steps; returns speed and memory.

    The first third of each sequence is a prompt without labels, as in fine-tuning data. `loss_only`:
    tuneport's label-only loss; False: the model's standard forward with full logits, the path of
    transformers.Trainer + peft and the official code."""
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
    optimizer = torch.optim.AdamW(params, lr=5e-5)
    backend.reset_peak_memory()  # the training step's peak, not the float32 model's before its cast
    ids = torch.randint(0, 64789, (batch, seq), device=device)
    labels = ids.clone()
    labels[:, :seq // 3] = -100
    timings = []
    for step in range(steps):
        backend.synchronize()
        start = time.perf_counter()
        with backend.autocast(dtype):
            loss = model(input_ids=ids, labels=labels, use_cache=False, loss_only=loss_only).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        backend.synchronize()
        timings.append(time.perf_counter() - start)
    steady = timings[min(3, steps - 1):]  # the first steps include allocator and kernel warm-up
    seconds = sum(steady) / len(steady)
    n_params = sum(p.numel() for p in model.parameters()) - 2 * 65024 * 4096  # without embedding/output
    config = chatglm3_6b_config(num_layers=layers)
    # LoRA: forward 2N, backward 2N for input gradients (frozen weights get none), plus causal attention
    # (QK^T and AV: 4 * seq * hidden per token and layer forward, halved by causality, x2 for backward).
    flops_per_token = 4 * n_params + 2 * 65024 * 4096 * 2 + 4 * seq * 4096 * config.num_layers
    result = {"tokens_per_s": batch * seq / seconds, "step_s": seconds, "loss": loss.item(),
              "peak_memory_gib": backend.memory_stats().peak / 2**30, "flops_per_token": flops_per_token}
    del model, optimizer
    backend.empty_cache()
    return result


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
    args = parser.parse_args()

    backend = get_backend(args.device)
    backend.setup()
    caps = backend.capabilities
    peak = args.peak_tflops or next((v for k, v in PEAK_BF16_TFLOPS.items() if k in caps.device_name), math.nan)
    print(f"device: {caps.device_name} x{caps.device_count}, {caps.memory_total / 2**30:.0f} GiB, bf16={caps.bf16}, "
          f"peak bf16 {peak} TFLOP/s, torch {torch.__version__}")

    errors = kernel_errors(backend)
    print("\nkernel max |cuda - reference|:")
    for name, err in errors.items():
        print(f"  {name:28s} {err:.3e}")

    runs = {}
    variants = (("reference kernels (baseline)", REFERENCE_KERNELS, True), ("cuda kernels", backend.kernels, True),
                ("cuda kernels, full logits (the HF / official path)", backend.kernels, False))
    for label, kernels, loss_only in variants:
        r = lora_run(backend, kernels, args.steps, args.seq, args.layers, torch.float32 if args.fp32 else torch.bfloat16,
                     loss_only, args.batch, args.checkpointing)
        r["mfu"] = r["tokens_per_s"] * r["flops_per_token"] / (peak * 1e12)
        runs[label] = r
        print(f"\nChatGLM3-6B LoRA, {'fp32' if args.fp32 else 'bf16'}, seq {args.seq}, micro-batch {args.batch}, "
              f"checkpointing {'on' if args.checkpointing else 'off'}, {args.steps} steps, {label}:")
        print(f"  {r['tokens_per_s']:.0f} tokens/s, {r['step_s'] * 1000:.0f} ms/step, MFU {r['mfu'] * 100:.1f}%, "
              f"peak memory {r['peak_memory_gib']:.1f} GiB, final loss {r['loss']:.3f}")
    base, fast = runs["reference kernels (baseline)"], runs["cuda kernels"]
    hf = runs["cuda kernels, full logits (the HF / official path)"]
    print(f"\nspeed-up cuda/reference: {fast['tokens_per_s'] / base['tokens_per_s']:.2f}x; "
          f"peak memory ratio {fast['peak_memory_gib'] / base['peak_memory_gib']:.2f}")
    print(f"tokens/s ratio tuneport/hf: {fast['tokens_per_s'] / hf['tokens_per_s']:.2f}, "
          f"peak memory ratio: {fast['peak_memory_gib'] / hf['peak_memory_gib']:.2f} (label-only loss against full logits)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": caps.device_name, "kernel_errors": errors, "runs": runs}, f, indent=2)


if __name__ == "__main__":
    main()
