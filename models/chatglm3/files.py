"""ChatGLM3 checkpoint folders, framework-neutral (json, numpy, safetensors; no torch, no MindSpore):
the layouts, config reading, the shard index (confined to the folder), weight-name and shape validation,
the official attention-mask rules, and PEFT's LoRA and IA3 adapter configs. The torch and MindSpore models both
use them."""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Union

import numpy as np

from ..family import CheckpointError, check_vocabulary_size, layout_weight_files, read_json
from .config import ChatGLM3Config
from .tokenizer import ChatGLM3Tokenizer

# In order of preference: (index file, single file). Safetensors first: memory-mapped and no pickle.
WEIGHT_LAYOUTS = (
    ("model.safetensors.index.json", "model.safetensors"),
    ("pytorch_model.bin.index.json", "pytorch_model.bin"),
)
# The keys of the official THUDM/chatglm3-6b config.json, and its Auto mapping to the official code.
OFFICIAL_CONFIG_KEYS = (
    "add_bias_linear", "add_qkv_bias", "apply_query_key_layer_scaling", "apply_residual_connection_post_layernorm",
    "architectures", "attention_dropout", "attention_softmax_in_fp32", "auto_map", "bias_dropout_fusion",
    "classifier_dropout", "eos_token_id", "ffn_hidden_size", "fp32_residual_connection", "hidden_dropout",
    "hidden_size", "kv_channels", "layernorm_epsilon", "model_type", "multi_query_attention",
    "multi_query_group_num", "num_attention_heads", "num_layers", "original_rope", "pad_token_id",
    "padded_vocab_size", "post_layer_norm", "pre_seq_len", "prefix_projection", "quantization_bit", "rmsnorm",
    "seq_length", "torch_dtype", "transformers_version", "use_cache", "vocab_size",
)
OFFICIAL_AUTO_MAP = {
    "AutoConfig": "configuration_chatglm.ChatGLMConfig",
    "AutoModel": "modeling_chatglm.ChatGLMForConditionalGeneration",
    "AutoModelForCausalLM": "modeling_chatglm.ChatGLMForConditionalGeneration",
}
# The release's own code files, by the sha256 of every version published in the history of
# huggingface.co/THUDM/chatglm3-6b (its git history from 2023-10-25 to 2023-12-07, the revision the golden
# vectors were made with). `tuneport export` copies such a file only when it is one of these versions: engines
# started with --trust-remote-code run it. A later release is added here, one hash per version.
RELEASE_CODE = {
    "configuration_chatglm.py": frozenset({
        "351ba435758670b27c160b7657c7ab1d32053c4e8c0606a5a9b8f9908249dec8",
    }),
    "modeling_chatglm.py": frozenset({
        "440d89faea5c3ea47fd2778abde970008d170cacb743aafcaf822cdaa5627ee0",  # 2023-12-07
        "a83673948c2825de9d1e640a8c10da973ac7aeb7717130123e6ee807b3a4b6ff",  # 2023-11-01
        "5481b3a993faeb3b3e055e77fd9895444fb835adfce5db218a211c9d4fe63fa7",  # 2023-10-26 ...
        "fc4192499e6f42001de4a1a1c35535779dec87cc35f53062c37523990aa99b76",
        "d4005360e32379287e037b31a4dac8de690136b3578af72cd74b68cc613036b9",
        "388dff98dcb84b35d60e416f2c3b2755eb3d064e21b78bc390e2df7f5f282bb0",
        "f56e8f5b059b1c08746288fc2f2635482b219797873ee1117bc73f1e8fbf8104",
        "67f09d3329992e35e1d45d677fdbfb4c72226662714eef4c8bb183e25c5b9fe5",
        "49056a4642fc52cf39b3d24d6cfc7608e6d70a56b938c5fdcae4c369b235d797",  # 2023-10-25
    }),
    "tokenization_chatglm.py": frozenset({
        "f3e7e26af20b222d107f888a3db305a1a25ea74c16952d36257e0e606d1780f6",  # 2023-12-07
        "d3f11140fbb2761c84f77e4fe51638cb5225b696edf7ea0e7481486400ccc7fe",  # 2023-11-09
        "ba3f783cd0ee0f8e2f52efe6753a782b9dafaa27293e0a561bed34b258d55d55",  # 2023-10-26 ...
        "0f431d2a02aeef28b86b82701001948463f37ffdb25d434cf6664ba877392afb",
        "3c17590ca405f716e0dadf416035fcd4be1da92e87e7c5a1f03b74ee8e6d28f2",  # 2023-10-25
    }),
}
# Buffers the official checkpoints store that are recomputed from the config when absent.
DERIVED_KEYS = ("transformer.rotary_pos_emb.inv_freq",)
PREFIX_ENCODER = "transformer.prefix_encoder."



