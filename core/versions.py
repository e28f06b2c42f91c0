"""Installed versions, read from package metadata (nothing is imported): the one lookup that run.json,
eval.json, parity reports, `tuneport doctor` and `--version` share."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version
from typing import Optional


def installed(name: str) -> Optional[str]:
    """The installed version of distribution `name`, or None when it is not installed."""
    try:
        return version(name)
    except PackageNotFoundError:
        return None


def tuneport_version() -> str:
    """tuneport's own version ("0+unknown" when run from a tree that was never installed)."""
    return installed("tuneport") or "0+unknown"
