"""Qwen2 (Qwen2.5 checkpoints) as a tuneport model family: transformers' own `Qwen2ForCausalLM` on the
backends' kernels, loaded from a standard Hugging Face folder (config.json, safetensors, tokenizer.json)
with no remote code and no network, and the ChatML chat format with Qwen2.5's tool calls.

The registry in `tuneport.models` imports `family` from here; nothing else is imported until asked for.
"""
