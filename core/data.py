"""Fine-tuning data: read a file, turn each record into chat messages, tokenise, batch.

Four record formats are read (one per file), all turned into one message format, the official ChatGLM3 one
(THUDM/ChatGLM3 `finetune_demo/README.md`): `{"role", "content"}`, optional `"metadata"`, and `"tools"`
on a system message.

- conversations: ChatGLM3's own `{"conversations": [{"role", "content"}, ...], "tools": [...]}`.
- alpaca: `{"instruction", "input", "output", "system", "history"}` (LLaMA-Factory's alpaca format).
- advertisegen: `{"content", "summary"}`, as the official fine-tuning demo's AdvertiseGen data.
- sharegpt: `{"conversations": [{"from", "value"}, ...], "system", "tools": "<json>"}` (LLaMA-Factory).

Every problem is a `DataError` whose message is one line naming the file, the line, the field and the
fix, and a file is validated completely before any tokenising. Framework-neutral: numpy only.
"""

from __future__ import annotations

import codecs
import hashlib
import json
import logging
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional, Sequence, Union

from .errors import DataError

if TYPE_CHECKING:  # annotations only; the functions import it when they run
    import numpy as np

logger = logging.getLogger(__name__)

FORMATS = ("conversations", "alpaca", "advertisegen", "sharegpt")
ROLES = ("system", "user", "assistant", "observation")
# ShareGPT "from" -> ChatGLM3 role; function_call is special-cased into an assistant tool call.
SHAREGPT_ROLES = {"human": "user", "gpt": "assistant", "function_call": "assistant",
                  "observation": "observation", "system": "system"}
IGNORE_INDEX = -100  # label with no loss, as the tokenizer's encode_conversation

_WHITESPACE = re.compile(r"[ \t\n\r]*")  # JSON's whitespace, no more
PathLike = Union[str, Path]


@dataclass
class EncodedData:
    """A tokenised data file.

    Attributes:
        samples: (input_ids, labels) per kept record; labels are -100 where there is no loss.
        format: the record format used (detected when "auto" was asked for).
        records: how many records the file holds.
        truncated: samples cut to max_input_length + max_output_length + 1 tokens.
        dropped: records left with no loss token after truncation (removed from `samples`).
        pairs: the samples are preference pairs, (chosen ids, chosen labels, rejected ids, rejected labels)
            (core/preference.py).
    """

    samples: list[tuple[list[int], ...]]
    format: str
    records: int
    truncated: int
    dropped: int
    pairs: bool = False

    def length(self, index: int) -> int:
        """Sample `index`'s tokens (a pair's: its longer reply's row)."""
        sample = self.samples[index]
        return max(len(sample[0]), len(sample[2])) if self.pairs else len(sample[0])


def fail(path: PathLike, problems: list[str]) -> DataError:
    """One DataError for a file: its first problem, and how many more there are."""
    more = len(problems) - 1
    suffix = f" (and {more} more problem{'s' if more > 1 else ''} in this file)" if more else ""
    return DataError(f"{path}: {problems[0]}{suffix}")


# --- reading ------------------------------------------------------------------------------------
def read_records(path: PathLike) -> list[tuple[int, dict]]:
    """The records of a JSON-array or JSON-lines file, each with the line it starts on.

    A file whose first non-whitespace character is `[` is one JSON array; otherwise each non-blank
    line is one JSON object. A UTF-8 byte-order mark is allowed (Windows editors write one).

    Args:
        path: the data file.

    Returns:
        (line number, record) pairs, line numbers counting from 1.

    Raises:
        DataError: the file is missing, empty, not UTF-8, not valid JSON, or holds a non-object record.
    """
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        raise DataError(f"{path}: file not found; check the path") from None
    except IsADirectoryError:
        raise DataError(f"{path}: is a folder; give the path of a .json or .jsonl file") from None
    except OSError as e:
        raise DataError(f"{path}: cannot be read ({e.strerror}); check its permissions") from None
    if data.startswith(codecs.BOM_UTF8):
        data = data[len(codecs.BOM_UTF8):]
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise DataError(f"{path}: line {line}: not UTF-8 text; re-save the file as UTF-8") from None
    if not text.strip():
        raise DataError(f"{path}: line 1: file is empty; add records as JSON lines or as a JSON array")

    records = _read_array(path, text) if text.lstrip().startswith("[") else _read_lines(path, text)
    problems = [f"line {line}: record is {_json_type(record)}, not an object; make each record "
                f'a JSON object such as {{"conversations": [...]}}'
                for line, record in records if not isinstance(record, dict)]
    if problems:
        raise fail(path, problems)
    if not records:
        raise DataError(f"{path}: line 1: file holds no records; add at least one record")
    return records


