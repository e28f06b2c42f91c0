"""The `tuneport` command line: one table of subcommands.

Every expected failure (a bad recipe, bad data, a missing device) ends with one `error:` line naming
the file, field and fix, and exit status 2; tracebacks are for bugs.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Callable, Optional

DEMO_RECIPE = "builtin:demo.yaml"
log = logging.getLogger("tuneport")


def package_version() -> str:
    try:
        return version("tuneport")
    except PackageNotFoundError:
        return "0+unknown"


def expected_errors() -> tuple[type[BaseException], ...]:
    """Exceptions that mean bad input or environment, printed as one line rather than a traceback."""
    from tuneport.backends import BackendUnavailable
    from tuneport.models.chatglm3 import CheckpointError

    from .config import RecipeError
    from .data import DataError
    from .precision import PrecisionError
    from .torch_runtime import MethodUnavailable
    from .trainer import RunError

    return (RecipeError, DataError, CheckpointError, RunError, PrecisionError, MethodUnavailable,
            BackendUnavailable, FileNotFoundError)


# --- train / demo ------------------------------------------------------------------------------------
def add_train_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("recipe", nargs="?", help="recipe YAML (default: the built-in demo)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. train.lr=1e-4")
    p.add_argument("--device", help="cpu | cuda | npu | auto (overrides the recipe)")
    p.add_argument("--framework", choices=["torch", "mindspore"], help="overrides the recipe (default torch)")
    p.add_argument("--resume", metavar="OUTPUT_DIR", help="continue the run in OUTPUT_DIR from its newest checkpoint")


def resolve_device(name: str) -> str:
    """`auto` is the first usable accelerator (npu, then cuda), else the CPU."""
    if name != "auto":
        return name
    from tuneport.backends import BackendUnavailable, available_backends, get_backend

    for candidate in ("npu", "cuda"):
        if candidate in available_backends():
            try:
                get_backend(candidate)
                return candidate
            except BackendUnavailable:
                continue
    return "cpu"


def read_recipe(args: argparse.Namespace, demo: bool):
    """The recipe a train command asks for: (recipe, resume folder or None, whether it is the demo)."""
    from .config import load_recipe
    from .trainer import RunError

    recipe_arg, overrides = args.recipe, list(args.overrides)
    if recipe_arg and "=" in recipe_arg and not recipe_arg.endswith((".yaml", ".yml")):
        recipe_arg, overrides = None, [recipe_arg, *overrides]  # `tuneport train key=value` overrides the demo
    if args.device:
        overrides.append(f"device={args.device}")
    if getattr(args, "framework", None):
        overrides.append(f"framework={args.framework}")
    if args.resume:
        resume_dir = Path(args.resume)
        if not (resume_dir / "recipe.yaml").exists():
            raise RunError(f"--resume {resume_dir}: no recipe.yaml there; it is not a tuneport run folder")
        return load_recipe(resume_dir / "recipe.yaml", (*overrides, f"output_dir={resume_dir}")), resume_dir, demo
    return load_recipe(recipe_arg or DEMO_RECIPE, tuple(overrides)), None, demo or recipe_arg is None


def device_for(recipe):
    """(device name, backend) for the recipe's framework and device."""
    from tuneport.backends import get_backend

    if recipe.framework == "mindspore":
        from tuneport.backends.mindspore import MindSporeDevice

        from .distributed import launched
        from .trainer import RunError

        if launched() and int(os.environ.get("WORLD_SIZE", "1")) > 1 or int(os.environ.get("RANK_SIZE", "1")) > 1:
            raise RunError("framework mindspore: one process per job for now; several cards train with the torch "
                           "path (torchrun, hccl on Ascend)")
        device = recipe.device
        if device == "auto":
            device = "cpu"
            log.warning("framework mindspore: device auto means the CPU; pass --device npu for Ascend")
        return device, MindSporeDevice(device)
    device = resolve_device(recipe.device)
    return device, get_backend(device)


