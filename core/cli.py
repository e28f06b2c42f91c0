"""The `tuneport` command line: one table of subcommands."""

from __future__ import annotations

import argparse
import sys
from importlib.metadata import PackageNotFoundError, version
from typing import Callable, Optional


def package_version() -> str:
    try:
        return version("tuneport")
    except PackageNotFoundError:
        return "0+unknown"


# name -> (help, add_arguments, run). Later subcommands (train, chat, doctor, ...) add rows here.
SUBCOMMANDS: dict[str, tuple[str, Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int]]] = {}


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
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "run", None):
        parser.print_help()
        return 0
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
