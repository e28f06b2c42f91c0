"""Shared fixtures: the golden vectors (tests/golden) and datasets (tests/data) that are part of the
repository, and the `device` marker, which skips a test when its backend is not usable on this machine."""

from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
GOLDEN = REPO / "tests" / "golden" / "chatglm3"
DATA = REPO / "tests" / "data"


def pytest_configure(config):
    config.addinivalue_line("markers", "device(name): run only where the named backend is usable")
    config.addinivalue_line("markers", "slow: a long test (a soak); CI runs it, `-m 'not slow'` leaves it out")
    config.addinivalue_line("markers", "browser: drives headless Chromium (apt-get install chromium); skipped without it")


def pytest_runtest_setup(item):
    for marker in item.iter_markers(name="device"):
        from tuneport.backends import BackendUnavailable, get_backend

        try:
            get_backend(marker.args[0])
        except (BackendUnavailable, ValueError) as e:
            pytest.skip(f"device {marker.args[0]!r} unavailable: {e}")


@pytest.fixture(scope="session")
def golden() -> Path:
    if not GOLDEN.is_dir():  # only in a copy made without them (a packaged sdist, say)
        pytest.skip(f"golden vectors not found at {GOLDEN}: they are part of the repository (tests/golden); "
                    "test a git clone")
    return GOLDEN


@pytest.fixture(scope="session")
def datasets() -> Path:
    if not DATA.is_dir():
        pytest.skip(f"datasets not found at {DATA}: they are part of the repository (tests/data); test a git clone")
    return DATA
