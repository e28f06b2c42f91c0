"""Batched greedy generation with a torch model: what `tuneport eval` and the runtime's evaluation replies use."""

from __future__ import annotations

from typing import Sequence

import torch
from tqdm import tqdm


def generate_replies(model, prompts: Sequence[Sequence[int]], stop_ids: Sequence[int], pad_id: int,
                     max_new_tokens: int, batch_size: int = 8, progress: bool = False) -> list[list[int]]:
    """Greedy replies to `prompts`, generated `batch_size` at a time with left padding.

    Prompts are batched longest first (less padding); each row's attention mask is 0 at its padding.
    ChatGLM3 does not shift positions for padding (as the official model), which leaves the replies
    unchanged: its rotary embedding depends on distances between tokens only.

    Args:
        model: a torch causal LM with transformers' `generate` (a base model or a peft model).
        prompts: token ids of each prompt.
        stop_ids: generation ends at any of these (not included in the reply).
        pad_id: the id left padding uses.
        max_new_tokens: the longest reply.
        batch_size: prompts per batch.
        progress: show a progress bar on stderr.

    Returns:
        The reply ids for each prompt, in the order of `prompts`.
    """
    if getattr(getattr(model, "active_peft_config", None), "is_prompt_learning", False):
        batch_size = 1  # peft puts its virtual tokens before the left padding: replies would depend on the batch
    device = next(model.parameters()).device
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    replies: list[list[int]] = [[] for _ in prompts]
    stops = set(stop_ids)
    bar = tqdm(total=len(prompts), desc="eval", unit="sample", disable=not progress)
    for first in range(0, len(order), batch_size):
        rows = order[first:first + batch_size]
        width = max(len(prompts[i]) for i in rows)
        input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
        for row, i in enumerate(rows):
            input_ids[row, width - len(prompts[i]):] = torch.tensor(prompts[i], dtype=torch.long)
            attention_mask[row, width - len(prompts[i]):] = 1
        with torch.no_grad():
            out = model.generate(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device),
                                 do_sample=False, num_beams=1, max_new_tokens=max_new_tokens,
                                 eos_token_id=list(stop_ids), pad_token_id=pad_id)
        for row, i in enumerate(rows):
            new = out[row, width:].tolist()
            replies[i] = new[:next((k for k, token in enumerate(new) if token in stops), len(new))]
        bar.update(len(rows))
    bar.close()
    return replies
