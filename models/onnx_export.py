"""What the families' ONNX exports share: torch's dynamo exporter run on a generation step (models/chatglm3/onnx.py,
models/decoder/onnx.py), with the interface `tuneport.core.onnx_generate` drives."""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import torch

OPSET = 18


def io_names(num_layers: int) -> tuple[list[str], list[str]]:
    """The graph's input and output names, in order."""
    past = [f"past_key_values.{i}.{kv}" for i in range(num_layers) for kv in ("key", "value")]
    present = [f"present.{i}.{kv}" for i in range(num_layers) for kv in ("key", "value")]
    return ["input_ids", "attention_mask", "position_ids", *past], ["logits", *present]


def export_step(step: torch.nn.Module, past: list[torch.Tensor], path: Path) -> None:
    """Write `step` (input_ids, attention_mask, position_ids, *past) -> (logits, *present) as the ONNX file `path`,
    its weights beside it in `path`.data. The exporter traces batch, seq 5 and `past`'s length; all three are
    dynamic axes."""
    batch, past_len, seq = past[0].shape[0], past[0].shape[2], 5
    args = (torch.ones(batch, seq, dtype=torch.long), torch.ones(batch, past_len + seq, dtype=torch.long),
            torch.arange(past_len, past_len + seq).expand(batch, seq), *past)
    inputs, outputs = io_names(len(past) // 2)
    b, s, p = torch.export.Dim("batch"), torch.export.Dim("seq"), torch.export.Dim("past")
    # The mask's length is past + seq; *past is one tuple to the exporter.
    shapes = ({0: b, 1: s}, {0: b, 1: torch.export.Dim.AUTO}, {0: b, 1: s}, tuple([{0: b, 2: p}] * len(past)))
    # The exporter logs every pass it runs and warns about torchvision; the result is checked instead.
    loggers = [logging.getLogger(name) for name in ("torch.onnx", "onnxscript", "onnx_ir")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(step, args, str(path), input_names=inputs, output_names=outputs, dynamic_shapes=shapes,
                              opset_version=OPSET, dynamo=True, external_data=True, optimize=True, verbose=False)
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)
