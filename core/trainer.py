"""The training loop, written once for every framework and device.

It owns the schedule, gradient accumulation (normalised by label tokens over the whole accumulated
batch), evaluation, checkpoint cadence, exact resume, and the run's records: `recipe.yaml`,
`metrics.jsonl`, TensorBoard events, `loss.png`, `run.json`, `checkpoints/step-N/` and `adapter/`.
The runtime (core/runtime.py: TorchRuntime or MindSporeRuntime) does the framework's part.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import os
import platform
import shlex
import shutil
import signal
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterator, Optional, Sequence

import numpy as np
import yaml
from safetensors import SafetensorError

from . import checkpoints
from ..models import TEMPLATE_FILE, builder_family, builder_names
from .config import Recipe, recipe_to_dict, resolve_path
from .data import GROUP_WINDOW, EncodedData, collate, collate_packed, encode_dataset, epoch_order, file_sha256, \
    packed_rows
from .errors import Diverged, RunError, Stopped
from .objectives import units
from .preference import collate_pairs, encode_pairs
from .rundir import atomic_write_text, read_json_object
from .runtime import Runtime
from .versions import installed
from .evaluate import build_prompts, decode_replies, read_dev_set
from .metrics import METRICS, MissingDependency, check_libraries, generation_metrics

log = logging.getLogger(__name__)


class StopOnSignal:
    """While active, SIGINT and SIGTERM ask the loop to stop after the current optimizer step (it then
    saves a checkpoint). The handler only records the signal (it may interrupt any code, a write to
    stderr included) and, in a process of its own, restores the default action, so a second signal ends
    the process at once even inside a long call. Under a launcher, which forwards signals and
    escalates itself, later signals are ignored. Inactive off the main thread.
    """

    def __init__(self):
        self.signum: Optional[int] = None
        self.previous: dict = {}
        self.announced = False
        self.launched = "LOCAL_RANK" in os.environ

    def __enter__(self) -> "StopOnSignal":
        if threading.current_thread() is threading.main_thread():
            self.previous = {s: signal.signal(s, self._handle) for s in (signal.SIGINT, signal.SIGTERM)}
        return self

    def _handle(self, signum: int, frame) -> None:
        if self.signum is None:
            self.signum = signum
            if not self.launched:
                for s in self.previous:
                    signal.signal(s, signal.SIG_DFL)

    def announce(self) -> None:
        """Say, once, that a signal arrived and what happens now."""
        if self.signum is not None and not self.announced:
            self.announced = True
            again = "" if self.launched else "; press Ctrl-C again to quit at once, without saving"
            log.warning("%s: finishing this optimizer step and saving a checkpoint%s",
                        signal.Signals(self.signum).name, again)

    def __exit__(self, *exc) -> None:
        for s, handler in self.previous.items():
            if handler is not None:  # None: a handler installed from C, which Python cannot restore
                signal.signal(s, handler)


# --- schedule ----------------------------------------------------------------------------------------
def learning_rate(step: int, base_lr: float, total: int, warmup: int, kind: str) -> float:
    """The learning rate for optimizer step `step` (0-based): linear warmup, then constant, linear
    decay to 0, or cosine decay to 0 at `total` (the formulas of transformers' schedulers)."""
    if step < warmup:
        return base_lr * step / max(1, warmup)
    if kind == "constant":
        return base_lr
    progress = (step - warmup) / max(1, total - warmup)
    if kind == "linear":
        return base_lr * max(0.0, 1.0 - progress)
    return base_lr * max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))


def label_tokens(batch: dict[str, np.ndarray]) -> int:
    """Tokens that carry loss (labels are shifted by one inside the model)."""
    return int((batch["labels"][:, 1:] != -100).sum())


@dataclass
class Position:
    """Where the data streams stand: the training data's epoch and the next sample's index in that epoch's
    order, the same for the mixed-in general data (`data.mix`), and the global micro-batches drawn so far."""

    epoch: int = 0
    offset: int = 0
    mix_epoch: int = 0
    mix_offset: int = 0
    batches: int = 0


MIX_STREAM = 1  # seeds the mixing draws and the general data's order apart from the training data's


