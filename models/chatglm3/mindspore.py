"""ChatGLM3 in MindSpore, numerically the official implementation (and tuneport's torch model).

The same architecture as `model.py` (see its docstring for the official code it matches), written with
MindSpore Cells in PyNative mode, with the official parameter names, so the same checkpoint folders
load and LoRA and IA3 adapters are saved and read in PEFT's format (`base_model.model.<name>.lora_A.weight`,
`base_model.model.<name>.ia3_l`): an adapter trained here loads with `peft.PeftModel.from_pretrained` on
a CUDA box, and the reverse.

    model = load_model("/models/chatglm3-6b")          # a mindspore.nn.Cell
    logits, loss = model(input_ids, attention_mask=mask, labels=labels)
"""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path
from typing import Optional, Union

import mindspore as ms
import numpy as np
from mindspore import Parameter, Tensor, nn, ops

from ..family import CheckpointError, read_json
from .files import (DERIVED_KEYS, PREFIX_ENCODER, attention_allowed, load_config, match_weights, packed_allowed,
                    peft_ia3_config, peft_lora_config, weight_files)
from .config import ChatGLM3Config
from .shards import read_shard

PEFT_PREFIX = "base_model.model."


def _tensor(x, dtype=None) -> Tensor:
    if isinstance(x, Tensor):
        return x if dtype is None else x.astype(dtype)
    array = np.asarray(x)
    return Tensor(array if dtype is None else array, dtype=dtype)


def _scaled(x, vector):
    """x times an IA3 vector, in the vector's dtype and back (as peft's IA3 layers)."""
    return (x.astype(vector.dtype) * vector.reshape(-1)).astype(x.dtype)


class Linear(nn.Cell):
    """y = x W^T + b, with an optional LoRA branch (peft's: + B(A(dropout(x))) * alpha / r) and an
    optional IA3 vector (peft's: y * l, bias included; on a feed-forward layer ((x * l) W^T + b))."""

    def __init__(self, in_features: int, out_features: int, bias: bool):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = Parameter(Tensor(np.zeros((out_features, in_features), np.float32)))
        self.bias = Parameter(Tensor(np.zeros((out_features,), np.float32))) if bias else None
        self.lora_A = self.lora_B = None
        self.lora_scaling, self.lora_dropout = 0.0, 0.0
        self.lora_enabled = True  # off: the base layer alone (DPO's reference, `adapters_disabled`)
        self.ia3_l, self.ia3_feedforward = None, False

    def add_lora(self, r: int, alpha: float, dropout: float, rng: np.random.Generator) -> None:
        """Attach LoRA initialised as peft does: A kaiming-uniform(a=sqrt(5)), B zero."""
        bound = 1.0 / math.sqrt(self.in_features)  # kaiming_uniform with a=sqrt(5) on fan_in
        self.lora_A = Linear(self.in_features, r, bias=False)
        self.lora_A.weight.set_data(Tensor(rng.uniform(-bound, bound, (r, self.in_features)).astype(np.float32)))
        self.lora_B = Linear(r, self.out_features, bias=False)
        self.lora_scaling, self.lora_dropout = alpha / r, dropout

    def add_ia3(self, feedforward: bool) -> None:
        """Attach an IA3 vector of ones in peft's shape: [1, in] on the input of a feed-forward layer,
        else [out, 1] on the output."""
        shape = (1, self.in_features) if feedforward else (self.out_features, 1)
        self.ia3_l, self.ia3_feedforward = Parameter(Tensor(np.ones(shape, np.float32))), feedforward

    def construct(self, x):
        if self.ia3_l is not None and self.ia3_feedforward:
            x = _scaled(x, self.ia3_l)
        y = ops.matmul(x, self.weight.T.astype(x.dtype))
        if self.bias is not None:
            y = y + self.bias.astype(y.dtype)
        if self.lora_A is not None and self.lora_enabled:
            h = ops.dropout(x, p=self.lora_dropout, training=self.training) if self.lora_dropout else x
            y = y + self.lora_B(self.lora_A(h)) * self.lora_scaling
        if self.ia3_l is not None and not self.ia3_feedforward:
            y = _scaled(y, self.ia3_l)
        return y


class Embedding(nn.Cell):
    def __init__(self, num: int, dim: int):
        super().__init__()
        self.weight = Parameter(Tensor(np.zeros((num, dim), np.float32)))

    def construct(self, ids):
        return ops.gather(self.weight, ids, 0)