def _read_lines(path: PathLike, text: str) -> list[tuple[int, Any]]:
    records, problems = [], []
    # split("\n"), not splitlines(): JSON strings may hold U+2028, which splitlines() would cut at.
    for number, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            records.append((number, json.loads(line)))
        except json.JSONDecodeError as e:
            problems.append(f"line {number}: invalid JSON ({e.msg} at column {e.colno}); each line must "
                            "hold one complete JSON object (or make the whole file one JSON array)")
    if problems:
        raise fail(path, problems)
    return records


def _read_array(path: PathLike, text: str) -> list[tuple[int, Any]]:
    # Walk the array one element at a time so that each record keeps the line it starts on.
    decoder, records = json.JSONDecoder(), []
    line, counted = 1, 0  # newlines counted in text[:counted]

    def line_at(pos: int) -> int:
        nonlocal line, counted
        line += text.count("\n", counted, pos)
        counted = pos
        return line

    def invalid(pos: int, what: str) -> DataError:
        return DataError(f"{path}: line {line_at(pos)}: invalid JSON ({what}); fix the JSON syntax")

    pos = _WHITESPACE.match(text).end() + 1  # just past "["
    pos = _WHITESPACE.match(text, pos).end()
    if text.startswith("]", pos):
        pos += 1
    else:
        while True:
            try:
                record, end = decoder.raw_decode(text, pos)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}: line {e.lineno}: invalid JSON ({e.msg} at column {e.colno}); "
                                "fix the JSON syntax") from None
            records.append((line_at(pos), record))
            pos = _WHITESPACE.match(text, end).end()
            if text.startswith(",", pos):
                pos = _WHITESPACE.match(text, pos + 1).end()
            elif text.startswith("]", pos):
                pos += 1
                break
            else:
                raise invalid(pos, f"expected ',' or ']' after the record on line {records[-1][0]}")
    pos = _WHITESPACE.match(text, pos).end()
    if pos < len(text):
        raise invalid(pos, "text after the array's closing ']'")
    return records


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    return {str: "a string", list: "a list", dict: "an object"}.get(type(value), "a number")


# --- formats ------------------------------------------------------------------------------------
def detect_format(record: dict) -> str:
    """The format of one record, from its keys.

    Args:
        record: one JSON object from a data file.

    Returns:
        One of FORMATS: "conversations" when its `conversations` items have `role`, "sharegpt" when
        they have `from`, "alpaca" with `instruction` and `output`, "advertisegen" with `content`
        and `summary`.

    Raises:
        DataError: (without file and line) the keys match no format.
    """
    items = record.get("conversations")
    if isinstance(items, list):
        if any(isinstance(item, dict) and "role" in item for item in items):
            return "conversations"
        if any(isinstance(item, dict) and "from" in item for item in items):
            return "sharegpt"
    if "instruction" in record and "output" in record:
        return "alpaca"
    if "content" in record and "summary" in record:
        return "advertisegen"
    keys = ", ".join(repr(key) for key in record) or "none"
    raise DataError(f"record matches no known format (its keys: {keys}); expected conversations "
                    "(conversations of role/content), alpaca (instruction, output), advertisegen "
                    "(content, summary) or sharegpt (conversations of from/value)")


def _get(obj: dict, key: str, kind: type, where: str = "", required: bool = True) -> Any:
    """obj[key], checked to be a `kind`; None when absent and not required."""
    if key not in obj:
        if required:
            raise DataError(f"{where}field {key!r} is missing; add it ({_json_type(kind())})")
        return None
    value = obj[key]
    if not isinstance(value, kind):
        raise DataError(f"{where}field {key!r} is {_json_type(value)}; expected {_json_type(kind())}")
    return value


