"""Named datasets: the simulations' benchmarks and the coordinator's central test sets (DESIGN 7).

| name            | task   | source                                   | split                  |
|-----------------|--------|------------------------------------------|------------------------|
| digits          | vision | scikit-learn's embedded 8x8 digits        | stratified 80/20, seed 0 |
| fsdd            | speech | `<data-dir>/fsdd/recordings/*.wav`        | official: takes 0-4 test |
| pneumoniamnist  | vision | `<data-dir>/pneumoniamnist/pneumoniamnist.npz` | official train/test |
| sms_spam        | text   | `<data-dir>/sms_spam/SMSSpamCollection`   | stratified 80/20, seed 0 |

`<data-dir>` is `$FEDPRIV_DATA_DIR`, else the `shared/data` folder beside this checkout.
This build reads local copies only (its machines reach no dataset hosts); a missing folder
gives a clear error saying where to put the files. Anything that is not a name is read as a
path in one of the local formats (`shared_models.datasets.load_local`), split 80/20 with seed 0
(stratified by class when every class has at least 2 records).
"""

from __future__ import annotations

import functools
import hashlib
import os
from pathlib import Path

import numpy as np
from sklearn.model_selection import train_test_split

from shared_models.datasets.synthetic_patients import assign_synthetic_patients

from shared_models.datasets import (
    DataFormatError,
    LabeledArrays,
    LocalDataOptions,
    image_features,
    load_digits_embedded,
    load_fsdd,
    load_local,
    load_npz,
    load_sms_spam,
)

DATASET_TASKS = {"digits": "vision", "fsdd": "speech", "pneumoniamnist": "vision", "sms_spam": "text"}
_RELATIVE_PATHS = {
    "fsdd": "fsdd/recordings",
    "pneumoniamnist": "pneumoniamnist/pneumoniamnist.npz",
    "sms_spam": "sms_spam/SMSSpamCollection",
}


def data_dir() -> Path:
    """Where named datasets live: $FEDPRIV_DATA_DIR, else `../shared/data` from the checkout."""
    env = os.environ.get("FEDPRIV_DATA_DIR")
    if env:
        return Path(env).expanduser()
    return Path(__file__).resolve().parents[2].parent / "shared" / "data"


def dataset_task(name_or_path: str, task: str | None = None) -> str:
    """The task of a named dataset, or `task` for a path. Raises ValueError on a mismatch."""
    named = DATASET_TASKS.get(name_or_path)
    if not named and not Path(name_or_path).expanduser().exists():
        raise ValueError(f"dataset {name_or_path!r} is neither a named dataset ({', '.join(DATASET_TASKS)}) "
                         "nor an existing path")
    if named and task and task != named:
        raise ValueError(f"dataset {name_or_path!r} is a {named} dataset, but --task is {task!r}")
    if not named and not task:
        raise ValueError(f"dataset {name_or_path!r} is a path: say its --task (vision, speech or text)")
    return named or task  # type: ignore[return-value]


