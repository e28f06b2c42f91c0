"""The `tuneport` command line: one table of subcommands.

Every expected failure (a bad recipe, bad data, a missing device) ends with one `error:` line naming
the file, field and fix, and exit status 2; tracebacks are for bugs.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import shlex
import signal
import sys
import time
from pathlib import Path
from dataclasses import dataclass
from typing import Any, Callable, Optional

from . import evaluate, parity  # their CLI parts; they import torch and the rest only when they run
from ..frameworks import FRAMEWORKS, frameworks_of, get_runtime
from .errors import EXPECTED, Diverged, MethodUnavailable, RecipeError, RunError, Stopped
from .methods import METHODS
from .quiet import hide_harmless_warnings
from .checkpoints import write_failure
from .rundir import FolderError, check_writable, writing
from .signals import StartupGuard
from .versions import tuneport_version

DEMO_RECIPE = "builtin:demo.yaml"
log = logging.getLogger("tuneport")


# --- train / demo ------------------------------------------------------------------------------------
def add_train_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("recipe", nargs="?", help="recipe YAML (default: the built-in demo)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. train.lr=1e-4")
    p.add_argument("--device", help="auto or a registered device: cpu, cuda, npu, ... (overrides the recipe)")
    p.add_argument("--framework", choices=FRAMEWORKS, help="overrides the recipe (default torch)")
    p.add_argument("--resume", metavar="OUTPUT_DIR", help="continue the run in OUTPUT_DIR from its newest checkpoint")


# Keys a resumed run may change: how long it runs and how often it saves and evaluates, not what it learns.
RESUME_MAY_CHANGE = ("train.max_steps", "train.epochs", "save.every", "save.keep_last", "eval.every",
                     "eval.max_batches", "device")


def read_recipe(args: argparse.Namespace, demo: bool):
    """The recipe a train command asks for: (recipe, resume folder or None, demo?, keys a resume changes).

    `--resume DIR` takes the recipe from DIR; overrides may change only RESUME_MAY_CHANGE.
    """
    from . import checkpoints, rundir
    from .config import changed_keys, load_recipe

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
    from . import checkpoints
    from .config import load_recipe
    from .rundir import check_usable, is_run_folder

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


def plan_inputs(recipe, resume_dir: Optional[Path], precision, changed: dict):
    """Validate everything a run reads (model, tokenizer, data, resume checkpoint), writing nothing. A resume
    must have steps left to train (`changed`: the keys its overrides change).

    Returns:
        (tokenizer, the run's data (trainer.Datasets), checkpoint to resume from or None)
    """
    from ..models import builder_family, builder_names, family_for

    from . import checkpoints, trainer

    if recipe.model in builder_names():
        if not recipe.tokenizer:
            raise RunError(f"tokenizer: a built model ({recipe.model}) needs a tokenizer path in the recipe")
        family = builder_family(recipe.model)
        model_dir, config = f"the built model {recipe.model!r}", family.builders[recipe.model][0]()
    else:
        model_dir = trainer.model_folder(recipe, Path(recipe.output_dir))
        family = family_for(model_dir)
        config, _, _ = family.check_checkpoint(model_dir, **recipe.method.model_overrides())
    tokenizer_path = trainer.tokenizer_path(recipe, model_dir)
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
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
        problem = (trainer.resume_problem(state, recipe, world_size, precision, resume_from)
                   or nothing_left(resume_dir, state["step"], trainer.total_steps(recipe, len(data.train.samples),
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


NEW_RUN_FIX = "free disk space, or choose a writable output_dir=..."


def cannot_write(folder: Path, e: OSError) -> FolderError:
    return FolderError(f"output_dir {folder}: cannot be written ({write_failure(e)}); nothing of this run was kept; "
                       f"{NEW_RUN_FIX}")


def train_write_error(e: BaseException, output_dir: Path, resumable: bool) -> Optional[FolderError]:
    """One line for a write that failed outside the writers that say it themselves (checkpoints, the adapter):
    the demo's base model, metrics.jsonl, TensorBoard events, run.json, loss.png. A run that can continue
    (it had started training, or was a resume) names its newest checkpoint and --resume; a new run that
    never started has been removed, and is started again."""
    from .trainer import resume_hint

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
    from . import rundir, trainer

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


def record_resume(output_dir: Path, recipe, changed: dict, record: Callable[[], dict]) -> None:
    """After the checkpoint has loaded: note the resume in run.json, and the recipe if an override changed it."""
    from . import checkpoints, rundir, trainer

    if not rundir.is_run_folder(output_dir):
        rundir.write_marker(output_dir)  # a run folder of an earlier tuneport
    checkpoints.remove_unfinished(output_dir / "checkpoints")
    history = trainer.read_run_json(output_dir) or record()
    history.setdefault("resumes", []).append({"time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "pid": os.getpid(),
                                              "changed": {k: list(v) for k, v in changed.items()}})
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
    from . import rundir

    recipe, resume_dir, demo, changed = read_recipe(args, demo)
    lock = rundir.RunLock(resume_dir) if resume_dir is not None and int(os.environ.get("RANK", "0")) == 0 else None
    try:
        action = folder_action(Path(recipe.output_dir), resume_dir is not None, demo)
        choice, precision = plan_device(recipe)
        tokenizer, data, resume_from = plan_inputs(recipe, resume_dir, precision, changed)
    except BaseException:
        if lock:
            lock.release()
        raise
    return RunPlan(recipe, resume_dir, demo, changed, action, choice, precision, tokenizer, data,
                   resume_from, lock)


def prepare_run(plan: RunPlan, guard: StartupGuard):
    """Set up the device and the process group, then claim a new run's folder (rank 0: lock, marker,
    recipe.yaml, run.json; `guard.undo` removes them again). Returns this process's Dist."""
    from . import trainer
    from .distributed import Dist, init_distributed

    backend = plan.choice.device
    backend.setup()
    if plan.choice.data_parallel:
        dist = init_distributed(backend.capabilities.dist_backend, backend.device,
                                process_group_alone=bool(plan.recipe.deepspeed))
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
    from . import trainer

    model_dir = trainer.model_folder(plan.recipe, plan.output_dir)
    return {**trainer.run_record(plan.recipe, plan.choice.device, plan.precision, model_dir),
            "world_size": dist.world_size}


