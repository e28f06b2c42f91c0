"""What each command does with its parsed arguments (`core/cli.py` parses them and loads this module only
when a command runs): call the run or the Python API, print the outcome, return the exit status."""

from __future__ import annotations

import argparse
import json
import os
import re
from pathlib import Path

from ..backends import available_backends, pick_backend
from ..frameworks import framework, frameworks_of
from ..models import family_for, get_family, model_types
from . import doctor, trainer
from .config import load_recipe, resolve_path
from .distributed import in_process_group
from .errors import MethodUnavailable, RunError
from .exits import leave_job
from .export import COPIED, SKIPPED, export
from .methods import METHODS
from .rundir import check_writable, writing
from .loading import load
from .run import train_run
from .serve import API_KEY_ENV, Limits, serve
from .console import KEY_ENV as CONSOLE_KEY_ENV, console


def run_train(args: argparse.Namespace, demo: bool = False) -> int:
    """`tuneport train` (and the demo): the run, then its summary on the main process."""
    trained = train_run(args, demo)
    if trained.is_main:
        recipe, output_dir = trained.recipe, trained.output_dir
        losses = [r["loss"] for r in trained.records]
        print(f"trained {len(trained.records)} steps ({recipe.framework}) on {trained.device} x{trained.world_size}: "
              f"loss {losses[0]:.4f} -> {losses[-1]:.4f}")
        margins = [r["margin"] for r in trained.records if "margin" in r]
        if margins:  # a preference objective
            print(f"reward margin {margins[0]:.2f} -> {margins[-1]:.2f}, reward accuracy "
                  f"{trained.records[0]['accuracy']:.2f} -> {trained.records[-1]['accuracy']:.2f}")
        change = trainer.read_run_json(output_dir).get("forgetting")
        if change:
            print(trainer.summary_line(change))
        print(f"adapter: {output_dir / 'adapter'}   metrics: {output_dir / 'metrics.jsonl'}   "
              f"plot: {output_dir / 'loss.png'}")
        if trained.demo and not recipe.objective.preference:  # the DPO demo's held-out accuracy is in the line above
            show_answers(trained.runtime, trained.tokenizer, train_data_path=recipe.data.train)
            print(f"chat with it: tuneport chat --model {trained.model_dir} --adapter {output_dir / 'adapter'}")
    if in_process_group():
        leave_job(0)
    return 0

def show_answers(runtime, tokenizer, train_data_path: str, count: int = 3) -> None:
    """Print the tuned model's greedy answers to the first `count` training prompts, beside the trained ones."""
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


def run_demo(args: argparse.Namespace) -> int:
    args.recipe = "builtin:demo_dpo.yaml" if args.objective == "dpo" else None
    args.device, args.resume = None, None
    return run_train(args, demo=True)


def run_chat(args: argparse.Namespace) -> int:
    if args.max_new_tokens <= 0:
        raise RunError(f"--max-new-tokens: {args.max_new_tokens} must be > 0, e.g. --max-new-tokens 512")
    loaded = load(args.model, args.adapter, args.device)
    history = [{"role": "system", "content": args.system}] if args.system else []

    def reply(query: str) -> str:
        return loaded.chat(query, history, args.max_new_tokens, stream=True)

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


def run_doctor(args: argparse.Namespace) -> int:
    return doctor.run(args.device, args.framework, args.nproc)


def run_convert(args: argparse.Namespace) -> int:
    family = family_for(Path(args.source))
    family.require("convert", f"tuneport convert {args.source}")
    fix = "free disk space, or choose a writable destination"
    check_writable(Path(args.destination), args.destination, fix)  # before any shard is read
    with writing(args.destination, "nothing was written there", fix):
        family.convert(Path(args.source), Path(args.destination))
    print(f"wrote {args.destination}")
    return 0


def run_export(args: argparse.Namespace) -> int:
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
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", text)
    if not match or match.group(2).lower() not in UNITS:
        raise RunError(f"--memory {text}: not an amount of memory; write it like 24GiB, 80GB or 512MiB")
    return int(float(match.group(1)) * UNITS[match.group(2).lower()])


