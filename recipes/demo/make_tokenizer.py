"""Train the demo's SentencePiece tokenizer from the demo dataset.

Reads every message of `data.jsonl` (ChatGLM3 conversations format) next to this script and trains a
small BPE SentencePiece model shaped like ChatGLM3's: byte fallback (so any text encodes, "\\n" as
<0x0A>), digits split, pieces 0/1/2 = <unk>/<s>/</s>, no pad piece, and identity normalization without
whitespace folding, so text round-trips exactly. `ChatGLM3Tokenizer` appends its nine special tokens
after this vocabulary. The model is written to `tokenizer.model` next to this script; no `.vocab` file
is written. Training is single-threaded on a fixed input in file order, so two runs give identical bytes.

Usage:
    python recipes/demo/make_tokenizer.py
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import sentencepiece as spm

HERE = Path(__file__).resolve().parent
DATA = HERE / "data.jsonl"
OUTPUT = HERE / "tokenizer.model"
VOCAB_SIZE = 1000


def sentences(path: Path) -> list[str]:
    """Every message content of the dataset, in file order."""
    texts = []
    with path.open(encoding="utf-8") as f:
        for line in f:
            if line.strip():
                texts.extend(message["content"] for message in json.loads(line)["conversations"])
    return texts


def train(data: Path = DATA, output: Path = OUTPUT) -> spm.SentencePieceProcessor:
    """Train the model on `data`, write it to `output` and return it loaded."""
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(sentences(data)),
        model_writer=model,
        model_type="bpe",
        vocab_size=VOCAB_SIZE,
        character_coverage=1.0,
        byte_fallback=True,
        split_digits=True,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        num_threads=1,
        shuffle_input_sentence=False,
        minloglevel=2,
    )
    output.write_bytes(model.getvalue())
    sp = spm.SentencePieceProcessor(model_file=str(output))
    for text in ("a\nb", "你好，tuneport!\n\n  x 2024", "Ω ✓ 🙂"):
        if sp.decode(sp.encode(text)) != text:
            raise RuntimeError(f"{text!r} does not round-trip")
    return sp


if __name__ == "__main__":
    sp = train()
    print(f"wrote {OUTPUT} ({sp.vocab_size()} pieces, {OUTPUT.stat().st_size} bytes)")