def build_run(plan: RunPlan, dist):
    """The runtime on its model, restored from the resumed checkpoint (then the resume is recorded).
    Returns (runtime, model folder, start or None)."""
    from . import trainer

    model_dir = trainer.model_folder(plan.recipe, plan.output_dir)  # every process: the folder rank 0 made sure of
    runtime = plan.choice.build(plan.recipe, plan.precision, model_dir, dist)
    start = trainer.restore(runtime, plan.resume_from) if plan.resume_from else None
    if plan.resume_dir is not None and dist.is_main:
        record_resume(plan.output_dir, plan.recipe, plan.changed, lambda: run_record(plan, dist))
    return runtime, model_dir, start


def run_train(args: argparse.Namespace, demo: bool = False) -> int:
    """plan, prepare, build, run: `tuneport train` (and the demo)."""
    from . import trainer
    from .distributed import in_process_group

    guard: StartupGuard = args.guard
    guard.message = "interrupted before training started; nothing was written"
    plan = plan_run(args, demo)
    if plan.resume_dir:
        guard.message = (f"interrupted before training resumed; its checkpoints are as they were: continue with "
                         f"tuneport train --resume {shlex.quote(str(plan.resume_dir))}")
    try:
        dist = prepare_run(plan, guard)
        runtime, model_dir, start = build_run(plan, dist)
        records = trainer.train(plan.recipe, runtime, plan.tokenizer, plan.data, plan.output_dir, start,
                                on_start=guard.hand_over)
    except BaseException as e:
        resumable = guard.started or plan.resume_dir is not None
        guard.run_undo()  # a new run that never started training leaves nothing behind
        failed = train_write_error(e, plan.output_dir, resumable)
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
    if dist.is_main:
        recipe, output_dir = plan.recipe, plan.output_dir
        losses = [r["loss"] for r in records]
        print(f"trained {len(records)} steps ({recipe.framework}) on {plan.choice.device_name} x{dist.world_size}: "
              f"loss {losses[0]:.4f} -> {losses[-1]:.4f}")
        change = trainer.read_run_json(output_dir).get("forgetting")
        if change:
            print(trainer.summary_line(change))
        print(f"adapter: {output_dir / 'adapter'}   metrics: {output_dir / 'metrics.jsonl'}   "
              f"plot: {output_dir / 'loss.png'}")
        if plan.demo:
            show_answers(runtime, plan.tokenizer, train_data_path=recipe.data.train)
            print(f"chat with it: tuneport chat --model {model_dir} --adapter {output_dir / 'adapter'}")
    if in_process_group():
        leave_job(0)
    return 0