def _messages_list(record: dict) -> list:
    items = _get(record, "conversations", list)
    if not items:
        raise DataError("field 'conversations' is empty; give at least one message")
    for i, item in enumerate(items, start=1):
        if not isinstance(item, dict):
            raise DataError(f"message {i} is {_json_type(item)}; make each message a JSON object")
    return items


def _with_tools(messages: list[dict], tools: list, where: str) -> list[dict]:
    """Put tools on the leading system message, adding one with content None if needed (the model
    family's tokenizer then writes its own tool prompt there)."""
    if not tools:
        return messages
    if messages and messages[0]["role"] == "system":
        if messages[0].get("tools"):
            raise DataError(f"field {where!r} and message 1 both give tools; keep one of them")
        messages[0]["tools"] = tools
    else:
        messages.insert(0, {"role": "system", "content": None, "tools": tools})
    return messages


def _from_conversations(record: dict) -> list[dict]:
    messages = []
    for i, item in enumerate(_messages_list(record), start=1):
        where = f"message {i}: "
        role = _get(item, "role", str, where)
        if role not in ROLES:
            raise DataError(f"message {i} has role {role!r}; expected one of {', '.join(ROLES)}")
        message = {"role": role, "content": _get(item, "content", str, where)}
        metadata = _get(item, "metadata", str, where, required=False)
        if metadata is not None:
            message["metadata"] = metadata
        tools = _get(item, "tools", list, where, required=False)
        if tools:
            # The tokenizer renders tools only on system messages; elsewhere they would vanish.
            if role != "system":
                raise DataError(f"message {i} has role {role!r} and field 'tools'; only a system "
                                "message may carry tools, or give them as a top-level 'tools' list")
            message["tools"] = tools
        messages.append(message)
    return _with_tools(messages, _get(record, "tools", list, required=False), "tools")


def _from_alpaca(record: dict) -> list[dict]:
    messages = []
    system = _get(record, "system", str, required=False)
    if system:
        messages.append({"role": "system", "content": system})
    for i, pair in enumerate(_get(record, "history", list, required=False) or [], start=1):
        if not (isinstance(pair, list) and len(pair) == 2 and all(isinstance(s, str) for s in pair)):
            raise DataError(f"field 'history' item {i} is not a [query, answer] pair of strings; "
                            'write it as ["question", "answer"]')
        messages += [{"role": "user", "content": pair[0]}, {"role": "assistant", "content": pair[1]}]
    instruction = _get(record, "instruction", str)
    extra = _get(record, "input", str, required=False)
    query = f"{instruction}\n{extra}" if extra else instruction
    return messages + [{"role": "user", "content": query},
                       {"role": "assistant", "content": _get(record, "output", str)}]


def _from_advertisegen(record: dict) -> list[dict]:
    return [{"role": "user", "content": _get(record, "content", str)},
            {"role": "assistant", "content": _get(record, "summary", str)}]


def _tool_call(value: str, i: int) -> dict:
    """A ShareGPT function_call value as ChatGLM3's assistant tool-call message."""
    fix = 'write it as {"name": "...", "arguments": {...}}'
    try:
        call = json.loads(value)
    except json.JSONDecodeError as e:
        raise DataError(f"message {i} (function_call) value is not valid JSON ({e.msg}); {fix}") from None
    if not isinstance(call, dict) or not isinstance(call.get("name"), str) or not call["name"]:
        raise DataError(f"message {i} (function_call) value has no 'name'; {fix}")
    arguments = call.get("arguments", {})
    if isinstance(arguments, str):  # some exports encode the arguments twice
        try:
            arguments = json.loads(arguments)
        except json.JSONDecodeError as e:
            raise DataError(f"message {i} (function_call) 'arguments' is not valid JSON ({e.msg}); "
                            f"{fix}") from None
    if not isinstance(arguments, dict):
        raise DataError(f"message {i} (function_call) 'arguments' is {_json_type(arguments)}; {fix}")
    args = ", ".join(f"{key}={value!r}" for key, value in arguments.items())
    return {"role": "assistant", "metadata": call["name"], "content": f"```python\ntool_call({args})\n```"}


