"""The Qwen2 (Qwen2.5) tokenizer and chat format.

The tokenizer is the folder's tokenizer.json (byte-level BPE with `<|endoftext|>`, `<|im_start|>`,
`<|im_end|>` and the tool tags as added tokens), run by transformers' fast tokenizer. The chat format is
ChatML exactly as the chat_template of Qwen2.5's tokenizer_config.json renders it
(https://huggingface.co/Qwen/Qwen2.5-7B-Instruct): `<|im_start|>role\\ncontent<|im_end|>\\n` per message,
Qwen2.5's default system prompt when the conversation has none, tools listed in the system message,
assistant tool calls as `<tool_call>\\n{"name": ..., "arguments": ...}\\n</tool_call>`, and tool results
as `<tool_response>` blocks in a user turn. Fine-tuning masks are the usual SFT ones: only what the
assistant writes (its content, tool calls and `<|im_end|>`) carries loss.

Messages are tuneport's (core/data.py, the ChatGLM3 names): roles system, user, assistant, observation
(a tool result; "tool" is accepted too), `tools` on a system message, and tool calls either as Qwen's
`tool_calls` list or as ChatGLM3 writes them (`metadata` the tool's name, content
"```python\\ntool_call(key=value, ...)\\n```"), which become Qwen2.5's form.
"""

from __future__ import annotations

import ast
import json
import re
from pathlib import Path
from typing import Optional, Union

from transformers import BatchEncoding, PreTrainedTokenizerFast

from ..family import CheckpointError, check_vocabulary_size, read_json

IM_START, IM_END, ENDOFTEXT = "<|im_start|>", "<|im_end|>", "<|endoftext|>"
SYSTEM_PROMPT = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."
TOOLS_HEADER = ("\n\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
                "You are provided with function signatures within <tools></tools> XML tags:\n<tools>")
TOOLS_FOOTER = ("\n</tools>\n\nFor each function call, return a json object with function name and arguments "
                "within <tool_call></tool_call> XML tags:\n<tool_call>\n"
                '{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call>')
ROLES = ("system", "user", "assistant", "observation", "tool")
IGNORE_INDEX = -100
_CHATGLM_CALL = re.compile(r"\s*```(?:python)?\s*\n(.*?)\s*```\s*", re.DOTALL)


def _json(value) -> str:
    """JSON as the chat template's `tojson` filter writes it (transformers: json.dumps, ensure_ascii off)."""
    return json.dumps(value, ensure_ascii=False)


def chatglm_tool_call(name: str, content: str) -> dict:
    """ChatGLM3's tool call (`metadata` name, content "```python\\ntool_call(key=value, ...)\\n```") as
    {"name", "arguments"}; the values are Python literals (core/data.py writes them with repr).

    Raises:
        ValueError: the content is not such a call.
    """
    match = _CHATGLM_CALL.fullmatch(content)
    code = (match.group(1) if match else content).strip()
    try:
        call = ast.parse(code, mode="eval").body
        if not (isinstance(call, ast.Call) and isinstance(call.func, ast.Name) and call.func.id == "tool_call"
                and not call.args and all(k.arg for k in call.keywords)):
            raise ValueError("not a tool_call(key=value, ...) call")
        arguments = {k.arg: ast.literal_eval(k.value) for k in call.keywords}
    except (SyntaxError, ValueError) as e:
        raise ValueError(f"assistant message with metadata {name!r} (a tool call) has content {content[:80]!r}, "
                         f"not ChatGLM3's ```python\\ntool_call(key=value, ...)\\n``` ({e}); give the call as "
                         'tool_calls: [{"name": ..., "arguments": {...}}]') from None
    return {"name": name, "arguments": arguments}


def tool_calls(message: dict) -> list[dict]:
    """An assistant message's tool calls as {"name", "arguments"} (Qwen's, OpenAI's or ChatGLM3's form)."""
    calls = message.get("tool_calls") or []
    if not calls and message.get("metadata"):
        return [chatglm_tool_call(message["metadata"], message.get("content") or "")]
    return [call.get("function", call) for call in calls]


