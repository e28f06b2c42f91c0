"""`tuneport eval`: generate replies for a dev set and score them as the official ChatGLM3 demo does.

Every sample of the dev file (any format `core.data` reads) ends with the expected assistant reply, the
reference; the conversation before it is the prompt, built as the official demo's `process_batch_eval`
builds it: the family's chat prompt cut to `max_input_length` tokens, then the start of the assistant's
turn. Replies are generated greedily in batches, left-padded (0 in the attention mask at the padding),
and end at the tokenizer's stop ids. The scores are `core.metrics.generation_metrics` (ROUGE-1/2/L and
BLEU-4, all x100).

The output folder gets `eval.json` (the metrics, what was evaluated, the data file's sha256, the
settings) and `predictions.jsonl` (one {line, prompt, reference, prediction} per sample). tuneport
writes only into a new or empty folder or one holding an earlier `tuneport eval`, and there replaces
only those two files.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

from ..frameworks import framework
from .errors import RunError
from .loading import open_model, tuned_model
from .versions import tuneport_version
from .data import DataError, FORMATS, fail, file_sha256, read_conversations
from .preference import PREFERENCE_FORMATS, collate_pairs, encode_pairs
from .rundir import FolderError, atomic_write_text, check_writable, read_json_object, writing
from .config import DTYPES, resolve_path
from .metrics import METRICS, MissingDependency, check_libraries, generation_metrics

EVAL_RECORD = "eval.json"
PREDICTIONS = "predictions.jsonl"
WRITE_FIX = "free disk space, or choose a writable --out"
# The official fine-tuning demo's lengths (configs/lora.yaml: 256 input tokens; 512 output tokens, and
# generation_config.max_new_tokens 512), as the recipes' defaults.
MAX_INPUT_LENGTH = 256
MAX_NEW_TOKENS = 512

log = logging.getLogger(__name__)


@dataclass
class DevSample:
    """One dev sample: the conversation before the reference reply, and the reference."""

    line: int  # the line of the data file its record starts on
    context: list[dict]  # messages before the reply (the last one is the prompt's query)
    reference: str


# --- reading ------------------------------------------------------------------------------------------
def read_dev_set(path: Path, fmt: str = "auto", limit: Optional[int] = None) -> tuple[list[DevSample], str, int]:
    """The dev samples of a data file: each record's last assistant reply is the reference.

    The records are read and converted as training data is (`core.data.read_conversations`: one format
    per file, detected from the first record with "auto").

    Args:
        path: a JSON or JSON-lines file in one of `core.data.FORMATS`.
        fmt: its format, or "auto".
        limit: take only the first `limit` records (None: all).

    Returns:
        (samples, the format, how many records the file holds).

    Raises:
        DataError: one line naming the file, the first problem's line and the fix, and how many more
            problems there are; among them a record with no (or an empty) assistant reply to score against.
    """
    conversations, fmt, count = read_conversations(path, fmt)
    samples, problems = [], []
    for line, messages in conversations[:limit]:
        last = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=None)
        if last is None:
            problems.append(f"line {line}: no assistant reply to score against; end each dev sample with the "
                            "expected assistant reply (the reference)")
        elif not (messages[last]["content"] or "").strip():
            problems.append(f"line {line}: the last assistant reply is empty; give the expected reply (the reference)")
        elif not any(m["role"] != "system" for m in messages[:last]):
            problems.append(f"line {line}: nothing before the assistant reply to prompt with; start the "
                            "conversation with a user message")
        else:
            samples.append(DevSample(line, messages[:last], messages[last]["content"].strip()))
    if problems:
        raise fail(path, problems)
    return samples, fmt, count


# --- prompts ------------------------------------------------------------------------------------------
def reply_start(tokenizer) -> list[int]:
    """The ids every chat prompt of `tokenizer` ends with (ChatGLM3: `<|assistant|>`; Qwen2: the end of
    the user turn and `<|im_start|>assistant\\n`): what a cut prompt keeps after its cut."""
    a, b = (tokenizer.build_chat_input(query)["input_ids"][0].tolist() for query in ("1", "2"))
    n = 0
    while n < min(len(a), len(b)) - 1 and a[-1 - n] == b[-1 - n]:
        n += 1
    return a[len(a) - n:]


def prompt_ids(tokenizer, context: list[dict], max_input_length: int, start: Sequence[int]) -> tuple[list[int], bool]:
    """The token ids of the prompt for the reply after `context`, and whether it was cut.

    As the official `process_batch_eval`: the chat prompt without the start of the reply is cut to its
    first `max_input_length` tokens, then the start of the reply (`start`, from `reply_start`) follows.
    """
    *history, query = context
    ids = tokenizer.build_chat_input(query["content"], history=history, role=query["role"])["input_ids"][0].tolist()
    body = len(ids) - len(start)
    if body <= max_input_length:
        return ids, False
    return ids[:max_input_length] + list(start), True


def build_prompts(tokenizer, samples: Sequence[DevSample], max_input_length: int, path) -> tuple[list[list[int]], int]:
    """The prompt ids of each dev sample (`prompt_ids`), and how many were cut to `max_input_length`.

    Raises:
        DataError: a conversation the tokenizer cannot render, naming `path` and the sample's line.
    """
    start = reply_start(tokenizer)
    prompts, truncated = [], 0
    for sample in samples:
        try:
            ids, cut = prompt_ids(tokenizer, sample.context, max_input_length, start)
        except (ValueError, TypeError, KeyError) as e:
            raise DataError(f"{path}: line {sample.line}: cannot build the prompt ({e}); fix the conversation "
                            "before the reply") from None
        prompts.append(ids)
        truncated += cut
    return prompts, truncated


def decode_replies(tokenizer, replies: Sequence[Sequence[int]]) -> list[str]:
    """Reply ids as the stripped text that is scored."""
    return [tokenizer.decode(ids, skip_special_tokens=True).strip() for ids in replies]


# --- the output folder --------------------------------------------------------------------------------
def is_eval_folder(folder: Path) -> bool:
    """Whether `folder` holds an `eval.json` that `tuneport eval` wrote."""
    record = read_json_object(folder / EVAL_RECORD)
    return record.get("tool") == "tuneport" and "metrics" in record


def check_out(out: Path) -> None:
    """Refuse, writing nothing, an output folder that tuneport may not write into.

    Raises:
        FolderError: `out` is a file, or a folder that holds something and no earlier `tuneport eval`.
    """
    if out.exists() and not out.is_dir():
        raise FolderError(f"--out {out}: is a file; give a folder for eval.json and predictions.jsonl")
    try:
        used = out.is_dir() and any(out.iterdir())
    except OSError as e:
        raise FolderError(f"--out {out}: cannot be read ({e.strerror}); choose another --out") from None
    if used and not is_eval_folder(out):
        raise FolderError(f"--out {out}: is not empty and holds no earlier tuneport eval ({EVAL_RECORD}); tuneport "
                          "never writes among your files: choose a new --out folder")


def default_out(adapter: Optional[Path]) -> Path:
    """`eval/` beside the adapter (in a run folder: the run's), else `eval/` here."""
    return adapter.parent / "eval" if adapter is not None else Path("eval")


def write_results(out: Path, record: dict, rows: list[dict]) -> None:
    """predictions.jsonl, then eval.json (whose sha256 of the predictions ties the two together)."""
    import hashlib

    text = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
    record["predictions"] = {"file": PREDICTIONS, "sha256": hashlib.sha256(text.encode("utf-8")).hexdigest()}
    check_out(out)  # again: the folder may have changed during a long generation
    with writing(f"--out {out}", "the scores and replies were not saved", WRITE_FIX):
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out / PREDICTIONS, text)
        atomic_write_text(out / EVAL_RECORD, json.dumps(record, indent=2, ensure_ascii=False))