def _from_sharegpt(record: dict) -> list[dict]:
    messages = []
    system = _get(record, "system", str, required=False)
    if system:
        messages.append({"role": "system", "content": system})
    for i, item in enumerate(_messages_list(record), start=1):
        where = f"message {i}: "
        source = _get(item, "from", str, where)
        if source not in SHAREGPT_ROLES:
            raise DataError(f"message {i} has from {source!r}; expected one of {', '.join(SHAREGPT_ROLES)}")
        value = _get(item, "value", str, where)
        if source == "function_call":
            messages.append(_tool_call(value, i))
        else:
            messages.append({"role": SHAREGPT_ROLES[source], "content": value})
    # ShareGPT stores tools as a JSON string ("" or "[]" for none); a decoded list is accepted too.
    tools = record.get("tools")
    if isinstance(tools, str):
        try:
            tools = json.loads(tools) if tools.strip() else None
        except json.JSONDecodeError as e:
            raise DataError(f"field 'tools' is not valid JSON ({e.msg} at column {e.colno}); "
                            "give a JSON string holding a list of tools") from None
    if tools is not None and not isinstance(tools, list):
        raise DataError(f"field 'tools' holds {_json_type(tools)}; give a JSON string holding a list of tools")
    return _with_tools(messages, tools or [], "tools")


_CONVERTERS = {"conversations": _from_conversations, "alpaca": _from_alpaca,
               "advertisegen": _from_advertisegen, "sharegpt": _from_sharegpt}


def _check_format(fmt: str) -> None:
    if fmt != "auto" and fmt not in FORMATS:
        raise DataError(f"data format {fmt!r} is unknown; expected one of auto, {', '.join(FORMATS)}")


def to_messages(record: dict, fmt: str) -> list[dict]:
    """One record as ChatGLM3 messages.

    A conversation without an assistant turn is returned as it is; `encode_dataset` drops it for
    having no loss tokens.

    Args:
        record: one JSON object from a data file.
        fmt: one of FORMATS, or "auto" to detect it from this record.

    Returns:
        Messages `{"role", "content"}`, optional `"metadata"`, and `"tools"` (a list) on a system
        message, ready for `ChatGLM3Tokenizer.encode_conversation`.

    Raises:
        DataError: (without file and line) a field is missing, has the wrong type or an unknown role,
            or the conversation is empty. The message names the field and the fix.
    """
    _check_format(fmt)
    return _CONVERTERS[detect_format(record) if fmt == "auto" else fmt](record)


# --- tokenising ---------------------------------------------------------------------------------
def read_conversations(path: PathLike, fmt: str = "auto") -> tuple[list[tuple[int, list[dict]]], str, int]:
    """The records of a data file as ChatGLM3 messages, each with the line it starts on; every record is
    validated before any is returned (one format per file, detected from the first record with "auto").

    Returns:
        ((line, messages) per record, the format, how many records the file holds).

    Raises:
        DataError: one line naming the file, the first problem's line, field and fix, and how many more.
    """
    _check_format(fmt)
    records = read_records(path)
    if fmt == "auto":
        first_line, first = records[0]
        try:
            fmt = detect_format(first)
        except DataError as e:
            raise DataError(f"{path}: line {first_line}: {e}") from None
        origin = f"detected from line {first_line}"
    else:
        origin = "as configured"
    conversations, problems = [], []
    for line, record in records:
        try:
            found = detect_format(record)
        except DataError:
            found = fmt  # not recognisable: let the converter name the missing or wrong field
        try:
            if found != fmt:
                raise DataError(f"record is in {found} format but the file is {fmt} ({origin}); "
                                "use one format per file")
            conversations.append((line, _CONVERTERS[fmt](record)))
        except DataError as e:
            problems.append(f"line {line}: {e}")
    if problems:
        raise fail(path, problems)
    return conversations, fmt, len(records)