class RMSNorm(nn.Cell):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = Parameter(Tensor(np.ones((dim,), np.float32)))
        self.eps = eps

    def construct(self, x):
        variance = x.astype(ms.float32).pow(2).mean(-1, keep_dims=True)
        return (self.weight * (x.astype(ms.float32) * ops.rsqrt(variance + self.eps))).astype(x.dtype)


class LayerNorm(nn.Cell):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = Parameter(Tensor(np.ones((dim,), np.float32)))
        self.bias = Parameter(Tensor(np.zeros((dim,), np.float32)))
        self.eps = eps

    def construct(self, x):
        mean = x.mean(-1, keep_dims=True)
        variance = ((x - mean) ** 2).mean(-1, keep_dims=True)
        return (x - mean) * ops.rsqrt(variance + self.eps) * self.weight + self.bias


def _norm(config: ChatGLM3Config) -> nn.Cell:
    cls = RMSNorm if config.rmsnorm else LayerNorm
    return cls(config.hidden_size, config.layernorm_epsilon)


def rotary(x, cos, sin):
    """Rotate interleaved pairs of the first 2 * cos.shape[-1] channels (x: [B, S, H, D])."""
    rot = cos.shape[-1] * 2
    x_rot, x_pass = x[..., :rot], x[..., rot:]
    pairs = x_rot.reshape(x_rot.shape[:-1] + (rot // 2, 2))
    even, odd = pairs[..., 0], pairs[..., 1]
    cos, sin = cos.expand_dims(2).astype(x.dtype), sin.expand_dims(2).astype(x.dtype)
    rotated = ops.stack((even * cos - odd * sin, odd * cos + even * sin), axis=-1).reshape(x_rot.shape)
    return ops.cat((rotated, x_pass), axis=-1)


def attention(q, k, v, mask: Optional[np.ndarray]):
    """Softmax(q k^T / sqrt(d)) v in float32 with grouped KV heads; `mask` True where allowed."""
    groups = q.shape[1] // k.shape[1]
    if groups > 1:
        k = ops.repeat_interleave(k, groups, axis=1)
        v = ops.repeat_interleave(v, groups, axis=1)
    scores = ops.matmul(q.astype(ms.float32), k.astype(ms.float32).swapaxes(-1, -2)) / math.sqrt(q.shape[-1])
    if mask is not None:
        scores = ops.masked_fill(scores, Tensor(~mask), float(np.finfo(np.float32).min))
    probs = ops.softmax(scores, axis=-1)
    return ops.matmul(probs.astype(v.dtype), v).astype(q.dtype)


def attention_mask_for(padding_mask: Optional[np.ndarray], q_len: int, past_len: int) -> np.ndarray:
    """The official ChatGLM3 mask rules (files.attention_allowed), as [B or 1, 1, q, keys] booleans."""
    allowed = attention_allowed(padding_mask, q_len, past_len)
    return np.tril(np.ones((q_len, past_len + q_len), dtype=bool), k=past_len)[None, None] if allowed is None else allowed


class SelfAttention(nn.Cell):
    def __init__(self, config: ChatGLM3Config):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = config.num_attention_heads, config.kv_heads, config.kv_channels
        self.grouped = config.multi_query_attention
        self.query_key_value = Linear(config.hidden_size, self.head_dim * (self.heads + 2 * self.kv_heads),
                                      bias=config.add_bias_linear or config.add_qkv_bias)
        self.dense = Linear(self.head_dim * self.heads, config.hidden_size, bias=config.add_bias_linear)

    def construct(self, x, cos, sin, mask, layer_cache, prefix_kv):
        batch, seq = x.shape[0], x.shape[1]
        qkv = self.query_key_value(x)
        if self.grouped:
            q, k, v = ops.split(qkv, [self.heads * self.head_dim, self.kv_heads * self.head_dim,
                                      self.kv_heads * self.head_dim], axis=-1)
            q = q.reshape(batch, seq, self.heads, self.head_dim)
            k = k.reshape(batch, seq, self.kv_heads, self.head_dim)
            v = v.reshape(batch, seq, self.kv_heads, self.head_dim)
        else:
            q, k, v = ops.split(qkv.reshape(batch, seq, self.heads, 3 * self.head_dim), self.head_dim, axis=-1)
        q = rotary(q, cos, sin).swapaxes(1, 2)
        k = rotary(k, cos, sin).swapaxes(1, 2)
        v = v.swapaxes(1, 2)
        if prefix_kv is not None:
            k, v = ops.cat((prefix_kv[0], k), axis=2), ops.cat((prefix_kv[1], v), axis=2)
        if layer_cache is not None:
            if layer_cache:
                k, v = ops.cat((layer_cache[0], k), axis=2), ops.cat((layer_cache[1], v), axis=2)
            layer_cache[:] = [k, v]
        out = attention(q, k, v, mask)
        return self.dense(out.swapaxes(1, 2).reshape(batch, seq, -1))


class MLP(nn.Cell):
    def __init__(self, config: ChatGLM3Config):
        super().__init__()
        self.dense_h_to_4h = Linear(config.hidden_size, 2 * config.ffn_hidden_size, bias=config.add_bias_linear)
        self.dense_4h_to_h = Linear(config.ffn_hidden_size, config.hidden_size, bias=config.add_bias_linear)

    def construct(self, x):
        gate, up = ops.chunk(self.dense_h_to_4h(x), 2, axis=-1)
        return self.dense_4h_to_h(ops.silu(gate) * up)


class GLMBlock(nn.Cell):
    def __init__(self, config: ChatGLM3Config):
        super().__init__()
        self.input_layernorm = _norm(config)
        self.self_attention = SelfAttention(config)
        self.post_attention_layernorm = _norm(config)
        self.mlp = MLP(config)
        self.dropout = config.hidden_dropout
        self.residual_from_norm = config.apply_residual_connection_post_layernorm

    def _drop(self, x):
        return ops.dropout(x, p=self.dropout, training=self.training) if self.dropout else x

    def construct(self, x, cos, sin, mask, layer_cache, prefix_kv):
        normed = self.input_layernorm(x)
        attn = self.self_attention(normed, cos, sin, mask, layer_cache, prefix_kv)
        x = (normed if self.residual_from_norm else x) + self._drop(attn)
        normed = self.post_attention_layernorm(x)
        return (normed if self.residual_from_norm else x) + self._drop(self.mlp(normed))


class GLMTransformer(nn.Cell):
    def __init__(self, config: ChatGLM3Config):
        super().__init__()
        self.layers = nn.CellList([GLMBlock(config) for _ in range(config.num_layers)])
        self.final_layernorm = _norm(config) if config.post_layer_norm else None


class EmbeddingCell(nn.Cell):
    def __init__(self, config: ChatGLM3Config):
        super().__init__()
        self.word_embeddings = Embedding(config.padded_vocab_size, config.hidden_size)


class PrefixEncoder(nn.Cell):
    def __init__(self, config: ChatGLM3Config):
        super().__init__()
        kv_size = config.num_layers * config.kv_channels * config.kv_heads * 2
        self.embedding = Embedding(config.pre_seq_len, kv_size)
        self.trans = None
        if config.prefix_projection:
            self.trans = nn.SequentialCell(Linear(kv_size, config.hidden_size, True), nn.Tanh(),
                                           Linear(config.hidden_size, kv_size, True))

    def construct(self, tokens):
        x = self.embedding(tokens)
        return self.trans(x) if self.trans is not None else x


class ChatGLMModel(nn.Cell):
    def __init__(self, config: ChatGLM3Config):
        super().__init__()
        self.config = config
        self.embedding = EmbeddingCell(config)
        self.encoder = GLMTransformer(config)
        self.output_layer = Linear(config.hidden_size, config.padded_vocab_size, bias=False)
        self.prefix_encoder = PrefixEncoder(config) if config.pre_seq_len else None
        rot_dim = config.kv_channels // 2
        self.theta = 1.0 / ((10000.0 * config.rope_ratio) ** (np.arange(0, rot_dim, 2, dtype=np.float32) / rot_dim))


class KVCache(list):
    """Per-layer [key, value] tensors, extended in place by each call that is given it."""


class ChatGLMForConditionalGeneration(nn.Cell):
    """`model(input_ids, attention_mask=None, labels=None, position_ids=None, cache=None)` -> (logits, loss)."""

    def __init__(self, config: ChatGLM3Config):
        super().__init__()
        self.config = config
        self.transformer = ChatGLMModel(config)
        self.compute_dtype = None  # mixed precision: activations in this dtype, weights stay float32

    def get_output_embeddings(self) -> nn.Cell:
        """The output layer (transformers' name for it, as the torch model has)."""
        return self.transformer.output_layer

    def _prefix(self, batch: int, dtype):
        config = self.config
        tokens = Tensor(np.arange(config.pre_seq_len)[None].repeat(batch, 0).astype(np.int32))
        kv = self.transformer.prefix_encoder(tokens).astype(dtype)
        kv = kv.reshape(batch, config.pre_seq_len, config.num_layers * 2, config.kv_heads, config.kv_channels)
        if self.training:
            kv = ops.dropout(kv, p=0.1, training=True)  # hard-coded in the official code
        kv = kv.transpose(2, 0, 3, 1, 4)
        return [(kv[2 * i], kv[2 * i + 1]) for i in range(config.num_layers)]

    def construct(self, input_ids, attention_mask=None, labels=None, position_ids=None, cache=None,
                  num_items_in_batch=None, cu_seq_lens=None):
        config = self.config
        ids = _tensor(input_ids, ms.int32)
        batch, seq = ids.shape
        x = self.transformer.embedding.word_embeddings(ids)
        if self.compute_dtype is not None:
            x = x.astype(self.compute_dtype)
        if config.fp32_residual_connection:
            x = x.astype(ms.float32)
        prefix = config.pre_seq_len or 0
        cached = int(cache[0][0].shape[2]) if cache else 0
        prefix_kvs = self._prefix(batch, x.dtype) if prefix and cached == 0 else [None] * config.num_layers
        past_tokens = cached - prefix if prefix and cached else cached
        if position_ids is None:
            positions = np.broadcast_to(np.arange(past_tokens, past_tokens + seq, dtype=np.float32), (batch, seq))
        else:
            positions = (position_ids.asnumpy() if isinstance(position_ids, Tensor) else np.asarray(position_ids))
        angles = Tensor(positions.astype(np.float32)[..., None] * self.transformer.theta)
        cos, sin = ops.cos(angles), ops.sin(angles)
        padding = None
        if attention_mask is not None:
            padding = attention_mask.asnumpy() if isinstance(attention_mask, Tensor) else np.asarray(attention_mask)
            if prefix:
                padding = np.concatenate([np.ones((batch, prefix), padding.dtype), padding], axis=1)
        if cu_seq_lens is not None:  # packed rows (torch's forward says how): each sample attends to itself only
            mask = packed_allowed(np.asarray(cu_seq_lens), batch, seq)
        else:
            mask = attention_mask_for(padding, seq, past_tokens + prefix)
        if cache is not None and not cache:
            cache.extend([] for _ in range(config.num_layers))
        for i, layer in enumerate(self.transformer.encoder.layers):
            x = layer(x, cos, sin, mask, cache[i] if cache is not None else None, prefix_kvs[i])
        if self.transformer.encoder.final_layernorm is not None:
            x = self.transformer.encoder.final_layernorm(x)
        logits = self.transformer.output_layer(x)
        loss = None if labels is None else shifted_loss(logits, _tensor(labels, ms.int32), num_items_in_batch)
        return logits, loss

    def trainable_parameters(self) -> list[Parameter]:
        return [p for p in self.get_parameters() if p.requires_grad]


def shifted_loss(logits, labels, num_items_in_batch=None):
    """Cross entropy of logits[:, :-1] against labels[:, 1:] in float32, ignore index -100."""
    logits = logits[:, :-1].astype(ms.float32)
    targets = labels[:, 1:]
    keep = (targets != -100)
    log_probs = ops.log_softmax(logits, axis=-1)
    picked = ops.gather_elements(log_probs, -1, ops.where(keep, targets, 0).expand_dims(-1)).squeeze(-1)
    total = -(picked * keep.astype(ms.float32)).sum()
    count = keep.astype(ms.float32).sum() if num_items_in_batch is None else float(num_items_in_batch)
    return total / count


def label_logps(logits, labels):
    """Each row's summed log-probability of its labels (logits[:, :-1] against labels[:, 1:], -100 ignored) in
    float32, and its label count: the preference objectives' input, as torch's `models.loss.label_logps`."""
    logits = logits[:, :-1].astype(ms.float32)
    targets = labels[:, 1:]
    keep = (targets != -100)
    log_probs = ops.log_softmax(logits, axis=-1)
    picked = ops.gather_elements(log_probs, -1, ops.where(keep, targets, 0).expand_dims(-1)).squeeze(-1)
    return (picked * keep.astype(ms.float32)).sum(axis=1), keep.astype(ms.float32).sum(axis=1)


class adapters_disabled:
    """While active, every LoRA branch of `model` is off: the base model (DPO's reference)."""

    def __init__(self, model: nn.Cell):
        self.layers = [cell for _, cell in model.cells_and_names() if isinstance(cell, Linear)
                       and cell.lora_A is not None]

    def __enter__(self):
        for layer in self.layers:
            layer.lora_enabled = False
        return self

    def __exit__(self, *exc):
        for layer in self.layers:
            layer.lora_enabled = True


# --- LoRA and IA3 in PEFT's format -----------------------------------------------------------------------
LORA, IA3 = ".lora_", ".ia3_l"  # in the names of their parameters


def _matches(name: str, modules: list[str]) -> bool:
    """peft's rule for a list of target modules: the full name, or its ending after a dot."""
    return any(name == m or name.endswith("." + m) for m in modules)


def _adapt(model: nn.Cell, target_modules: list[str], attach) -> int:
    """Freeze every parameter, then `attach(name, linear)` to each Linear that `target_modules` names."""
    for param in model.get_parameters():
        param.requires_grad = False
    count = 0
    for name, cell in model.cells_and_names():
        if isinstance(cell, Linear) and _matches(name, target_modules):
            attach(name, cell)
            count += 1
    name_parameters(model)
    return count


def add_lora(model: ChatGLMForConditionalGeneration, r: int, alpha: float, dropout: float,
             target_modules: list[str], seed: int = 0) -> int:
    """Attach LoRA to every Linear named in `target_modules`; freeze everything else.

    Returns:
        The number of adapted layers.
    """
    rng = np.random.default_rng(seed)
    return _adapt(model, target_modules, lambda name, cell: cell.add_lora(r, alpha, dropout, rng))


def add_ia3(model: ChatGLMForConditionalGeneration, target_modules: list[str], feedforward_modules: list[str]) -> int:
    """Attach IA3 vectors (ones) to every Linear named in `target_modules`, on the input of those that
    `feedforward_modules` names (peft's rule: the name ends with one of them), else on the output;
    freeze everything else.

    Returns:
        The number of adapted layers.
    """
    return _adapt(model, target_modules,
                  lambda name, cell: cell.add_ia3(any(name.endswith(m) for m in feedforward_modules)))


def name_parameters(model: nn.Cell) -> None:
    """Give every Parameter its full dotted name (official names, and PEFT's lora_A/lora_B/ia3_l)."""
    for name, param in model.parameters_and_names():
        param.name = name


def adapter_state(model: nn.Cell, kind: str) -> dict[str, np.ndarray]:
    """The adapter's weights (`kind`: LORA or IA3) under PEFT's saved names (`base_model.model.<name>...`)."""
    return {PEFT_PREFIX + name: param.asnumpy() for name, param in model.parameters_and_names() if kind in name}


def _save_adapter(model: nn.Cell, folder: Union[str, Path], kind: str, config: dict) -> None:
    from safetensors.numpy import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: np.ascontiguousarray(v) for k, v in adapter_state(model, kind).items()},
              str(folder / "adapter_model.safetensors"))
    (folder / "adapter_config.json").write_text(json.dumps(config, indent=2))


