"""The tokenizer against golden cases made with the official tokenization_chatglm.py and the official
fine-tuning demo's process_batch (tests/golden/chatglm3/tokenizer_cases.json). Exact equality."""

import json

import pytest

from tuneport.models.chatglm3 import load_tokenizer


@pytest.fixture(scope="module")
def tok(golden):
    return load_tokenizer(golden / "checkpoint")


@pytest.fixture(scope="module")
def tc(golden):
    return json.loads((golden / "tokenizer_cases.json").read_text(encoding="utf-8"))


def test_special_tokens(tok, tc):
    assert {t: tok.get_command(t) for t in tc["special_tokens"]} == tc["special_tokens"]
    assert {t: tok.convert_tokens_to_ids(t) for t in tc["special_tokens"]} == tc["special_tokens"]
    assert tok.eos_token_id == tc["eos_token_id"] and tok.pad_token_id == tc["pad_token_id"]
    assert tok.padding_side == "left"
    assert len(tok) == tok.vocab_size == 64798


def test_encode(tok, tc):
    for case in tc["encode"]:
        assert tok.encode(case["text"], add_special_tokens=False) == case["ids"], case["text"]
        assert tok.tokenize(case["text"]) == case["tokens"], case["text"]
        assert tok.encode(case["text"]) == case["ids_with_prefix"], case["text"]
        assert tok(case["text"])["input_ids"] == case["ids_with_prefix"], case["text"]


def test_decode(tok, tc):
    for case in tc["decode"]:
        assert tok.decode(case["ids"]) == case["text"], case["ids"]


def test_special_ids_decode_to_their_names(tok):
    ids = tok.build_chat_input("你好")["input_ids"][0].tolist()
    # SentencePiece drops the dummy-prefix space at the start of each run of ordinary pieces.
    assert tok.decode(ids) == "[gMASK]sop<|user|>\n 你好<|assistant|>"
    assert tok.decode(ids + [2], skip_special_tokens=True) == "\n 你好"


def test_build_chat_input(tok, tc):
    for case in tc["chat"]:
        inputs = tok.build_chat_input(case["query"], history=case["history"], role=case["role"])
        assert inputs["input_ids"].tolist() == [case["input_ids"]]
        assert inputs["attention_mask"].tolist() == [[1] * len(case["input_ids"])]


def test_encode_conversation_matches_official_finetune_masks(tok, tc):
    for case in tc["finetune"]:
        ids, labels = tok.encode_conversation(case["conversations"], case["max_input_length"],
                                              case["max_output_length"])
        assert ids == case["input_ids"]
        assert labels == case["labels"]


def test_batch_padding_is_left(tok):
    batch = tok(["你好", "Hello, world!"], padding=True, return_tensors="pt")
    assert batch["input_ids"][0, :2].tolist() == [0, 0]
    assert batch["attention_mask"][0].tolist() == [0, 0, 1, 1, 1, 1]


def test_save_and_reload(tok, tmp_path):
    tok.save_pretrained(tmp_path)
    again = load_tokenizer(tmp_path)
    assert again.encode("你好, world") == tok.encode("你好, world")


def test_ids_beyond_the_vocabulary_decode_to_nothing(tok):
    # The model's padded vocabulary (65024) is larger than the tokenizer's (64798).
    assert tok.decode([36474, 65000, 54591]) == "你好"