def encode_dataset(
    path: PathLike, tokenizer, fmt: str = "auto", max_input_length: int = 256, max_output_length: int = 512
) -> EncodedData:
    """Read, validate and tokenise a data file.

    Every record is validated before any is tokenised, so a bad file fails fast and reports all
    its problems at once. The default lengths are the official ChatGLM3 demo's (configs/lora.yaml).

    Args:
        path: a JSON-array or JSON-lines file.
        tokenizer: the model family's tokenizer (anything with `encode_conversation`).
        fmt: one of FORMATS, or "auto" to detect it from the first record (all must then match).
        max_input_length: as the official demo; samples keep max_input + max_output + 1 tokens.
        max_output_length: see max_input_length.

    Returns:
        The samples and the counts of records, truncated and dropped samples.

    Raises:
        DataError: one line naming the file, the first problem's line, field and fix, and how many
            more problems the file has.
    """
    conversations, fmt, count = read_conversations(path, fmt)
    limit = max_input_length + max_output_length + 1
    samples, truncated, dropped = [], 0, 0
    for line, messages in conversations:
        # Encode untruncated (the tokenizer cuts at max_input + max_output + 1) to count the cuts.
        try:
            input_ids, labels = tokenizer.encode_conversation(messages, sys.maxsize, 0)
        except ValueError as e:  # what the model's chat template cannot render (a role, tools, a tool call)
            raise DataError(f"{path}: line {line}: {e}") from None
        if len(input_ids) > limit:
            truncated += 1
            input_ids, labels = input_ids[:limit], labels[:limit]
        if all(label == IGNORE_INDEX for label in labels):
            dropped += 1
            continue
        samples.append((input_ids, labels))
    logger.info("%s: %d %s records, %d samples; %d truncated to %d tokens, %d dropped (no assistant "
                "tokens left)", path, count, fmt, len(samples), truncated, limit, dropped)
    return EncodedData(samples=samples, format=fmt, records=count, truncated=truncated, dropped=dropped)


# --- batching -----------------------------------------------------------------------------------
def collate(samples: list[tuple[list[int], list[int]]], pad_id: int) -> dict[str, np.ndarray]:
    """A right-padded batch.

    Right padding (unlike the tokenizer's left padding for generation) keeps every sample's
    positions starting at 0, as in training without padding.

    Args:
        samples: (input_ids, labels) pairs.
        pad_id: the id padding input_ids (the tokenizer's pad_token_id).

    Returns:
        int64 arrays of shape [batch, longest]: `input_ids` (pad_id at padding), `labels` (-100 at
        padding) and `attention_mask` (1 on tokens, 0 at padding).
    """
    if not samples:
        raise ValueError("collate needs at least one sample")
    import numpy as np

    longest = max(len(ids) for ids, _ in samples)
    input_ids = np.full((len(samples), longest), pad_id, dtype=np.int64)
    labels = np.full((len(samples), longest), IGNORE_INDEX, dtype=np.int64)
    attention_mask = np.zeros((len(samples), longest), dtype=np.int64)
    for row, (ids, sample_labels) in enumerate(samples):
        input_ids[row, :len(ids)] = ids
        labels[row, :len(sample_labels)] = sample_labels
        attention_mask[row, :len(ids)] = 1
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}


def collate_packed(rows: list[list[tuple[list[int], list[int]]]], pad_id: int) -> dict[str, np.ndarray]:
    """A batch of packed rows: each row's samples end to end, right-padded to the longest row.

    Every sample keeps its own positions (from 0) and its first label is -100: alone, nothing predicts a
    sample's first token, and in a row the previous sample's last token must not. `cu_seq_lens` cuts the
    rows, laid end to end, into their samples and each row's padding (a sample of its own), as
    `Kernels.packed_attention` takes them; the models then attend within samples only.

    Args:
        rows: per row, its (input_ids, labels) samples.
        pad_id: the id padding input_ids.

    Returns:
        int64 arrays [rows, longest]: `input_ids`, `labels`, `attention_mask` (1 on tokens, 0 at padding: for
        counting, the models do not read it here) and `position_ids`; and `cu_seq_lens`, int32 [pieces + 1].
    """
    import numpy as np

    longest = max(sum(len(ids) for ids, _ in row) for row in rows)
    batch = collate([(sum((ids for ids, _ in row), []), sum(([IGNORE_INDEX] + labels[1:] for _, labels in row), []))
                     for row in rows], pad_id)
    positions = np.zeros_like(batch["input_ids"])
    cuts = [0]
    for r, row in enumerate(rows):
        start = r * longest
        for ids, _ in row:
            positions[r, cuts[-1] - start: cuts[-1] - start + len(ids)] = np.arange(len(ids))
            cuts.append(cuts[-1] + len(ids))
        if cuts[-1] < start + longest:  # the row's padding
            positions[r, cuts[-1] - start:] = np.arange(start + longest - cuts[-1])
            cuts.append(start + longest)
    return {**batch, "position_ids": positions, "cu_seq_lens": np.asarray(cuts, dtype=np.int32)}


