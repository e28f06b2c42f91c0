"""The tokenizer and chat format of every transformers decoder family, from the checkpoint's own chat template.

The tokenizer is the folder's tokenizer.json and tokenizer_config.json, run by transformers' fast tokenizer.
A conversation is rendered by the folder's `chat_template` (or the recipe's `data.template` file) exactly as
transformers' `apply_chat_template` renders it: nothing here knows a family's format. Masks come from the
rendered text: an assistant reply starts where the prompt for it ends (the turns before it rendered with the
generation prompt) and ends after the first stop token (generation_config.json's eos ids) the template writes
after it; a last reply the template closes with nothing (GLM-4) gets the eos token appended.

Messages are tuneport's (core/data.py, the ChatGLM3 names) and become what the template reads: tools in
OpenAI form through `tools=`; a tool result has role "tool", or "observation" in a template that never
names "tool" (GLM-4); a tool call is OpenAI's `tool_calls` when the template reads them, else GLM-4's
`metadata` (the name) with the arguments as JSON content.
"""

from __future__ import annotations

import ast
import json
import re
from pathlib import Path
from typing import Optional, Union

import jinja2
from transformers import BatchEncoding, PreTrainedTokenizerFast
from transformers.utils.chat_template_utils import _compile_jinja_template  # how transformers compiles templates

from ..family import CheckpointError, check_vocabulary_size, read_json

ROLES = ("system", "user", "assistant", "observation", "tool")
IGNORE_INDEX = -100
_CHATGLM_CALL = re.compile(r"\s*```(?:python)?\s*\n(.*?)\s*```\s*", re.DOTALL)
_TOOL_ROLE = re.compile(r"""["']tool["']""")  # a template that compares roles with "tool"
_FIX = "name a template that does in the recipe: data.template: FILE.jinja"


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
    """An assistant message's tool calls as {"name", "arguments" (a dict)} plus "id" when it has one, from
    OpenAI's form ({"type": "function", "function": {...}}), the plain {"name", "arguments"} or ChatGLM3's.

    Raises:
        ValueError: a call without a name, or arguments that are not a JSON object.
    """
    if not message.get("tool_calls") and message.get("metadata"):
        return [chatglm_tool_call(message["metadata"], message.get("content") or "")]
    calls = []
    for call in message["tool_calls"]:
        function = call.get("function", call)
        arguments = function.get("arguments") or {}
        try:
            arguments = json.loads(arguments) if isinstance(arguments, str) else arguments
        except json.JSONDecodeError as e:
            raise ValueError(f"tool call arguments are not valid JSON ({e.msg})") from None
        if not isinstance(function.get("name"), str) or not isinstance(arguments, dict):
            raise ValueError('a tool call needs a "name" and "arguments" that are a JSON object')
        calls.append({"name": function["name"], "arguments": arguments, **({"id": call["id"]} if "id" in call else {})})
    return calls


def _template_call(message: dict, template: str, called: int) -> tuple[dict, list[str]]:
    """An assistant tool-call message as `template` reads it, and the ids given to its calls: OpenAI's
    `tool_calls` (ids call00001, ... where the message has none: Mistral's template wants 9 characters), else
    GLM-4's `metadata` (`<|assistant|>name\\n{arguments}`, one call per message, without text).

    Raises:
        ValueError: a malformed call, or a template that renders no tool calls (or not this many).
    """
    calls = tool_calls(message)
    text = (message.get("content") or "") if message.get("tool_calls") else ""  # ChatGLM3's content is the call
    if "tool_calls" in template:
        ids = [call.get("id") or f"call{called + k:05d}" for k, call in enumerate(calls, start=1)]
        return {"role": "assistant", "content": text, "tool_calls": [
            {"type": "function", "id": i, "function": {"name": c["name"], "arguments": c["arguments"]}}
            for i, c in zip(ids, calls)]}, ids
    if "metadata" not in template:
        raise ValueError(f"a tool call, but the chat template renders none (it reads neither tool_calls nor "
                         f"metadata); {_FIX}")
    if len(calls) != 1 or text:
        raise ValueError(f"{len(calls)} tool calls{' and text' if text else ''}, but the chat template renders one "
                         "call per assistant message (metadata), without text")
    return {"role": "assistant", "metadata": calls[0]["name"],
            "content": json.dumps(calls[0]["arguments"], ensure_ascii=False)}, []


