"""ChatGLM3 as a model family: what the registry in `tuneport.models` hands to the rest of tuneport."""

from __future__ import annotations

from importlib import import_module

from ..family import ModelFamily

# Every linear layer of a ChatGLM3 block (the official names).
LINEAR_LAYERS = ("query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h")


def _mindspore():
    """The MindSpore model module, imported only when asked for (importing it imports MindSpore)."""
    return import_module(".mindspore", __package__)


def _export_onnx(model, path):
    from .onnx import export_onnx  # imports torch.onnx, which is slow: only when exporting to ONNX

    export_onnx(model, path)


def family() -> ModelFamily:
    from . import builders
    from .checkpoint import check_checkpoint, convert_to_safetensors, load_model, save_official
    from .files import RELEASE_CODE, check_vocabulary, load_config, load_tokenizer
    from .config import chatglm3_6b_config
    from .model import ChatGLMForConditionalGeneration

    return ModelFamily(
        model_type="chatglm",
        check_checkpoint=check_checkpoint,
        load_model=load_model,
        load_tokenizer=load_tokenizer,
        check_vocabulary=check_vocabulary,
        lora_targets=("query_key_value",),  # the official fine-tuning demo's
        linear_layers=LINEAR_LAYERS,
        blocks="transformer.encoder.layers",
        prefix_module="transformer.prefix_encoder",
        prefix_config=lambda tokens, projection: {"pre_seq_len": tokens, "prefix_projection": projection},
        # as peft's for fused-QKV models (Bloom, GPT-NeoX): the attention's output and the MLP's input to its last layer
        ia3_targets=("query_key_value", "dense_4h_to_h"),
        ia3_feedforward=("dense_4h_to_h",),
        prefix_shape=lambda config: {"num_attention_heads": config.kv_heads,
                                     "token_dim": config.kv_heads * config.kv_channels},
        reference=("ChatGLM3-6B", chatglm3_6b_config),
        builders={"demo": (lambda: builders.builder_config("demo"), builders.build_demo_folder)},
        convert=convert_to_safetensors,
        save_official=save_official,
        release_code=RELEASE_CODE,
        export_onnx=_export_onnx,
        chat=lambda: import_module(".chat", __package__),
        model_class=ChatGLMForConditionalGeneration,
        load_config=load_config,
        mindspore=_mindspore,
    )
