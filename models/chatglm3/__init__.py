"""ChatGLM3: config, model, tokenizer and checkpoint loading, numerically the official implementation.

Importing this package (where torch is installed) registers the torch model with transformers' Auto
classes under model_type "chatglm", so `AutoModelForCausalLM.from_pretrained(folder)` uses this code,
never the folder's. Everything else is imported lazily: the MindSpore model
(`tuneport.models.chatglm3.mindspore`) imports and runs without torch.
"""

from importlib import import_module
from importlib.util import find_spec

# name -> the module of this package that defines it
_EXPORTS = {
    "CheckpointError": "..family", "ChatGLM3Config": ".config", "chatglm3_6b_config": ".config",
    "chatglm3_tiny_config": ".config", "ChatGLMForConditionalGeneration": ".model", "ChatGLMModel": ".model",
    "ChatGLM3Tokenizer": ".tokenizer", "load_config": ".files", "load_model": ".checkpoint",
    "load_tokenizer": ".files",
}


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(import_module(_EXPORTS[name], __name__), name)


def chatglm3_6b(**overrides):
    """ChatGLM3-6B with freshly initialised weights (6,243,584,000 parameters).

    Build it under `torch.device("meta")` to inspect it without allocating memory.
    """
    from .model import ChatGLMForConditionalGeneration
    from .config import chatglm3_6b_config

    return ChatGLMForConditionalGeneration(chatglm3_6b_config(**overrides))


def chatglm3_tiny(**overrides):
    """A tiny ChatGLM3-architecture model for tests and the CPU demo."""
    from .model import ChatGLMForConditionalGeneration
    from .config import chatglm3_tiny_config

    return ChatGLMForConditionalGeneration(chatglm3_tiny_config(**overrides))


if find_spec("torch") is not None:
    from . import model  # noqa: F401  (registers the Auto classes)

__all__ = sorted([*_EXPORTS, "chatglm3_6b", "chatglm3_tiny"])