class TemplateTokenizer(PreTrainedTokenizerFast):
    """A checkpoint's tokenizer with its own chat template; see the module docstring. `load_tokenizer` makes one."""

    _stop_ids: list[int] = []

    def _template_chat(self, messages: list[dict]) -> tuple[list[dict], list[int], Optional[list[dict]]]:
        """tuneport's messages as the template reads them: (the messages, each one's number in `messages`, tools).

        Raises:
            ValueError: an unknown role, tools off the first (system) message, or tools or a tool call that
                the template never renders.
        """
        first = messages[0] if messages else {}
        tools = [t if "function" in t else {"type": "function", "function": t}
                 for t in (first.get("tools") if first.get("role") == "system" else None) or []] or None
        template = self.get_chat_template(None, tools)
        if tools and "tools" not in template:
            raise ValueError(f"message 1 carries tools, but the chat template never reads `tools`; {_FIX}")
        chat, numbers, pending, called = [], [], [], 0  # pending: the ids of calls whose results are to come
        for n, message in enumerate(messages, start=1):
            role, content = message.get("role"), message.get("content")
            if role not in ROLES:
                raise ValueError(f"message {n} has role {role!r}; expected one of {', '.join(ROLES)}")
            if message.get("tools") and (n > 1 or role != "system"):
                raise ValueError(f"message {n} carries tools; only the first (system) message may")
            if role == "system" and content is None:
                continue  # it only carried the tools (core/data.py adds such a message)
            entry = {"role": role, "content": content or ""}
            if role in ("observation", "tool"):
                entry["role"] = "tool" if _TOOL_ROLE.search(template) else "observation"
                call_id = message.get("tool_call_id") or (pending.pop(0) if pending else None)
                entry.update({"tool_call_id": call_id} if call_id else {})
            elif role == "assistant" and (message.get("tool_calls") or message.get("metadata")):
                try:
                    entry, ids = _template_call(message, template, called)
                except ValueError as e:
                    raise ValueError(f"message {n}: {e}") from None
                pending, called = pending + ids, called + len(ids)
            chat.append(entry)
            numbers.append(n)
        return chat, numbers, tools

    def _render(self, chat: list[dict], tools: Optional[list[dict]], prompt: bool = False) -> str:
        """`apply_chat_template(..., tokenize=False)`; a template's refusal becomes a one-line ValueError."""
        try:
            return self.apply_chat_template(chat, tools=tools, tokenize=False, add_generation_prompt=prompt)
        except (jinja2.TemplateError, TypeError) as e:
            raise ValueError(f"the chat template cannot render this conversation: {' '.join(str(e).split())}") from None

    def _reply_end(self, text: str, start: int, bound: int) -> Optional[int]:
        """The end of the first stop token in `text` that starts at or after `start` and at or before `bound`."""
        ends = [at + len(stop) for stop in self._stop_texts() if (at := text.find(stop, start, bound + len(stop))) >= 0]
        return min(ends, default=None)

    def _stop_texts(self) -> list[str]:
        """The stop tokens' text (an added token's content)."""
        return [token for token in self.convert_ids_to_tokens(self._stop_ids) if token]

    def encode_conversation(self, messages: list[dict], max_input_length: int,
                            max_output_length: int) -> tuple[list[int], list[int]]:
        """Fine-tuning ids and labels for one conversation.

        The ids are the tokenizer's for the rendered text, without special tokens added (the template writes
        BOS). A token carries loss when it starts inside a reply: from the end of the prompt for it
        (`apply_chat_template(messages[:i], add_generation_prompt=True)`) to the end of the first stop token
        after it (so its text, tool calls, thinking block and end-of-turn token; never a role header). A last
        reply followed by no stop token gets the eos token appended. Labels are the ids there, -100 elsewhere.
        Truncated to max_input + max_output + 1 tokens, as the ChatGLM3 family.

        Returns:
            (input_ids, labels).

        Raises:
            ValueError: the messages cannot be converted (see `_template_chat`), the template refuses them,
                it renders the turns before a reply differently depending on what follows, or it writes no
                stop token after a reply that is not the last.
        """
        chat, numbers, tools = self._template_chat(messages)
        text, spans = self._render(chat, tools), []
        for i, message in enumerate(chat):
            if message["role"] != "assistant":
                continue
            if i == 0:
                raise ValueError(f"message {numbers[i]}: the conversation opens with an assistant reply; start it "
                                 "with a user (or system) message")
            start = len(prompt := self._render(chat[:i], tools, prompt=True))
            if not text.startswith(prompt):
                raise ValueError(f"message {numbers[i]}: the chat template renders the turns before this assistant "
                                 "reply differently depending on what follows, so the reply's span cannot be found")
            last = i == len(chat) - 1
            upto = text if last else self._render(chat[:i + 1], tools)
            end = self._reply_end(text, start, len(upto) if text.startswith(upto) else len(text))
            if end is None and not last:
                raise ValueError(f"message {numbers[i]}: the chat template writes no stop token ("
                                 f"{', '.join(self._stop_texts())}) after this assistant "
                                 f"reply, so the model would never learn to stop; {_FIX}")
            if end is None:  # GLM-4: the next turn's header ends a reply, and nothing follows the last
                text += self.eos_token
                end = len(text)
            spans.append((start, end))
        encoding = self.backend_tokenizer.encode(text, add_special_tokens=False)
        labels = [token if any(s <= at < e for s, e in spans) else IGNORE_INDEX
                  for token, (at, _) in zip(encoding.ids, encoding.offsets)]
        limit = max_input_length + max_output_length + 1
        return encoding.ids[:limit], labels[:limit]

    def build_chat_input(self, query: str, history: Optional[list[dict]] = None, role: str = "user") -> BatchEncoding:
        """The prompt for the model's next reply: the history and the query, then the template's generation prompt.

        Args:
            query: the new message's text.
            history: earlier messages (`role`, `content`, `tools` on a leading system one, tool calls).
            role: the new message's role ("user", or "observation" for a tool result).

        Returns:
            `input_ids` and `attention_mask` tensors of shape [1, n], ready for `model.generate(**inputs)`.
        """
        import torch

        chat, _, tools = self._template_chat([*(history or []), {"role": role, "content": query}])
        ids = self.backend_tokenizer.encode(self._render(chat, tools, prompt=True), add_special_tokens=False).ids
        return BatchEncoding({"input_ids": torch.tensor([ids]),
                              "attention_mask": torch.ones(1, len(ids), dtype=torch.long)})

    @property
    def stop_token_ids(self) -> list[int]:
        """The ids generation stops at: generation_config.json's eos_token_id (else config.json's), then eos."""
        return list(self._stop_ids)


