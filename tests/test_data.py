"""core/data.py on the real datasets (tests/data) with the real ChatGLM3 tokenizer (golden checkpoint).

Expected messages are written out by hand in the official ChatGLM3 message format (THUDM/ChatGLM3
finetune_demo/README.md; tool calls as its tool-using demo writes them) and tokenised with
`encode_conversation`, which test_tokenizer.py checks against the official process_batch.
"""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest

from tuneport.core.data import (
    DataError,
    collate,
    detect_format,
    encode_dataset,
    epoch_order,
    file_sha256,
    read_records,
    to_messages,
)
from tuneport.models.chatglm3 import load_tokenizer

TOOLS_PROMPT = "Answer the following questions as best as you can. You have access to the following tools:"
LIMITS = {"max_input_length": 2048, "max_output_length": 2048}  # nothing in the datasets is cut


@pytest.fixture(scope="module")
def tok(golden):
    return load_tokenizer(golden / "checkpoint")


def expected(tok, messages):
    return tok.encode_conversation(messages, LIMITS["max_input_length"], LIMITS["max_output_length"])


# --- the four formats on their datasets ---------------------------------------------------
def test_advertisegen(tok, datasets):
    data = encode_dataset(datasets / "advertisegen/train.json", tok, **LIMITS)
    assert (data.format, data.records, len(data.samples), data.truncated, data.dropped) == (
        "advertisegen", 200, 200, 0, 0)
    # Record 1: content -> user, summary -> assistant, as the official demo.
    assert data.samples[0] == expected(tok, [
        {"role": "user", "content": "类型#裤*版型#宽松*风格#性感*图案#线条*裤型#阔腿裤"},
        {"role": "assistant", "content": "宽松的阔腿裤这两年真的吸粉不少，明星时尚达人的心头爱。毕竟好穿时尚，谁都能穿出腿长2米"
         "的效果宽松的裤腿，当然是遮肉小能手啊。上身随性自然不拘束，面料亲肤舒适贴身体验感棒棒哒。系带部分增加设计看点，还让"
         "单品的设计感更强。腿部线条若隐若现的，性感撩人。颜色敲温柔的，与裤子本身所呈现的风格有点反差萌。"},
    ])


def test_conversations(tok, datasets):
    data = encode_dataset(datasets / "cognition/train.json", tok, **LIMITS)
    assert (data.format, data.records, len(data.samples)) == ("conversations", 71, 71)
    assert data.samples[0] == expected(tok, [
        {"role": "user", "content": "你好"},
        {"role": "assistant", "content": "您好，我是 大熊喵 Raginhart 开发的 AI 助手，很高兴认识您。请问我能为您做些什么？"},
    ])


def test_alpaca(tok, datasets):
    data = encode_dataset(datasets / "alpaca_zh/train.json", tok, **LIMITS)
    assert (data.format, data.records, len(data.samples)) == ("alpaca", 1000, 1000)
    # Record 609 has an empty input (user content is the instruction), record 665 has one.
    assert data.samples[608] == expected(tok, [
        {"role": "user", "content": "回应：“早上好！”"}, {"role": "assistant", "content": "早上好！"}])
    assert data.samples[664] == expected(tok, [
        {"role": "user", "content": "将以下罗马数字转换为阿拉伯数字。\n输入：XIV"},
        {"role": "assistant", "content": "输出：14"}])


def test_alpaca_system_and_history():
    record = {"system": "简洁回答。", "history": [["1+1?", "2"]], "instruction": "2+2?", "input": "", "output": "4"}
    assert to_messages(record, "alpaca") == [
        {"role": "system", "content": "简洁回答。"},
        {"role": "user", "content": "1+1?"}, {"role": "assistant", "content": "2"},
        {"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"},
    ]


def test_sharegpt_tool_calls(tok, datasets):
    data = encode_dataset(datasets / "glaive_toolcall_zh/train.json", tok, **LIMITS)
    assert (data.format, data.records, len(data.samples), data.dropped) == ("sharegpt", 300, 300, 0)
    tools = [{"name": "calculate_age", "description": "根据出生日期计算年龄", "parameters": {
        "type": "object", "properties": {"birthdate": {"type": "string", "description": "出生日期以YYYY-MM-DD格式表示"}},
        "required": ["birthdate"]}}]
    assert data.samples[3] == expected(tok, [
        {"role": "system", "content": TOOLS_PROMPT, "tools": tools},
        {"role": "user", "content": "你好，我出生于1990年5月15日。你能告诉我我今天几岁了吗？"},
        {"role": "assistant", "metadata": "calculate_age",
         "content": "```python\ntool_call(birthdate='1990-05-15')\n```"},
        {"role": "observation", "content": '{"age": 31}'},
        {"role": "assistant", "content": "根据我的计算，你今天31岁了。"},
    ])