def run_estimate(args: argparse.Namespace) -> int:
    estimate = framework("torch").estimate

    memory = parse_memory(args.memory) if args.memory else None  # every argument before the estimate
    if args.nproc < 1:
        raise RunError(f"--nproc {args.nproc}: the number of cards must be >= 1")
    if args.offload and args.strategy != "fsdp":
        raise RunError("--offload: host-memory offload is fsdp's; add --strategy fsdp (DeepSpeed offloads through "
                       "its JSON config)")
    recipe = load_recipe(args.recipe, tuple(args.overrides))
    device = (args.device or recipe.device).partition(":")[0]
    if device == "auto":
        device = pick_backend("auto")[0].partition(":")[0]
    elif device not in available_backends():
        raise RunError(f"--device {device}: not one of {', '.join(available_backends())}")
    t, d = recipe.train, recipe.data
    mib = 2**20
    sharing = dict(nproc=args.nproc, strategy=args.strategy, offload=args.offload)
    cards = f", per card of {args.nproc} ({args.strategy}{' with offload' if args.offload else ''})" \
        if args.nproc > 1 or args.strategy != "ddp" else ""
    print(f"tuneport estimate: {recipe.model}, method {recipe.method.name}, {device}, precision {recipe.precision}, "
          f"micro-batch {t.micro_batch_size}, {d.row_tokens} tokens{' (packed rows)' if d.packing else ''}{cards}")
    plans = {on: estimate.plan(recipe, device, checkpointing=on) for on in (False, True)}
    both = {on: p.at(t.micro_batch_size, **sharing) for on, p in plans.items()}
    print(f"{'':14s}{'checkpointing off':>20s}{'on':>12s}")
    for part in ("weights", "gradients", "optimizer", "activations", "logits", "runtime"):
        print(f"  {part:12s}{getattr(both[False], part) / mib:16.0f} MiB{getattr(both[True], part) / mib:8.0f} MiB")
    print(f"  {'peak':12s}{both[False].peak / mib:16.0f} MiB{both[True].peak / mib:8.0f} MiB")
    if memory is None:
        return 0
    shown = args.memory.replace("GiB", " GiB").replace("MiB", " MiB").replace("GB", " GB").replace("MB", " MB")
    for on in (False, True):
        print(f"largest micro-batch in {shown}, checkpointing {'on' if on else 'off'}: "
              f"{plans[on].largest_batch(memory, **sharing)}")
    auto = t.gradient_checkpointing == "auto"
    on = estimate.needs_checkpointing(both[False].peak, memory) if auto else t.gradient_checkpointing
    fits = both[on].peak <= memory
    how = f"auto: {'on' if on else 'off'}" if auto else ("on" if on else "off")
    print(f"the recipe (checkpointing {how}) fits in {shown}: {'yes' if fits else 'no'}")
    print(fewest_cards(plans, t.micro_batch_size, memory, shown, t.gradient_checkpointing))
    return 0 if fits else 1


def fewest_cards(plans: dict, batch: int, memory: int, shown: str, checkpointing, most: int = 1024) -> str:
    """The fewest cards of `memory` bytes the step fits on, and the first strategy that fits there (the
    cheapest in communication first: ddp, zero2, fsdp, zero3, fsdp with offload), checkpointing off before on
    unless the recipe fixes it."""
    choices = [("ddp", False), ("zero2", False), ("fsdp", False), ("zero3", False), ("fsdp", True)]
    allowed = (False, True) if checkpointing == "auto" else (bool(checkpointing),)
    nproc = 1
    while nproc <= most:
        for strategy, offload in choices:
            for on in allowed:
                peak = plans[on].at(batch, nproc, strategy, offload).peak
                if peak <= memory:
                    host = plans[on].host(nproc) if offload else 0
                    return (f"fewest cards of {shown}: {nproc} with --strategy {strategy}{' --offload' if offload else ''}"
                            f", checkpointing {'on' if on else 'off'} ({peak / 2**30:.1f} GiB each"
                            + (f", and {host / 2**30:.1f} GiB of host memory each)" if offload else ")"))
        nproc *= 2
    return f"fewest cards of {shown}: none up to {most}; lower the micro-batch or the sequence length"


def run_methods(args: argparse.Namespace) -> int:
    trainable_parameters = framework("torch").estimate.trainable_parameters

    if args.model:
        folder = Path(args.model)
        family = family_for(folder)
        columns = [(folder.name, family, family.check_checkpoint(folder)[0])]  # config and weight headers only
    else:
        families = map(get_family, args.family or model_types())
        columns = [(f.reference[0], f, f.reference[1]()) for f in families if f.reference]
    rows = []
    for name, entry in METHODS.items():
        method = entry.config()
        counts = []
        for _, family, config in columns:
            try:
                counts.append(f"{trainable_parameters(family, config, method):,}")
            except MethodUnavailable:  # e.g. ChatGLM's own P-tuning v2 on another family
                counts.append("-")
        rows.append((name, ", ".join(frameworks_of(name)), counts))
    widths = [max(len(name), *(len(counts[i]) for _, _, counts in rows)) + 2 for i, (name, _, _) in enumerate(columns)]
    print("trainable parameters on each model (its config.json, counted on the meta device):")
    print(f"{'method':15s}{'frameworks':18s}" + "".join(f"{name:>{w}s}" for (name, _, _), w in zip(columns, widths)))
    for name, frameworks, counts in rows:
        print(f"{name:15s}{frameworks:18s}" + "".join(f"{c:>{w}s}" for c, w in zip(counts, widths)))
    return 0


def run_serve(args: argparse.Namespace) -> int:
    for name in ("port", "max_tokens", "max_queue", "max_request_bytes", "max_model_len"):
        if getattr(args, name) < (0 if name == "max_queue" else 1):
            raise RunError(f"--{name.replace('_', '-')}: {getattr(args, name)} is too small")
    limits = Limits(args.max_tokens, args.max_queue, args.max_request_bytes, args.max_model_len)
    return serve(Path(args.model), Path(args.adapter) if args.adapter else None, args.device, args.host, args.port,
                 args.api_key or os.environ.get(API_KEY_ENV) or None, limits, args.model_name, args.log_prompts)


def run_console(args: argparse.Namespace) -> int:
    if not 0 < args.port < 65536:
        raise RunError(f"--port: {args.port} is not a port number (1-65535)")
    if args.unload_after <= 0:
        raise RunError(f"--unload-after: {args.unload_after} must be > 0 seconds")
    return console(Path(args.runs_dir), args.host, args.port, args.key or os.environ.get(CONSOLE_KEY_ENV) or None,
                   args.device, args.unload_after)