def pack(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """First-fit decreasing: the indices of `lengths` in rows of at most `capacity` tokens, each sample, longest
    first (ties in their given order), in the first row with room for it.

    Raises:
        ValueError: a sample is longer than `capacity`.
    """
    rows: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        if lengths[i] > capacity:
            raise ValueError(f"a sample of {lengths[i]} tokens does not fit in a packed row of {capacity}")
        row = next((r for r, free in enumerate(room) if lengths[i] <= free), None)
        if row is None:
            rows.append([])
            room.append(capacity)
            row = len(rows) - 1
        rows[row].append(i)
        room[row] -= lengths[i]
    return rows


def packed_rows(num_samples: int, seed: int, epoch: int, lengths: Sequence[int], capacity: int,
                window: int) -> list[list[int]]:
    """The packed rows of one epoch, fixed by (seed, epoch) and the lengths alone: the shuffled samples are
    taken `window` at a time and packed (`pack`), and the rows are shuffled.

    Returns:
        Per row, the indices of its samples.
    """
    import numpy as np

    rng = np.random.default_rng([seed, epoch])
    order = rng.permutation(num_samples)
    lengths = np.asarray(lengths)
    rows = [[int(chunk[i]) for i in row] for chunk in np.split(order, range(window, num_samples, window))
            for row in pack(lengths[chunk].tolist(), capacity)]
    return [rows[i] for i in rng.permutation(len(rows))]


GROUP_WINDOW = 32  # batches whose samples are sorted by length together


def epoch_order(num_samples: int, seed: int, epoch: int, lengths: Optional[Sequence[int]] = None,
                batch: int = 1) -> np.ndarray:
    """The order of samples in one epoch: a permutation fixed by (seed, epoch) and the lengths alone.

    Depending on nothing else (no global RNG state) lets a resumed run replay the same order. With
    `lengths`, the order groups samples of similar length into batches, to cut padding: the shuffled
    samples are taken `GROUP_WINDOW` batches at a time and sorted by length, cut into batches of `batch`,
    and the batches are shuffled (a last, partial batch stays last, so the others keep their places).

    Args:
        num_samples: how many samples to order.
        seed: the run's seed (non-negative).
        epoch: the epoch number (non-negative).
        lengths: each sample's length, to group by; None for a plain shuffle.
        batch: samples per batch (all processes together), for grouping.

    Returns:
        A permutation of range(num_samples), int64.
    """
    import numpy as np

    rng = np.random.default_rng([seed, epoch])
    order = rng.permutation(num_samples)
    if lengths is None or batch <= 1 or num_samples <= batch:
        return order
    lengths = np.asarray(lengths)
    window = batch * GROUP_WINDOW
    grouped = np.concatenate([chunk[np.argsort(-lengths[chunk], kind="stable")]
                              for chunk in np.split(order, range(window, num_samples, window))])
    full = num_samples // batch * batch
    batches = grouped[:full].reshape(-1, batch)[rng.permutation(full // batch)]
    return np.concatenate((batches.reshape(-1), grouped[full:]))


def file_sha256(path: PathLike) -> str:
    """The SHA-256 of a file's bytes, in hex, for run records.

    Args:
        path: the file.

    Returns:
        64 lowercase hex digits.
    """
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