def load_config(path: Union[str, Path], **overrides) -> ChatGLM3Config:
    """Read `config.json` of a checkpoint folder, apply `overrides`, and validate.

    Raises:
        CheckpointError: the file is missing or invalid, or the config is inconsistent (every problem listed).
    """
    file = Path(path) / "config.json"
    values = read_json(file)
    values.pop("auto_map", None)  # never point transformers at code in the folder
    config = ChatGLM3Config(**{**values, **overrides})
    problems = config.problems()
    if problems:
        raise CheckpointError(f"{file}: " + "; ".join(problems))
    return config


def weight_files(folder: Path) -> list[Path]:
    """The weight files of a ChatGLM3 `folder` (safetensors preferred to pickle), via the index when sharded.

    Raises:
        CheckpointError: see `layout_weight_files`.
    """
    return layout_weight_files(folder, WEIGHT_LAYOUTS)


def match_weights(folder: Path, expected: dict[str, tuple], found: dict[str, tuple[tuple, str]],
                  config: ChatGLM3Config) -> list[str]:
    """Check the tensors a checkpoint holds against the model's.

    Args:
        folder: the checkpoint folder (for the message).
        expected: the model's tensor names and shapes.
        found: the checkpoint's tensor names -> (shape, file name).
        config: the model's config (a P-tuning prefix encoder may start fresh).

    Returns:
        The expected names the checkpoint may lack: buffers recomputed from the config, and a prefix
        encoder that starts fresh.

    Raises:
        CheckpointError: missing or unexpected keys, or shape mismatches, all listed.
    """
    unexpected = [name for name in found if name not in expected]
    wrong = [f"{name} (expected {list(expected[name])}, found {list(shape)} in {file})"
             for name, (shape, file) in found.items() if name in expected and tuple(shape) != tuple(expected[name])]
    fresh_prefix = config.pre_seq_len and not any(name.startswith(PREFIX_ENCODER) for name in found)
    missing = [name for name in expected if name not in found]
    optional = [n for n in missing if n in DERIVED_KEYS or (fresh_prefix and n.startswith(PREFIX_ENCODER))]
    missing = [n for n in missing if n not in optional]
    problems = [f"{label}: {', '.join(items)}" for label, items in
                (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", wrong)) if items]
    if problems:
        raise CheckpointError(
            f"{folder}: the weights do not match config.json ({'; '.join(problems)}); "
            "check that config.json belongs to these weights and that config overrides are right")
    return optional


def attention_allowed(padding_mask: Optional[np.ndarray], q_len: int, past_len: int) -> Optional[np.ndarray]:
    """The official ChatGLM3 mask rules as [batch, 1, q_len, past_len + q_len] booleans (None: plainly
    causal, aligned to the end). With padding, real queries see the non-padded keys up to themselves;
    when nothing precedes the input, a padded query sees every key, as the official `get_masks` does."""
    keys = past_len + q_len
    if padding_mask is None or padding_mask.all():
        return None
    if padding_mask.shape[1] != keys:
        raise ValueError(f"attention_mask has {padding_mask.shape[1]} columns; expected {keys} "
                         f"(cached tokens {past_len} + new tokens {q_len})")
    pad = padding_mask.astype(bool)
    allowed = np.tril(np.ones((q_len, keys), dtype=bool), k=past_len)[None] & pad[:, None, :]
    if past_len == 0:
        allowed = allowed | ~pad[:, :, None]
    return allowed[:, None]


def packed_allowed(cu_seq_lens: np.ndarray, batch: int, seq: int) -> np.ndarray:
    """Packed rows' mask, [batch, 1, seq, seq] booleans: a query sees the keys of its own sample up to itself
    (`cu_seq_lens` cut the rows, laid end to end, into samples, as `Kernels.packed_attention` takes them)."""
    sample = np.searchsorted(np.asarray(cu_seq_lens)[1:], np.arange(batch * seq), side="right").reshape(batch, seq)
    return ((sample[:, :, None] == sample[:, None, :]) & np.tril(np.ones((seq, seq), dtype=bool)))[:, None]


def peft_lora_config(r: int, alpha: float, dropout: float, target_modules: list[str], base_model: str = "") -> dict:
    """The adapter_config.json of a PEFT LoRA adapter, as peft writes it for these settings."""
    return {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": r, "lora_alpha": alpha, "lora_dropout": dropout,
            "target_modules": sorted(target_modules), "bias": "none", "fan_in_fan_out": False,
            "inference_mode": True, "init_lora_weights": True, "base_model_name_or_path": base_model,
            "modules_to_save": None, "use_rslora": False, "use_dora": False}


def peft_ia3_config(target_modules: list[str], feedforward_modules: list[str], base_model: str = "") -> dict:
    """The adapter_config.json of a PEFT IA3 adapter, as peft writes it for these settings."""
    return {"peft_type": "IA3", "task_type": "CAUSAL_LM", "target_modules": sorted(target_modules),
            "feedforward_modules": sorted(feedforward_modules), "exclude_modules": None, "fan_in_fan_out": False,
            "inference_mode": True, "init_ia3_weights": True, "base_model_name_or_path": base_model,
            "modules_to_save": None, "auto_mapping": None, "revision": None}


def check_vocabulary(tokenizer: ChatGLM3Tokenizer, config: ChatGLM3Config, tokenizer_path, model_path) -> None:
    """A tokenizer must not produce ids past the model's embedding rows.

    Raises:
        CheckpointError: naming both files and the sizes.
    """
    check_vocabulary_size(len(tokenizer), config.padded_vocab_size, "padded_vocab_size", "tokenizer.model",
                          tokenizer_path, model_path)


def load_tokenizer(path: Union[str, Path]) -> ChatGLM3Tokenizer:
    """Load the tokenizer of a checkpoint folder (its `tokenizer.model`), or from the file itself.

    Raises:
        CheckpointError: no tokenizer.model, or a file SentencePiece cannot read.
    """
    path = Path(path)
    file = path / "tokenizer.model" if path.is_dir() else path
    if not file.exists():
        raise CheckpointError(f"{path}: no tokenizer.model; pass the checkpoint folder or the tokenizer.model file")
    settings: dict = {}
    if (file.parent / "tokenizer_config.json").exists():
        settings = read_json(file.parent / "tokenizer_config.json")
    try:
        return ChatGLM3Tokenizer(vocab_file=str(file), padding_side=settings.get("padding_side", "left"))
    except (RuntimeError, OSError) as e:
        raise CheckpointError(f"{file}: not a SentencePiece model ({e})") from None


def official_config(config: ChatGLM3Config, dtype: str) -> dict:
    """config.json in the official form: exactly its keys, our values, `torch_dtype` the weights' dtype."""
    values = config.to_dict()
    fixed = {"architectures": ["ChatGLMModel"], "auto_map": OFFICIAL_AUTO_MAP, "model_type": "chatglm",
             "torch_dtype": dtype, "transformers_version": values.get("transformers_version", "4.44.2"),
             "quantization_bit": 0}
    return {key: fixed[key] if key in fixed else values.get(key) for key in OFFICIAL_CONFIG_KEYS}
