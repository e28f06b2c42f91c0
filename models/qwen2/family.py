"""Qwen2 as a model family: what the registry in `tuneport.models` hands to the rest of tuneport."""

from __future__ import annotations

from ..family import ModelFamily

# Every linear layer of a Qwen2 block (transformers' names).
LINEAR_LAYERS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def family() -> ModelFamily:
    from .checkpoint import check_checkpoint, load_config, load_model, qwen2_5_7b_config
    from .model import Qwen2ForCausalLM
    from .tokenizer import check_vocabulary, load_tokenizer

    return ModelFamily(
        model_type="qwen2",
        check_checkpoint=check_checkpoint,
        load_model=load_model,
        load_tokenizer=load_tokenizer,
        check_vocabulary=check_vocabulary,
        lora_targets=LINEAR_LAYERS,  # QwenLM/Qwen2.5 examples/sft/finetune.py, LoraArguments
        linear_layers=LINEAR_LAYERS,
        blocks="model.layers",
        ia3_targets=("q_proj", "v_proj", "down_proj"),  # peft's defaults for qwen2
        ia3_feedforward=("down_proj",),
        model_class=Qwen2ForCausalLM,
        load_config=load_config,
        reference=("Qwen2.5-7B", qwen2_5_7b_config),  # for `tuneport methods`
    )
