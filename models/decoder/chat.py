"""The OpenAI-server chat protocol (`tuneport serve`) of transformers decoder families, by their tool-call format.

Requests become tuneport's messages for the tokenizer's `build_chat_input` (models/decoder/tokenizer.py):
OpenAI `tools` as function dicts on a leading system message, an assistant's `tool_calls` as
{"name", "arguments": dict}, a `role: "tool"` message as an observation. Replies are the text decoded with
special tokens skipped. Serve answers one tool call, the first. Text before it (Qwen2.5's preamble, Qwen3's
`<think>` block) is left out of a whole answer; a streamed one has sent it as content, as OpenAI streams
content before tool calls. Styles:

- "qwen" (Qwen2.5, Qwen3): `<tool_call>\n{"name": ..., "arguments": {...}}\n</tool_call>`, as their templates'
  tool prompt asks (`<tool_call>` is an added token that is not special, so decoding keeps it).
- "llama3" (Llama 3.1): the reply is `{"name": ..., "parameters": {...}}`, as Llama 3.1's template asks
  ("arguments" is read too); `<|python_tag|>` before it is special and decodes to nothing. Built-in tools
  (`brave_search.call(...)`) are answered as text.
- "glm4" (glm-4-9b-chat, GLM-4-0414): the tool's name on the first line, its JSON arguments after it. GLM-4-0414's
  template writes a call `<|assistant|>{{ meta }}\n{{ content }}` and an answer `<|assistant|>\n...`; THUDM/GLM-4
  basic_demo/openai_api_server.py (`process_response`) reads a first line that is a name, then a JSON object, as
  a call. The template renders one call per assistant turn, without text, so a request's calls are split so.
- "": no tool-call format tuneport reads; a request with tools is refused.

Imports no framework.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Callable, Optional

from ..chat_protocol import ChatFormatError, message_text

ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant",
         "tool": "observation", "function": "observation"}
QUERY_ROLES = ("user", "observation")
_OPEN, _CLOSE = "<tool_call>", "</tool_call>"
_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")  # OpenAI's rule for a function name


def _no_constant(name: str):
    raise ValueError(f"{name} has no JSON form")


def _json_object(text: str) -> Optional[dict]:
    """`text` as a JSON object, else None (not JSON, not an object, or holding NaN/Infinity). Never evaluates."""
    try:
        value = json.loads(text, parse_constant=_no_constant)
    except (ValueError, RecursionError):  # JSONDecodeError is a ValueError
        return None
    return value if isinstance(value, dict) else None


def _functions(tools) -> list[dict]:
    """OpenAI tools ({"type": "function", "function": {...}}) as function dicts ({name, description, parameters})."""
    if not isinstance(tools, list):
        raise ChatFormatError("tools: expected a list of tools")
    for i, tool in enumerate(tools):
        function = tool.get("function") if isinstance(tool, dict) and tool.get("type", "function") == "function" \
            else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            raise ChatFormatError(f'tools[{i}]: expected {{"type": "function", "function": {{"name": ..., '
                                  '"description": ..., "parameters": {...}}}}')
    return [tool["function"] for tool in tools]


def _calls(message: dict, where: str) -> list[dict]:
    """An assistant message's OpenAI `tool_calls` as {"name", "arguments": dict} (and "id" where given)."""
    if not isinstance(message["tool_calls"], list):
        raise ChatFormatError(f"{where}.tool_calls: expected a list of tool calls")
    calls = []
    for j, call in enumerate(message["tool_calls"]):
        function = call.get("function") if isinstance(call, dict) else None
        arguments = (function.get("arguments") or "{}") if isinstance(function, dict) else None
        if not isinstance(arguments, str) or not isinstance(function.get("name"), str):
            raise ChatFormatError(f'{where}.tool_calls[{j}]: expected {{"function": {{"name": "...", "arguments": '
                                  '"a JSON object as a string"}}')
        parsed = _json_object(arguments)
        if parsed is None:
            raise ChatFormatError(f"{where}.tool_calls[{j}].function.arguments: {arguments[:80]!r} is not a JSON "
                                  "object; send the arguments as a JSON object in a string")
        calls.append({"name": function["name"], "arguments": parsed,
                      **({"id": call["id"]} if isinstance(call.get("id"), str) and call["id"] else {})})
    return calls


def _turns(message, where: str, one_call_a_turn: bool) -> list[dict]:
    """One OpenAI message as tuneport's messages; with `one_call_a_turn` (GLM-4) a call's text and each call
    become turns of their own."""
    if not isinstance(message, dict) or "role" not in message:
        raise ChatFormatError(f"{where}: expected an object with 'role' and 'content'")
    role = ROLES.get(message["role"]) if isinstance(message["role"], str) else None
    if role is None:
        raise ChatFormatError(f"{where}.role: {message['role']!r} is not one of {', '.join(ROLES)}")
    text = message_text(message.get("content"), where)
    if role == "assistant" and message.get("tool_calls"):
        calls = _calls(message, where)
        if not one_call_a_turn:
            return [{"role": role, "content": text, "tool_calls": calls}]
        turns = [{"role": role, "content": "", "tool_calls": [call]} for call in calls]
        return [{"role": role, "content": text}, *turns] if text else turns
    call_id = message.get("tool_call_id") if role == "observation" else None
    return [{"role": role, "content": text, **({"tool_call_id": call_id} if isinstance(call_id, str) else {})}]


