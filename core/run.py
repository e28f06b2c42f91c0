"""A training run from its arguments to its last step: the recipe read once (with a resume's stored one),
the inputs validated before anything is written, the device and process group set up, the folder
claimed, the runtime built and restored, then the training loop (`core/trainer.py`). `tuneport train`
(core/commands.py) and `tuneport.train` (core/api.py) both run `train_run`."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import shlex
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

from ..frameworks import get_runtime
from ..models import builder_family, builder_names, family_for
from . import checkpoints, rundir, trainer
from .config import changed_keys, load_recipe, resolve_path
from .distributed import Dist, in_process_group, init_distributed, launched
from .errors import EXPECTED, Diverged, RecipeError, RunError, Stopped
from .exits import leave_job, report
from .checkpoints import write_failure
from .precision import resolve_precision
from .rundir import FolderError, check_usable, check_writable, is_run_folder
from .signals import StartupGuard
from .trainer import resume_hint

log = logging.getLogger("tuneport")


DEMO_RECIPE = "builtin:demo.yaml"


# Keys a resumed run may change: how long it runs and how often it saves and evaluates, not what it learns.
RESUME_MAY_CHANGE = ("train.max_steps", "train.epochs", "save.every", "save.keep_last", "eval.every",
                     "eval.max_batches", "device")


def read_recipe(args: argparse.Namespace, demo: bool):
    """The recipe a train command asks for: (recipe, resume folder or None, demo?, keys a resume changes).

    `--resume DIR` takes the recipe from DIR; overrides may change only RESUME_MAY_CHANGE.
    """
    recipe_arg, overrides = args.recipe, list(args.overrides)
    if recipe_arg and "=" in recipe_arg and not recipe_arg.endswith((".yaml", ".yml")):
        recipe_arg, overrides = None, [recipe_arg, *overrides]  # `tuneport train key=value` overrides the demo
    if args.device:
        overrides.append(f"device={args.device}")
    if getattr(args, "framework", None):
        overrides.append(f"framework={args.framework}")
    if not args.resume:
        return load_recipe(recipe_arg or DEMO_RECIPE, tuple(overrides)), None, demo or recipe_arg is None, {}
    resume_dir = Path(args.resume)
    if recipe_arg:
        raise RunError(f"--resume {resume_dir}: a resumed run keeps the recipe in its folder; drop {recipe_arg} "
                       f"(to run longer: tuneport train --resume {resume_dir} train.max_steps=N)")
    if any(o.partition("=")[0].strip() == "output_dir" for o in overrides):
        raise RunError(f"--resume {resume_dir}: the run folder is {resume_dir}; drop output_dir=...")
    earlier_tuneport = (resume_dir / "run.json").is_file() and checkpoints.latest_checkpoint(resume_dir / "checkpoints")
    if not (resume_dir / "recipe.yaml").is_file() or not (rundir.is_run_folder(resume_dir) or earlier_tuneport):
        raise RunError(f"--resume {resume_dir}: not a tuneport run folder (no {rundir.MARKER} and recipe.yaml); "
                       "give the output_dir of a run")
    # The folder is set as a value, not parsed as a YAML override ("runs/exp #2" would lose its "#2").
    # A run from before length grouping existed keeps its plain shuffle.
    earlier = () if "group_by_length" in (resume_dir / "recipe.yaml").read_text() else ("data.group_by_length=false",)
    stored = dataclasses.replace(load_recipe(resume_dir / "recipe.yaml", earlier), output_dir=str(resume_dir))
    recipe = dataclasses.replace(load_recipe(resume_dir / "recipe.yaml", (*earlier, *overrides)),
                                 output_dir=str(resume_dir))
    changed = changed_keys(stored, recipe)
    refused = {k: v for k, v in changed.items() if k not in RESUME_MAY_CHANGE
               or (k == "train.max_steps" and recipe.method.spans_run)}  # e.g. AdaLoRA's budget spans max_steps
    if recipe.train.strategy == "fsdp":  # on another number of processes (the checkpoint's batch is checked later)
        refused.pop("train.micro_batch_size", None)
    if refused:
        raise RunError(f"--resume {resume_dir}: " + ", ".join(f"{k} ({old!r} -> {new!r})" for k, (old, new)
                                                               in refused.items())
                       + " would change what the run learns; a resumed run may change only "
                       + ", ".join(RESUME_MAY_CHANGE)
                       + (f" (not train.max_steps with {recipe.method.name}: its schedule spans the run)"
                          if "train.max_steps" in refused else "")
                       + ". Start a new run (another output_dir) for the rest")
    return recipe, resume_dir, demo, changed


def folder_action(output_dir: Path, resume: bool, demo: bool) -> str:
    """What a run does with its output folder: "new", "afresh" (a run folder without progress, or an
    earlier demo) or "resume". Reads only.

    Raises:
        FolderError: a folder that is not tuneport's, or a run with progress that was not resumed.
    """
    if resume:
        return "resume"
    check_usable(output_dir)
    check_writable(output_dir, f"output_dir {output_dir}", NEW_RUN_FIX)
    if not is_run_folder(output_dir):
        return "new"
    progress = checkpoints.latest_checkpoint(output_dir / "checkpoints") or (output_dir / "adapter").exists()
    try:
        was_demo = load_recipe(output_dir / "recipe.yaml").model == "demo"
    except RecipeError:
        was_demo = False
    if (demo and was_demo) or not progress:
        return "afresh"  # an earlier demo, or a start that failed before its first checkpoint
    raise FolderError(f"output_dir: {output_dir} already holds a run; continue it with --resume {output_dir}, "
                      "or choose another output_dir=...")


def plan_inputs(recipe, resume_dir: Optional[Path], precision, changed: dict, world_size: int):
    """Validate everything a run reads (model, tokenizer, data, resume checkpoint), writing nothing. A resume
    must have steps left to train (`changed`: the keys its overrides change) and continue on the processes
    that wrote its checkpoint (`world_size`: the job's, as its launcher says).

    Returns:
        (tokenizer, the run's data (trainer.Datasets), checkpoint to resume from or None)
    """
    if recipe.model in builder_names():
        if not recipe.tokenizer:
            raise RunError(f"tokenizer: a built model ({recipe.model}) needs a tokenizer path in the recipe")
        family = builder_family(recipe.model)
        model_dir, config = f"the built model {recipe.model!r}", family.builders[recipe.model][0]()
    else:
        model_dir = trainer.model_folder(recipe, Path(recipe.output_dir))
        family = family_for(model_dir)
    family.require(recipe.framework, f"framework {recipe.framework}")  # before any weight or data is read
    if recipe.method.needs:
        family.require(recipe.method.needs, f"method {recipe.method.name}")
    if recipe.model not in builder_names():
        config, _, _ = family.check_checkpoint(model_dir, **recipe.method.model_overrides(family))
    tokenizer_path = trainer.tokenizer_path(recipe, model_dir)
    if recipe.data.template:
        family.require("template", "data.template")
        tokenizer = family.load_tokenizer(tokenizer_path, template=resolve_path(recipe.data.template))
    else:
        tokenizer = family.load_tokenizer(tokenizer_path)
    family.check_vocabulary(tokenizer, config, tokenizer_path, model_dir)
    data = trainer.load_data(recipe, tokenizer)
    resume_from = None
    if resume_dir is not None:
        resume_from = checkpoints.latest_checkpoint(resume_dir / "checkpoints")
        if resume_from is None:
            log.warning("%s has no complete checkpoint; starting from step 0", resume_dir)
            return tokenizer, data, None
        try:
            state = checkpoints.read_state(resume_from)
        except (OSError, ValueError) as e:
            raise RunError(f"{resume_from / checkpoints.STATE_FILE}: cannot be read ({e}); move this "
                                   "checkpoint folder away to resume from the one before it") from None
        problem = (trainer.resume_problem(state, recipe, world_size, precision, resume_from)
                   or nothing_left(resume_dir, state["step"], trainer.total_steps(recipe, data.train,
                                                                                  world_size), recipe, changed))
        if problem:
            raise RunError(problem)
    return tokenizer, data, resume_from


def nothing_left(run: Path, done: int, total: int, recipe, changed: dict) -> Optional[str]:
    """Why a resume would train no step (or None): a length at or below the steps done, or a finished run.
    A run stopped after its last checkpoint but before its adapter was written still resumes, to write it."""
    lengths = [f"{k}={new}" for k, (_, new) in changed.items() if k in ("train.max_steps", "train.epochs")]
    longer = (f"To train longer: tuneport train --resume {shlex.quote(str(run))} "
              + (f"train.max_steps={2 * max(done, total)}" if recipe.train.max_steps is not None
                 else f"train.epochs={2 * recipe.train.epochs:g}"))
    if done >= total and lengths:
        return (f"--resume {run}: {' '.join(lengths)} makes {total} steps, at or below the {done} the run has done; "
                f"nothing was changed. {longer}")
    if done >= total and (run / "adapter").is_dir():
        return f"--resume {run}: the run is complete ({done} of {total} steps, adapter written). {longer}"
    return None


SHARDED = ("fsdp", "deepspeed")  # strategies whose engines need a process group, also for one process

NEW_RUN_FIX = "free disk space, or choose a writable output_dir=..."


def cannot_write(folder: Path, e: OSError) -> FolderError:
    return FolderError(f"output_dir {folder}: cannot be written ({write_failure(e)}); nothing of this run was kept; "
                       f"{NEW_RUN_FIX}")


def train_write_error(e: BaseException, output_dir: Path, resumable: bool) -> Optional[FolderError]:
    """One line for a write that failed outside the writers that say it themselves (checkpoints, the adapter):
    the demo's base model, metrics.jsonl, TensorBoard events, run.json, loss.png. A run that can continue
    (it had started training, or was a resume) names its newest checkpoint and --resume; a new run that
    never started has been removed, and is started again."""
    reason = write_failure(e) if isinstance(e, Exception) and not isinstance(e, EXPECTED) else None
    if reason is None:
        return None
    return FolderError(f"output_dir {output_dir}: cannot be written ({reason}); "
                       + (resume_hint(output_dir) if resumable else f"nothing of this run was kept; {NEW_RUN_FIX}"))


def prepare_folder(output_dir: Path, action: str, demo: bool, recipe, record: Callable[[], dict], guard: StartupGuard):
    """Claim the output folder of a new run (rank 0 only): lock, marker, recipe.yaml, run.json. From the lock
    on, `guard.undo` removes what the start wrote (run on a signal or a failure before training starts).

    Returns:
        The folder's lock, held until the run ends.
    """
    created, was_run_folder = not output_dir.exists(), rundir.is_run_folder(output_dir)
    try:
        lock = rundir.claim(output_dir)
    except OSError as e:
        if created:
            rundir.unclaim(output_dir, created, was_run_folder)
        raise cannot_write(output_dir, e) from None
    guard.undo = lambda: rundir.unclaim(output_dir, created, was_run_folder)
    try:
        action = folder_action(output_dir, False, demo)  # again, now that no other run can change it
        if action == "afresh":
            log.warning("%s: starting afresh (removing only what tuneport wrote there)", output_dir)
            rundir.clear(output_dir)
        rundir.write_marker(output_dir)
        trainer.write_recipe(recipe, output_dir)
        rundir.atomic_write_text(output_dir / "run.json", json.dumps(record(), indent=2, default=str))
    except BaseException as e:
        lock.release()
        if isinstance(e, Exception) and write_failure(e):  # the demo's base model is built here too
            raise cannot_write(output_dir, e) from None
        raise
    return lock


def record_resume(output_dir: Path, recipe, changed: dict, record: Callable[[], dict],
                  processes: tuple[int, int] = (1, 1)) -> None:
    """After the checkpoint has loaded: note the resume in run.json (with `processes`, the checkpoint's number of
    processes and this run's, when they differ), and the recipe if an override changed it."""
    if not rundir.is_run_folder(output_dir):
        rundir.write_marker(output_dir)  # a run folder of an earlier tuneport
    checkpoints.remove_unfinished(output_dir / "checkpoints")
    history = trainer.read_run_json(output_dir) or record()
    history.pop("outcome", None)  # how the previous process ended; this one is running now
    history.setdefault("resumes", []).append({"time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "pid": os.getpid(),
                                              "changed": {k: list(v) for k, v in changed.items()},
                                              **({"world_size": list(processes)} if processes[0] != processes[1]
                                                 else {})})
    if changed:
        trainer.write_recipe(recipe, output_dir)
    rundir.atomic_write_text(output_dir / "run.json", json.dumps(history, indent=2, default=str))


@dataclass
class RunPlan:
    """A run, validated before anything is written: what `plan_run` makes of the command line."""

    recipe: Any
    resume_dir: Optional[Path]  # the run folder being resumed, or None for a new run
    demo: bool
    changed: dict  # keys a resume changes: {key: (old, new)}
    action: str  # what happens to the output folder: "new", "afresh" or "resume"
    choice: Any  # core.runtime.RuntimeChoice: framework, device, runtime builder
    precision: Any  # core.precision.PrecisionPlan
    tokenizer: Any
    data: Any  # trainer.Datasets
    resume_from: Optional[Path]  # the checkpoint a resume continues from
    lock: Any = None  # a resumed folder's lock, taken before its checkpoints are read

    @property
    def output_dir(self) -> Path:
        return Path(self.recipe.output_dir)


def plan_run(args: argparse.Namespace, demo: bool) -> RunPlan:
    """The command line to a validated run plan. Writes nothing (a resume first locks its folder, so that
    no other run changes the checkpoints it reads)."""
    recipe, resume_dir, demo, changed = read_recipe(args, demo)
    action = folder_action(Path(recipe.output_dir), resume_dir is not None, demo)  # reads only
    # The framework says where its launcher put this process (choice.job): rank 0 locks a resumed folder.
    choice, precision = plan_device(recipe)
    lock = rundir.RunLock(resume_dir) if resume_dir is not None and choice.job.rank == 0 else None
    try:
        tokenizer, data, resume_from = plan_inputs(recipe, resume_dir, precision, changed, choice.job.world_size)
    except BaseException:
        if lock:
            lock.release()
        raise
    return RunPlan(recipe, resume_dir, demo, changed, action, choice, precision, tokenizer, data,
                   resume_from, lock)


def prepare_run(plan: RunPlan, guard: StartupGuard):
    """Set up the device and join the job (torchrun's process group, or the framework's own launcher's job:
    `choice.join`), then claim a new run's folder (rank 0: lock, marker, recipe.yaml, run.json; `guard.undo`
    removes them again). Returns this process's Dist."""
    backend = plan.choice.device
    backend.setup()
    if plan.choice.join is not None:
        dist = plan.choice.join()
    elif plan.choice.data_parallel:
        dist = init_distributed(backend.capabilities.dist_backend, backend.device,
                                process_group_alone=plan.recipe.train.strategy in SHARDED)
    else:
        dist = Dist()
    if dist.world_size == 1:  # one process: the device the name picks (`--device npu:1`); a job's, by local rank
        dist = dataclasses.replace(dist, local_rank=int(plan.choice.device_name.partition(":")[2] or 0))
    backend.set_device(dist.local_rank)

    def claim() -> None:
        if dist.is_main and plan.resume_dir is None:
            plan.lock = prepare_folder(plan.output_dir, plan.action, plan.demo, plan.recipe,
                                       lambda: run_record(plan, dist), guard)

    dist.barrier()  # every process has checked the folder before the first one writes to it
    trainer.all_ok(dist, claim, f"output folder {plan.output_dir}")
    return dist


def run_record(plan: RunPlan, dist) -> dict:
    model_dir = trainer.model_folder(plan.recipe, plan.output_dir)
    return {**trainer.run_record(plan.recipe, plan.choice.device, plan.precision, model_dir),
            "world_size": dist.world_size}


def build_run(plan: RunPlan, dist):
    """The runtime on its model, restored from the resumed checkpoint (then the resume is recorded).
    Returns (runtime, model folder, start or None)."""
    model_dir = trainer.model_folder(plan.recipe, plan.output_dir)  # every process: the folder rank 0 made sure of
    runtime = plan.choice.build(plan.recipe, plan.precision, model_dir, dist)
    start = trainer.restore(runtime, plan.resume_from) if plan.resume_from else None
    if plan.resume_dir is not None and dist.is_main:
        before = checkpoints.read_state(plan.resume_from)["world_size"] if plan.resume_from else dist.world_size
        record_resume(plan.output_dir, plan.recipe, plan.changed, lambda: run_record(plan, dist),
                      (before, dist.world_size))
    return runtime, model_dir, start


def plan_device(recipe):
    """(framework and device choice, precision plan) for the recipe, with its DeepSpeed settings checked."""
    choice = get_runtime(recipe.framework, recipe.device)
    precision = resolve_precision(recipe.precision, choice.device_name, choice.device.capabilities)
    if recipe.deepspeed:
        config = resolve_path(recipe.deepspeed)
        if not config.exists():
            raise RunError(f"deepspeed: {recipe.deepspeed}: file not found; give a DeepSpeed JSON config")
        try:
            json.loads(config.read_text())
        except (ValueError, OSError) as e:
            raise RunError(f"deepspeed: {recipe.deepspeed}: not a readable JSON config ({e}); fix it, or start from "
                           "builtin:deepspeed/zero3.json") from None
    if recipe.train.offload and choice.device.device(0).type == "cpu":
        raise RunError("train.offload: the device is the host already, so there is nothing to offload; remove "
                       "train.offload=true (or train on an accelerator)")
    if recipe.train.strategy in SHARDED and not launched():
        raise RunError(f"train.strategy: {recipe.train.strategy} runs under a launcher, also for one device; run: "
                       "torchrun --standalone --nproc_per_node N -m tuneport.core.cli train RECIPE ...")
    return choice, precision


def record_outcome(output_dir: Path, e: Optional[BaseException]) -> None:
    """run.json's `outcome`: how this process ended the run (None: it finished), as the console shows it; a
    resume clears it. Only a folder the run still has; a failure to write it never hides the run's own error."""
    if e is None:
        outcome = {"status": "finished", "message": ""}
    elif isinstance(e, (Stopped, KeyboardInterrupt)):
        outcome = {"status": "stopped", "message": str(e) or "interrupted"}
    elif isinstance(e, Diverged):
        outcome = {"status": "diverged", "message": str(e)}
    else:
        text = str(e) if isinstance(e, EXPECTED) else f"{type(e).__name__}: {e}"
        outcome = {"status": "failed", "message": text.splitlines()[0] if text else type(e).__name__}
    if not rundir.is_run_folder(output_dir):
        return
    try:
        trainer.update_run_json(output_dir, outcome={**outcome, "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                                                     "pid": os.getpid()})
    except OSError:
        log.warning("%s: could not record how the run ended in run.json", output_dir)


@dataclass
class Trained:
    """A finished run: its recipe and folder, each step's record, and what chat-style checks need after it."""

    recipe: Any
    output_dir: Path
    records: list[dict]
    runtime: Any
    tokenizer: Any
    model_dir: Path
    device: str
    world_size: int
    is_main: bool
    demo: bool


def train_run(args: argparse.Namespace, demo: bool = False) -> Trained:
    """plan, prepare, build, run: a training run from command-line style arguments (`recipe`, `overrides`,
    `resume`, `device`, `framework`, and `guard`, the start-up signal guard).

    Raises:
        RecipeError, DataError, CheckpointError, FolderError, RunError, ...: before or during the run (a new
            run that never reached its first step leaves nothing behind).
        Stopped: SIGINT or SIGTERM after a checkpoint was saved.
    """
    guard: StartupGuard = args.guard
    guard.message = "interrupted before training started; nothing was written"
    plan = plan_run(args, demo)
    if plan.resume_dir:
        guard.message = (f"interrupted before training resumed; its checkpoints are as they were: continue with "
                         f"tuneport train --resume {shlex.quote(str(plan.resume_dir))}")
    dist = None
    try:
        dist = prepare_run(plan, guard)
        runtime, model_dir, start = build_run(plan, dist)
        records = trainer.train(plan.recipe, runtime, plan.tokenizer, plan.data, plan.output_dir, start,
                                on_start=guard.hand_over)
        if dist.is_main:
            record_outcome(plan.output_dir, None)  # while the folder is still locked
    except BaseException as e:
        resumable = guard.started or plan.resume_dir is not None
        guard.run_undo()  # a new run that never started training leaves nothing behind
        failed = train_write_error(e, plan.output_dir, resumable)
        if dist is not None and dist.is_main:
            record_outcome(plan.output_dir, failed or e)
        if not in_process_group():
            if failed:
                raise failed from None
            raise
        code = report(failed or e, guard)  # printed now, while the model (and DDP's reducer) is still alive
        if plan.lock:
            plan.lock.release()
        leave_job(code)
    finally:
        if plan.lock:
            plan.lock.release()
    return Trained(plan.recipe, plan.output_dir, records, runtime, plan.tokenizer, model_dir, plan.choice.device_name,
                   dist.world_size, dist.is_main, plan.demo)
