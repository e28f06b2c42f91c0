"""ChatGLM3: config, model, tokenizer and checkpoint loading, numerically the official implementation.

Importing this package registers the model with transformers' Auto classes under model_type
"chatglm", so `AutoModelForCausalLM.from_pretrained(folder)` uses this code, never the folder's.
"""

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer

from .checkpoint import CheckpointError, load_config, load_model, load_tokenizer
from .config import ChatGLM3Config, chatglm3_6b_config, chatglm3_tiny_config
from .model import ChatGLMForConditionalGeneration, ChatGLMModel
from .tokenizer import ChatGLM3Tokenizer

AutoConfig.register("chatglm", ChatGLM3Config, exist_ok=True)
AutoModel.register(ChatGLM3Config, ChatGLMForConditionalGeneration, exist_ok=True)
AutoModelForCausalLM.register(ChatGLM3Config, ChatGLMForConditionalGeneration, exist_ok=True)
AutoTokenizer.register(ChatGLM3Config, slow_tokenizer_class=ChatGLM3Tokenizer, exist_ok=True)


def chatglm3_6b(**overrides) -> ChatGLMForConditionalGeneration:
    """ChatGLM3-6B with freshly initialised weights (6,243,584,000 parameters).

    Build it under `torch.device("meta")` to inspect it without allocating memory.
    """
    return ChatGLMForConditionalGeneration(chatglm3_6b_config(**overrides))


def chatglm3_tiny(**overrides) -> ChatGLMForConditionalGeneration:
    """A tiny ChatGLM3-architecture model for tests and the CPU demo."""
    return ChatGLMForConditionalGeneration(chatglm3_tiny_config(**overrides))


__all__ = [
    "ChatGLM3Config",
    "ChatGLM3Tokenizer",
    "ChatGLMForConditionalGeneration",
    "ChatGLMModel",
    "CheckpointError",
    "chatglm3_6b",
    "chatglm3_6b_config",
    "chatglm3_tiny",
    "chatglm3_tiny_config",
    "load_config",
    "load_model",
    "load_tokenizer",
]