# --- the command --------------------------------------------------------------------------------------
def add_eval_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="base checkpoint folder (or a `tuneport export` folder)")
    p.add_argument("--adapter", help="tuned result: a PEFT adapter, a P-tuning v2 prefix folder, or a full checkpoint")
    p.add_argument("--data", required=True, help="dev file (JSON or JSON lines, any supported format; "
                   "builtin:demo/data.jsonl is the demo's); each sample's last assistant reply is the reference")
    p.add_argument("--format", default="auto", help="the data format: auto (default), conversations, alpaca, "
                   "advertisegen or sharegpt")
    p.add_argument("--out", help="folder for eval.json and predictions.jsonl (default: eval/ beside the adapter, "
                   "or ./eval)")
    p.add_argument("--device", default="auto", help="auto or a registered device: cpu, cuda, npu, ... (default auto)")
    p.add_argument("--dtype", default="fp32", help="the model's weights: fp32 (default), bf16 or fp16")
    p.add_argument("--batch-size", type=int, default=8, help="prompts generated together, left-padded (default 8)")
    p.add_argument("--max-new-tokens", type=int, default=MAX_NEW_TOKENS,
                   help=f"the longest reply in tokens (default {MAX_NEW_TOKENS}, as the official demo)")
    p.add_argument("--max-input-length", type=int, default=MAX_INPUT_LENGTH,
                   help=f"prompts are cut to this many tokens, then the assistant turn starts (default "
                        f"{MAX_INPUT_LENGTH}, as the official demo)")
    p.add_argument("--limit", type=int, help="evaluate the first K samples only")
    p.add_argument("--preference", action="store_true",
                   help="--data holds preference pairs (TRL's prompt/chosen/rejected or ShareGPT pairs): score how "
                        "often the model gives the chosen reply the higher log-probability per token, generating nothing")