class Qwen2Tokenizer(PreTrainedTokenizerFast):
    """tokenizer.json through transformers' fast tokenizer, with Qwen2.5's chat format.

    Generation stops at `<|im_end|>` or `<|endoftext|>`; `<|endoftext|>` pads.
    """

    # --- chat format -------------------------------------------------------------------------------
    def render(self, messages: list[dict], add_generation_prompt: bool = False) -> list[tuple[str, bool]]:
        """The conversation as Qwen2.5's chat template writes it, in pieces of (text, carries loss).

        Raises:
            ValueError: an unknown role, tools on a system message that is not the first, or an
                assistant tool call in neither Qwen's nor ChatGLM3's form.
        """
        for i, message in enumerate(messages, start=1):
            if message.get("role") not in ROLES:
                raise ValueError(f"message {i} has role {message.get('role')!r}; expected one of {', '.join(ROLES)}")
            if message.get("tools") and i > 1:
                raise ValueError(f"message {i} carries tools; only the first (system) message may")
        first_system = bool(messages) and messages[0]["role"] == "system"
        system = messages[0].get("content") if first_system else None
        system = SYSTEM_PROMPT if system is None else system
        tools = messages[0].get("tools") if first_system else None
        if tools:
            system += TOOLS_HEADER + "".join("\n" + _json(tool) for tool in tools) + TOOLS_FOOTER
        pieces = [(f"{IM_START}system\n{system}{IM_END}\n", False)]
        rest = messages[1:] if first_system else messages
        for i, message in enumerate(rest):
            role, content = message["role"], message.get("content") or ""
            if role == "assistant":
                calls = "".join(f'\n<tool_call>\n{{"name": "{call["name"]}", "arguments": '
                                f'{_json(call["arguments"])}}}\n</tool_call>' for call in tool_calls(message))
                chatglm_call = message.get("metadata") and not message.get("tool_calls")  # its content is the call
                text = "" if chatglm_call else content
                body = text + calls if text else calls[1:]  # the template's "\n" after the role, then the reply
                pieces += [(f"{IM_START}assistant\n", False), (body + IM_END, True), ("\n", False)]
            elif role in ("observation", "tool"):  # consecutive results share one user turn
                opens = i == 0 or rest[i - 1]["role"] not in ("observation", "tool")
                closes = i == len(rest) - 1 or rest[i + 1]["role"] not in ("observation", "tool")
                pieces.append(((f"{IM_START}user" if opens else "") + f"\n<tool_response>\n{content}\n</tool_response>"
                               + (f"{IM_END}\n" if closes else ""), False))
            else:  # user, or a later system message
                pieces.append((f"{IM_START}{role}\n{content}{IM_END}\n", False))
        if add_generation_prompt:
            pieces.append((f"{IM_START}assistant\n", False))
        return pieces

    def apply_template(self, messages: list[dict], add_generation_prompt: bool = False) -> str:
        """The conversation's text, as `apply_chat_template(..., tokenize=False)` with Qwen2.5's template."""
        return "".join(text for text, _ in self.render(messages, add_generation_prompt))

    def encode_conversation(self, messages: list[dict], max_input_length: int,
                            max_output_length: int) -> tuple[list[int], list[int]]:
        """Fine-tuning ids and labels for one conversation.

        The ids are the tokenizer's for the whole rendered text (exactly what Qwen2.5's chat template and
        tokenizer give); a token carries loss when it starts inside what an assistant writes: its content
        and tool calls and the `<|im_end|>` that ends them, not the `<|im_start|>assistant\\n` before.
        Labels are the ids there and -100 elsewhere (the model shifts them). Truncated to
        max_input + max_output + 1 tokens, as the ChatGLM3 family, so a recipe's lengths mean the same.

        Returns:
            (input_ids, labels).
        """
        pieces = self.render(messages)
        loss = [flag for text, flag in pieces for _ in text]
        encoding = self.backend_tokenizer.encode("".join(text for text, _ in pieces), add_special_tokens=False)
        labels = [token if start < len(loss) and loss[start] else IGNORE_INDEX
                  for token, (start, _) in zip(encoding.ids, encoding.offsets)]
        limit = max_input_length + max_output_length + 1
        return encoding.ids[:limit], labels[:limit]

    def build_chat_input(self, query: str, history: Optional[list[dict]] = None, role: str = "user") -> BatchEncoding:
        """The prompt for the model's next reply: the history, the query, then `<|im_start|>assistant\\n`.

        Args:
            query: the new message's text.
            history: earlier messages (`role`, `content`, `tools` on a leading system one, tool calls).
            role: the new message's role ("user", or "observation" for a tool result).

        Returns:
            `input_ids` and `attention_mask` tensors of shape [1, n], ready for `model.generate(**inputs)`.
        """
        import torch

        text = self.apply_template([*(history or []), {"role": role, "content": query}], add_generation_prompt=True)
        ids = self.backend_tokenizer.encode(text, add_special_tokens=False).ids
        return BatchEncoding({"input_ids": torch.tensor([ids]),
                              "attention_mask": torch.ones(1, len(ids), dtype=torch.long)})

    @property
    def stop_token_ids(self) -> list[int]:
        """`<|im_end|>` (the turn is over) and `<|endoftext|>`, as Qwen2.5's generation_config.json."""
        return [self.convert_tokens_to_ids(IM_END), self.convert_tokens_to_ids(ENDOFTEXT)]