def plan_device(recipe):
    """(framework and device choice, precision plan) for the recipe, with its DeepSpeed settings checked."""
    from .config import resolve_path
    from .distributed import launched
    from .precision import resolve_precision

    choice = get_runtime(recipe.framework, recipe.device)
    precision = resolve_precision(recipe.precision, choice.device_name, choice.device.capabilities)
    if recipe.deepspeed and not resolve_path(recipe.deepspeed).exists():
        raise RunError(f"deepspeed: {recipe.deepspeed}: file not found; give a DeepSpeed JSON config")
    if recipe.deepspeed and json.loads(resolve_path(recipe.deepspeed).read_text()).get(
            "zero_optimization", {}).get("stage", 0) == 3:
        raise RunError("deepspeed: ZeRO stage 3 is not supported yet (saving would need gathered weights); "
                               "use stage 2 (builtin:deepspeed/zero2.json)")
    if recipe.deepspeed and not launched():
        raise RunError("deepspeed: DeepSpeed runs under a launcher, also for one device; run: torchrun "
                               "--standalone --nproc_per_node N -m tuneport.core.cli train RECIPE ...")
    return choice, precision


def show_answers(runtime, tokenizer, train_data_path: str, count: int = 3) -> None:
    """Print the tuned model's greedy answers to the first `count` training prompts, beside the trained ones."""
    from .config import resolve_path

    lines = resolve_path(train_data_path).read_text(encoding="utf-8").splitlines()[:count]
    matched = 0
    for line in lines:
        messages = json.loads(line)["conversations"]
        *history, query, answer = messages
        prompt = tokenizer.build_chat_input(query["content"], history=history)["input_ids"][0].tolist()
        reply = tokenizer.decode(runtime.generate(prompt, 64, tokenizer.stop_token_ids, tokenizer.pad_token_id),
                                 skip_special_tokens=True).strip()
        matched += reply == answer["content"]
        print(f"\nuser:      {query['content']}\nassistant: {reply}\ntrained:   {answer['content']}")
    print(f"\n{matched}/{len(lines)} answers reproduce the trained ones")


def add_demo_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides of recipes/demo.yaml")


def run_demo(args: argparse.Namespace) -> int:
    args.recipe, args.device, args.resume = None, None, None
    return run_train(args, demo=True)


# --- chat ----------------------------------------------------------------------------------------------
def add_chat_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="base checkpoint folder")
    p.add_argument("--adapter", help="tuned result: a PEFT adapter, a P-tuning v2 prefix folder, or a full checkpoint")
    p.add_argument("--device", default="auto", help="auto or a registered device: cpu, cuda, npu, ...")
    p.add_argument("--prompt", help="answer this one message and exit (for scripts)")
    p.add_argument("--system", help="system message for the conversation")
    p.add_argument("--max-new-tokens", type=int, default=512)