def save_lora(model: nn.Cell, folder: Union[str, Path], r: int, alpha: float, dropout: float,
              target_modules: list[str], base_model: str = "") -> None:
    """Write a PEFT LoRA adapter folder (adapter_config.json + adapter_model.safetensors)."""
    _save_adapter(model, folder, LORA, peft_lora_config(r, alpha, dropout, target_modules, base_model))


def save_ia3(model: nn.Cell, folder: Union[str, Path], target_modules: list[str], feedforward_modules: list[str],
             base_model: str = "") -> None:
    """Write a PEFT IA3 adapter folder (adapter_config.json + adapter_model.safetensors)."""
    _save_adapter(model, folder, IA3, peft_ia3_config(target_modules, feedforward_modules, base_model))


def _adapter_config(folder: Path, peft_type: str) -> dict:
    config = read_json(folder / "adapter_config.json")
    if config.get("peft_type") != peft_type:
        raise CheckpointError(f"{folder}: adapter type {config.get('peft_type')!r} is not {peft_type}")
    return config


def _modules(config: dict, key: str) -> list[str]:
    modules = config.get(key) or []
    return [modules] if isinstance(modules, str) else list(modules)


def _load_weights(model: nn.Cell, folder: Path, kind: str, trainable: bool) -> None:
    from safetensors.numpy import load_file

    weights = load_file(str(folder / "adapter_model.safetensors"))
    params = dict(model.parameters_and_names())
    for key, value in weights.items():
        name = key[len(PEFT_PREFIX):] if key.startswith(PEFT_PREFIX) else key
        name = name.replace(".default.", ".")
        if name not in params or tuple(params[name].shape) != value.shape:
            raise CheckpointError(f"{folder}: adapter weight {key} {list(value.shape)} matches no layer of this model")
        params[name].set_data(Tensor(value.astype(np.float32)))
    for name, param in params.items():
        param.requires_grad = trainable and kind in name


