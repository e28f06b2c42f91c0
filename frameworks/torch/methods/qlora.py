"""QLoRA: LoRA through peft over a base whose linear layers bitsandbytes rounds to 4 bits."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from torch import nn

from ....core.errors import MethodUnavailable
from ..method import Build, LoraLike
from ....models import read_json

log = logging.getLogger(__name__)
QUANTIZED_BASE = "tuneport_quantized_base.json"  # in a QLoRA adapter: how its base was quantized


def quantize_linear_4bit(model: nn.Module, quant_type: str, double_quant: bool, compute_dtype: torch.dtype,
                         device: torch.device, repack: bool = True) -> int:
    """Replace every nn.Linear except the output layer (`get_output_embeddings()`) by a bitsandbytes 4-bit
    layer (QLoRA base). `repack` False: never bitsandbytes' CPU inference layout (a model that trains: it
    repacks the weights in eval mode and keeps them so, and training after an evaluation then fails in
    matmul_4bit with "a view of a leaf Variable ... in-place").

    Returns:
        The number of layers quantized.
    """
    import bitsandbytes as bnb

    count = 0
    output = model.get_output_embeddings()  # stays in float: the loss reads its weight
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if type(child) is not nn.Linear or child is output:
                continue
            layer = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=child.bias is not None,
                                      compute_dtype=compute_dtype, quant_type=quant_type,
                                      compress_statistics=double_quant)
            if child.in_features % 64 or not repack:
                # bitsandbytes' CPU inference repacking (taken where the CPU has AVX512-BF16) assumes rows of
                # whole 64-wide quantization blocks; narrower layers (tiny test models) keep the plain path.
                layer.support_avx512bf16_for_cpu = False
            layer.weight = bnb.nn.Params4bit(child.weight.data.to("cpu"), requires_grad=False,
                                             quant_type=quant_type, compress_statistics=double_quant)
            if child.bias is not None:
                layer.bias = nn.Parameter(child.bias.data, requires_grad=False)
            setattr(module, child_name, layer.to(device))  # moving quantizes
            count += 1
    return count


def dequantize_base_4bit(model: nn.Module, quant_type: str, double_quant: bool) -> int:
    """Round every nn.Linear except the output layer to bitsandbytes' 4-bit values and back, in place: the
    base weights a QLoRA adapter was trained on, in float. Returns the number of layers rounded."""
    import bitsandbytes.functional as bnbf

    count = 0
    output = model.get_output_embeddings()
    for name, module in model.named_modules():
        if type(module) is nn.Linear and module is not output:
            weight = module.weight.data
            packed, state = bnbf.quantize_4bit(weight.float(), quant_type=quant_type, compress_statistics=double_quant)
            module.weight.data = bnbf.dequantize_4bit(packed, state, quant_type=quant_type).to(weight.dtype)
            count += 1
    return count


class QLora(LoraLike):
    adapter_files = ("adapter_config.json", QUANTIZED_BASE)

    unestimated = ("bitsandbytes builds its 4-bit base on the device; estimate method lora for an upper bound")

    def check(self, build: Build) -> None:
        if build.purpose == "train" and not build.backend.capabilities.bnb_4bit:
            raise MethodUnavailable(
                f"method qlora needs bitsandbytes 4-bit kernels on {build.backend.name}; "
                "install them with: pip install 'bitsandbytes>=0.45' (CPU and CUDA; Ascend has none: "
                "use method lora there)")

    def quantize(self, model: nn.Module, build: Build) -> bool:
        if build.purpose == "meta":  # nothing to round: the trainable parameters are LoRA's
            return False
        if build.quantize is not None:
            build.quantize(model)
            return True
        method = build.method
        n = quantize_linear_4bit(model, method.quant_type, method.double_quant, build.compute, build.device,
                                 repack=build.purpose != "train")
        log.info("qlora: %d linear layers quantized to 4-bit %s", n, method.quant_type)
        return True

    def save(self, model, build: Build, folder: Path, trained, weights=None) -> None:
        super().save(model, build, folder, trained, weights)
        # loading it again means the same 4-bit base (dequantized)
        (folder / QUANTIZED_BASE).write_text(json.dumps(
            {"quant_type": build.method.quant_type, "double_quant": build.method.double_quant}))

    def prepare_base(self, model: nn.Module, adapter: Path) -> bool:
        settings = read_json(adapter / QUANTIZED_BASE)
        dequantize_base_4bit(model, settings["quant_type"], settings["double_quant"])
        return True


METHOD = QLora()