@functools.lru_cache(maxsize=4)
def load_dataset(name_or_path: str, task: str | None = None, root: str = "",
                 options: LocalDataOptions | None = None, synthetic_patients: bool = False) -> dict[str, LabeledArrays]:
    """{"train", "test"} splits of a named dataset or a local path (cached per process).

    root: folder of the named datasets (default `data_dir()`); Flower runs the apps from
    a copy of this project, so the simulation passes it explicitly in the run-config.
    options: format options for a local path (`LocalDataOptions`); named datasets ignore them,
    except FSDD which takes its `audio_features` and the image datasets (digits,
    pneumoniamnist) their `image_features`.
    synthetic_patients: give every split seeded pseudo-patient group keys
    (`shared_models.datasets.synthetic_patients`; a dataset with its own groups is refused).
    Raises DataFormatError when a named dataset's files are missing or malformed.
    """
    if synthetic_patients:
        splits = load_dataset(name_or_path, task, root, options)
        try:
            return {split: assign_synthetic_patients(data, split) for split, data in splits.items()}
        except ValueError as err:
            raise DataFormatError(f"dataset {name_or_path!r}: --synthetic-patients: {err}") from err
    task = dataset_task(name_or_path, task)
    image_kind = (options or LocalDataOptions()).image_features
    if name_or_path == "digits":
        return {split: image_features(data, image_kind) for split, data in load_digits_embedded().items()}
    if name_or_path in _RELATIVE_PATHS:
        path = (Path(root) if root else data_dir()) / _RELATIVE_PATHS[name_or_path]
        if not path.exists():
            raise DataFormatError(
                f"dataset {name_or_path!r} not found at {path}. Put the files there or set "
                "FEDPRIV_DATA_DIR to the folder holding fsdd/, pneumoniamnist/ and sms_spam/."
            )
        if name_or_path == "fsdd":
            features = (options or LocalDataOptions()).audio_features
            return _cached_features(path, lambda: load_fsdd(path, features=features), features)
        if name_or_path == "pneumoniamnist":
            splits = load_npz(path, classes=["normal", "pneumonia"])
            # Scattering 5.3k 28x28 images takes ~5 s on one core: computed, never cached on disk.
            return {split: image_features(splits[split], image_kind) for split in ("train", "test")}
        return load_sms_spam(path)
    return _split_local(load_local(name_or_path, task, options))


def _split_local(data: LabeledArrays, test_fraction: float = 0.2) -> dict[str, LabeledArrays]:
    """80/20 {"train", "test"} split of a local dataset, seed 0.

    Stratified by class when every class present has at least 2 records and both sides
    can hold one record of each class; otherwise a plain random split.
    """
    counts = np.unique(data.y, return_counts=True)[1]
    n_test = int(np.ceil(test_fraction * len(data)))  # what train_test_split puts in the test side
    can_stratify = len(counts) > 0 and counts.min() >= 2 and len(counts) <= n_test <= len(data) - len(counts)
    stratify = data.y if can_stratify else None
    train_idx, test_idx = train_test_split(
        np.arange(len(data)), test_size=test_fraction, stratify=stratify, random_state=0
    )
    return {"train": data.subset(np.sort(train_idx)), "test": data.subset(np.sort(test_idx))}


def _cached_features(folder: Path, compute, features: str = "logmel") -> dict[str, LabeledArrays]:
    """Audio features are costly (FSDD: log-mel ~20 s, scattering ~5 min on 2 cores): keep
    them on disk, keyed by the files and the kind of features."""
    files = sorted(folder.glob("*.wav"))
    key = hashlib.sha256()
    for f in files:
        st = f.stat()
        key.update(f"{f.name}:{st.st_size}:{st.st_mtime_ns}".encode())
    key.update(b"logmel-v1/content-ids" if features == "logmel" else f"{features}-v3/content-ids".encode())
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "fedpriv" / f"fsdd-{key.hexdigest()[:16]}.npz"
    if cache.exists():
        try:
            with np.load(cache, allow_pickle=False) as z:
                return {
                    split: LabeledArrays(
                        task="speech",
                        x=z[f"{split}_x"],
                        y=z[f"{split}_y"],
                        classes=[str(d) for d in range(10)],
                        record_ids=list(z[f"{split}_ids"]),
                        groups=z[f"{split}_groups"],
                        source=str(folder),
                    )
                    for split in ("train", "test")
                }
        except (OSError, KeyError, ValueError):
            cache.unlink(missing_ok=True)  # damaged cache: recompute
    splits = compute()
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache.with_suffix(f".{os.getpid()}.tmp.npz")
    np.savez(
        tmp,
        **{
            f"{split}_{field}": value
            for split, data in splits.items()
            for field, value in (
                ("x", data.x),
                ("y", data.y),
                ("ids", np.asarray(data.record_ids)),
                ("groups", data.groups),
            )
        },
    )
    os.replace(tmp, cache)
    return splits
