"""An 8B-parameter LoRA step under fsdp with offload against ddp (the baseline), on one accelerator: tokens/s
and peak memory of each, and their ratios. Not a test.

    torchrun --standalone --nproc_per_node 1 bench/fsdp_offload.py --device cuda      (or npu)
    torchrun --standalone --nproc_per_node 1 bench/fsdp_offload.py --device cpu --layers 2 --seq 64 --steps 2
                                                                   (smoke test of the script: fsdp without offload)

The model is the ChatGLM3 architecture with 40 blocks instead of 28 (8.4B parameters), random weights in
bf16, LoRA r 8 on query_key_value, AdamW, gradient checkpointing on, built in host memory as `train.strategy:
fsdp` builds it. ddp on one process is the model on the device, unwrapped; fsdp is `sharding.shard`, the
function the runtime calls, with FSDP2's CPU offload policy (not on the CPU device, which is the host).
"""

from __future__ import annotations

import argparse
import json
import time

import torch
import torch.distributed as dist

from tuneport.backends import get_backend
from tuneport.core.methods import METHODS
from tuneport.frameworks.torch import sharding
from tuneport.frameworks.torch.build import apply_method, enable_checkpointing
from tuneport.models import get_family
from tuneport.models.chatglm3 import ChatGLMForConditionalGeneration, chatglm3_6b_config


def host_model(layers: int) -> torch.nn.Module:
    """A random-weight model in host memory, bf16, with LoRA attached."""
    with torch.device("meta"):
        model = ChatGLMForConditionalGeneration(chatglm3_6b_config(num_layers=layers, dtype="bfloat16"))
    model = model.to(torch.bfloat16).to_empty(device="cpu")
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(0, 0.02, generator=generator)
        for name, buffer in model.named_buffers():
            if name.endswith("inv_freq"):
                buffer.copy_(1.0 / 10000 ** (torch.arange(0, buffer.numel() * 2, 2).float() / (buffer.numel() * 2)))
    lora = METHODS["lora"].config(r=8, alpha=16, dropout=0.0, target_modules=["query_key_value"])
    return apply_method(model, lora, get_family("chatglm"))


def run(arm: str, backend, layers: int, seq: int, steps: int) -> dict:
    device = backend.device(0)
    model = host_model(layers)
    enable_checkpointing(model.get_base_model())
    if arm == "ddp":
        model.to(device)
    else:
        sharding.shard(model, "transformer.encoder.layers", device, 1, torch.bfloat16, offload=device.type != "cpu")
    model.get_base_model().set_kernels(backend.kernels)
    trained = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trained, lr=1e-4)
    ids = torch.randint(100, 60000, (1, seq), device=device)
    backend.empty_cache()
    backend.reset_peak_memory()
    times = []
    for _ in range(steps):
        backend.synchronize()
        started = time.perf_counter()
        with backend.autocast(torch.bfloat16):
            loss = model(input_ids=ids, labels=ids, use_cache=False, loss_only=True).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        backend.synchronize()
        times.append(time.perf_counter() - started)
    timed = times[1:] or times  # the first step warms up
    return {"arm": arm, "tokens_per_s": seq * len(timed) / sum(timed), "peak_gib": backend.memory_stats().peak / 2**30,
            "loss": loss.item()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--layers", type=int, default=40)
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    backend = get_backend(args.device)
    backend.setup()
    dist.init_process_group(backend.capabilities.dist_backend)
    backend.set_device(0)
    results = [run(arm, backend, args.layers, args.seq, args.steps) for arm in ("ddp", "fsdp")]
    base, sharded = results
    for r in results:
        print(f"{r['arm']:5s} {r['tokens_per_s']:10.0f} tokens/s  peak {r['peak_gib']:6.1f} GiB  loss {r['loss']:.4f}")
    arm = "fsdp + offload" if args.device != "cpu" else "fsdp"
    print(f"{arm} / ddp: tokens/s x{sharded['tokens_per_s'] / base['tokens_per_s']:.2f}, "
          f"peak memory x{sharded['peak_gib'] / max(base['peak_gib'], 1e-9):.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