def load_lora(model: ChatGLMForConditionalGeneration, folder: Union[str, Path], trainable: bool = False) -> dict:
    """Attach and load a PEFT LoRA adapter folder (written by peft or by `save_lora`).

    Returns:
        The adapter's config.
    """
    folder = Path(folder)
    config = _adapter_config(folder, "LORA")
    add_lora(model, config["r"], config["lora_alpha"], config.get("lora_dropout", 0.0),
             _modules(config, "target_modules"))
    _load_weights(model, folder, LORA, trainable)
    return config


def load_ia3(model: ChatGLMForConditionalGeneration, folder: Union[str, Path], trainable: bool = False) -> dict:
    """Attach and load a PEFT IA3 adapter folder (written by peft or by `save_ia3`).

    Returns:
        The adapter's config.
    """
    folder = Path(folder)
    config = _adapter_config(folder, "IA3")
    add_ia3(model, _modules(config, "target_modules"), _modules(config, "feedforward_modules"))
    _load_weights(model, folder, IA3, trainable)
    return config


# --- checkpoints -----------------------------------------------------------------------------------------
def _read_weights(file: Path):
    if file.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(file), framework="numpy") as f:
            for name in f.keys():
                yield name, f.get_tensor(name)
        return
    if importlib.util.find_spec("torch") is None:
        raise CheckpointError(f"{file}: pickle (.bin) weights need torch to read; convert the folder once with "
                              "`tuneport convert SRC DST` on a machine with torch, then load DST")
    for name, tensor in read_shard(file):
        yield name, tensor.float().numpy()