def run_chat(args: argparse.Namespace) -> int:
    import torch
    from transformers import TextStreamer

    from ..backends import open_backend
    from ..models import family_for

    from ..frameworks.torch.build import load_tuned_model

    if args.max_new_tokens <= 0:
        raise RunError(f"--max-new-tokens: {args.max_new_tokens} must be > 0, e.g. --max-new-tokens 512")
    try:
        _, backend, index = open_backend(args.device)
    except ValueError as e:
        raise RunError(f"--device: {e}") from None
    family = family_for(Path(args.model))
    tokenizer = family.load_tokenizer(args.model)
    family.check_vocabulary(tokenizer, family.check_checkpoint(args.model)[0], args.model, args.model)
    model = load_tuned_model(Path(args.model), Path(args.adapter) if args.adapter else None, backend,
                             device_index=index)
    history = [{"role": "system", "content": args.system}] if args.system else []

    def reply(query: str) -> str:
        inputs = tokenizer.build_chat_input(query, history=history).to(model.device)
        streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
        with torch.no_grad():
            out = model.generate(**inputs, max_new_tokens=args.max_new_tokens, do_sample=False,
                                 eos_token_id=tokenizer.stop_token_ids, pad_token_id=tokenizer.pad_token_id,
                                 streamer=streamer)
        text = tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True).strip()
        history.extend([{"role": "user", "content": query}, {"role": "assistant", "content": text}])
        return text

    if args.prompt is not None:
        reply(args.prompt)
        return 0
    print("tuneport chat: type a message; 'clear' starts over, 'exit' or Ctrl-D quits.")
    while True:
        try:
            query = input("\nuser: ").strip()
        except EOFError:
            print()
            return 0
        if query in ("exit", "quit"):
            return 0
        if query == "clear":
            del history[1 if args.system else 0:]
            continue
        if query:
            print("assistant: ", end="", flush=True)
            reply(query)


# --- doctor ------------------------------------------------------------------------------------------
def add_doctor_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="cpu", help="a registered device: cpu, cuda, npu, ... (default cpu)")
    p.add_argument("--framework", default="torch", choices=FRAMEWORKS)


def run_doctor(args: argparse.Namespace) -> int:
    from .doctor import run

    return run(args.device, args.framework)


# --- convert -------------------------------------------------------------------------------------------
def add_convert_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("source", help="checkpoint folder (pickle .bin or safetensors shards)")
    p.add_argument("destination", help="new folder: the same checkpoint as safetensors shards")


def run_convert(args: argparse.Namespace) -> int:
    from ..models import CheckpointError, family_for

    family = family_for(Path(args.source))
    if family.convert is None:
        raise CheckpointError(f"{args.source}: converting {family.model_type} checkpoints is not supported")
    fix = "free disk space, or choose a writable destination"
    check_writable(Path(args.destination), args.destination, fix)  # before any shard is read
    with writing(args.destination, "nothing was written there", fix):
        family.convert(Path(args.source), Path(args.destination))
    print(f"wrote {args.destination}")
    return 0


# --- export --------------------------------------------------------------------------------------------
def add_export_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="base checkpoint folder")
    p.add_argument("--adapter", help="a run's adapter/ folder (LoRA, P-tuning v2 or full); omit to re-export the base")
    p.add_argument("--out", required=True, help="new folder for the merged model (official layout)")
    p.add_argument("--dtype", default="fp32", help="fp32 | bf16 | fp16 (default fp32)")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it holds an earlier export")
    p.add_argument("--format", default="safetensors", help="safetensors (the official layout, default) | onnx "
                   "(one generation step with its KV cache, fp32)")
    p.add_argument("--copy-code", action="store_true", help="also copy the base folder's release code files "
                   "(modeling_chatglm.py, ...) whose sha256 is no published release's; engines started with "
                   "--trust-remote-code run them")


