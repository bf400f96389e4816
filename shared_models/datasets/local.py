"""How a site's local files are read: the options a data owner sets, group keys and the data summary.

`LocalDataOptions` carries the format options of `fedpriv node` and `fedpriv simulate`
(`--image-size`, `--max-text-bytes`, `--csv-delimiter`, `--group-column`, `--group-manifest`,
added to both parsers by `add_local_data_options`); every loader of local files records
what it converted and skipped in a `DataSummary`, which travels in `LabeledArrays.meta["summary"]`
and is printed by `fedpriv node` before it connects (`summary_lines`).

Group keys (issue 19, patient-level DP): each record may carry the key of the person it is
about (`LabeledArrays.groups`), so that a node can make the patient, not the record, its
privacy unit. A text CSV names the key's column (`--group-column`); image and audio folders
give it in a manifest CSV with columns `file,group` (`--group-manifest`, or a `groups.csv` at
the data folder's root: `read_group_manifest`, `manifest_groups`); an `.npz` holds it as a
`{split}_groups` array.
"""

from __future__ import annotations

import argparse
import csv
import io
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import numpy as np

from shared_models.records import DataFormatError

MAX_BYTES = 200  # default tokenizer length in UTF-8 bytes (covers ~95% of SMS messages)
CSV_DELIMITERS = ",;\t|"
GROUP_MANIFEST = "groups.csv"  # read without --group-manifest when it sits at a data folder's root
TEXT_COLUMNS = ("text", "label")


# What an audio clip becomes (`shared_models.datasets.audio.clip_features`); the run chooses
# (run-config `audio-features`). Here, not in audio.py, since audio.py imports this module.
AUDIO_FEATURES = ("logmel", "scattering")
# What an image becomes (`shared_models.datasets.images.image_features`): its pixels, or
# wavelet scattering maps (run-config `image-features`).
IMAGE_FEATURES = ("pixels", "scattering")


@dataclass(frozen=True)
class LocalDataOptions:
    """Format options for a node's local data (hashable: loaders are cached on it).

    image_size: resize every image to image_size x image_size pixels (PIL, bilinear);
       None keeps each image's own size and refuses a folder of mixed sizes.
    max_text_bytes: the byte-level tokenizer's length L (UTF-8 bytes); longer texts are cut
       to L and counted in the data summary.
    csv_delimiter: the CSV field delimiter; None sniffs it among `,` `;` TAB `|`.
    group_column: the text CSV's column holding each record's group key (e.g. `patient_id`,
       the privacy unit of patient-level DP; matched without case or surrounding spaces);
       None reads no group keys from a CSV.
    group_manifest: a CSV with columns `file,group` giving each image/audio file's group key
       (a relative path is taken from the data folder); None reads `groups.csv` at the data
       folder's root when there is one.
    audio_features: what an audio clip becomes, "logmel" or "scattering"
       (`shared_models.datasets.audio.clip_features`); a model choice of the run, so a deployed
       node takes it from the run-config, not from its own options.
    image_features: what an image becomes, "pixels" or "scattering"
       (`shared_models.datasets.images.image_features`); like audio_features, the run's choice.
    """

    image_size: int | None = None
    max_text_bytes: int = MAX_BYTES
    csv_delimiter: str | None = None
    group_column: str | None = None
    group_manifest: str | None = None
    audio_features: str = "logmel"
    image_features: str = "pixels"

    def __post_init__(self) -> None:
        if self.image_size is not None and self.image_size < 1:
            raise ValueError(f"image size must be >= 1 pixel, got {self.image_size}")
        if self.max_text_bytes < 1:
            raise ValueError(f"max text bytes must be >= 1, got {self.max_text_bytes}")
        if self.csv_delimiter is not None and (len(self.csv_delimiter) != 1 or self.csv_delimiter in '"\r\n'):
            raise ValueError(f"CSV delimiter must be one character other than a quote or line break, "
                             f"got {self.csv_delimiter!r}")
        if self.group_column is not None:
            check_group_column(self.group_column)
        if self.group_manifest is not None and not self.group_manifest.strip():
            raise ValueError("group manifest must be a file path, got an empty one")
        if self.audio_features not in AUDIO_FEATURES:
            raise ValueError(f"audio features must be 'logmel' or 'scattering', got {self.audio_features!r}")
        if self.image_features not in IMAGE_FEATURES:
            raise ValueError(f"image features must be 'pixels' or 'scattering', got {self.image_features!r}")


@dataclass
class DataSummary:
    """What a loader did to a site's files: conversions and skipped entries, each with a count.

    converted / skipped: {what happened (human-readable): number of files or records}.
    """

    converted: Counter = field(default_factory=Counter)
    skipped: Counter = field(default_factory=Counter)

    def as_dict(self) -> dict:
        return {"converted": dict(self.converted), "skipped": dict(self.skipped)}


def is_hidden(path: Path) -> bool:
    """Hidden files and folders (name starts with '.', e.g. `.ipynb_checkpoints`, `.DS_Store`)."""
    return path.name.startswith(".")


