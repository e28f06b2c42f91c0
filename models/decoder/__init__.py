"""Every transformers-native decoder as one model family (Llama, Qwen2/3, GLM-4, Mistral, Gemma, Qwen3-MoE, ...)."""
