"""The `tuneport` command's entry point (`pyproject.toml`'s console script; `python -m tuneport.core.entry`).

It installs the start-up signal handler (core/signals.py, standard library only) before anything heavy is
imported, then loads the CLI: Ctrl-C or SIGTERM at any moment of start-up ends the command cleanly.
"""

from __future__ import annotations

import sys

from .signals import StartupGuard


def main() -> int:
    guard = StartupGuard().install()
    from .cli import main as cli_main  # after the handler: the CLI's imports (torch's, later) may be interrupted

    return cli_main(guard=guard)


if __name__ == "__main__":
    sys.exit(main())
