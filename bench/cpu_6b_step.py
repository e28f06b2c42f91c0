"""ChatGLM3-6B on one CPU box: one LoRA training step at sequence 128 in bf16. Not a test.

The model is built directly in bf16 with random weights (torch's default dtype set to bf16 while it is
built, so no float32 copy ever exists), LoRA r8 on query_key_value goes on through tuneport's
`apply_method`, and one forward and backward with the label-only loss runs, then AdamW. Reported:
peak RSS (Linux's VmHWM), the build time and the step time, next to the baseline of the same process
before the model (the framework alone).

    python bench/cpu_6b_step.py [--seq 128] [--layers 28]
"""

from __future__ import annotations

import argparse
import time


def rss_mib(field: str = "VmRSS") -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":")) / 1024


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--layers", type=int, default=28, help="fewer for a quick try of the script")
    args = p.parse_args()

    import torch

    from tuneport.backends import get_backend
    from tuneport.frameworks.torch.build import apply_method
    from tuneport.core.methods import LoraConfig
    from tuneport.models.chatglm3 import ChatGLMForConditionalGeneration, chatglm3_6b_config
    from tuneport.models.chatglm3.family import family

    get_backend("cpu").setup()  # as `tuneport train` does
    baseline = rss_mib()
    start = time.perf_counter()
    torch.manual_seed(0)
    torch.set_default_dtype(torch.bfloat16)  # every parameter is created in bf16: no float32 copy
    try:
        model = ChatGLMForConditionalGeneration(chatglm3_6b_config(num_layers=args.layers, dtype="bfloat16"))
    finally:
        torch.set_default_dtype(torch.float32)
    method = LoraConfig(r=8, alpha=32, dropout=0.0, target_modules=["query_key_value"])
    model = apply_method(model, method, family()).train()
    built = time.perf_counter() - start
    after_build = rss_mib()
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-4)
    ids = torch.randint(0, 65024, (1, args.seq))
    labels = ids.clone()
    labels[:, :args.seq // 3] = -100
    start = time.perf_counter()
    loss = model(input_ids=ids, labels=labels, use_cache=False, loss_only=True).loss
    loss.backward()
    optimizer.step()
    step = time.perf_counter() - start
    params = sum(p.numel() for p in model.parameters())
    print(f"ChatGLM3-6B ({args.layers} layers, {params / 1e9:.2f} B parameters, bf16), LoRA r8 on query_key_value "
          f"({sum(p.numel() for p in trainable):,} trainable), sequence {args.seq}, loss {loss.item():.4f}")
    print(f"framework alone {baseline:.0f} MiB; after building {after_build:.0f} MiB in {built:.1f} s")
    print(f"one training step: {step:.1f} s; peak RSS {rss_mib('VmHWM') / 1024:.2f} GiB")


if __name__ == "__main__":
    main()