def _take(count: int, order_of: Callable[[int], Sequence], pos: Position, prefix: str = "") -> list:
    """The next `count` units (sample indices, or packed rows of them) of a stream whose epoch and offset are
    `pos.{prefix}epoch|offset`, running on into the next epoch at an epoch's end."""
    chosen: list = []
    while len(chosen) < count:
        epoch, offset = getattr(pos, prefix + "epoch"), getattr(pos, prefix + "offset")
        units = order_of(epoch)
        take = list(units[offset: offset + count - len(chosen)])
        chosen += take
        offset += len(take)
        if offset >= len(units):
            epoch, offset = epoch + 1, 0
        setattr(pos, prefix + "epoch", epoch)
        setattr(pos, prefix + "offset", offset)
    return chosen


def epoch_units(data: EncodedData, seed: int, group: int = 0, pack: int = 0) -> Callable[[int], Sequence]:
    """The units a stream takes, as a function of the epoch: sample indices in a shuffled order (with `group`,
    one whose runs of `group` samples hold similar lengths: `epoch_order`), or with `pack` (tokens a row holds)
    rows of sample indices (`packed_rows`, packed within windows of GROUP_WINDOW * `group` samples)."""
    n = len(data.samples)
    lengths = [data.length(i) for i in range(n)]
    if not pack:
        return lambda epoch: epoch_order(n, seed, epoch, lengths if group > 1 else None, group)
    return functools.lru_cache(maxsize=2)(lambda epoch: packed_rows(n, seed, epoch, lengths, pack,
                                                                    GROUP_WINDOW * max(group, 1)))


def micro_batches(data: EncodedData, size: int, seed: int, pad_id: int, pos: Position,
                  rank: int = 0, world_size: int = 1, group: int = 0,
                  mix: Optional[EncodedData] = None, mix_ratio: float = 0.0, pack: int = 0) -> Iterator[dict]:
    """Endless stream of this process's right-padded micro-batches; advances `pos`.

    Units, samples or with `pack` rows of packed samples (`epoch_units`), are taken in a per-epoch shuffled
    order, `size * world_size` at a time (running on into the next epoch at an epoch's end, so every batch
    is full), and process `rank` takes its slice. One process with micro-batch M*W therefore sees exactly the
    units W processes of M see, and with `group` the units of one optimizer step, the same units whatever
    the accumulation.

    With `mix`, each global micro-batch draws how many of its units come from the general data
    (binomial with probability `mix_ratio`, seeded by the run's seed and the batch's number, so a resumed
    run draws the same) and where they sit in it; the general data has its own shuffled order and position.
    """
    total = size * world_size
    order_of = epoch_units(data, seed, group, pack)
    mix_order_of = epoch_units(mix, seed + MIX_STREAM, 0, pack) if mix is not None else None
    while True:
        general = 0
        if mix is not None and mix_ratio:
            rng = np.random.default_rng([seed, MIX_STREAM, pos.batches])
            general = int(rng.binomial(total, mix_ratio))
        chosen = [(data, unit) for unit in _take(total - general, order_of, pos)]
        if general:
            chosen += [(mix, unit) for unit in _take(general, mix_order_of, pos, "mix_")]
            chosen = [chosen[i] for i in rng.permutation(total)]
        pos.batches += 1
        mine = chosen[rank * size: (rank + 1) * size]
        if pack:
            yield collate_packed([[source.samples[i] for i in row] for source, row in mine], pad_id)
        elif data.pairs:
            yield collate_pairs([source.samples[i] for source, i in mine], pad_id)
        else:
            yield collate([source.samples[i] for source, i in mine], pad_id)


# --- model folder ------------------------------------------------------------------------------------
def model_folder(recipe: Recipe, output_dir: Path) -> Path:
    """The base model's checkpoint folder: the recipe's folder, or one a builder writes once."""
    if recipe.model in builder_names():
        folder = output_dir / "base_model"
        if not (folder / "config.json").exists():
            _, build = builder_family(recipe.model).builders[recipe.model]
            build(folder)
        return folder
    folder = resolve_path(recipe.model)
    if not (folder / "config.json").exists():
        raise RunError(f"model: {recipe.model!r} is not a checkpoint folder with config.json, nor a builder name "
                       f"({', '.join(builder_names())})")
    return folder


def tokenizer_path(recipe: Recipe, model_dir: Path) -> Path:
    return resolve_path(recipe.tokenizer) if recipe.tokenizer else model_dir