def _split_qwen(text: str) -> Optional[tuple[str, str]]:
    start = text.find(_OPEN, max(text.rfind("</think>"), 0))  # a call named in the thinking is not one
    if start < 0:  # hold an ending that may yet become "<tool_call>"
        return None if any(text.endswith(_OPEN[:k]) for k in range(1, len(_OPEN))) else ("", text)
    end = text.find(_CLOSE, start)
    if end < 0:
        return None
    body = text[start + len(_OPEN):end].strip()
    name = (_json_object(body) or {}).get("name")
    return (name, body) if isinstance(name, str) and name else ("", text)


def _split_llama3(text: str) -> Optional[tuple[str, str]]:
    body = text.lstrip()
    if not body.startswith("{"):
        return None if not body else ("", text)
    try:
        call, end = json.JSONDecoder().raw_decode(body)
    except (ValueError, RecursionError):
        return None  # not a whole object yet; one that never becomes one is answered as text
    name = call.get("name") if isinstance(call, dict) else None
    if isinstance(name, str) and name and ("parameters" in call or "arguments" in call):
        return name, body[:end]  # Llama 3.2 may add "; {...}" calls: serve answers the first
    return "", text


def _split_glm4(text: str) -> Optional[tuple[str, str]]:
    first, newline, rest = text.partition("\n")
    name = first.strip()
    if not newline:
        return None if not name or _NAME.fullmatch(name) else ("", text)
    if not name:
        return "", rest
    return (name, rest) if _NAME.fullmatch(name) and rest.lstrip()[:1] in ("", "{") else ("", text)


def _call_arguments(body: str) -> Optional[dict]:
    call = _json_object(body) or {}
    arguments = call.get("arguments", call.get("parameters"))
    return _json_object(arguments) if isinstance(arguments, str) else arguments if isinstance(arguments, dict) else None


@dataclass(frozen=True)
class Protocol:
    """One tool-call style's chat protocol, as core/serve.py's Engine and Reply use it.

    Attributes:
        style: "qwen", "llama3", "glm4" or "" (see the module docstring).
        split_reply: the reply so far -> None while it may still become a tool call, (tool name, body) once it
            is one, ("", the answer) when it is not.
        parse_tool_call: a body -> the call's arguments, or None when they do not parse (answered as text).
    """

    style: str
    split_reply: Callable[[str], Optional[tuple[str, str]]]
    parse_tool_call: Callable[[str], Optional[dict]]
    ChatFormatError = ChatFormatError  # a class attribute, not a field: serve catches `chat.ChatFormatError`

    def history_from_openai(self, messages, tools=None) -> tuple[list[dict], str, str]:
        """OpenAI chat messages as (history, query, query role) for the tokenizer's `build_chat_input`.

        Args:
            messages: the request's `messages`; the last is from the user or a tool.
            tools: the request's `tools`, or None.

        Returns:
            tuneport's messages before the query, the query's text, and its role ("user" or "observation").

        Raises:
            ChatFormatError: every malformed message, an unknown role, tools this style cannot call, or a
                conversation that does not end with a user or tool message.
        """
        if not isinstance(messages, list) or not messages:
            raise ChatFormatError('messages: expected a non-empty list of {"role": ..., "content": ...}')
        history, problems = [], []
        for i, message in enumerate(messages):
            try:
                history += _turns(message, f"messages[{i}]", one_call_a_turn=self.style == "glm4")
            except ChatFormatError as e:
                problems.append(str(e))
        try:
            if tools and not self.style:
                raise ChatFormatError("tools: this model's chat template has no tool-call format tuneport reads "
                                      "(Qwen2.5/3, Llama 3.1 and GLM-4 have); send the request without tools, or "
                                      'with "tool_choice": "none"')
            if tools and history and history[0]["role"] == "system":
                history[0]["tools"] = _functions(tools)
            elif tools:
                history.insert(0, {"role": "system", "content": None, "tools": _functions(tools)})
        except ChatFormatError as e:
            problems.append(str(e))
        last = messages[-1].get("role") if isinstance(messages[-1], dict) else None
        if isinstance(last, str) and ROLES.get(last) not in (None, *QUERY_ROLES):
            problems.append(f"messages[{len(messages) - 1}].role: the last message must be from the user or a "
                            f"tool, not {last!r}; end with the message to answer")
        if problems:
            raise ChatFormatError("; ".join(problems))
        query = history.pop()
        return history, query["content"], query["role"]


_STYLES: dict[str, tuple[Callable, Callable]] = {
    "qwen": (_split_qwen, _call_arguments),
    "llama3": (_split_llama3, _call_arguments),
    "glm4": (_split_glm4, _json_object),
    "": (lambda text: ("", text), lambda body: None),
}


def protocol(style: str) -> Protocol:
    """The chat protocol of a tool-call style (models/decoder/entries.py's `tool_calls`).

    Raises:
        ValueError: an unknown style.
    """
    if style not in _STYLES:
        raise ValueError(f"tool-call style {style!r}: expected one of {', '.join(map(repr, _STYLES))}")
    return Protocol(style, *_STYLES[style])
