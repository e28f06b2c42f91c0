"""The ChatGLM3 tokenizer: SentencePiece plus nine special tokens, and the chat and fine-tuning formats.

Matches `tokenization_chatglm.py` of THUDM/chatglm3-6b and the official fine-tuning demo
(`finetune_demo/finetune_hf.py`, `process_batch`). Special tokens are appended after the SentencePiece
vocabulary and are never produced from plain text: "<|user|>" typed by a user is just text.
"""

from __future__ import annotations

import json
import os
from typing import Optional

import sentencepiece as spm
from transformers import BatchEncoding, PreTrainedTokenizer

SPECIAL_TOKENS = (
    "[MASK]", "[gMASK]", "[sMASK]", "sop", "eop", "<|system|>", "<|user|>", "<|assistant|>", "<|observation|>",
)
ROLES = ("system", "user", "assistant", "observation")


# The system prompt ChatGLM3's own tool demos put before the tool list.
TOOLS_PROMPT = "Answer the following questions as best as you can. You have access to the following tools:"

class ChatGLM3Tokenizer(PreTrainedTokenizer):
    """SentencePiece `tokenizer.model` with ChatGLM3's special tokens; pads on the left by default."""

    vocab_files_names = {"vocab_file": "tokenizer.model"}
    model_input_names = ["input_ids", "attention_mask"]

    def __init__(self, vocab_file: str, padding_side: str = "left", **kwargs):
        self.vocab_file = vocab_file
        self.sp = spm.SentencePieceProcessor(model_file=vocab_file)
        base = self.sp.vocab_size()
        self.special_ids = {token: base + i for i, token in enumerate(SPECIAL_TOKENS)}
        self.special_tokens_by_id = {i: token for token, i in self.special_ids.items()}
        for name in ("eos_token", "pad_token", "unk_token"):
            kwargs.pop(name, None)
        # eos is </s> (2) and pad is <unk> (0), both ordinary SentencePiece pieces.
        super().__init__(padding_side=padding_side, eos_token="</s>", pad_token="<unk>", unk_token="<unk>",
                         clean_up_tokenization_spaces=False, **kwargs)

    # --- vocabulary -------------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return self.sp.vocab_size() + len(SPECIAL_TOKENS)

    def get_vocab(self) -> dict[str, int]:
        vocab = {self.sp.id_to_piece(i): i for i in range(self.sp.vocab_size())}
        vocab.update(self.special_ids)
        return vocab

    def get_command(self, token: str) -> int:
        """The id of a special token such as "<|user|>" or "[gMASK]"."""
        return self.special_ids[token]

    def tokenize(self, text: str, **kwargs) -> list[str]:
        # No added-token splitting: special tokens never come from text (official behaviour).
        return self._tokenize(text)

    def _tokenize(self, text: str, **kwargs) -> list[str]:
        return self.sp.encode(text, out_type=str)

    def _convert_token_to_id(self, token: str) -> int:
        if token in self.special_ids:
            return self.special_ids[token]
        return self.sp.piece_to_id(token)

    def _convert_id_to_token(self, index: int) -> str:
        if index in self.special_tokens_by_id:
            return self.special_tokens_by_id[index]
        return self.sp.id_to_piece(index)

    def convert_tokens_to_string(self, tokens: list[str]) -> str:
        text, pieces = "", []
        for token in tokens:
            if token in self.special_ids:
                text += self.sp.decode_pieces(pieces) + token
                pieces = []
            else:
                pieces.append(token)
        return text + self.sp.decode_pieces(pieces)

    def _decode(self, token_ids, skip_special_tokens: bool = False, **kwargs) -> str:
        if isinstance(token_ids, int):
            token_ids = [token_ids]
        # The model's padded vocabulary is larger than the tokenizer's; an untrained model can emit
        # those ids, and they stand for no text.
        token_ids = [i for i in token_ids if 0 <= i < self.vocab_size]
        if skip_special_tokens:  # role and prompt tokens too, not only eos/pad/unk
            token_ids = [i for i in token_ids if i not in self.special_tokens_by_id]
        return super()._decode(token_ids, skip_special_tokens=skip_special_tokens, **kwargs)

    def save_vocabulary(self, save_directory: str, filename_prefix: Optional[str] = None) -> tuple[str]:
        name = (filename_prefix + "-" if filename_prefix else "") + "tokenizer.model"
        path = os.path.join(save_directory, name)
        with open(path, "wb") as f:
            f.write(self.sp.serialized_model_proto())
        return (path,)

    # --- special tokens and encoding ---------------------------------------------------------------
    def get_prefix_tokens(self) -> list[int]:
        return [self.special_ids["[gMASK]"], self.special_ids["sop"]]

    def build_inputs_with_special_tokens(self, token_ids_0: list[int], token_ids_1: Optional[list[int]] = None):
        ids = self.get_prefix_tokens() + token_ids_0
        if token_ids_1 is not None:
            ids += token_ids_1 + [self.eos_token_id]
        return ids

    def num_special_tokens_to_add(self, pair: bool = False) -> int:
        return 3 if pair else 2

    def create_token_type_ids_from_sequences(self, token_ids_0, token_ids_1=None) -> list[int]:
        return [0] * len(self.build_inputs_with_special_tokens(token_ids_0, token_ids_1))

    def get_special_tokens_mask(self, token_ids_0, token_ids_1=None, already_has_special_tokens=False):
        if already_has_special_tokens:
            return [int(i in self.special_tokens_by_id or i in self.all_special_ids) for i in token_ids_0]
        mask = [1, 1] + [0] * len(token_ids_0)
        return mask + [0] * len(token_ids_1) + [1] if token_ids_1 is not None else mask

    # --- chat format -------------------------------------------------------------------------------
    def build_single_message(self, role: str, metadata: str, message: str) -> list[int]:
        """`<|role|>` + encode(metadata + "\\n") + encode(message)."""
        if role not in ROLES:
            raise ValueError(f"role {role!r} is not one of {', '.join(ROLES)}")
        return [self.special_ids[f"<|{role}|>"]] + self.sp.encode(f"{metadata}\n") + self.sp.encode(message)

    def message_ids(self, message: dict) -> list[int]:
        """Token ids of one message dict (`role`, `content`, optional `metadata` and system `tools`).

        A system message with tools and `content` None gets ChatGLM3's own tool prompt (`TOOLS_PROMPT`)."""
        content = message.get("content", "")
        if message["role"] == "system" and message.get("tools"):
            text = TOOLS_PROMPT if content is None else content
            content = text + "\n" + json.dumps(message["tools"], indent=4, ensure_ascii=False)
        return self.build_single_message(message["role"], message.get("metadata", ""), content)

    def build_chat_input(self, query: str, history: Optional[list[dict]] = None, role: str = "user") -> BatchEncoding:
        """The prompt for the model's next reply, as the official `build_chat_input`.

        Args:
            query: the new message's text.
            history: earlier messages (`role`, `content`, optional `metadata`, and `tools` on a system one).
            role: the new message's role ("user", or "observation" for a tool result).

        Returns:
            A BatchEncoding with `input_ids` and `attention_mask` tensors of shape [1, n], ready for
            `model.generate(**inputs)`: `[gMASK] sop`, the messages, the query, then `<|assistant|>`.
        """
        ids = self.get_prefix_tokens()
        for message in history or []:
            ids += self.message_ids(message)
        ids += self.build_single_message(role, "", query) + [self.special_ids["<|assistant|>"]]
        import torch  # only here: the MindSpore path encodes conversations without torch

        return BatchEncoding(
            {"input_ids": torch.tensor([ids]), "attention_mask": torch.ones(1, len(ids), dtype=torch.long)}
        )

    @property
    def stop_token_ids(self) -> list[int]:
        """Generation ends at any of these: eos, `<|user|>` (turn over) or `<|observation|>` (tool call)."""
        return [self.eos_token_id, self.special_ids["<|user|>"], self.special_ids["<|observation|>"]]

    def encode_conversation(
        self, messages: list[dict], max_input_length: int, max_output_length: int
    ) -> tuple[list[int], list[int]]:
        """Fine-tuning ids and labels for one conversation, as the official demo's `process_batch`.

        System, user and observation tokens get no loss; assistant tokens do; eos is appended; the
        mask is shifted right by one, so `<|assistant|>` itself has no loss but the token that ends
        the reply (the next role token or eos) does. Truncated to max_input + max_output + 1.

        Returns:
            (input_ids, labels), labels -100 where there is no loss.
        """
        ids, loss_mask = self.get_prefix_tokens(), [False, False]
        for message in messages:
            message_ids = self.message_ids(message)
            ids += message_ids
            loss_mask += [message["role"] == "assistant"] * len(message_ids)
        ids.append(self.eos_token_id)
        loss_mask = [False] + loss_mask
        labels = [token if keep else -100 for token, keep in zip(ids, loss_mask)]
        limit = max_input_length + max_output_length + 1
        return ids[:limit], labels[:limit]