# --- records -----------------------------------------------------------------------------------------
class MetricsLog:
    """metrics.jsonl (one JSON object per line) plus TensorBoard scalars, both on disk at every step.

    The events are written synchronously through tensorboardX's event-file writer: its SummaryWriter
    hands them to a thread that flushes every two minutes, so a killed process would lose them.
    """

    def __init__(self, output_dir: Path, resume_step: Optional[int]):
        from tensorboardX.event_file_writer import EventsWriter
        from tensorboardX.proto.event_pb2 import Event, SessionLog
        from tensorboardX.summary import scalar

        self.event, self.scalar = Event, scalar  # used at every step

        self.path = output_dir / "metrics.jsonl"
        if resume_step is not None and self.path.exists():  # drop what the killed run logged past its checkpoint
            kept = [line for line in self.path.read_text().splitlines() if _step(line) <= resume_step]
            atomic_write_text(self.path, "".join(line + "\n" for line in kept))
        elif self.path.exists():
            self.path.unlink()
        (output_dir / "tensorboard").mkdir(exist_ok=True)
        self.events = EventsWriter(str(output_dir / "tensorboard" / "events"), f".{os.getpid()}")
        if resume_step is not None:  # TensorBoard hides the killed run's events after the checkpoint
            self.events.write_event(Event(step=resume_step + 1, wall_time=time.time(),
                                          session_log=SessionLog(status=SessionLog.START)))
            self.events.flush()

    def write(self, record: dict) -> None:
        """Append one record (non-finite numbers become null: the file stays strict JSON) and its scalars."""
        record = {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in record.items()}
        with open(self.path, "a") as f:
            f.write(json.dumps(record, allow_nan=False) + "\n")
        for key, value in record.items():
            if key != "step" and isinstance(value, (int, float)):
                self.events.write_event(self.event(step=record["step"], wall_time=time.time(),
                                                   summary=self.scalar(key, value)))
        self.events.flush()

    def close(self) -> None:
        self.events.close()

    def records(self) -> list[dict]:
        return [json.loads(line) for line in self.path.read_text().splitlines() if _step(line) != math.inf] \
            if self.path.exists() else []


def _step(line: str) -> float:
    """The step of a metrics line; a line cut short by a crash counts as past any checkpoint."""
    try:
        return json.loads(line)["step"]
    except (json.JSONDecodeError, KeyError, TypeError):
        return math.inf


def plot_loss(records: list[dict], path: Path) -> None:
    """loss.png: the training loss, the evaluation losses and, with eval.generate, ROUGE-L and BLEU-4; with a
    preference objective, the reward margin and the held-out preference accuracy."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    train = [(r["step"], r["loss"]) for r in records if "loss" in r]
    if train:
        ax.plot(*zip(*train), label="train loss")
    for key, label in (("eval_loss", "eval loss"), ("general_loss", "general loss (forgetting)")):
        points = [(r["step"], r[key]) for r in records if r.get(key) is not None]
        if points:
            ax.plot(*zip(*points), "o-", label=label)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.legend(loc="upper left")
    ax.grid(alpha=0.3)
    scores = [(r["step"], r["rouge-l"], r["bleu-4"]) for r in records if r.get("rouge-l") is not None]
    if scores:  # eval.generate: the generation metrics on a second axis
        right = ax.twinx()
        steps, rouge, bleu = zip(*scores)
        right.plot(steps, rouge, "s--", color="tab:green", label="ROUGE-L")
        right.plot(steps, bleu, "^--", color="tab:purple", label="BLEU-4")
        right.set_ylabel("score (0-100)")
        right.legend(loc="upper right")
    margins = [(r["step"], r["margin"]) for r in records if r.get("margin") is not None]
    if margins:  # a preference objective: the reward margin, and the held-out pairs' preference accuracy
        right = ax.twinx()
        right.plot(*zip(*margins), "--", color="tab:green", label="reward margin")
        held = [(r["step"], r["eval_preference"]) for r in records if r.get("eval_preference") is not None]
        if held:
            right.plot(*zip(*held), "s-", color="tab:purple", label="held-out preference accuracy")
        right.set_ylabel("margin / accuracy")
        right.legend(loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def package_versions() -> dict:
    names = ("tuneport", "torch", "transformers", "peft", "safetensors", "numpy", "mindspore", "deepspeed")
    return {"python": platform.python_version(), **{name: installed(name) for name in names}}


def run_record(recipe: Recipe, backend, precision, model_dir: Path) -> dict:
    model_files = {}
    for name in ("config.json", "model.safetensors.index.json", "pytorch_model.bin.index.json"):
        if (model_dir / name).exists():
            model_files[name] = file_sha256(model_dir / name)
    data_files = {}
    for path in filter(None, (recipe.data.train, recipe.data.eval, recipe.eval.general, recipe.data.mix)):
        data_files[path] = file_sha256(resolve_path(path))
    return {
        "versions": package_versions(),
        "device": backend.name,
        "capabilities": asdict(backend.capabilities),
        "precision": asdict(precision),
        "recipe": recipe_to_dict(recipe),
        "sha256": {"data": data_files, "model": model_files},
        "model_dir": str(model_dir.resolve()),
    }


# --- the loop ----------------------------------------------------------------------------------------
@dataclass
class Datasets:
    """A run's encoded data: training, held-out task data (`data.eval`), general-domain data scored for
    forgetting (`eval.general`) and general data mixed into training (`data.mix`)."""

    train: EncodedData
    eval: Optional[EncodedData] = None
    general: Optional[EncodedData] = None
    mix: Optional[EncodedData] = None
    dev: Optional[list] = None  # data.eval's prompts and references (core.evaluate.DevSample), for eval.generate


def load_data(recipe: Recipe, tokenizer) -> Datasets:
    """The run's data, encoded (the general-domain files in whatever format they are: `auto`)."""
    def encode(path: Optional[str], fmt: str = recipe.data.format, pairs: bool = False) -> Optional[EncodedData]:
        if not path:
            return None
        return (encode_pairs if pairs else encode_dataset)(resolve_path(path), tokenizer, fmt,
                                                           recipe.data.max_input_length, recipe.data.max_output_length)

    pairs = recipe.objective.preference  # data.train and data.eval hold preference pairs
    data = Datasets(encode(recipe.data.train, pairs=pairs), encode(recipe.data.eval, pairs=pairs),
                    encode(recipe.eval.general, "auto"), encode(recipe.data.mix, "auto"))
    for key, path, found in (("data.train", recipe.data.train, data.train), ("data.mix", recipe.data.mix, data.mix),
                             ("eval.general", recipe.eval.general, data.general)):
        if found is not None and not found.samples:
            raise RunError(f"{key}: {path}: no sample has an assistant reply to learn from or score")
    if recipe.eval.generate:
        try:
            check_libraries()
        except MissingDependency as e:
            raise RunError(f"eval.generate: {e}") from None
        data.dev = read_dev_set(resolve_path(recipe.data.eval), recipe.data.format, recipe.eval.generate_samples)[0]
    return data


