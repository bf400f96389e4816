"""How a site's local files are read: the options a data owner sets and the data summary.

`LocalDataOptions` carries the format options of `fedpriv node` and `fedpriv simulate`
(`--image-size`, `--max-text-bytes`, `--csv-delimiter`, added to both parsers by
`add_local_data_options`); every loader of local files records
what it converted and skipped in a `DataSummary`, which travels in `LabeledArrays.meta["summary"]`
and is printed by `fedpriv node` before it connects (`summary_lines`).
"""

from __future__ import annotations

import argparse
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

MAX_BYTES = 200  # default tokenizer length in UTF-8 bytes (covers ~95% of SMS messages)
CSV_DELIMITERS = ",;\t|"


@dataclass(frozen=True)
class LocalDataOptions:
    """Format options for a node's local data (hashable: loaders are cached on it).

    image_size: resize every image to image_size x image_size pixels (PIL, bilinear);
       None keeps each image's own size and refuses a folder of mixed sizes.
    max_text_bytes: the byte-level tokenizer's length L (UTF-8 bytes); longer texts are cut
       to L and counted in the data summary.
    csv_delimiter: the CSV field delimiter; None sniffs it among `,` `;` TAB `|`.
    """

    image_size: int | None = None
    max_text_bytes: int = MAX_BYTES
    csv_delimiter: str | None = None

    def __post_init__(self) -> None:
        if self.image_size is not None and self.image_size < 1:
            raise ValueError(f"image size must be >= 1 pixel, got {self.image_size}")
        if self.max_text_bytes < 1:
            raise ValueError(f"max text bytes must be >= 1, got {self.max_text_bytes}")
        if self.csv_delimiter is not None and (len(self.csv_delimiter) != 1 or self.csv_delimiter in '"\r\n'):
            raise ValueError(f"CSV delimiter must be one character other than a quote or line break, "
                             f"got {self.csv_delimiter!r}")


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


def summary_lines(data) -> list[str]:
    """Human-readable lines of a loaded dataset's summary (records per class, converted, skipped).

    data: a `LabeledArrays`; its `meta["summary"]` (if any) gives the conversions and skips.
    """
    counts = np.bincount(data.y, minlength=len(data.classes))
    lines = ["records per class: " + ", ".join(f"{c} {n}" for c, n in zip(data.classes, counts.tolist()))]
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
    """--image-size, --max-text-bytes, --csv-delimiter: how local files are read (`LocalDataOptions`).

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


def csv_delimiter(text: str) -> str:
    """argparse type: one delimiter character; 'tab' and '\\t' mean TAB (ArgumentTypeError otherwise)."""
    value = "\t" if text.lower() in ("tab", "\\t") else text
    if len(value) != 1 or value in '"\r\n':
        raise argparse.ArgumentTypeError(f"must be one character (or 'tab'), got {text!r}")
    return value


def local_data_options(args: argparse.Namespace) -> LocalDataOptions:
    """The `LocalDataOptions` of parsed `add_local_data_options` flags."""
    return LocalDataOptions(image_size=args.image_size, max_text_bytes=args.max_text_bytes,
                            csv_delimiter=args.csv_delimiter)