def test_tool_call_message_text(datasets):
    line, record = read_records(datasets / "glaive_toolcall_zh/train.json")[0]
    assert line == 2 and detect_format(record) == "sharegpt"
    call = to_messages(record, "sharegpt")[2]
    assert call == {
        "role": "assistant", "metadata": "generate_invoice",
        "content": "```python\ntool_call(customer_name='约翰·多伊', items=[{'name': '苹果', 'quantity': 2, 'price': 1}, "
                   "{'name': '香蕉', 'quantity': 3, 'price': 0.5}])\n```",
    }
    # Arguments encoded as a JSON string of their own decode the same way.
    twice = {"conversations": [{"from": "function_call",
                                "value": json.dumps({"name": "f", "arguments": json.dumps({"x": 1, "y": "a"})})}]}
    assert to_messages(twice, "sharegpt")[0]["content"] == "```python\ntool_call(x=1, y='a')\n```"


def test_conversations_top_level_tools():
    tools = [{"name": "track"}]
    plain = {"conversations": [{"role": "user", "content": "q"}], "tools": tools}
    # Content None: the family's tokenizer supplies its tool prompt (ChatGLM3's TOOLS_PROMPT, as the
    # encoded sample in test_sharegpt_tool_calls shows).
    assert to_messages(plain, "auto")[0] == {"role": "system", "content": None, "tools": tools}
    with_system = {"conversations": [{"role": "system", "content": "s"}, {"role": "user", "content": "q"}],
                   "tools": tools}
    assert to_messages(with_system, "auto") == [{"role": "system", "content": "s", "tools": tools},
                                                {"role": "user", "content": "q"}]


# --- truncation and dropping ---------------------------------------------------------------------
def test_truncated_and_dropped(tok, datasets, tmp_path):
    data = encode_dataset(datasets / "advertisegen/train.json", tok, max_input_length=8, max_output_length=6)
    # Every prompt is longer than 15 tokens, so every sample is cut before its reply and dropped.
    assert (data.records, data.truncated, data.dropped, data.samples) == (200, 200, 200, [])

    path = tmp_path / "train.jsonl"
    path.write_text('{"conversations": [{"role": "user", "content": "你好"}]}\n\n'
                    '{"conversations": [{"role": "user", "content": "你好"}, {"role": "assistant", "content": "好"}]}\n',
                    encoding="utf-8")
    data = encode_dataset(path, tok, max_input_length=64, max_output_length=64)
    assert (data.records, data.truncated, data.dropped, len(data.samples)) == (2, 0, 1, 1)
    ids, labels = data.samples[0]
    assert len(ids) == len(labels) and any(label != -100 for label in labels)


# --- errors: one line naming the file and the line ---------------------------------------------------
ARRAY_BAD_THIRD = """[
  {"content": "a",
   "summary": "b"},
  {"content": "c",
   "summary": "d"},

  {"content": "e",
   "summary": 5}
]
"""

BAD_FILES = {
    "invalid_json": (b'{"content": "a", "summary": "b"}\n{"content": "a", "summary": "b"}\n{"content": "a",\n',
                     3, "invalid JSON"),
    "unknown_role": ('{"conversations": [{"role": "user", "content": "q"}]}\n'
                     '{"conversations": [{"role": "user", "content": "q"}, {"role": "bot", "content": "a"}]}\n',
                     2, "message 2 has role 'bot'; expected one of system, user, assistant, observation"),
    "missing_field": ('{"instruction": "q", "output": "a"}\n{"instruction": "q", "input": "x"}\n',
                      2, "field 'output' is missing"),
    "empty": (b"", 1, "file is empty"),
    "not_utf8": (b'{"content": "a", "summary": "b"}\n{"content": "\xff\xfe", "summary": "b"}\n',
                 2, "not UTF-8 text; re-save the file as UTF-8"),
    "tools_not_json": ('{"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}], '
                       '"tools": "[{oops"}\n', 1, "field 'tools' is not valid JSON"),
    "function_call_not_json": ('{"conversations": [{"from": "human", "value": "q"}, '
                               '{"from": "function_call", "value": "f(x)"}]}\n',
                               1, "message 2 (function_call) value is not valid JSON"),
    "array_third_record": (ARRAY_BAD_THIRD, 7, "field 'summary' is a number; expected a string"),
    "array_invalid_json": ('[\n  {"content": "a", "summary": "b"}\n  {"content": "c", "summary": "d"}\n]\n',
                           3, "expected ',' or ']' after the record on line 2"),  # json.loads says line 3 too
    "not_an_object": ('{"content": "a", "summary": "b"}\n["a", "b"]\n', 2, "record is a list, not an object"),
    "mixed_formats": ('{"content": "a", "summary": "b"}\n{"instruction": "q", "output": "a"}\n',
                      2, "record is in alpaca format but the file is advertisegen (detected from line 1)"),
    "unknown_format": ('{"prompt": "q", "response": "a"}\n', 1, "record matches no known format (its keys: "
                       "'prompt', 'response')"),
}