def run_export(args: argparse.Namespace) -> int:
    from .export import COPIED, SKIPPED, export

    record = export(Path(args.model), Path(args.adapter) if args.adapter else None, Path(args.out), args.dtype,
                    args.overwrite, args.format, args.copy_code)
    for name, digest in record["sha256"].items():
        print(f"{digest}  {Path(args.out) / name}")
    for name, code in record["code"].items():
        if code["action"] == SKIPPED:
            print(f"skipped {Path(args.model) / name}: its sha256 {code['sha256'][:12]}... is no published release's "
                  "that tuneport knows; engines started with --trust-remote-code would run it. If you trust it, "
                  "export again with --copy-code")
        elif code["action"] == COPIED:
            print(f"copied {Path(args.model) / name} (--copy-code), which is no published release's: engines started "
                  "with --trust-remote-code will run it")
    if "onnx_max_abs_diff" in record:
        print(f"onnx.checker: passed; onnxruntime against torch, largest logit difference: "
              f"{record['onnx_max_abs_diff']:.3g}")
    print(f"wrote {args.out} ({args.format}, {args.dtype}); the sha256 of each file is in {Path(args.out) / 'export.json'}")
    return 0


# --- estimate ----------------------------------------------------------------------------------------
UNITS = {"": 1, "b": 1, "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40, "kb": 10**3, "mb": 10**6,
         "gb": 10**9, "tb": 10**12}


def parse_memory(text: str) -> int:
    """'24GiB', '80GB', '512MiB' or bytes, as bytes."""
    import re

    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", text)
    if not match or match.group(2).lower() not in UNITS:
        raise RunError(f"--memory {text}: not an amount of memory; write it like 24GiB, 80GB or 512MiB")
    return int(float(match.group(1)) * UNITS[match.group(2).lower()])


def add_estimate_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("recipe", help="recipe YAML (its model: a folder, of which only config.json is read, or a builder)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. train.micro_batch_size=8")
    p.add_argument("--device", help="cpu, cuda, npu, ... (default: the recipe's)")
    p.add_argument("--memory", help="the memory to fit in, e.g. 24GiB: prints the largest micro-batch that fits")


def run_estimate(args: argparse.Namespace) -> int:
    from ..backends import available_backends, pick_backend
    from .config import load_recipe
    from .estimate import needs_checkpointing, plan

    memory = parse_memory(args.memory) if args.memory else None  # every argument before the estimate
    recipe = load_recipe(args.recipe, tuple(args.overrides))
    device = (args.device or recipe.device).partition(":")[0]
    if device == "auto":
        device = pick_backend("auto")[0].partition(":")[0]
    elif device not in available_backends():
        raise RunError(f"--device {device}: not one of {', '.join(available_backends())}")
    t, d = recipe.train, recipe.data
    mib = 2**20
    print(f"tuneport estimate: {recipe.model}, method {recipe.method.name}, {device}, precision {recipe.precision}, "
          f"micro-batch {t.micro_batch_size}, {d.max_input_length + d.max_output_length + 1} tokens")
    plans = {on: plan(recipe, device, checkpointing=on) for on in (False, True)}
    both = {on: p.at(t.micro_batch_size) for on, p in plans.items()}
    print(f"{'':14s}{'checkpointing off':>20s}{'on':>12s}")
    for part in ("weights", "gradients", "optimizer", "activations", "logits", "runtime"):
        print(f"  {part:12s}{getattr(both[False], part) / mib:16.0f} MiB{getattr(both[True], part) / mib:8.0f} MiB")
    print(f"  {'peak':12s}{both[False].peak / mib:16.0f} MiB{both[True].peak / mib:8.0f} MiB")
    if memory is None:
        return 0
    shown = args.memory.replace("GiB", " GiB").replace("MiB", " MiB").replace("GB", " GB").replace("MB", " MB")
    for on in (False, True):
        print(f"largest micro-batch in {shown}, checkpointing {'on' if on else 'off'}: "
              f"{plans[on].largest_batch(memory)}")
    auto = t.gradient_checkpointing == "auto"
    on = needs_checkpointing(both[False].peak, memory) if auto else t.gradient_checkpointing
    fits = both[on].peak <= memory
    how = f"auto: {'on' if on else 'off'}" if auto else ("on" if on else "off")
    print(f"the recipe (checkpointing {how}) fits in {shown}: {'yes' if fits else 'no'}")
    return 0 if fits else 1