def total_steps(recipe: Recipe, data: EncodedData, world_size: int = 1) -> int:
    """Optimizer steps: max_steps, or enough global batches (micro x accumulation x processes) for the epochs
    of `data` (training data's samples, or with packing its rows, as the first epoch packs them)."""
    if recipe.train.max_steps is not None:
        return recipe.train.max_steps
    per_step = recipe.train.micro_batch_size * recipe.train.grad_accum * world_size
    pack = pack_length(recipe)
    units = len(epoch_units(data, recipe.train.seed, per_step, pack)(0)) if pack else len(data.samples)
    return max(1, math.ceil(recipe.train.epochs * units / per_step))


def pack_length(recipe: Recipe) -> int:
    """The tokens of a packed row, or 0 without packing."""
    return recipe.data.row_tokens if recipe.data.packing else 0


def evaluations(runtime, data: Datasets, recipe: Recipe, tokenizer) -> dict:
    """What this run records at an evaluation: `eval_loss` on the task's held-out data, `general_loss` on
    the general-domain data, and with eval.generate the generation metrics of data.eval's replies."""
    found = {}
    for key, encoded in (("eval_loss", data.eval), ("general_loss", data.general)):
        if encoded is not None:
            scores = evaluate(runtime, encoded, recipe, tokenizer.pad_token_id)
            found[key] = scores.pop("loss")
            found.update({f"eval_{name}": value for name, value in scores.items()})
    if data.dev:
        found.update(generation_scores(runtime, data.dev, recipe, tokenizer))
    return found


def generation_scores(runtime, samples: list, recipe: Recipe, tokenizer) -> dict:
    """ROUGE-1/2/L and BLEU-4 (as `tuneport eval`) of greedy replies to `samples`' prompts, at most
    data.max_output_length tokens each."""
    prompts, _ = build_prompts(tokenizer, samples, recipe.data.max_input_length, recipe.data.eval)
    replies = runtime.generate_batch(prompts, recipe.data.max_output_length, tokenizer.stop_token_ids,
                                     tokenizer.pad_token_id)
    scores = generation_metrics(decode_replies(tokenizer, replies), [s.reference for s in samples])
    return {name: scores[name] for name in METRICS}