def visible_entries(folder: Path, summary: DataSummary) -> list[Path]:
    """The sorted entries of `folder`, hidden ones left out and counted in `summary.skipped`."""
    entries = []
    for entry in sorted(folder.iterdir()):
        if is_hidden(entry):
            summary.skipped["hidden (name starts with '.')" + (" folder" if entry.is_dir() else " file")] += 1
        else:
            entries.append(entry)
    return entries


def check_group_column(name: str) -> str:
    """`name` if it can be a group column: not empty, not the `text` or `label` column. Raises ValueError."""
    if not name.strip():
        raise ValueError("group column must be a column name, got an empty one")
    if name.strip().lower() in TEXT_COLUMNS:
        raise ValueError(f"group column must be another column than 'text' and 'label', got {name!r}")
    return name


def group_sizes(groups: np.ndarray) -> np.ndarray:
    """(G,) int64 number of records of each distinct group key in `groups` ((N,)), keys in sorted order."""
    return np.unique(np.asarray(groups), return_counts=True)[1].astype(np.int64)


def header_columns(header: list[str], wanted: tuple[str, ...]) -> dict[str, int]:
    """{name: index} of the `wanted` names in a CSV header (matched without case or surrounding spaces)."""
    names = [name.strip().lower() for name in header]
    return {col: names.index(col) for col in wanted if col in names}


def _first_row(text: str, delimiter: str) -> list[str]:
    """The first non-empty record of CSV `text` read with `delimiter`, or [] (also when it is not valid CSV)."""
    try:
        return next((row for row in csv.reader(io.StringIO(text, newline=""), delimiter=delimiter) if row), [])
    except csv.Error:
        return []


def _manifest_path(folder: Path, manifest: str | Path | None) -> Path | None:
    """The manifest to read for `folder`: the given one (relative: from `folder`), else `folder/groups.csv` if any.

    Raises DataFormatError when a given manifest is not a file.
    """
    if manifest is None:
        default = folder / GROUP_MANIFEST
        return default if default.is_file() else None
    path = Path(manifest).expanduser()
    path = path if path.is_absolute() else folder / path
    if not path.is_file():
        raise DataFormatError(f"{path}: group manifest (--group-manifest) not found; expected a CSV file with "
                              f"columns 'file' and 'group' (a relative path is taken from the data folder {folder})")
    return path


def read_group_manifest(folder: Path, manifest: str | Path | None = None) -> tuple[Path, dict[str, str]] | None:
    """(manifest path, {file: group key}) of a data folder's group manifest, or None when it has none.

    manifest: `--group-manifest` (a relative path is taken from `folder`); None reads
    `folder/groups.csv` when it exists. The manifest is a UTF-8 CSV (a byte-order mark
    allowed, delimiter `,` or else `;` TAB `|`) whose header holds `file` and `group`;
    `file` is a path relative to `folder` with forward slashes (`normal/img001.png`).
    Keys and paths are stripped of surrounding spaces. Raises DataFormatError naming the
    manifest: for a header without `file` and `group` (with the columns found), a row with an
    empty file or group (with its line), or one file given two different groups.
    """
    path = _manifest_path(folder, manifest)
    if path is None:
        return None
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise DataFormatError(f"{path}: group manifest is not UTF-8 text (byte {err.start}: {err.reason})") from err
    except OSError as err:
        raise DataFormatError(f"{path}: cannot read the group manifest ({err})") from err

    # A comma unless only another usual delimiter gives a header with both columns (a spreadsheet export).
    delimiter = next((d for d in CSV_DELIMITERS if len(header_columns(_first_row(text, d), ("file", "group"))) == 2),
                     ",")
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter)
    groups, lines = {}, {}
    try:
        header = next((row for row in reader if row), [])
        columns = header_columns(header, ("file", "group"))
        if len(columns) < 2:
            raise DataFormatError(f"{path}: group manifest needs a header with columns 'file' and 'group'; found "
                                  f"columns {header}")
        for row in reader:
            if not row or all(not cell.strip() for cell in row):
                continue
            cells = {name: row[i].strip() if i < len(row) else "" for name, i in columns.items()}
            if not cells["file"] or not cells["group"]:
                raise DataFormatError(f"{path}: line {reader.line_num} of the group manifest has an empty "
                                      f"'file' or 'group'")
            name = PurePosixPath(cells["file"]).as_posix()  # "./a/b.png" and "a//b.png" are "a/b.png"
            if name in groups and groups[name] != cells["group"]:
                raise DataFormatError(f"{path}: the group manifest gives {name} two groups: {groups[name]!r} "
                                      f"(line {lines[name]}) and {cells['group']!r} (line {reader.line_num})")
            groups.setdefault(name, cells["group"])
            lines.setdefault(name, reader.line_num)
    except csv.Error as err:
        raise DataFormatError(f"{path}: line {reader.line_num} of the group manifest is not valid CSV ({err})") from err
    return path, groups


