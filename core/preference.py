"""Preference data: pairs of replies to one prompt, the chosen and the rejected, for the preference objectives
(core/objectives.py). Framework-neutral: numpy only.

Two record formats (one per file, `data.format: auto` detects it from the first record):
- trl: TRL's `{"prompt", "chosen", "rejected"}`, each a string, or message lists (`prompt`: the conversation
  before the reply; `chosen`, `rejected`: one assistant message each, or a string).
- sharegpt: LLaMA-Factory's preference form, `{"conversations": [{"from", "value"}, ...], "chosen": {"from":
  "gpt", "value"}, "rejected": {...}}`, with optional `system` and `tools`.

The prompt is rendered with the family's chat template (its tokenizer's `encode_conversation`); only the two
replies carry labels. Every problem is one line naming the file, the line, the field and the fix.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Union

from .data import IGNORE_INDEX, EncodedData, _from_sharegpt, _get, _json_type, collate, fail, read_records
from .errors import DataError

if TYPE_CHECKING:
    import numpy as np

logger = logging.getLogger(__name__)

PREFERENCE_FORMATS = ("trl", "sharegpt")
PathLike = Union[str, Path]


def detect_preference_format(record: dict) -> str:
    """"sharegpt" for a record with `conversations`, "trl" for one with `prompt`; both need chosen and rejected.

    Raises:
        DataError: (without file and line) the record is no preference pair.
    """
    if "chosen" not in record or "rejected" not in record:
        keys = ", ".join(repr(key) for key in record) or "none"
        raise DataError(f"record is not a preference pair (its keys: {keys}); give 'prompt', 'chosen' and 'rejected' "
                        "(TRL), or 'conversations', 'chosen' and 'rejected' (LLaMA-Factory's ShareGPT form)")
    if "conversations" in record:
        return "sharegpt"
    if "prompt" in record:
        return "trl"
    raise DataError("field 'prompt' is missing; give the prompt (a string or a list of messages) beside 'chosen' "
                    "and 'rejected'")


def _reply(record: dict, key: str) -> dict:
    """The chosen or rejected reply as one assistant message."""
    value = record[key]
    if isinstance(value, str):
        content = value
    elif isinstance(value, dict):  # ShareGPT {"from": "gpt", "value"}, or one message {"role", "content"}
        content = value.get("value", value.get("content"))
    elif isinstance(value, list) and len(value) == 1 and isinstance(value[0], dict):
        content = value[0].get("content")
    else:
        content = None
    if not isinstance(content, str) or not content.strip():
        raise DataError(f"field {key!r} holds no reply ({_json_type(value)}); give the reply as a string, or as one "
                        'assistant message {"role": "assistant", "content": "..."}')
    return {"role": "assistant", "content": content}


def _prompt_trl(record: dict) -> list[dict]:
    prompt = record["prompt"]
    if isinstance(prompt, str):
        if not prompt.strip():
            raise DataError("field 'prompt' is empty; give the prompt the replies answer")
        return [{"role": "user", "content": prompt}]
    if not (isinstance(prompt, list) and prompt and all(isinstance(m, dict) for m in prompt)):
        raise DataError(f"field 'prompt' is {_json_type(prompt)}; give a string or a list of messages "
                        '[{"role": "user", "content": "..."}]')
    messages = []
    for i, item in enumerate(prompt, start=1):
        where = f"field 'prompt' message {i}: "
        messages.append({"role": _get(item, "role", str, where), "content": _get(item, "content", str, where)})
    return messages


def to_pair(record: dict, fmt: str) -> tuple[list[dict], dict, dict]:
    """(prompt messages, chosen reply, rejected reply) of one record.

    Raises:
        DataError: (without file and line) a field is missing or empty, or the two replies are the same.
    """
    prompt = _prompt_trl(record) if fmt == "trl" else _from_sharegpt(record)
    chosen, rejected = _reply(record, "chosen"), _reply(record, "rejected")
    if chosen["content"] == rejected["content"]:
        raise DataError("fields 'chosen' and 'rejected' hold the same reply; a pair needs two different replies")
    if not prompt or prompt[-1]["role"] == "assistant":
        raise DataError("the prompt must end with a user (or observation) turn, which the replies answer")
    return prompt, chosen, rejected


def _final_reply(ids: list[int], labels: list[int]) -> tuple[list[int], int]:
    """Labels of the last assistant turn only, and where it starts (the prompt's length)."""
    end = len(labels)
    while end and labels[end - 1] == IGNORE_INDEX:
        end -= 1
    start = end
    while start and labels[start - 1] != IGNORE_INDEX:
        start -= 1
    return [IGNORE_INDEX] * start + labels[start:end] + [IGNORE_INDEX] * (len(labels) - end), start


def encode_pairs(path: PathLike, tokenizer, fmt: str = "auto", max_input_length: int = 256,
                 max_output_length: int = 512) -> EncodedData:
    """Read, validate and tokenise a preference file: every record is checked before any is tokenised.

    Returns:
        EncodedData whose samples are (chosen ids, chosen labels, rejected ids, rejected labels), `pairs` True;
        a reply longer than max_output_length is cut (counted in `truncated`).

    Raises:
        DataError: one line naming the file, the first problem's line, field and fix, and how many more: a record
            that is no pair, a missing or empty reply, two equal replies, or a prompt over max_input_length tokens.
    """
    if fmt not in ("auto", *PREFERENCE_FORMATS):
        raise DataError(f"{path}: data.format {fmt!r} is not a preference format; use auto, trl or sharegpt")
    records = read_records(path)
    problems, pairs = [], []
    for line, record in records:
        try:
            found = detect_preference_format(record)
            if fmt == "auto":
                fmt = found
            elif found != fmt:
                raise DataError(f"record is in {found} form but the file is {fmt}; use one format per file")
            pairs.append((line, to_pair(record, fmt)))
        except DataError as e:
            problems.append(f"line {line}: {e}")
    if problems:
        raise fail(path, problems)
    samples, truncated = [], 0
    for line, (prompt, chosen, rejected) in pairs:
        encoded = []
        for reply in (chosen, rejected):
            try:
                ids, labels = tokenizer.encode_conversation(prompt + [reply], sys.maxsize, 0)
            except ValueError as e:  # what the model's chat template cannot render
                raise DataError(f"{path}: line {line}: {e}") from None
            labels, start = _final_reply(ids, labels)
            if start > max_input_length:
                problems.append(f"line {line}: field 'prompt' is {start} tokens, over data.max_input_length="
                                f"{max_input_length}; shorten it or raise data.max_input_length")
                break
            if len(ids) - start > max_output_length:
                truncated += 1
                ids, labels = ids[:start + max_output_length], labels[:start + max_output_length]
            encoded += [ids, labels]
        else:
            samples.append(tuple(encoded))
    if problems:
        raise fail(path, problems)
    logger.info("%s: %d %s preference pairs; %d replies cut to %d tokens", path, len(samples), fmt, truncated,
                max_output_length)
    return EncodedData(samples=samples, format=fmt, records=len(records), truncated=truncated, dropped=0, pairs=True)


def collate_pairs(pairs: list[tuple], pad_id: int) -> dict[str, np.ndarray]:
    """One right-padded batch of a micro-batch's pairs: the chosen replies' rows, then the rejected ones'; with
    pairs that carry their reference log-probabilities (a fifth item, (chosen, rejected): `objective.
    precompute_reference`), those too, as `reference_logps` [rows] float32."""
    import numpy as np

    batch = collate([(p[0], p[1]) for p in pairs] + [(p[2], p[3]) for p in pairs], pad_id)
    if all(len(p) == 5 for p in pairs):
        batch["reference_logps"] = np.array([p[4][0] for p in pairs] + [p[4][1] for p in pairs], dtype=np.float32)
    return batch
