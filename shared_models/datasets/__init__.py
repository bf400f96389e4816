"""Data both roles read: the formats a hospital or firm holds, the named datasets, partitions (DESIGN 7).

A node reads its local data with these loaders; the coordinator reads its central test set
and a simulation its named datasets (`shared_models.datasets.named`) and simulated nodes'
shares (`shared_models.datasets.partitioning`) with the same ones.

`load_local(path, task)` reads a node's own data from its `data-path`:
- vision: a MedMNIST-style `.npz` (its `train` split) or a folder with one subfolder of
  images per class;
- speech: a folder with one subfolder of WAV files per class, or FSDD-named WAV files;
- text: a `.csv` with `text,label` columns, or a `label<TAB>text` file (SMS Spam format).
Every loader raises `DataFormatError` with the file/field at fault.
"""

from __future__ import annotations

from pathlib import Path

from shared_models.records import DataFormatError, LabeledArrays

from .audio import LogMelConfig, load_audio_folder, load_fsdd
from .images import load_digits_embedded, load_image_folder, load_npz
from .text import encode_bytes, load_sms_spam, load_text_csv, read_tsv


def load_local(path: str | Path, task: str) -> LabeledArrays:
    """A node's local training data at `path` for `task` ("vision", "speech" or "text").

    Raises DataFormatError when the path is missing or its format does not fit the task.
    """
    path = Path(path).expanduser()
    if not path.exists():
        raise DataFormatError(f"{path}: data-path does not exist")
    if task == "vision":
        if path.suffix == ".npz":
            splits = load_npz(path)
            if "train" not in splits:
                raise DataFormatError(f"{path}: .npz has no 'train_images'/'train_labels' (found {sorted(splits)})")
            return splits["train"]
        return load_image_folder(path)
    if task == "speech":
        return load_audio_folder(path)
    if task == "text":
        if path.suffix == ".csv":
            return load_text_csv(path)
        return read_tsv(path)
    raise DataFormatError(f"task must be one of vision, speech, text; got {task!r}")


__all__ = [
    "DataFormatError",
    "LabeledArrays",
    "LogMelConfig",
    "encode_bytes",
    "load_audio_folder",
    "load_digits_embedded",
    "load_fsdd",
    "load_image_folder",
    "load_local",
    "load_npz",
    "load_sms_spam",
    "load_text_csv",
    "read_tsv",
]
