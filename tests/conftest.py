"""Shared fixtures: the real datasets in ../shared/data, and the system programs some tests drive.

Both skip with a reason naming what is missing. `.ci/run` installs the system programs and
sets FEDPRIV_REQUIRE_SYSTEM_PROGRAMS=1, which turns a missing program into a failure, so CI
always runs those tests for real.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from shared_models.datasets.named import data_dir

# program -> (where it may be when not on PATH, the Debian package that provides it)
SYSTEM_PROGRAMS = {
    "chromium": (("/usr/bin/chromium",), "chromium"),
    "nginx": (("/usr/sbin/nginx", "/usr/local/sbin/nginx"), "nginx-light (or nginx)"),
}


def _system_program(name: str) -> str:
    """The path of a system program a test drives, or skip (fail under CI) naming its package."""
    places, package = SYSTEM_PROGRAMS[name]
    found = shutil.which(name) or next((p for p in places if Path(p).exists()), None)
    if found:
        return found
    reason = f"{name} not found: install Debian's {package} package (.ci/run does)"
    if os.environ.get("FEDPRIV_REQUIRE_SYSTEM_PROGRAMS") == "1":
        pytest.fail(reason + "; FEDPRIV_REQUIRE_SYSTEM_PROGRAMS=1 makes it required")
    pytest.skip(reason)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    root = data_dir()
    if not (root / "fsdd").is_dir():
        pytest.skip(f"real datasets not found at {root} (set FEDPRIV_DATA_DIR or lay out ../shared/data)")
    return root


@pytest.fixture(scope="session")
def chromium() -> str:
    """Path of Debian's Chromium (renders the run report in tests/test_report.py)."""
    return _system_program("chromium")


@pytest.fixture(scope="session")
def nginx() -> str:
    """Path of nginx (`fedpriv server`'s Fleet-only TLS gateway in tests/test_deployment_e2e.py)."""
    return _system_program("nginx")