def forgetting(before: dict, after: dict) -> dict:
    """How each evaluation changed over the run: {key: {"before", "after", "change"}}, the change relative
    (None from a score of 0)."""
    return {key: {"before": before[key], "after": after[key],
                  "change": after[key] / before[key] - 1 if before[key] else None}
            for key in before if after.get(key) is not None}


def summary_line(change: dict) -> str:
    """'task eval loss 2.31 → 1.12 (-51.5%), general loss 1.85 → 1.97 (+6.5%)' for what the run measured."""
    names = {"eval_loss": "task eval loss", "general_loss": "general loss",
             "eval_preference": "held-out preference accuracy", **{k: k.upper() for k in METRICS}}
    return ", ".join(f"{names[k]} {v['before']:.2f} → {v['after']:.2f}"
                     + (f" ({v['change']:+.1%})" if v["change"] is not None else "") for k, v in change.items()
                     if k in names)


def evaluate(runtime, data: EncodedData, recipe: Recipe, pad_id: int) -> dict:
    """The evaluation data's loss (token-averaged; for preference pairs the objective's, pair-averaged), and
    for pairs the objective's metrics averaged over them; the batches shared among the processes."""
    size = recipe.train.micro_batch_size
    batches = [data.samples[i: i + size] for i in range(0, len(data.samples), size)][: recipe.eval.max_batches]
    total, tokens, sums = 0.0, 0, {}
    rank, world = runtime.dist.rank, runtime.dist.world_size
    # Every process runs as many forwards (a sharded model's take part on all of them); a process short of
    # a batch repeats the first one and does not count it.
    for i in range(rank, len(batches) + (-len(batches)) % world, world):
        chosen = batches[i if i < len(batches) else 0]
        if data.pairs:
            loss, count, metrics = runtime.eval_pairs(collate_pairs(chosen, pad_id))
        else:
            (loss, count), metrics = runtime.eval_loss(collate(chosen, pad_id)), {}
        if i < len(batches):
            total, tokens = total + loss, tokens + count
            sums = {k: sums.get(k, 0.0) + v for k, v in metrics.items()}
    names = sorted(sums)
    total, tokens, *values = runtime.dist.all_sum([total, tokens, *(sums[k] for k in names)])
    return {"loss": total / max(1, tokens), **{k: v / max(1, tokens) for k, v in zip(names, values)}}


REFERENCE_PART = 64  # pairs whose reference log-probabilities one file of reference/ holds