def manifest_groups(folder: Path, files: list[Path], manifest: tuple[Path, dict[str, str]],
                    summary: DataSummary) -> np.ndarray:
    """(N,) str group keys of the loaded `files` (inside `folder`) from a `read_group_manifest` result.

    Counts the files given a key in `summary.converted` and the manifest's rows that name no
    loaded file (missing, hidden or skipped files) in `summary.skipped`. Raises
    DataFormatError naming the manifest and the loaded files it has no row for.
    """
    path, groups = manifest
    names = [file.relative_to(folder).as_posix() for file in files]
    missing = [name for name in names if name not in groups]
    if missing:
        listed = ", ".join(missing[:10]) + (f" and {len(missing) - 10} more" if len(missing) > 10 else "")
        raise DataFormatError(f"{folder / missing[0]}: no row in the group manifest {path} (every loaded file needs "
                              f"a group key); {len(missing)} of {len(names)} files have none: {listed}")
    shown = path.name if path.parent.resolve() == folder.resolve() else str(path)
    summary.converted[f"group keys read from {shown}"] += len(names)
    unused = len(set(groups) - set(names))
    if unused:
        summary.skipped[f"rows of {shown} naming no loaded file"] += unused
    return np.asarray([groups[name] for name in names], dtype=str)


def summary_lines(data) -> list[str]:
    """Human-readable lines of a loaded dataset's summary (records per class, groups, converted, skipped).

    data: a `LabeledArrays`; its `meta["summary"]` (if any) gives the conversions and skips.
    With group keys (`data.groups`), a line gives their number and the records per group.
    """
    counts = np.bincount(data.y, minlength=len(data.classes))
    lines = ["records per class: " + ", ".join(f"{c} {n}" for c, n in zip(data.classes, counts.tolist()))]
    if data.groups is not None:
        sizes = group_sizes(data.groups)
        if len(sizes):
            median = float(np.median(sizes))  # a whole number, or one half between two group sizes
            median_text = str(int(median)) if median.is_integer() else f"{median:.1f}"
            lines.append(f"groups: {len(sizes)} (records per group: min {sizes.min()}, median {median_text}, "
                         f"max {sizes.max()})")
        else:
            lines.append("groups: 0")
    summary = data.meta.get("summary", {})
    converted, skipped = summary.get("converted", {}), summary.get("skipped", {})
    lines.append("converted: " + ("; ".join(f"{what}: {n}" for what, n in converted.items()) or "nothing"))
    lines.append("skipped: " + ("; ".join(f"{what}: {n}" for what, n in skipped.items()) or "nothing"))
    return lines


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {text}")
    return value


def add_local_data_options(parser) -> None:
    """--image-size, --max-text-bytes, --csv-delimiter, --group-column, --group-manifest: how local files are read.

    The flags of `LocalDataOptions` (`local_data_options` builds it from the parsed flags).

    Shared by `fedpriv simulate`/`fedpriv run` (a --dataset path) and `fedpriv node` (its --data).
    """
    parser.add_argument("--image-size", type=_positive_int, default=None, metavar="N",
                        help="resize every image of an image folder to NxN pixels (PIL, bilinear); without it images "
                             "keep their size and a folder of mixed sizes is refused, naming the odd files")
    parser.add_argument("--max-text-bytes", type=_positive_int, default=MAX_BYTES, metavar="L",
                        help="text length in UTF-8 bytes the byte-level tokenizer keeps; longer texts are cut "
                             "(the data summary counts them)")
    parser.add_argument("--csv-delimiter", type=csv_delimiter, default=None, metavar="CHAR",
                        help="field delimiter of a text .csv ('tab' or '\\t' for TAB); without it the delimiter is "
                             "sniffed among , ; TAB |")
    parser.add_argument("--group-column", type=group_column, default=None, metavar="NAME",
                        help="the CSV column holding each record's group key, e.g. patient_id: the privacy unit for "
                             "patient-level DP (text .csv only)")
    parser.add_argument("--group-manifest", type=group_manifest, default=None, metavar="FILE",
                        help="a CSV with columns file,group giving each image/audio file's group key (file: its path "
                             "in the data folder, e.g. normal/img001.png; a relative FILE is taken from the data "
                             "folder); without it a groups.csv at the data folder's root is read when present")


def csv_delimiter(text: str) -> str:
    """argparse type: one delimiter character; 'tab' and '\\t' mean TAB (ArgumentTypeError otherwise)."""
    value = "\t" if text.lower() in ("tab", "\\t") else text
    if len(value) != 1 or value in '"\r\n':
        raise argparse.ArgumentTypeError(f"must be one character (or 'tab'), got {text!r}")
    return value


def group_column(text: str) -> str:
    """argparse type: a group column name (`check_group_column`; ArgumentTypeError otherwise)."""
    try:
        return check_group_column(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from err


def group_manifest(text: str) -> str:
    """argparse type: a manifest path, not empty (ArgumentTypeError otherwise); it is looked for when data is read."""
    if not text.strip():
        raise argparse.ArgumentTypeError("must be a file path, got an empty one")
    return text


def local_data_options(args: argparse.Namespace) -> LocalDataOptions:
    """The `LocalDataOptions` of parsed `add_local_data_options` flags."""
    return LocalDataOptions(image_size=args.image_size, max_text_bytes=args.max_text_bytes,
                            csv_delimiter=args.csv_delimiter, group_column=args.group_column,
                            group_manifest=args.group_manifest)
