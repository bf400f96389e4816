"""Shared fixtures: the real datasets in ../shared/data (skipped with a reason when absent)."""

from __future__ import annotations

from pathlib import Path

import pytest

from simulations.datasets import data_dir


@pytest.fixture(scope="session")
def shared_data() -> Path:
    root = data_dir()
    if not (root / "fsdd").is_dir():
        pytest.skip(f"real datasets not found at {root} (set FEDPRIV_DATA_DIR or lay out ../shared/data)")
    return root