def run_train(args: argparse.Namespace, demo: bool = False) -> int:
    from tuneport.models.chatglm3 import load_tokenizer

    from . import checkpoints, trainer
    from .config import load_recipe, resolve_path
    from .distributed import Dist, init_distributed, launched, shutdown
    from .precision import resolve_precision

    recipe, resume_dir, demo = read_recipe(args, demo)
    output_dir = Path(recipe.output_dir)

    # Everything that can be wrong with the inputs is checked before anything is written.
    use_mindspore = recipe.framework == "mindspore"
    device, backend = device_for(recipe)
    precision = resolve_precision(recipe.precision, device, backend.capabilities)
    if recipe.deepspeed and not resolve_path(recipe.deepspeed).exists():
        raise trainer.RunError(f"deepspeed: {recipe.deepspeed}: file not found; give a DeepSpeed JSON config")
    if recipe.deepspeed and json.loads(resolve_path(recipe.deepspeed).read_text()).get(
            "zero_optimization", {}).get("stage", 0) == 3:
        raise trainer.RunError("deepspeed: ZeRO stage 3 is not supported yet (saving would need gathered weights); "
                               "use stage 2 (builtin:deepspeed/zero2.json)")
    if recipe.deepspeed and not launched():
        raise trainer.RunError("deepspeed: DeepSpeed runs under a launcher, also for one device; run: torchrun "
                               "--standalone --nproc_per_node N -m tuneport.core.cli train RECIPE ...")
    folder_given = recipe.model not in trainer.BUILDERS
    if folder_given:
        model_dir = trainer.model_folder(recipe, output_dir)
    elif not recipe.tokenizer:
        raise trainer.RunError(f"tokenizer: a built model ({recipe.model}) needs a tokenizer path in the recipe")
    tokenizer = load_tokenizer(trainer.tokenizer_path(recipe, model_dir if folder_given else None))
    train_data, eval_data = trainer.load_data(recipe, tokenizer)

    resume_from, replace_old = None, False
    if resume_dir is not None:
        resume_from = checkpoints.latest_checkpoint(output_dir / "checkpoints")
        if resume_from is None:
            log.warning("%s has no complete checkpoint; starting from step 0", output_dir)
    elif (output_dir / "recipe.yaml").exists():
        progress = checkpoints.latest_checkpoint(output_dir / "checkpoints") or (output_dir / "adapter").exists()
        if demo and load_recipe(output_dir / "recipe.yaml").model == "demo":
            replace_old = True  # a previous demo: start the demo afresh
        elif not progress:
            replace_old = True  # a start that failed before its first checkpoint holds nothing to keep
            log.warning("%s holds a run with no checkpoint and no adapter; starting it afresh", output_dir)
        else:
            raise trainer.RunError(f"output_dir: {output_dir} already holds a run; continue it with "
                                   f"--resume {output_dir}, or choose another output_dir=...")

    backend.setup()
    dist = Dist() if use_mindspore else init_distributed(backend.capabilities.dist_backend, backend.device,
                                                     process_group_alone=bool(recipe.deepspeed))
    backend.set_device(dist.local_rank)
    dist.barrier()  # every process has checked the folder before the first one writes to it
    if dist.is_main:
        if replace_old:
            shutil.rmtree(output_dir)
        if resume_dir is not None:
            checkpoints.remove_unfinished(output_dir / "checkpoints")
        output_dir.mkdir(parents=True, exist_ok=True)
        trainer.write_recipe(recipe, output_dir)
        model_dir = trainer.model_folder(recipe, output_dir)  # a builder writes its folder here, once
        record = trainer.run_record(recipe, backend, precision, model_dir)
        record["world_size"] = dist.world_size
        (output_dir / "run.json").write_text(json.dumps(record, indent=2, default=str))
    dist.barrier()
    model_dir = trainer.model_folder(recipe, output_dir)  # every process: the folder rank 0 made sure of

    if use_mindspore:
        from tuneport.backends.mindspore import MindSporeRuntime

        runtime = MindSporeRuntime(recipe, backend, precision, model_dir, dist)
    else:
        from .torch_runtime import TorchRuntime

        runtime = TorchRuntime(recipe, backend, precision, model_dir, dist)
    records = trainer.train(recipe, runtime, tokenizer, train_data, eval_data, output_dir, backend, resume_from)
    if dist.is_main:
        losses = [r["loss"] for r in records]
        print(f"trained {len(records)} steps ({recipe.framework}) on {device} x{dist.world_size}: loss {losses[0]:.4f} -> {losses[-1]:.4f}")
        print(f"adapter: {output_dir / 'adapter'}   metrics: {output_dir / 'metrics.jsonl'}   "
              f"plot: {output_dir / 'loss.png'}")
        if demo:
            show_answers(runtime, tokenizer, train_data_path=recipe.data.train)
            print(f"chat with it: tuneport chat --model {model_dir} --adapter {output_dir / 'adapter'}")
    shutdown()
    return 0


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
    p.add_argument("--device", default="auto", help="cpu | cuda | npu | auto")
    p.add_argument("--prompt", help="answer this one message and exit (for scripts)")
    p.add_argument("--system", help="system message for the conversation")
    p.add_argument("--max-new-tokens", type=int, default=512)