# --- methods -----------------------------------------------------------------------------------------
def add_methods_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help="a checkpoint folder to count on (default: each model family's flagship, "
                   "e.g. ChatGLM3-6B, from its config alone)")


def run_methods(args: argparse.Namespace) -> int:
    from ..models import family_for, get_family, model_types
    from .estimate import trainable_parameters

    if args.model:
        folder = Path(args.model)
        family = family_for(folder)
        columns = [(folder.name, family, family.check_checkpoint(folder)[0])]  # config and weight headers only
    else:
        columns = [(f.reference[0], f, f.reference[1]()) for f in map(get_family, model_types()) if f.reference]
    print(f"{'method':15s}{'frameworks':18s}" + "".join(f"{'trainable on ' + name:>26s}" for name, _, _ in columns))
    for name, entry in METHODS.items():
        method = entry.config()
        counts = []
        for _, family, config in columns:
            try:
                counts.append(f"{trainable_parameters(family, config, method):,}")
            except MethodUnavailable:  # e.g. ChatGLM's own P-tuning v2 on another family
                counts.append("-")
        print(f"{name:15s}{', '.join(frameworks_of(name)):18s}" + "".join(f"{c:>26s}" for c in counts))
    return 0


# --- serve -------------------------------------------------------------------------------------------
def add_serve_arguments(p: argparse.ArgumentParser) -> None:
    from .serve import API_KEY_ENV, Limits

    p.add_argument("--model", required=True, help="base checkpoint folder (or a `tuneport export` folder)")
    p.add_argument("--adapter", help="tuned result: a PEFT adapter, a P-tuning v2 prefix folder, or a full checkpoint")
    p.add_argument("--device", default="auto", help="auto or a registered device: cpu, cuda, npu, ...")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1); any other needs an "
                   "API key")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", default=None, help=f"the key every request must send as 'Authorization: Bearer KEY' "
                   f"(default: ${API_KEY_ENV})")
    p.add_argument("--model-name", help="the model id clients ask for (default: the --model folder's name)")
    p.add_argument("--max-tokens", type=int, default=Limits.max_tokens, help="largest max_tokens a request may ask for")
    p.add_argument("--max-queue", type=int, default=Limits.max_queue, help="requests that may wait; more get 503")
    p.add_argument("--max-request-bytes", type=int, default=Limits.max_request_bytes)
    p.add_argument("--max-model-len", type=int, default=Limits.max_model_len,
                   help="prompt plus reply in tokens (at most the model's seq_length)")
    p.add_argument("--log-prompts", action="store_true", help="log each request's messages (off: counts only)")


def run_serve(args: argparse.Namespace) -> int:
    from .serve import API_KEY_ENV, Limits, serve

    for name in ("port", "max_tokens", "max_queue", "max_request_bytes", "max_model_len"):
        if getattr(args, name) < (0 if name == "max_queue" else 1):
            raise RunError(f"--{name.replace('_', '-')}: {getattr(args, name)} is too small")
    limits = Limits(args.max_tokens, args.max_queue, args.max_request_bytes, args.max_model_len)
    return serve(Path(args.model), Path(args.adapter) if args.adapter else None, args.device, args.host, args.port,
                 args.api_key or os.environ.get(API_KEY_ENV) or None, limits, args.model_name, args.log_prompts)