@pytest.mark.parametrize("name", BAD_FILES)
def test_errors_name_file_and_line(tok, tmp_path, name):
    content, line, problem = BAD_FILES[name]
    path = tmp_path / f"{name}.json"
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content, encoding="utf-8")
    with pytest.raises(DataError) as info:
        encode_dataset(path, tok)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(f"{path}: line {line}: "), message
    assert problem in message and "; " in message, message


def test_every_problem_is_counted(tok, tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text('{"instruction": "q"}\n{"instruction": 1, "output": "a"}\n{"instruction": "q", "output": "a"}\n'
                    '{"instruction": "q", "output": "a", "history": [["only a query"]]}\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"line 1: .* \(and 2 more problems in this file\)$"):
        encode_dataset(path, tok, fmt="alpaca")


def test_missing_file_and_unknown_format(tok, tmp_path):
    with pytest.raises(DataError, match=r"nothing\.json: file not found; check the path"):
        read_records(tmp_path / "nothing.json")
    with pytest.raises(DataError, match=r"data format 'csv' is unknown; expected one of auto, conversations"):
        encode_dataset(tmp_path / "nothing.json", tok, fmt="csv")


# --- batching -------------------------------------------------------------------------------------
def test_collate_pads_on_the_right():
    samples = [([1, 2, 3], [-100, 2, 3]), ([4], [4]), ([5, 6], [-100, -100])]
    batch = collate(samples, pad_id=0)
    assert {key: value.dtype for key, value in batch.items()} == dict.fromkeys(
        ("input_ids", "labels", "attention_mask"), np.int64)
    assert batch["input_ids"].tolist() == [[1, 2, 3], [4, 0, 0], [5, 6, 0]]
    assert batch["labels"].tolist() == [[-100, 2, 3], [4, -100, -100], [-100, -100, -100]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0], [1, 1, 0]]


def test_collate_keeps_label_counts(tok, datasets):
    samples = encode_dataset(datasets / "cognition/train.json", tok, **LIMITS).samples[:8]
    batch = collate(samples, pad_id=tok.pad_token_id)
    assert batch["input_ids"].shape == (8, max(len(ids) for ids, _ in samples))
    assert (batch["labels"] != -100).sum(axis=1).tolist() == [sum(l != -100 for l in labels) for _, labels in samples]
    assert batch["attention_mask"].sum(axis=1).tolist() == [len(ids) for ids, _ in samples]


def test_epoch_order_is_deterministic():
    first = epoch_order(100, seed=42, epoch=0)
    assert sorted(first.tolist()) == list(range(100))
    assert np.array_equal(first, epoch_order(100, seed=42, epoch=0))
    assert not np.array_equal(first, epoch_order(100, seed=42, epoch=1))
    assert not np.array_equal(first, epoch_order(100, seed=7, epoch=0))


def test_file_sha256(tmp_path):
    path = tmp_path / "abc.txt"
    path.write_bytes(b"abc")
    # FIPS 180-2's test vector for "abc".
    assert file_sha256(path) == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    assert file_sha256(path) == hashlib.sha256(b"abc").hexdigest()


@pytest.mark.parametrize("num_samples, batch", [(100, 4), (103, 4), (1000, 8), (5, 8)])
def test_length_grouping_orders_every_sample_once_and_cuts_padding(num_samples, batch):
    lengths = np.random.default_rng(0).integers(10, 500, num_samples)
    grouped = epoch_order(num_samples, seed=42, epoch=3, lengths=lengths, batch=batch)
    assert sorted(grouped.tolist()) == list(range(num_samples))  # each sample exactly once in the epoch
    assert np.array_equal(grouped, epoch_order(num_samples, seed=42, epoch=3, lengths=lengths, batch=batch))
    assert not np.array_equal(grouped, epoch_order(num_samples, seed=42, epoch=4, lengths=lengths, batch=batch))

    def padding(order):  # padded positions when batches are cut from the order
        full = len(order) // batch * batch
        rows = lengths[order[:full]].reshape(-1, batch)
        return int((rows.max(axis=1, keepdims=True) - rows).sum())

    plain = epoch_order(num_samples, seed=42, epoch=3)
    if num_samples > batch:
        assert padding(grouped) < padding(plain) / 3
    else:
        assert np.array_equal(grouped, plain)