def load_model(path: Union[str, Path], **config_overrides) -> ChatGLMForConditionalGeneration:
    """Load an official ChatGLM3 checkpoint folder into MindSpore (float32, on the current device).

    Raises:
        CheckpointError: no weights, missing or unexpected keys, or wrong shapes (all listed).
    """
    folder = Path(path)
    config = load_config(folder, **config_overrides)
    model = ChatGLMForConditionalGeneration(config)
    name_parameters(model)
    params = dict(model.parameters_and_names())
    expected = {name: tuple(param.shape) for name, param in params.items()}
    found = {}
    for file in weight_files(folder):
        for name, value in _read_weights(file):
            found[name] = (tuple(value.shape), file.name)
            if name in params and found[name][0] == expected[name]:
                params[name].set_data(Tensor(np.asarray(value, dtype=np.float32)))
    optional = match_weights(folder, expected, {n: v for n, v in found.items() if n not in DERIVED_KEYS}, config)
    fresh_prefix = any(name.startswith(PREFIX_ENCODER) for name in optional)
    if fresh_prefix:  # as torch's default nn.Embedding init, the official prefix encoder's
        rng = np.random.default_rng(0)
        for name, param in params.items():
            if name.startswith(PREFIX_ENCODER):
                param.set_data(Tensor(rng.standard_normal(param.shape).astype(np.float32) * (
                    1.0 if name.endswith("embedding.weight") else 1.0 / math.sqrt(param.shape[-1]))))
    model.set_train(False)
    return model


def load_prefix_encoder(model: ChatGLMForConditionalGeneration, file: Union[str, Path]) -> None:
    """Load P-tuning v2 prefix-encoder weights saved under the official names (safetensors)."""
    from safetensors.numpy import load_file

    params = dict(model.parameters_and_names())
    for name, value in load_file(str(file)).items():
        if name not in params:
            raise CheckpointError(f"{file}: {name} matches no parameter (is pre_seq_len set?)")
        params[name].set_data(Tensor(value.astype(np.float32)))
