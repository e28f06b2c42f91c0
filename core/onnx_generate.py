"""Greedy decoding of a `tuneport export --format onnx` graph with numpy and onnxruntime only (no torch).

This is the path for runtimes that are not torch: it shows how to drive the graph. The prompt runs
once with an empty cache; every later step feeds one token and the cache the previous step returned.
Positions count from 0 on every row, padding included, as in the official ChatGLM3 code.

    python -m tuneport.core.onnx_generate EXPORT_DIR --ids 64790 64792 ... [--max-new-tokens 32]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

MODEL_FILE = "model.onnx"
NUMPY_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16}
STEP_INPUTS = ("input_ids", "attention_mask", "position_ids")


class OnnxModelError(ValueError):
    """An ONNX export that cannot be run; the message names the file and the fix."""


def open_session(path: Path):
    """An onnxruntime session for `path` (a model.onnx file or the export folder holding one)."""
    import onnxruntime as ort

    path = Path(path)
    if path.is_dir():
        path = path / MODEL_FILE
    if not path.is_file():
        raise OnnxModelError(f"{path}: file not found; pass the folder `tuneport export --format onnx` wrote")
    try:
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    except Exception as e:  # onnxruntime raises its own exception types for a damaged or foreign file
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise OnnxModelError(f"{path}: not a loadable ONNX model ({first}); export it again with "
                             "`tuneport export --format onnx`") from None
    names = [i.name for i in session.get_inputs()]
    if names[:3] != list(STEP_INPUTS) or not names[3:] or session.get_outputs()[0].name != "logits":
        raise OnnxModelError(f"{path}: not a `tuneport export --format onnx` graph (inputs {', '.join(names[:5])}; "
                             f"expected {', '.join(STEP_INPUTS)}, past_key_values.*); export it with tuneport")
    return session


def empty_cache(session, batch: int) -> dict[str, np.ndarray]:
    """The cache before the first step: every past_key_values.N.key/value with no positions."""
    return {spec.name: np.zeros((batch, spec.shape[1], 0, spec.shape[3]), NUMPY_TYPES[spec.type])
            for spec in session.get_inputs()[3:]}  # [batch, kv_heads, past, head_dim]


def step(session, input_ids: np.ndarray, attention_mask: np.ndarray,
         cache: dict[str, np.ndarray]) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """One run of the graph: (logits, the cache for the next step). `attention_mask` covers the cache
    and the new tokens; the new tokens' positions follow the cache's length on every row."""
    outputs = [o.name for o in session.get_outputs()]
    start = attention_mask.shape[1] - input_ids.shape[1]
    positions = np.broadcast_to(np.arange(start, attention_mask.shape[1], dtype=np.int64), input_ids.shape)
    results = session.run(outputs, {"input_ids": input_ids, "attention_mask": attention_mask,
                                    "position_ids": positions, **cache})
    return results[0], {name.replace("present", "past_key_values"): value
                        for name, value in zip(outputs[1:], results[1:])}


def onnx_generate(model: Path | object, input_ids: Sequence[Sequence[int]], max_new_tokens: int,
                  eos_token_id: Optional[Sequence[int] | int] = None,
                  attention_mask: Optional[Sequence[Sequence[int]]] = None) -> np.ndarray:
    """Greedy-decode `max_new_tokens` tokens after each row of `input_ids` (left-padded rows allowed).

    Args:
        model: the export folder, a model.onnx path, or an open onnxruntime session.
        input_ids: [batch, seq] prompt ids.
        max_new_tokens: how many tokens to add at most.
        eos_token_id: id(s) that end a row; an ended row is padded with its first eos id.
        attention_mask: [batch, seq], 0 at left padding; all ones when omitted.

    Returns:
        [batch, seq + generated] int64 ids: the prompt followed by the new tokens.
    """
    session = model if hasattr(model, "run") else open_session(model)
    ids = np.asarray(input_ids, dtype=np.int64)
    if ids.ndim != 2 or ids.shape[1] == 0:
        raise ValueError(f"input_ids: expected [batch, seq] with seq >= 1, got shape {ids.shape}")
    vocab = session.get_outputs()[0].shape[-1]
    if isinstance(vocab, int) and (ids.min() < 0 or ids.max() >= vocab):
        raise ValueError(f"input_ids: ids must be from 0 to {vocab - 1} (the model's vocabulary); got "
                         f"{ids.min()} to {ids.max()}")
    mask = np.ones_like(ids) if attention_mask is None else np.asarray(attention_mask, dtype=np.int64)
    eos = [] if eos_token_id is None else [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)
    batch = ids.shape[0]
    cache, done, tokens, new = empty_cache(session, batch), np.zeros(batch, bool), ids, ids
    for _ in range(max_new_tokens):
        logits, cache = step(session, new, mask, cache)
        nxt = logits[:, -1].argmax(-1).astype(np.int64)
        if eos:
            nxt = np.where(done, eos[0], nxt)
            done |= np.isin(nxt, eos)
        new = nxt[:, None]
        tokens = np.concatenate((tokens, new), axis=1)
        mask = np.concatenate((mask, np.ones((batch, 1), np.int64)), axis=1)
        if done.all():
            break
    return tokens


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tuneport.core.onnx_generate", description=__doc__.splitlines()[0])
    p.add_argument("model", help="the folder `tuneport export --format onnx` wrote, or its model.onnx")
    p.add_argument("--ids", type=int, nargs="+", required=True, help="prompt token ids")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--eos", type=int, nargs="*", default=None, help="ids that end generation")
    args = p.parse_args(argv)
    try:
        out = onnx_generate(Path(args.model), [args.ids], args.max_new_tokens, args.eos)
    except (OnnxModelError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(" ".join(str(i) for i in out[0, len(args.ids):]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