def write_reference_part(path: Path, logps: np.ndarray) -> None:
    """One file of the reference pass, written atomically (a part is there whole, or not at all)."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        np.save(f, logps)
    os.replace(tmp, path)


def attach_reference(runtime, data: EncodedData, folder: Path, name: str, recipe: Recipe, pad_id: int) -> None:
    """`objective.precompute_reference`: every pair's reference log-probabilities (chosen, rejected), computed
    once before training, `REFERENCE_PART` pairs a file (`reference/{name}-NNNNN.npy`, the main process writes
    it), and attached to the pairs, which then carry them into their batches. A run killed during the pass
    keeps the parts it finished, and `--resume` computes the rest. Every process runs every forward (a sharded
    model's forwards need them all)."""
    folder.mkdir(exist_ok=True)
    size, count = recipe.train.micro_batch_size, len(data.samples)
    done = {p.name for p in folder.glob(f"{name}-*.npy")}
    runtime.dist.all_sum([0.0])  # every process has looked before any part is written
    computed = 0
    for k, start in enumerate(range(0, count, REFERENCE_PART)):
        path = folder / f"{name}-{k:05d}.npy"
        pairs = data.samples[start:start + REFERENCE_PART]
        if path.name in done:
            logps = np.load(path)
        else:
            rows = []
            for i in range(0, len(pairs), size):
                out = runtime.reference_logps(collate_pairs(pairs[i:i + size], pad_id))
                rows.append(out.reshape(2, -1).T)  # the chosen rows first, then the rejected ones
            logps = np.concatenate(rows)
            if runtime.dist.is_main:
                write_reference_part(path, logps)
            computed += len(pairs)
        data.samples[start:start + len(pairs)] = [(*p[:4], (float(c), float(r))) for p, (c, r) in zip(pairs, logps)]
    log.info("reference log-probabilities of %d %s pairs: %d computed, %d read from %s", count, name, computed,
             count - computed, folder)


def all_ok(dist, work: Callable[[], None], what: str) -> None:
    """Run this process's part of a collective step; when it fails on any process, every process raises
    (so none waits forever at the next collective call). A failed write becomes a one-line RunError.

    Raises:
        RunError: naming `what` and, on the process that failed to write, the reason.
    """
    error = None
    try:
        work()
    except Exception as e:
        error = e
    (failed,) = dist.all_sum([float(error is not None)])
    if error is not None:
        reason = checkpoints.write_failure(error)
        if reason is None:
            raise error
        raise RunError(f"{what} could not be written ({reason})") from None
    if failed:
        raise RunError(f"{what}: failed on another process (its error says why)")


def save_checkpoint(runtime, root: Path, step: int, pos: Position, keep_last: int) -> Path:
    """Every process writes its part into a temporary folder, then rank 0 publishes it by a rename.

    Raises:
        RunError: the checkpoint cannot be written (disk full, no permission); the unfinished folder is
            removed and the older checkpoints stay as they were.
    """
    dist = runtime.dist
    final = root / f"step-{step}"
    tmp = checkpoints.temporary_dir(final)

    def publish() -> None:
        checkpoints.write_state(tmp, {"step": step, "position": asdict(pos), "world_size": dist.world_size,
                                      "micro_batch_size": runtime.recipe.train.micro_batch_size,
                                      "grad_accum": runtime.recipe.train.grad_accum,
                                      "strategy": runtime.recipe.train.strategy,
                                      "precision": precision_name(runtime.precision)})
        checkpoints.publish(tmp, final)
        checkpoints.prune(root, keep_last)

    try:
        all_ok(dist, lambda: checkpoints.reset_dir(tmp) if dist.is_main else None, str(tmp))
        all_ok(dist, lambda: runtime.save_state(tmp), str(tmp))
        all_ok(dist, publish if dist.is_main else lambda: None, str(tmp))
    except RunError as e:
        if dist.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
        raise RunError(f"output_dir {root.parent}: the checkpoint of step {step}: {e}; "
                       + resume_hint(root.parent, "free disk space or lower save.keep_last")) from None
    return final


def resume_hint(output_dir: Path, fix: str = "free disk space") -> str:
    """What a run that stopped on a failed write kept, and how it continues."""
    newest = checkpoints.latest_checkpoint(output_dir / "checkpoints")
    return (f"kept: {newest or 'no checkpoint yet (a resume starts again from step 0)'}; {fix}, then continue "
            "with: tuneport train --resume "
            f"{shlex.quote(str(output_dir))}")


def precision_name(precision) -> str:
    return precision.compute + (" with loss scaling" if precision.loss_scaling else "")


def resume_problem(state: dict, recipe: Recipe, world_size: int, precision, checkpoint: Path) -> Optional[str]:
    """Why checkpoint `state` cannot continue exactly with these processes, batch settings and precision
    (or None)."""
    t = recipe.train
    now = {"world_size": world_size, "micro_batch_size": t.micro_batch_size, "grad_accum": t.grad_accum,
           "precision": precision_name(precision), "strategy": t.strategy}
    state = {"strategy": "deepspeed" if (checkpoint / "deepspeed").is_dir() else "ddp", **state}  # before strategies
    changed = {k: (state[k], v) for k, v in now.items() if k in state and state[k] != v}
    if t.strategy == "fsdp" and set(changed) <= {"world_size", "micro_batch_size"}:
        before = state["world_size"] * state["micro_batch_size"]
        if before == world_size * t.micro_batch_size:
            return None  # FSDP's checkpoint reshards; the same global micro-batch keeps the data order
        if before % world_size == 0:
            return (f"--resume: {checkpoint} was written by {state['world_size']} processes of "
                    f"train.micro_batch_size={state['micro_batch_size']}; with {world_size} set "
                    f"train.micro_batch_size={before // world_size} to keep the batch of {before} samples")
    if not changed:
        return None
    return (f"--resume: {checkpoint} was written with " + ", ".join(f"{k}={old}" for k, (old, _) in changed.items())
            + " but this run has " + ", ".join(f"{k}={new}" for k, (_, new) in changed.items())
            + "; resume with the same processes, batch settings, strategy and precision (a device with the same "
              "precision support) for an exact continuation"
            + (" (train.strategy=fsdp resumes on another number of processes)" if "world_size" in changed else ""))


def restore(runtime, checkpoint: Path) -> tuple[int, Position]:
    """Load a checkpoint into the runtime; returns (step, data position) to continue from.

    Raises:
        RunError: the checkpoint's files are damaged or belong to another method.
    """
    state = checkpoints.read_state(checkpoint)
    try:
        runtime.load_state(checkpoint)
    except (OSError, ValueError, KeyError, RuntimeError, SafetensorError) as e:  # damaged or foreign files
        raise RunError(f"{checkpoint}: cannot be resumed from ({type(e).__name__}: {str(e).splitlines()[0][:200]}); "
                       "move this checkpoint folder away to resume from the one before it") from None
    log.info("resumed from %s (step %d)", checkpoint, state["step"])
    return state["step"], Position(**state["position"])


def check_finite(step: int, loss: float, grad_norm: float, runtime, recipe: Recipe, root: Path) -> None:
    """Stop a diverged run before it writes anything more (dynamic loss scaling skips overflowed steps
    itself, so there only the loss must be finite).

    Raises:
        Diverged: naming the step, the values, the likely fixes and the last good checkpoint.
    """
    if math.isfinite(loss) and (math.isfinite(grad_norm) or runtime.precision.loss_scaling):
        return
    newest = checkpoints.latest_checkpoint(root)
    kept = f"the last good checkpoint is kept: {newest}" if newest else "no checkpoint was written before it"
    raise Diverged(f"step {step}: loss {loss} and gradient norm {grad_norm} are not both finite: training "
                   f"diverged. Start a new run (another output_dir) with a lower train.lr (now {recipe.train.lr:g}) "
                   f"or precision=fp32, or check the data for broken samples; {kept}")


def train(
    recipe: Recipe,
    runtime: Runtime,
    tokenizer,
    data: Datasets,
    output_dir: Path,
    start: Optional[tuple[int, Position]] = None,
    on_step: Optional[Callable[[dict], None]] = None,
    on_start: Callable[[], None] = lambda: None,
) -> list[dict]:
    """Run the optimizer steps of `recipe`, from the start or from `start` (step, position) that
    `restore` returned after loading a checkpoint into the runtime.

    Every process runs this; only rank 0 logs and writes. `on_start` is called just before the first step
    (the CLI's start-up signal handling ends there). SIGINT or SIGTERM ends the run after the
    current optimizer step with a checkpoint (`Stopped`); a non-finite loss or gradient norm ends it
    without one (`Diverged`). A new run with evaluation data scores it before the first step (run.json's
    `baseline`), and at the end records each evaluation loss's change (run.json's `forgetting`).

    Returns:
        The metric records of the whole run (including those before a resume); empty off rank 0.
    """
    t = recipe.train
    dist = runtime.dist
    steps = total_steps(recipe, data.train, dist.world_size)
    ckpt_root = output_dir / "checkpoints"
    step, pos = start or (0, Position())
    if recipe.objective.precompute_reference:
        for name, pairs in (("train", data.train), ("eval", data.eval)):
            if pairs is not None:
                attach_reference(runtime, pairs, output_dir / "reference", name, recipe, tokenizer.pad_token_id)
    if dist.is_main:  # for the console's "step N of M"
        update_run_json(output_dir, total_steps=steps)
    if start is None and (data.eval or data.general):
        baseline = evaluations(runtime, data, recipe, tokenizer)
        if dist.is_main:
            update_run_json(output_dir, baseline=baseline)
    metrics = MetricsLog(output_dir, step if start else None) if dist.is_main else None
    per_step = t.micro_batch_size * dist.world_size * t.grad_accum  # grouped by what one optimizer step takes
    stream = micro_batches(data.train, t.micro_batch_size, t.seed, tokenizer.pad_token_id, pos,
                           dist.rank, dist.world_size, per_step if recipe.data.group_by_length or recipe.data.packing
                           else 0, data.mix, recipe.data.mix_ratio, pack_length(recipe))

    from tqdm import tqdm

    on_start()
    bar = tqdm(total=steps, initial=step, desc="train", unit="step", dynamic_ncols=True, disable=not dist.is_main)
    try:
        with StopOnSignal() as stop:
            while step < steps:
                started = time.perf_counter()
                batches = [next(stream) for _ in range(t.grad_accum)]
                counts = [units(recipe.objective, b) for b in batches]
                names = sorted(counts[0])  # what the objective normalises by: label tokens, pairs
                *summed, tokens, positions = dist.all_sum([*(sum(c[k] for c in counts) for k in names),
                                                           sum(int(b["attention_mask"].sum()) for b in batches),
                                                           sum(b["attention_mask"].size for b in batches)])
                step_units = {k: int(v) for k, v in zip(names, summed)}
                num_items = step_units if recipe.objective.preference else step_units["tokens"]
                lr = learning_rate(step, t.lr, steps, t.warmup_steps, t.scheduler)
                loss = sum(runtime.forward_backward(b, num_items, boundary=i == len(batches) - 1)
                           for i, b in enumerate(batches))
                grad_norm = runtime.optimizer_step(lr, t.grad_clip)
                sums = runtime.take_metrics()  # the objective's metrics over this step's pairs (none for sft)
                metric_values = dict(zip(sorted(sums), dist.all_sum([sums[k] for k in sorted(sums)]))) if sums else {}
                # One exchange per step: the summed loss, and which processes were asked to stop.
                loss, sigints, sigterms = dist.all_sum([loss, float(stop.signum == signal.SIGINT),
                                                        float(stop.signum == signal.SIGTERM)])
                stop.announce()
                step += 1
                check_finite(step, loss, grad_norm, runtime, recipe, ckpt_root)
                elapsed = time.perf_counter() - started
                record = {"step": step, "epoch": pos.epoch, "loss": loss, "lr": lr, "grad_norm": grad_norm,
                          # real (not padding) tokens, their rate, and the share of the batches' positions padded
                          "tokens": int(tokens), "tokens_per_s": tokens / elapsed, "padding": 1 - tokens / positions,
                          "peak_memory": runtime.memory_stats().peak,
                          **{k: v / step_units["pairs"] for k, v in metric_values.items()}}
                mfu = runtime.mfu(tokens / elapsed / dist.world_size)
                if mfu is not None:  # on an accelerator whose peak is known
                    record["mfu"] = mfu
                if (data.eval or data.general) and ((recipe.eval.every and step % recipe.eval.every == 0)
                                                    or step == steps):
                    record.update(evaluations(runtime, data, recipe, tokenizer))
                if metrics:
                    metrics.write(record)
                bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{record['tokens_per_s']:.0f}",
                                pad=f"{record['padding']:.0%}", **({"mfu": f"{mfu:.0%}"} if mfu is not None else {}))
                bar.update(1)
                if on_step:
                    on_step(record)
                saved = None
                if recipe.save.every and (step % recipe.save.every == 0 or step == steps):
                    saved = save_checkpoint(runtime, ckpt_root, step, pos, recipe.save.keep_last)
                signum = signal.SIGINT if sigints else signal.SIGTERM if sigterms else None
                if dist.world_size == 1:  # alone, a signal during this step's logging counts too
                    signum = signum or stop.signum
                if signum and step < steps:
                    stop.announce()
                    saved = saved or save_checkpoint(runtime, ckpt_root, step, pos, recipe.save.keep_last)
                    raise Stopped(signum, step, saved)
    finally:
        bar.close()
        if metrics:
            metrics.close()
    weights = runtime.gather()  # every process: a sharded model's weights come together on the main one
    if not dist.is_main:
        return []
    try:
        with checkpoints.atomic_folder(output_dir / "adapter", output_dir / "adapter.tmp") as tmp:
            runtime.save_adapter(tmp, weights)
            if recipe.data.template:  # what serve, chat and eval render this adapter's conversations with
                shutil.copyfile(resolve_path(recipe.data.template), tmp / TEMPLATE_FILE)
    except Exception as e:
        reason = checkpoints.write_failure(e)
        if reason is None:
            raise
        raise RunError(f"output_dir {output_dir}: the tuned adapter could not be written ({reason}); "
                       + resume_hint(output_dir)) from None
    records = metrics.records()
    plot_loss(records, output_dir / "loss.png")
    baseline = read_run_json(output_dir).get("baseline")
    if baseline:
        update_run_json(output_dir, forgetting=forgetting(baseline, records[-1]))
    return records


def read_run_json(output_dir: Path) -> dict:
    return read_json_object(output_dir / "run.json")


def update_run_json(output_dir: Path, **entries) -> None:
    """Add `entries` to the run's run.json (written atomically)."""
    atomic_write_text(output_dir / "run.json", json.dumps({**read_run_json(output_dir), **entries}, indent=2,
                                                          default=str))


def write_recipe(recipe: Recipe, output_dir: Path) -> None:
    atomic_write_text(output_dir / "recipe.yaml", yaml.safe_dump(recipe_to_dict(recipe), sort_keys=False,
                                                                 allow_unicode=True))
