"""Generation metrics as the official ChatGLM3 fine-tuning demo computes them.

THUDM/ChatGLM3 `finetune_demo/finetune_hf.py`, `compute_metrics`: each prediction and its reference are cut
into words by jieba; ROUGE-1/2/L are the F-scores of `rouge_chinese.Rouge` on the words joined by spaces,
and BLEU-4 is nltk's `sentence_bleu` on the word lists with smoothing method 3; each is averaged over
the pairs. The libraries are the `eval` extra (`pip install 'tuneport[eval]'`), imported only when a
metric is computed.
"""

from __future__ import annotations

import logging
from typing import Sequence

from .errors import MissingDependency

ROUGE = ("rouge-1", "rouge-2", "rouge-l")
METRICS = (*ROUGE, "bleu-4")
INSTALL = "pip install 'tuneport[eval]'"


def check_libraries() -> None:
    """Raise MissingDependency now if a library is not installed, without importing any (nltk takes a
    second or two): for commands that check their inputs before a long run."""
    import importlib.util

    missing = [name for module, name in (("jieba", "jieba"), ("rouge_chinese", "rouge-chinese"), ("nltk", "nltk"))
               if importlib.util.find_spec(module) is None]
    if missing:
        raise MissingDependency(f"generation metrics need {', '.join(missing)}: {INSTALL}")


def require_libraries():
    """(jieba, rouge_chinese.Rouge, nltk's sentence_bleu, nltk's SmoothingFunction), imported now."""
    try:
        import jieba
        from nltk.translate.bleu_score import SmoothingFunction, sentence_bleu
        from rouge_chinese import Rouge
    except ImportError as e:
        raise MissingDependency(f"generation metrics need jieba, rouge-chinese and nltk ({e.name or e} is "
                                f"missing): {INSTALL}") from None
    # jieba logs "Building prefix dict ..." at DEBUG on its own stderr handler the first time it cuts; its
    # dictionary ships with the package, so nothing is downloaded.
    jieba.setLogLevel(logging.INFO)
    return jieba, Rouge, sentence_bleu, SmoothingFunction


def generation_metrics(predictions: Sequence[str], references: Sequence[str]) -> dict:
    """ROUGE-1/2/L and BLEU-4 of predictions against references, as the official ChatGLM3 demo.

    Per pair, both texts are stripped and cut into words with `jieba.cut`. ROUGE-N/L is the F-score of
    `rouge_chinese.Rouge().get_scores` on the words joined by spaces, times 100, rounded to 4 decimals
    (as the official code rounds it). BLEU-4 is `nltk`'s `sentence_bleu([reference words], prediction
    words)` with `SmoothingFunction().method3`, times 100: unlike the official code, which reports BLEU
    as a fraction, every metric here is on the same 0-100 scale. Each metric is the mean over the pairs.

    A prediction with no words (empty, or only whitespace) scores 0 on every metric and is counted in
    `empty`; the official code stops with rouge's "Hypothesis is empty" there.

    Args:
        predictions: the model's replies, one per reference.
        references: the expected replies; none may be empty.

    Returns:
        {"rouge-1", "rouge-2", "rouge-l", "bleu-4": means on a 0-100 scale, "count": pairs,
        "empty": predictions with no words}.

    Raises:
        MissingDependency: jieba, rouge-chinese or nltk is not installed (the message names the fix).
        ValueError: no pairs, unequal lengths, or an empty reference.
    """
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references; give one per reference")
    if not references:
        raise ValueError("no predictions to score; give at least one pair")
    jieba, Rouge, sentence_bleu, SmoothingFunction = require_libraries()
    rouge, smoothing = Rouge(), SmoothingFunction().method3
    totals = dict.fromkeys(METRICS, 0.0)
    empty = 0
    for i, (prediction, reference) in enumerate(zip(predictions, references)):
        reference_words = list(jieba.cut(reference.strip()))
        if not " ".join(reference_words).split():
            raise ValueError(f"reference {i + 1} is empty; every prediction needs a reference to be scored against")
        prediction_words = list(jieba.cut(prediction.strip()))
        if not " ".join(prediction_words).split():  # what rouge finds empty; nltk would score it 0 too
            empty += 1
            continue
        scores = rouge.get_scores(" ".join(prediction_words), " ".join(reference_words))[0]
        for name in ROUGE:
            totals[name] += round(scores[name]["f"] * 100, 4)
        totals["bleu-4"] += sentence_bleu([reference_words], prediction_words, smoothing_function=smoothing) * 100
    count = len(references)
    return {**{name: total / count for name, total in totals.items()}, "count": count, "empty": empty}
