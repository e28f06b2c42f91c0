"""`tuneport`'s command line: it parses the arguments, runs the command, and maps what ended it to an
exit status (core/exits.py). What a command does is core/commands.py (loaded only when one runs, so
`tuneport --help` imports no framework); the same steps from Python are core/api.py (`tuneport.train`, ...).
"""

from __future__ import annotations

import argparse
import logging
import sys
from importlib import import_module
from typing import Callable, Optional, Union

from ..frameworks import FRAMEWORKS
from . import evaluate, parity
from .exits import report
from .quiet import hide_harmless_warnings
from .console import KEY_ENV as CONSOLE_KEY_ENV
from .serve import API_KEY_ENV, Limits
from .signals import StartupGuard
from .versions import tuneport_version

log = logging.getLogger("tuneport")


# --- train / demo ------------------------------------------------------------------------------------
def add_train_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("recipe", nargs="?", help="recipe YAML (default: the built-in demo)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. train.lr=1e-4")
    p.add_argument("--device", help="auto or a registered device: cpu, cuda, npu, ... (overrides the recipe)")
    p.add_argument("--framework", choices=FRAMEWORKS, help="overrides the recipe (default torch)")
    p.add_argument("--resume", metavar="OUTPUT_DIR", help="continue the run in OUTPUT_DIR from its newest checkpoint")


def add_demo_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides of recipes/demo.yaml")
    p.add_argument("--objective", choices=("sft", "dpo"), default="sft",
                   help="dpo: the preference demo (recipes/demo_dpo.yaml): DPO on pairs, held-out accuracy before/after")


# --- chat ----------------------------------------------------------------------------------------------
def add_chat_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="base checkpoint folder")
    p.add_argument("--adapter", help="tuned result: a PEFT adapter, a P-tuning v2 prefix folder, or a full checkpoint")
    p.add_argument("--device", default="auto", help="auto or a registered device: cpu, cuda, npu, ...")
    p.add_argument("--prompt", help="answer this one message and exit (for scripts)")
    p.add_argument("--system", help="system message for the conversation")
    p.add_argument("--max-new-tokens", type=int, default=512)


# --- doctor ------------------------------------------------------------------------------------------
def add_doctor_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="cpu", help="a registered device: cpu, cuda, npu, ... (default cpu)")
    p.add_argument("--framework", default="torch", choices=FRAMEWORKS)
    p.add_argument("--nproc", type=int, default=1, help="also check that N local processes start the collective "
                   "a job of N uses (gloo, nccl, hccl, MindSpore's under msrun)")


# --- convert -------------------------------------------------------------------------------------------
def add_convert_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("source", help="checkpoint folder (pickle .bin or safetensors shards)")
    p.add_argument("destination", help="new folder: the same checkpoint as safetensors shards")


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


def add_estimate_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("recipe", help="recipe YAML (its model: a folder, of which only config.json is read, or a builder)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. train.micro_batch_size=8")
    p.add_argument("--device", help="cpu, cuda, npu, ... (default: the recipe's)")
    p.add_argument("--memory", help="each card's memory, e.g. 24GiB: prints the largest micro-batch that fits, and "
                   "the fewest cards and the strategy that fit the recipe")
    p.add_argument("--nproc", type=int, default=1, help="cards the job runs on (default 1): the memory of each")
    p.add_argument("--strategy", default="ddp", choices=("ddp", "fsdp", "zero2", "zero3"),
                   help="how the cards share the model: ddp (each holds all), fsdp, DeepSpeed zero2 or zero3")
    p.add_argument("--offload", action="store_true", help="fsdp: shards in host memory")


# --- methods -----------------------------------------------------------------------------------------
def add_methods_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help="a checkpoint folder to count on (default: each model family's flagship, "
                   "e.g. ChatGLM3-6B, from its config alone)")
    p.add_argument("--family", action="append", metavar="MODEL_TYPE",
                   help="only this model type's reference size (repeat for more; default: every family)")


# --- serve -------------------------------------------------------------------------------------------
def add_serve_arguments(p: argparse.ArgumentParser) -> None:
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


# --- console -----------------------------------------------------------------------------------------
def add_console_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("runs_dir", nargs="?", default="outputs", metavar="RUNS_DIR",
                   help="the folder of the run folders to show (default outputs); new runs start there")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1); any other needs --key")
    p.add_argument("--port", type=int, default=7860)
    p.add_argument("--key", default=None, help=f"the key the page and its API require (default: ${CONSOLE_KEY_ENV})")
    p.add_argument("--device", default="auto", help="where chat loads the models: auto, cpu, cuda, npu, ...")
    p.add_argument("--unload-after", type=float, default=600, metavar="SECONDS",
                   help="unload a chat model idle this long (default 600)")


# --- the table ---------------------------------------------------------------------------------------
# The command registry: name -> (help, its argument builder, what runs it). A name of core/commands.py's
# function is loaded when its command runs (that module imports the frameworks' layer and the rest).
SUBCOMMANDS: dict[str, tuple[str, Callable[[argparse.ArgumentParser], None],
                             Union[str, Callable[[argparse.Namespace], int]]]] = {
    "train": ("fine-tune with a recipe (no recipe: the built-in demo)", add_train_arguments, "run_train"),
    "demo": ("run the built-in demo offline on the CPU", add_demo_arguments, "run_demo"),
    "chat": ("chat with a base model and an optional tuned adapter", add_chat_arguments, "run_chat"),
    "doctor": ("report versions, the device and its capabilities; exit 1 with the fix if unusable",
               add_doctor_arguments, "run_doctor"),
    "export": ("merge a tuned adapter into its base model and write the official checkpoint layout",
               add_export_arguments, "run_export"),
    "serve": ("serve a model and an optional adapter with the OpenAI chat API", add_serve_arguments, "run_serve"),
    "console": ("a local web page to start, watch, compare and try the runs in a folder", add_console_arguments,
                "run_console"),
    "eval": evaluate.SUBCOMMAND,
    "parity": parity.SUBCOMMAND,
    "estimate": ("predict a recipe's peak training memory from config.json, and the largest micro-batch that fits",
                 add_estimate_arguments, "run_estimate"),
    "methods": ("list the tuning methods, the frameworks that run each, and what each trains on a model",
                add_methods_arguments, "run_methods"),
    "convert": ("rewrite a checkpoint folder's weights as safetensors shards (no pickle, no torch needed to read)",
                add_convert_arguments, "run_convert"),
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
    try:  # a signal while the parser is built (before any command runs) is the start-up guard's one line too
        parser = build_parser()
        args, extra = parser.parse_known_args(argv)
    except KeyboardInterrupt as e:
        return report(e, guard)
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
        run = args.run if callable(args.run) else getattr(import_module(".commands", __package__), args.run)
        return run(args)
    except BaseException as e:
        return report(e, guard)


if __name__ == "__main__":  # under a launcher: `torchrun ... -m tuneport.core.cli train ...`
    sys.exit(main(guard=StartupGuard().install()))
