"""Data both roles read: the formats a hospital or firm holds, the named datasets, partitions (DESIGN 7).

A node reads its local data with these loaders; the coordinator reads its central test set
and a simulation its named datasets (`shared_models.datasets.named`) and simulated nodes'
shares (`shared_models.datasets.partitioning`) with the same ones.

`load_local(path, task, options)` reads a node's own data from its `data-path`:
- vision: a MedMNIST-style `.npz` (its `train` split) or a folder with one subfolder of
  images per class (8- or 16-bit, any PIL format; one size, or resized with `--image-size`);
  pixels, or wavelet scattering maps when the run says `image-features = "scattering"`;
- speech: a folder with one subfolder of WAV files per class, or FSDD-named WAV files (any
  rate and channel count: resampled and downmixed to the model's 8 kHz mono);
- text: a `.csv` with `text,label` columns (delimiter sniffed or `--csv-delimiter`), or a
  `label<TAB>text` file (SMS Spam format); texts cut at `--max-text-bytes`.
Each record may carry a group key (`LabeledArrays.groups`, e.g. the patient: the privacy unit
of patient-level DP): a text CSV's `--group-column`; an image or audio folder's manifest
(`--group-manifest`, or `groups.csv` at the folder's root; columns `file,group`); an `.npz`'s
`train_groups` array. An option the data's format cannot use is an error, never ignored.
Extensions match in any case; hidden files and folders are skipped. What was converted and
skipped is in the result's `meta["summary"]` (`summary_lines`). Every loader raises
`DataFormatError` with the file/field at fault.
"""

from __future__ import annotations

from pathlib import Path

from shared_models.records import DataFormatError, LabeledArrays

from .audio import LogMelConfig, load_audio_folder, load_fsdd
from .images import image_features, load_digits_embedded, load_image_folder, load_npz
from .local import LocalDataOptions, group_sizes, summary_lines
from .text import encode_bytes, load_sms_spam, load_text_csv, read_tsv


def load_local(path: str | Path, task: str, options: LocalDataOptions | None = None) -> LabeledArrays:
    """A node's local training data at `path` for `task` ("vision", "speech" or "text").

    options: the owner's format options (`LocalDataOptions`: image size, text length, CSV
    delimiter, group column or manifest); None takes the defaults. Raises DataFormatError
    when the path is missing, its format does not fit the task, or a group option does not
    fit its format (a group column names a text CSV's column; a manifest is for image and
    audio folders).
    """
    options = options or LocalDataOptions()
    path = Path(path).expanduser()
    if not path.exists():
        raise DataFormatError(f"{path}: data-path does not exist")
    if task not in ("vision", "speech", "text"):
        raise DataFormatError(f"task must be one of vision, speech, text; got {task!r}")
    if task in ("vision", "speech") and path.is_file() and path.suffix.lower() == ".csv":
        raise DataFormatError(_csv_for_task(path, task))
    folder = task in ("vision", "speech") and path.suffix.lower() != ".npz"
    if options.group_column is not None and not (task == "text" and path.suffix.lower() == ".csv"):
        raise DataFormatError(_group_column_misfit(path, task, options.group_column))
    if options.group_manifest is not None and not folder:
        elsewhere = {"vision": "; an .npz holds them as a 'train_groups' array",
                     "text": "; a text CSV holds them in a column (--group-column)"}.get(task, "")
        raise DataFormatError(f"{path}: --group-manifest gives group keys to the files of an image or audio "
                              f"folder{elsewhere}")
    if task == "vision":
        if path.suffix.lower() == ".npz":
            splits = load_npz(path)
            if "train" not in splits:
                raise DataFormatError(f"{path}: .npz has no 'train_images'/'train_labels' (found {sorted(splits)})")
            data = splits["train"]
        else:
            data = load_image_folder(path, options.image_size, group_manifest=options.group_manifest)
        try:
            return image_features(data, options.image_features)
        except ValueError as err:
            raise DataFormatError(f"{path}: {err}") from err
    if task == "speech":
        return load_audio_folder(path, group_manifest=options.group_manifest, features=options.audio_features)
    if path.suffix.lower() == ".csv":
        return load_text_csv(path, max_len=options.max_text_bytes, delimiter=options.csv_delimiter,
                             group_column=options.group_column)
    return read_tsv(path, max_len=options.max_text_bytes)


def _group_column_misfit(path: Path, task: str, column: str) -> str:
    """The error for `--group-column` given for data without columns: where that data's group keys go instead."""
    if task == "text":
        return (f"{path}: --group-column {column!r} names a column of a text .csv, but this file is read as "
                "'label<TAB>text' lines (SMS Spam format), which have no columns; save it as a .csv with a header "
                f"holding 'text', 'label' and {column!r}")
    where = ("a 'train_groups' array in the .npz" if path.suffix.lower() == ".npz"
             else "a manifest CSV with columns file,group (--group-manifest, or groups.csv in the data folder)")
    return (f"{path}: --group-column {column!r} names a column of a text .csv; --task {task} data gives group keys "
            f"in {where}")


def _csv_for_task(path: Path, task: str) -> str:
    """The error for a CSV file given to a task that reads folders: it names the file's columns."""
    try:
        with open(path, encoding="utf-8-sig", errors="replace", newline="") as handle:
            header = handle.readline().strip()
    except OSError as err:
        header = f"unreadable: {err}"
    expected = ("a folder with one subfolder of images per class, or a MedMNIST-style .npz" if task == "vision"
                else "a folder of WAV files (one subfolder per class, or FSDD names)")
    return (f"{path}: is a CSV file (first line: {header[:120] or 'empty'}); CSV files are read by --task text only, "
            f"from their 'text' and 'label' columns. --task {task} reads {expected}")


__all__ = [
    "DataFormatError",
    "LabeledArrays",
    "LocalDataOptions",
    "LogMelConfig",
    "encode_bytes",
    "group_sizes",
    "image_features",
    "load_audio_folder",
    "load_digits_embedded",
    "load_fsdd",
    "load_image_folder",
    "load_local",
    "load_npz",
    "load_sms_spam",
    "load_text_csv",
    "read_tsv",
    "summary_lines",
]
