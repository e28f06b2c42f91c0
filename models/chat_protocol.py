"""What every family's chat protocol for `tuneport serve` shares (models/<family>/chat.py): the request error
and OpenAI's message content. Imports no framework."""

from __future__ import annotations


class ChatFormatError(ValueError):
    """A request the model cannot take; the message names the field and the fix (the server's 400)."""


def message_text(content, where: str) -> str:
    """OpenAI content: a string, null, or a list of {"type": "text", "text": ...} parts.

    Raises:
        ChatFormatError: any other content (images, audio), naming `where`.
    """
    if content is None or isinstance(content, str):
        return content or ""
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text"
                                         and isinstance(p.get("text"), str) for p in content):
        return "".join(p["text"] for p in content)
    raise ChatFormatError(f"{where}.content: expected a string or a list of text parts; this model reads text only")
