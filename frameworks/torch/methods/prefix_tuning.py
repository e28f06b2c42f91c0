"""Prefix tuning through peft (peft's adapter format)."""

import logging

from ....core.errors import MethodUnavailable
from ..method import VirtualTokens

log = logging.getLogger(__name__)


class PrefixTuning(VirtualTokens):
    peft_type = "PREFIX_TUNING"
    def peft_config(self, method, family, model_config, max_steps):
        import peft

        shape = family.prefix_shape(model_config) if family.prefix_shape and model_config is not None else {}
        return peft.PrefixTuningConfig(num_virtual_tokens=method.num_virtual_tokens, task_type="CAUSAL_LM",
                                       prefix_projection=method.prefix_projection, **shape)

    def checkpointing(self, model, build, wanted: bool, required: bool) -> bool:
        if not wanted or getattr(model, "keeps_prefix_when_checkpointing", False):
            return wanted
        model_type = build.family.model_type
        if required:
            raise MethodUnavailable(f"method prefix_tuning: {model_type}'s layers drop the prefix under gradient "
                                    "checkpointing; set train.gradient_checkpointing=false")
        log.info("gradient checkpointing off: %s's layers would drop prefix tuning's prefix", model_type)
        return False


METHOD = PrefixTuning()
