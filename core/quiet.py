"""Third-party warnings known to be harmless, kept out of tuneport's output (`--verbose` shows them).

Each is filtered where it is raised: by its category, its message and the module that raises it (log records:
by logger and message), never by a blanket filter, so a new or different warning still shows. Each entry says
why it is harmless.
"""

from __future__ import annotations

import logging
import re
import warnings

# (category, message regex, raising module regex)
HARMLESS_WARNINGS = (
    # peft reads transformers' deprecated alias `is_gradient_checkpointing` whenever it wraps a model (peft 0.21,
    # transformers 5.2x); the alias still answers, and tuneport sets checkpointing itself.
    (FutureWarning, r"`is_gradient_checkpointing` is deprecated", r"transformers\.modeling_utils"),
    # peft's generic rank_pattern check does not know AdaLoRA's own keys (`...lora_E`), which AdaLoRA's
    # resizing reads; the saved ranks are the allocated ones (tests/test_methods.py checks them).
    (RuntimeWarning, r"The following rank_pattern keys did not match any targeted module", r"peft\.tuners\.tuners_utils"),
    # peft drops the position ids of prompt-learning methods (virtual tokens come first); the model then numbers
    # positions itself, which tests/test_decoder.py checks against the uncached model.
    (UserWarning, r"Position ids are not supported for parameter efficient tuning", r"peft\.peft_model"),
)
# (logger, message regex)
HARMLESS_LOGS = (
    # bitsandbytes' CPU backend without the optional `kernels` package uses its own 4-bit kernels instead.
    ("bitsandbytes.backends.cpu.ops", r"Failed to load CPU gemm_4bit_forward from kernels-community"),
)


class _DropMessage(logging.Filter):
    def __init__(self, pattern: str):
        super().__init__()
        self.pattern = re.compile(pattern)

    def filter(self, record: logging.LogRecord) -> bool:
        return not self.pattern.search(record.getMessage())


LOG_FILTERS = tuple((logger, _DropMessage(pattern)) for logger, pattern in HARMLESS_LOGS)


def hide_harmless_warnings() -> None:
    """Filter the known-harmless warnings and log records (again: each filter is added once)."""
    for category, message, module in HARMLESS_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category, module=module)
    for logger, drop in LOG_FILTERS:
        logging.getLogger(logger).addFilter(drop)