def check_arguments(args: argparse.Namespace) -> None:
    """Every bad number or choice on the command line, in one RunError."""
    problems = [f"--{name.replace('_', '-')}: {value} must be > 0"
                for name, value in (("batch_size", args.batch_size), ("max_new_tokens", args.max_new_tokens),
                                    ("max_input_length", args.max_input_length), ("limit", args.limit))
                if value is not None and value <= 0]
    if args.dtype not in DTYPES:
        problems.append(f"--dtype {args.dtype}: not one of {', '.join(DTYPES)}")
    formats = PREFERENCE_FORMATS if getattr(args, "preference", False) else FORMATS
    if args.format not in ("auto", *formats):
        problems.append(f"--format {args.format}: not one of auto, {', '.join(formats)}")
    if problems:
        raise RunError("; ".join(problems))


def run_eval(args: argparse.Namespace) -> int:
    """`tuneport eval`: check the arguments, the output folder and the dev file (before loading a
    framework), then generate, score, write eval.json and predictions.jsonl, and print the table."""
    check_arguments(args)
    if args.preference:
        return run_preference_eval(args)
    try:
        check_libraries()
    except MissingDependency as e:
        raise RunError(f"tuneport eval: {e}") from None
    model_dir, data = Path(args.model), resolve_path(args.data)  # builtin:demo/data.jsonl too
    adapter = Path(args.adapter) if args.adapter else None
    out = Path(args.out) if args.out else default_out(adapter)
    check_out(out)
    check_writable(out, f"--out {out}", WRITE_FIX)  # before anything is generated
    samples, fmt, records = read_dev_set(data, args.format, args.limit)
    opened = open_model(model_dir, args.device, adapter)
    tokenizer, device_name = opened.tokenizer, opened.device
    prompts, truncated = build_prompts(tokenizer, samples, args.max_input_length, data)
    if truncated:
        log.warning("%d of %d prompts cut to %d tokens (--max-input-length)", truncated, len(prompts),
                    args.max_input_length)

    model = tuned_model(opened, adapter, args.dtype)
    began = time.time()
    replies = framework("torch").generate_replies(model, prompts, tokenizer.stop_token_ids, tokenizer.pad_token_id,
                               args.max_new_tokens, args.batch_size, progress=True)
    seconds = time.time() - began
    predictions = decode_replies(tokenizer, replies)
    references = [sample.reference for sample in samples]
    metrics = generation_metrics(predictions, references)

    record: dict[str, Any] = {
        "tool": "tuneport", "version": tuneport_version(), "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "model": str(model_dir.resolve()), "adapter": str(adapter.resolve()) if adapter else None,
        "data": {"file": str(data.resolve()), "sha256": file_sha256(data), "format": fmt, "records": records,
                 "samples": len(samples)},
        "settings": {"device": device_name, "dtype": args.dtype, "decoding": "greedy",
                     "batch_size": args.batch_size, "max_new_tokens": args.max_new_tokens,
                     "max_input_length": args.max_input_length, "limit": args.limit,
                     "truncated_prompts": truncated},
        "metrics": metrics, "generation_seconds": round(seconds, 3),
    }
    rows = [{"line": s.line, "prompt": s.context[-1]["content"], "reference": s.reference, "prediction": p}
            for s, p in zip(samples, predictions)]
    write_results(out, record, rows)

    print(f"tuneport eval: {len(samples)} samples of {args.data} ({fmt}), greedy, at most {args.max_new_tokens} new "
          f"tokens, {device_name}, {seconds:.1f} s")
    print(f"  {'metric':10s}{'score':>8s}")
    for name in METRICS:
        print(f"  {name:10s}{metrics[name]:8.2f}")
    if metrics["empty"]:
        print(f"  ({metrics['empty']} empty replies scored 0)")
    print(f"wrote {out / EVAL_RECORD} and {out / PREDICTIONS}")
    return 0


