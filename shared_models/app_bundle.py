"""The Flower App bundle (FAB) of fedpriv: which files it holds, and its SHA-256 hash.

`stage_app` copies the app's own files (pyproject.toml and the `*.py` files of its
packages, nothing else) into a fresh folder; `flwr run` builds the FAB from that folder,
so kits, keys and run folders lying in the checkout can never enter a bundle. `fab_sha256`
builds the same FAB with Flower's own builder (`flwr.cli.build.build_fab_from_disk`:
fixed file dates, sorted paths, so the bytes depend on the files' contents only) and
hashes it: the coordinator's `flwr run` and a node that holds the same fedpriv get the same
hash. A deployed node approves that hash (`client.app_approval`).
"""

from __future__ import annotations

import hashlib
import shutil
import tempfile
import tomllib
from pathlib import Path

from flwr.cli.build import build_fab_from_disk

from shared_models.flower_processes import APP_DIR


def app_packages(app_dir: Path = APP_DIR) -> list[str]:
    """The app's top-level packages, as pyproject.toml's [tool.setuptools.packages.find] include lists them."""
    config = tomllib.loads((app_dir / "pyproject.toml").read_text())
    patterns = config["tool"]["setuptools"]["packages"]["find"]["include"]
    return sorted({pattern.rstrip("*").rstrip(".") for pattern in patterns})


def stage_app(dest: Path, app_dir: Path = APP_DIR) -> Path:
    """Copy the Flower App's own files into `dest` (created): pyproject.toml and the `*.py` files of
    its packages (`app_packages`), nothing else; returns `dest`.

    `flwr run` builds the app bundle (FAB) from this folder, never from the checkout or the
    working directory, so kits, keys, run folders and earlier bundles lying there can never
    enter a bundle.
    """
    dest.mkdir(parents=True, exist_ok=True)
    shutil.copy2(app_dir / "pyproject.toml", dest / "pyproject.toml")
    for package in app_packages(app_dir):
        for source in sorted((app_dir / package).rglob("*.py")):
            relative = source.relative_to(app_dir)
            if any(part.startswith(".") or part == "__pycache__" for part in relative.parts):
                continue
            target = dest / relative
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target)
    return dest


def fab_sha256(app_dir: Path = APP_DIR) -> str:
    """SHA-256 (64 hex digits) of the FAB that `flwr run` builds from `stage_app(app_dir)`.

    The same hash Flower computes for the bundle it ships (flwr 1.42 `flwr run`:
    `hashlib.sha256(build_fab_from_disk(app))`). Raises ValueError (Flower's) when the app's
    pyproject.toml is not a valid Flower App.
    """
    with tempfile.TemporaryDirectory(prefix="fedpriv-fab-") as tmp:
        return staged_fab_sha256(stage_app(Path(tmp) / "app", app_dir))


def staged_fab_sha256(staged: Path) -> str:
    """SHA-256 (64 hex digits) of the FAB Flower builds from the already staged app folder `staged`."""
    return hashlib.sha256(build_fab_from_disk(staged)).hexdigest()
