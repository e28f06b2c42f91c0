"""The precision policy, one place for every backend: what `precision: auto|fp32|bf16|fp16` means on
the device at hand. Trainable weights always stay in float32; this decides the compute dtype."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from ..backends import Capabilities
from .errors import PrecisionError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PrecisionPlan:
    compute: str  # "fp32" | "bf16" | "fp16"
    loss_scaling: bool  # dynamic loss scaling (fp16 only)
    reason: str  # why, for the log and run.json


def resolve_precision(requested: str, device: str, caps: Capabilities) -> PrecisionPlan:
    """Decide the compute precision for `requested` on `device` with capabilities `caps`.

    auto: fp32 where the device prefers it (the CPU: bf16 there is slower and only asked for explicitly); bf16 where
    the device supports it; otherwise fp16 with dynamic loss scaling, with a warning.

    Raises:
        PrecisionError: bf16 or fp16 asked for on a device without it.
    """
    name = caps.device_name
    if requested == "fp32":
        plan = PrecisionPlan("fp32", False, "fp32 requested")
    elif requested == "bf16":
        if not caps.bf16:
            raise PrecisionError(
                f"precision: bf16 is not supported on {name} ({device}); use precision=fp16 "
                "(with loss scaling) or precision=auto"
            )
        plan = PrecisionPlan("bf16", False, "bf16 requested")
    elif requested == "fp16":
        if not caps.fp16:
            raise PrecisionError(f"precision: fp16 is not supported on {name} ({device}); use precision=auto")
        plan = PrecisionPlan("fp16", True, "fp16 requested; dynamic loss scaling on")
    elif caps.prefers_fp32:
        plan = PrecisionPlan("fp32", False, f"auto on {name}: fp32")
    elif caps.bf16:
        plan = PrecisionPlan("bf16", False, f"auto: {name} supports bf16")
    elif caps.fp16:
        plan = PrecisionPlan("fp16", True, f"auto: {name} has no bf16, so fp16 with dynamic loss scaling")
        log.warning("precision auto: %s has no bf16; training in fp16 with dynamic loss scaling", name)
    else:
        plan = PrecisionPlan("fp32", False, f"auto: {name} has neither bf16 nor fp16")
    log.info("precision: %s (%s)", plan.compute, plan.reason)
    return plan