def _stop_ids(folder: Path, eos_id: int) -> list[int]:
    """generation_config.json's eos_token_id (an id or a list), else config.json's, then `eos_id`, deduplicated."""
    for file in (folder / "generation_config.json", folder / "config.json"):
        value = read_json(file).get("eos_token_id") if file.is_file() else None
        if value is not None:
            ids = value if isinstance(value, list) else [value]
            if not all(isinstance(i, int) for i in ids):
                raise CheckpointError(f"{file}: eos_token_id is {value!r}; expected a token id or a list of them")
            return list(dict.fromkeys([*ids, eos_id]))
    return [eos_id]


def load_tokenizer(path: Union[str, Path], template: Union[str, Path, None] = None) -> TemplateTokenizer:
    """The tokenizer of a checkpoint folder (or of the folder of a tokenizer.json file), local files only.

    Args:
        path: the folder, with tokenizer.json, tokenizer_config.json and a chat template (tokenizer_config.json's
            `chat_template` or chat_template.jinja); generation_config.json / config.json give the stop ids.
        template: a .jinja file that provides or replaces the folder's chat template (recipe `data.template`).

    Raises:
        CheckpointError: a missing or unreadable file, no chat template, a template that is not valid Jinja,
            or no eos token.
    """
    path = Path(path)
    folder = path if path.is_dir() else path.parent
    file = folder / "tokenizer.json"
    if not file.is_file():
        raise CheckpointError(f"{folder}: no tokenizer.json; pass the checkpoint folder or its tokenizer.json file")
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        if (folder / name).is_file():
            read_json(folder / name)  # one-line errors for a bad file, before transformers reads it
    source = Path(template) if template is not None else folder / "chat_template.jinja"
    if template is None and not source.is_file():
        source = folder / "tokenizer_config.json"  # its chat_template, if any
    try:
        text = source.read_text(encoding="utf-8") if source.name != "tokenizer_config.json" else None
    except (OSError, UnicodeDecodeError) as e:
        reason = getattr(e, "strerror", None) or e
        raise CheckpointError(f"{source}: cannot read the chat template ({reason})") from None
    overrides = {"chat_template": text} if template is not None else {}
    try:
        tokenizer = TemplateTokenizer.from_pretrained(str(folder), local_files_only=True, padding_side="left",
                                                      **overrides)
    except Exception as e:  # the tokenizers library raises a plain Exception for a malformed file
        detail = " ".join(f"{type(e).__name__}: {e}".split())[:200]
        raise CheckpointError(f"{file}: transformers' fast tokenizer cannot load it ({detail})") from None
    if not tokenizer.chat_template:
        raise CheckpointError(f"{folder}: has no chat_template (tokenizer_config.json or chat_template.jinja); "
                              "name one in the recipe: data.template: FILE.jinja")
    templates = tokenizer.chat_template
    for text in templates.values() if isinstance(templates, dict) else [templates]:
        try:
            _compile_jinja_template(text)
        except jinja2.TemplateSyntaxError as e:
            raise CheckpointError(f"{source}: chat template line {e.lineno}: {e.message}; fix it or name another in "
                                  "the recipe: data.template: FILE.jinja") from None
    if tokenizer.eos_token is None:
        raise CheckpointError(f"{folder / 'tokenizer_config.json'}: has no eos_token; use the tokenizer files that "
                              "came with the model")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer._stop_ids = _stop_ids(folder, tokenizer.eos_token_id)
    return tokenizer


def check_vocabulary(tokenizer: TemplateTokenizer, config, tokenizer_path, model_path) -> None:
    """A tokenizer must not produce ids past the model's embedding rows.

    Raises:
        CheckpointError: naming both files and the sizes.
    """
    check_vocabulary_size(len(tokenizer), config.vocab_size, "vocab_size", "tokenizer.json", tokenizer_path, model_path)
