"""What each strategy costs per card: `tuneport estimate` for ChatGLM3-6B (full and LoRA) and Qwen2.5-72B LoRA
on 8 cards, against ddp (every card holds everything) as the baseline, for the README's table.

    python bench/sharding_table.py [--device cuda|npu] [--nproc 8]

Only config.json is read (written here from the published configs: THUDM/chatglm3-6b and
Qwen/Qwen2.5-72B-Instruct), so it runs on any machine. bf16 (the recipes' `auto` on a 910B or a recent GPU),
micro-batch 1 of 769 tokens (the recipes' 256 + 512 + 1), gradient checkpointing on.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from tuneport.core.config import load_recipe
from tuneport.frameworks.torch.estimate import plan
from tuneport.models.chatglm3.config import chatglm3_6b_config

QWEN2_5_72B = {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_size": 8192,
               "intermediate_size": 29568, "num_hidden_layers": 80, "num_attention_heads": 64,
               "num_key_value_heads": 8, "vocab_size": 152064, "max_position_embeddings": 32768,
               "rope_theta": 1000000.0, "rms_norm_eps": 1e-06, "tie_word_embeddings": False,
               "torch_dtype": "bfloat16", "hidden_act": "silu"}
STRATEGIES = [("ddp", False), ("zero2", False), ("fsdp", False), ("zero3", False), ("fsdp", True)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--nproc", type=int, default=8)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        glm, qwen = Path(tmp) / "chatglm3-6b", Path(tmp) / "qwen2.5-72b"
        chatglm3_6b_config().save_pretrained(glm)
        qwen.mkdir()
        (qwen / "config.json").write_text(json.dumps(QWEN2_5_72B))
        rows = [("ChatGLM3-6B full", "builtin:chatglm3_6b_lora.yaml", glm, "full"),
                ("ChatGLM3-6B LoRA", "builtin:chatglm3_6b_lora.yaml", glm, "lora"),
                ("Qwen2.5-72B LoRA", "builtin:qwen2_5_7b_lora.yaml", qwen, "lora")]
        print(f"Per-card peak, GiB, on {args.nproc} cards ({args.device}, bf16, micro-batch 1 x 769 tokens, "
              "checkpointing on); in brackets: the ratio to ddp")
        print("| model, method | " + " | ".join(s + (" + offload" if o else "") for s, o in STRATEGIES)
              + " | fits 32 GB | fits 64 GB |")
        print("|---" * (len(STRATEGIES) + 3) + "|")
        for name, recipe_file, folder, method in rows:
            recipe = load_recipe(recipe_file, (f"model={folder}", f"method.name={method}", "precision=bf16",
                                               "train.micro_batch_size=1", "train.gradient_checkpointing=true"))
            memory = plan(recipe, args.device, checkpointing=True)
            peaks = [memory.at(1, args.nproc, s, o).peak for s, o in STRATEGIES]
            cells = [f"{p / 2**30:.1f} ({p / peaks[0]:.2f})" for p in peaks]
            fits = [", ".join(s + ("+offload" if o else "") for (s, o), p in zip(STRATEGIES, peaks) if p <= gb * 10**9)
                    or "none" for gb in (32, 64)]
            print(f"| {name} | " + " | ".join(cells) + f" | {fits[0]} | {fits[1]} |")


if __name__ == "__main__":
    main()