# --- the table ---------------------------------------------------------------------------------------
SUBCOMMANDS: dict[str, tuple[str, Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int]]] = {
    "train": ("fine-tune with a recipe (no recipe: the built-in demo)", add_train_arguments, run_train),
    "demo": ("run the built-in demo offline on the CPU", add_demo_arguments, run_demo),
    "chat": ("chat with a base model and an optional tuned adapter", add_chat_arguments, run_chat),
    "doctor": ("report versions, the device and its capabilities; exit 1 with the fix if unusable",
               add_doctor_arguments, run_doctor),
    "export": ("merge a tuned adapter into its base model and write the official checkpoint layout",
               add_export_arguments, run_export),
    "serve": ("serve a model and an optional adapter with the OpenAI chat API", add_serve_arguments, run_serve),
    "eval": evaluate.SUBCOMMAND,
    "parity": parity.SUBCOMMAND,
    "estimate": ("predict a recipe's peak training memory from config.json, and the largest micro-batch that fits",
                 add_estimate_arguments, run_estimate),
    "methods": ("list the tuning methods, the frameworks that run each, and what each trains on a model",
                add_methods_arguments, run_methods),
    "convert": ("rewrite a checkpoint folder's weights as safetensors shards (no pickle, no torch needed to read)",
                add_convert_arguments, run_convert),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tuneport",
        description="Fine-tune large language models with one recipe on any accelerator (CPU, CUDA, Ascend NPU).",
    )
    parser.add_argument("--version", action="version", version=f"tuneport {tuneport_version()}")
    verbose = dict(action="store_true", help="also show third-party warnings known to be harmless (core/quiet.py)")
    parser.add_argument("--verbose", **verbose)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (help_text, add_arguments, run) in SUBCOMMANDS.items():
        command = sub.add_parser(name, help=help_text, description=help_text)
        add_arguments(command)
        command.add_argument("--verbose", **verbose, default=argparse.SUPPRESS)  # after the command too
        command.set_defaults(run=run)
    return parser


def main(argv: Optional[list[str]] = None, guard: Optional[StartupGuard] = None) -> int:
    """Run one command. `guard`: the start-up signal handler the entry point installed (core/entry.py);
    without one (a call from Python), signals keep their handlers."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    guard = guard or StartupGuard()
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if not args.verbose:
        hide_harmless_warnings()
    # `key=value` overrides may come after options too (`train RECIPE --device cpu train.lr=1e-4`).
    if extra and hasattr(args, "overrides") and all("=" in item and not item.startswith("-") for item in extra):
        args.overrides = [*args.overrides, *extra]
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if not getattr(args, "run", None):
        parser.print_help()
        return 0
    args.guard = guard
    try:
        return args.run(args)
    except BaseException as e:
        return report(e, guard)


def report(e: BaseException, guard: StartupGuard) -> int:
    """The exit status for an exception that ended a command, after printing its one `error:` line;
    re-raises what is a bug (a traceback is for bugs)."""
    main_process = int(os.environ.get("RANK", "0")) == 0  # collective outcomes are reported once
    if isinstance(e, Stopped):
        if main_process:
            run_dir = shlex.quote(str(e.checkpoint.parent.parent))
            how = (f"the same launcher with: train --resume {run_dir}" if "LOCAL_RANK" in os.environ
                   else f"tuneport train --resume {run_dir}")
            print(f"{e}; continue with: {how}", file=sys.stderr)
        return 128 + e.signum
    if isinstance(e, Diverged):
        if main_process:
            print(f"error: {e}", file=sys.stderr)
        return 3
    if isinstance(e, EXPECTED):
        print(f"error: {e}", file=sys.stderr)
        return 2
    if isinstance(e, KeyboardInterrupt):
        print(guard.message, file=sys.stderr)
        return 128 + getattr(e, "signum", signal.SIGINT)
    reason = write_failure(e) if isinstance(e, Exception) else None
    if reason is None:
        raise e
    where = getattr(e, "filename", None) or "a file"
    print(f"error: {where}: cannot be written ({reason}); free disk space or fix the permissions", file=sys.stderr)
    return 2


def leave_job(code: int) -> None:
    """End a worker of a distributed job now, with `code`, while its model is still alive: freeing
    DistributedDataParallel's reducer can deadlock gloo's threads against the GIL, so a worker that has
    written everything skips the destructors."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":  # under a launcher: `torchrun ... -m tuneport.core.cli train ...`
    sys.exit(main(guard=StartupGuard().install()))
