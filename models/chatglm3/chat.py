"""ChatGLM3's chat protocol behind an OpenAI-compatible server, as the official OpenAI API demo serves it.

Requests: OpenAI `tools` become the system message with tools (in ChatGLM3's own tool format, the one
its fine-tuning data uses), an assistant message's `tool_calls` become assistant turns with the tool's
name as metadata and a `tool_call(...)` code block, and a `role: "tool"` message becomes an observation.
Replies: ChatGLM3 writes `metadata\\ncontent` after `<|assistant|>`; empty metadata is a plain answer,
a tool name is a tool call whose arguments are parsed as Python literals (never evaluated).
Imports no framework.
"""

from __future__ import annotations

import ast
import json
from typing import Optional

from ..chat_protocol import ChatFormatError, message_text

ROLE_MAP = {"system": "system", "user": "user", "assistant": "assistant", "tool": "observation",
            "function": "observation"}
QUERY_ROLES = ("user", "observation")


def tool_call_text(arguments: dict) -> str:
    """A tool call's body as ChatGLM3 writes it (and as the fine-tuning data's tool calls are rendered)."""
    args = ", ".join(f"{key}={value!r}" for key, value in arguments.items())
    return f"```python\ntool_call({args})\n```"


def _native_tools(tools, where: str = "tools") -> list[dict]:
    """OpenAI tools ({"type": "function", "function": {...}}) in ChatGLM3's own format ({name, description, parameters})."""
    if not isinstance(tools, list):
        raise ChatFormatError(f"{where}: expected a list of tools")
    native = []
    for i, tool in enumerate(tools):
        function = tool.get("function") if isinstance(tool, dict) and tool.get("type", "function") == "function" else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            raise ChatFormatError(f'{where}[{i}]: expected {{"type": "function", "function": {{"name": ..., '
                                  '"description": ..., "parameters": {...}}}}')
        native.append(function)
    return native


def _tool_calls(message: dict, where: str) -> list[dict]:
    if not isinstance(message["tool_calls"], list):
        raise ChatFormatError(f"{where}.tool_calls: expected a list of tool calls")
    turns = []
    for j, call in enumerate(message["tool_calls"]):
        function = call.get("function") if isinstance(call, dict) else None
        if (not isinstance(function, dict) or not isinstance(function.get("name"), str)
                or not isinstance(function.get("arguments", ""), str)):
            raise ChatFormatError(f'{where}.tool_calls[{j}]: expected {{"function": {{"name": "...", "arguments": '
                                  '"a JSON object as a string"}}')
        try:
            arguments = json.loads(function.get("arguments") or "{}")
        except json.JSONDecodeError as e:
            raise ChatFormatError(f"{where}.tool_calls[{j}].function.arguments: not valid JSON ({e.msg})") from None
        if not isinstance(arguments, dict):
            raise ChatFormatError(f"{where}.tool_calls[{j}].function.arguments: expected a JSON object")
        turns.append({"role": "assistant", "metadata": function["name"], "content": tool_call_text(arguments)})
    return turns


def history_from_openai(messages, tools=None) -> tuple[list[dict], str, str]:
    """OpenAI chat messages as ChatGLM3's (history, query, query role) for `build_chat_input`.

    Raises:
        ChatFormatError: an unknown role, a malformed message, or a conversation that does not end with
            a user or tool message.
    """
    if not isinstance(messages, list) or not messages:
        raise ChatFormatError("messages: expected a non-empty list of {\"role\": ..., \"content\": ...}")
    history = []
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, dict) or "role" not in message:
            raise ChatFormatError(f"{where}: expected an object with 'role' and 'content'")
        role = ROLE_MAP.get(message["role"]) if isinstance(message["role"], str) else None
        if role is None:
            raise ChatFormatError(f"{where}.role: {message['role']!r} is not one of {', '.join(ROLE_MAP)}")
        if role == "assistant" and message.get("tool_calls"):
            history += _tool_calls(message, where)
        else:
            history.append({"role": role, "content": message_text(message.get("content"), where)})
    if tools:  # first, with content None: the tokenizer writes ChatGLM3's own tool prompt, as the official demo
        history.insert(0, {"role": "system", "content": None, "tools": _native_tools(tools)})
    last = history.pop()
    if last["role"] not in QUERY_ROLES:
        raise ChatFormatError(f"messages[{len(messages) - 1}].role: the last message must be from the user or a "
                              f"tool, not {messages[-1]['role']!r}")
    return history, last["content"], last["role"]


def split_reply(text: str) -> Optional[tuple[str, str]]:
    """(metadata, content) of a reply so far, or None while its first line is still being written."""
    if "\n" not in text:
        return None
    metadata, content = text.split("\n", 1)
    return metadata.strip(), content


def parse_tool_call(content: str) -> Optional[dict]:
    """The keyword arguments of a `tool_call(...)` block as a dict, or None if it is not one (or its
    values have no JSON form, such as sets, bytes or infinities).

    The block is parsed and its values read as Python literals; nothing in it is evaluated.
    """
    lines = content.strip().splitlines()
    if len(lines) >= 2 and lines[0].startswith("```") and lines[-1].strip() == "```":
        lines = lines[1:-1]
    try:
        call = ast.parse("\n".join(lines).strip(), mode="eval").body
        if not (isinstance(call, ast.Call) and isinstance(call.func, ast.Name) and call.func.id == "tool_call"
                and not call.args and all(k.arg for k in call.keywords)):
            return None
        arguments = {k.arg: ast.literal_eval(k.value) for k in call.keywords}
        json.dumps(arguments, allow_nan=False)
        return arguments
    except (SyntaxError, ValueError, TypeError, RecursionError, MemoryError):
        return None
