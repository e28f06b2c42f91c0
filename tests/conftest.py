"""Shared fixtures: the golden vectors from ../shared (skipped with a reason when absent) and the
`device` marker, which skips a test when its backend is not usable on this machine."""

from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
GOLDEN = SHARED / "golden" / "chatglm3"


def pytest_configure(config):
    config.addinivalue_line("markers", "device(name): run only where the named backend is usable")


def pytest_runtest_setup(item):
    for marker in item.iter_markers(name="device"):
        from tuneport.backends import BackendUnavailable, get_backend

        try:
            get_backend(marker.args[0])
        except (BackendUnavailable, ValueError) as e:
            pytest.skip(f"device {marker.args[0]!r} unavailable: {e}")


@pytest.fixture(scope="session")
def golden() -> Path:
    if not GOLDEN.is_dir():
        pytest.skip(f"golden vectors not found at {GOLDEN} (they live in ../shared beside the repository)")
    return GOLDEN


@pytest.fixture(scope="session")
def shared_data() -> Path:
    data = SHARED / "data"
    if not data.is_dir():
        pytest.skip(f"datasets not found at {data} (they live in ../shared beside the repository)")
    return data