def run_preference_eval(args: argparse.Namespace) -> int:
    """`tuneport eval --preference`: the model's preference accuracy on a pairs file (per token, as the preference
    objectives' `preference` metric; and on the summed log-probabilities), written to eval.json."""
    model_dir, data = Path(args.model), resolve_path(args.data)
    adapter = Path(args.adapter) if args.adapter else None
    out = Path(args.out) if args.out else default_out(adapter)
    check_out(out)
    check_writable(out, f"--out {out}", WRITE_FIX)
    opened = open_model(model_dir, args.device, adapter)
    pairs = encode_pairs(data, opened.tokenizer, args.format, args.max_input_length, args.max_new_tokens)
    samples = pairs.samples[: args.limit]
    batches = [collate_pairs(samples[i:i + args.batch_size], opened.tokenizer.pad_token_id)
               for i in range(0, len(samples), args.batch_size)]
    scores = framework("torch").pair_scores(tuned_model(opened, adapter, args.dtype), batches)
    per_token = sum(c / max(n_c, 1) > r / max(n_r, 1) for c, r, n_c, n_r in scores) / len(scores)
    summed = sum(c > r for c, r, _, _ in scores) / len(scores)
    record = {"tool": "tuneport", "version": tuneport_version(), "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
              "model": str(model_dir.resolve()), "adapter": str(adapter.resolve()) if adapter else None,
              "data": {"file": str(data.resolve()), "sha256": file_sha256(data), "format": pairs.format,
                       "pairs": len(samples)},
              "settings": {"device": opened.device, "dtype": args.dtype, "max_input_length": args.max_input_length,
                           "max_reply_length": args.max_new_tokens, "limit": args.limit},
              "metrics": {"preference_accuracy": per_token, "summed_logp_accuracy": summed}}
    rows = [{"chosen_logp": c, "rejected_logp": r, "chosen_tokens": n_c, "rejected_tokens": n_r}
            for c, r, n_c, n_r in scores]
    write_results(out, record, rows)
    print(f"tuneport eval --preference: {len(samples)} pairs of {args.data} ({pairs.format}), {opened.device}")
    print(f"  preference accuracy (per token) {per_token:.3f}; on summed log-probabilities {summed:.3f}")
    print(f"wrote {out / EVAL_RECORD} and {out / PREDICTIONS}")
    return 0


HELP = "generate replies for a dev set and score ROUGE-1/2/L and BLEU-4 as the official ChatGLM3 demo"
SUBCOMMAND = (HELP, add_eval_arguments, run_eval)  # core/cli.py's table entry