def _token(value) -> Optional[str]:
    """A token of tokenizer_config.json: a string, or transformers' {"content": ...} form."""
    return value.get("content") if isinstance(value, dict) else value


def load_tokenizer(path: Union[str, Path]) -> Qwen2Tokenizer:
    """The tokenizer of a Qwen2 folder (its tokenizer.json, and tokenizer_config.json when there), or of a
    tokenizer.json file; local files only.

    Raises:
        CheckpointError: no tokenizer.json, a file the tokenizers library cannot read, or a vocabulary
            without ChatML's tokens.
    """
    from tokenizers import Tokenizer

    path = Path(path)
    file = path / "tokenizer.json" if path.is_dir() else path
    if not file.is_file():
        raise CheckpointError(f"{path}: no tokenizer.json; pass the checkpoint folder or its tokenizer.json file")
    try:
        backend = Tokenizer.from_file(str(file))
    except Exception as e:  # the tokenizers library raises a plain Exception for a malformed file
        raise CheckpointError(f"{file}: not a tokenizers tokenizer.json ({' '.join(str(e).split())[:200]})") from None
    config_file = file.parent / "tokenizer_config.json"
    settings = read_json(config_file) if config_file.is_file() else {}
    pad = _token(settings.get("pad_token")) or ENDOFTEXT
    eos = _token(settings.get("eos_token")) or IM_END
    missing = [t for t in dict.fromkeys((IM_START, IM_END, ENDOFTEXT, pad, eos)) if backend.token_to_id(t) is None]
    if missing:
        raise CheckpointError(f"{file}: has no {', '.join(missing)} token{'s' if len(missing) > 1 else ''}; Qwen2's "
                              "chat format needs them (use the tokenizer.json that came with the model)")
    # The folder's chat_template serves transformers' apply_chat_template; tuneport renders with `render`.
    return Qwen2Tokenizer(tokenizer_object=backend, eos_token=eos, pad_token=pad, padding_side="left",
                          clean_up_tokenization_spaces=False, chat_template=settings.get("chat_template"))


def check_vocabulary(tokenizer: Qwen2Tokenizer, config, tokenizer_path, model_path) -> None:
    """A tokenizer must not produce ids past the model's embedding rows.

    Raises:
        CheckpointError: naming both files and the sizes.
    """
    check_vocabulary_size(len(tokenizer), config.vocab_size, "vocab_size", "tokenizer.json", tokenizer_path, model_path)