def run_chat(args: argparse.Namespace) -> int:
    import torch
    from transformers import TextStreamer

    from tuneport.models.chatglm3 import load_tokenizer

    from .torch_runtime import load_tuned_model

    device = resolve_device(args.device)
    tokenizer = load_tokenizer(args.model)
    model = load_tuned_model(Path(args.model), Path(args.adapter) if args.adapter else None, device=device)
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
    p.add_argument("--device", default="cpu", help="cpu | cuda | npu (default cpu)")
    p.add_argument("--framework", default="torch", choices=["torch", "mindspore"])


def run_doctor(args: argparse.Namespace) -> int:
    from .doctor import run

    return run(args.device, args.framework)


# --- convert -------------------------------------------------------------------------------------------
def add_convert_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("source", help="checkpoint folder (pickle .bin or safetensors shards)")
    p.add_argument("destination", help="new folder: the same checkpoint as safetensors shards")


def run_convert(args: argparse.Namespace) -> int:
    from tuneport.models.chatglm3.checkpoint import convert_to_safetensors

    convert_to_safetensors(Path(args.source), Path(args.destination))
    print(f"wrote {args.destination}")
    return 0


# --- the table ---------------------------------------------------------------------------------------
SUBCOMMANDS: dict[str, tuple[str, Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int]]] = {
    "train": ("fine-tune with a recipe (no recipe: the built-in demo)", add_train_arguments, run_train),
    "demo": ("run the built-in demo offline on the CPU", add_demo_arguments, run_demo),
    "chat": ("chat with a base model and an optional tuned adapter", add_chat_arguments, run_chat),
    "doctor": ("report versions, the device and its capabilities; exit 1 with the fix if unusable",
               add_doctor_arguments, run_doctor),
    "convert": ("rewrite a checkpoint folder's weights as safetensors shards (no pickle, no torch needed to read)",
                add_convert_arguments, run_convert),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tuneport",
        description="Fine-tune large language models with one recipe on any accelerator (CPU, CUDA, Ascend NPU).",
    )
    parser.add_argument("--version", action="version", version=f"tuneport {package_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (help_text, add_arguments, run) in SUBCOMMANDS.items():
        command = sub.add_parser(name, help=help_text, description=help_text)
        add_arguments(command)
        command.set_defaults(run=run)
    return parser


def main(argv: Optional[list[str]] = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # `key=value` overrides may come after options too (`train RECIPE --device cpu train.lr=1e-4`).
    if extra and hasattr(args, "overrides") and all("=" in item and not item.startswith("-") for item in extra):
        args.overrides = [*args.overrides, *extra]
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if not getattr(args, "run", None):
        parser.print_help()
        return 0
    try:
        return args.run(args)
    except expected_errors() as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
