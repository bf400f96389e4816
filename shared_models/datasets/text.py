"""Text: CSV (`text,label`) and the SMS Spam Collection TSV -> byte-level token ids (N, L).

A CSV may also hold each record's group key (`--group-column`, e.g. `patient_id`): the privacy
unit of patient-level DP, kept in `LabeledArrays.groups`. The TSV has no columns, so no keys.

The tokenizer is data-independent on purpose: id = UTF-8 byte + 1, 0 = padding. A vocabulary
built from one client's messages would put words from its records into the shared model.
"""

from __future__ import annotations

import csv
import io
import unicodedata
from pathlib import Path

import numpy as np
from sklearn.model_selection import train_test_split

from shared_models.records import DataFormatError, LabeledArrays, content_record_ids

from .local import CSV_DELIMITERS, MAX_BYTES, DataSummary, header_columns


def encode_bytes(texts: list[str], max_len: int = MAX_BYTES) -> np.ndarray:
    """(N, max_len) int64 ids: UTF-8 bytes + 1, truncated, right-padded with 0."""
    out = np.zeros((len(texts), max_len), dtype=np.int64)
    for i, text in enumerate(texts):
        raw = np.frombuffer(text.encode("utf-8")[:max_len], dtype=np.uint8)
        out[i, : len(raw)] = raw.astype(np.int64) + 1
    return out


def _read_utf8(path: Path) -> str:
    """The file's text exactly as stored (no newline translation), a UTF-8 byte-order mark dropped.

    Raises DataFormatError naming the file (and the byte) when it is unreadable or not UTF-8.
    """
    try:
        return path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise DataFormatError(f"{path}: not UTF-8 text (byte {err.start}: {err.reason})") from err
    except OSError as err:
        raise DataFormatError(f"{path}: cannot read ({err})") from err


def _build(texts: list[str], labels: list[str], path: Path, classes: list[str] | None,
           max_len: int = MAX_BYTES, summary: DataSummary | None = None,
           groups: list[str] | None = None) -> LabeledArrays:
    if not texts:
        raise DataFormatError(f"{path}: no records")
    classes = classes or sorted(set(labels))
    if len(classes) < 2:
        raise DataFormatError(f"{path}: need at least 2 distinct labels, found {classes}")
    index = {c: i for i, c in enumerate(classes)}
    unknown = sorted(set(labels) - set(index))
    if unknown:
        raise DataFormatError(f"{path}: labels {unknown} are not in the class set {classes}")
    summary = summary if summary is not None else DataSummary()
    longer = sum(len(t.encode("utf-8")) > max_len for t in texts)
    if longer:
        summary.converted[f"texts longer than {max_len} bytes cut to {max_len} (--max-text-bytes)"] += longer
    return LabeledArrays(
        task="text",
        x=encode_bytes(texts, max_len),
        y=np.asarray([index[l] for l in labels], dtype=np.int64),
        classes=classes,
        # Ids from the text as a person wrote it (never cut): Unicode NFC, surrounding white space dropped.
        record_ids=content_record_ids((unicodedata.normalize("NFC", t.strip()).encode("utf-8") for t in texts), "text"),
        groups=None if groups is None else np.asarray(groups, dtype=str),
        source=str(path),
        meta={"summary": summary.as_dict()},
    )


def _header(text: str, delimiter: str) -> list[str]:
    """The first non-empty record of `text` parsed with `delimiter` (the CSV header), or []."""
    for row in csv.reader(io.StringIO(text, newline=""), delimiter=delimiter):
        if row:
            return row
    return []


def _columns(header: list[str]) -> dict[str, int]:
    """{'text': index, 'label': index} of a header (names matched without case or surrounding spaces)."""
    return header_columns(header, ("text", "label"))


def _pick_delimiter(text: str) -> tuple[str, str]:
    """(delimiter, how it was chosen) for a CSV with a `text,label` header.

    csv.Sniffer's guess among `,` `;` TAB `|`, unless only another of those delimiters gives a
    header holding both `text` and `label` (Sniffer guesses from character counts, which a
    long first text can sway).
    """
    try:
        sniffed = csv.Sniffer().sniff(text[:65536], delimiters=CSV_DELIMITERS).delimiter
    except csv.Error:
        sniffed = ","
    fitting = [d for d in CSV_DELIMITERS if len(_columns(_header(text, d))) == 2]
    if sniffed in fitting or not fitting:
        return sniffed, "sniffed"
    return fitting[0], "the one whose header has 'text' and 'label'"


def load_text_csv(path: str | Path, classes: list[str] | None = None, *, max_len: int = MAX_BYTES,
                  delimiter: str | None = None, group_column: str | None = None) -> LabeledArrays:
    """A CSV with a header containing `text` and `label` columns (UTF-8, a byte-order mark allowed).

    Parsed by Python's `csv` module from the raw file: quoted fields keep their delimiters and
    newlines. delimiter: the field delimiter (`--csv-delimiter`); None sniffs it among `,` `;`
    TAB `|`. group_column: the column holding each record's group key (`--group-column`, e.g.
    `patient_id`; matched without case or surrounding spaces): the result's `groups` is then
    an (N,) str array of the stripped keys; None leaves `groups` None. Returns x (N, max_len)
    int64 byte ids (`encode_bytes`); texts longer than max_len UTF-8 bytes are cut and counted
    in `meta["summary"]`. Raises DataFormatError naming the file: for a header without `text`
    and `label`, or without the group column (with the columns found and the delimiter), and
    naming the line for a record with an empty text, label or group key or with more fields
    than the header.
    """
    path = Path(path)
    text = _read_utf8(path)
    how = "given"
    if delimiter is None:
        delimiter, how = _pick_delimiter(text)
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter)
    try:
        header = next((row for row in reader if row), [])
        columns = _columns(header)
        if len(columns) < 2:
            raise DataFormatError(f"{path}: expected a CSV header with columns 'text' and 'label'; found columns "
                                  f"{header} with delimiter {delimiter!r} ({how}; set --csv-delimiter to choose another)")
        group_at = None
        if group_column is not None:
            group_at = header_columns(header, (group_column.strip().lower(),)).get(group_column.strip().lower())
            if group_at is None:
                raise DataFormatError(f"{path}: no group column {group_column!r} (--group-column); found columns "
                                      f"{header} with delimiter {delimiter!r}")
        texts, labels, groups, summary = [], [], [], DataSummary()
        for row in reader:
            if not row or (len(row) == 1 and not row[0].strip()):
                continue
            if len(row) > len(header):
                raise DataFormatError(f"{path}: line {reader.line_num} has {len(row)} fields, the header {header} has "
                                      f"{len(header)} (delimiter {delimiter!r}); quote fields that hold the delimiter")
            cells = {name: row[i].strip() if i < len(row) else "" for name, i in columns.items()}
            if not cells["text"] or not cells["label"]:
                raise DataFormatError(f"{path}: line {reader.line_num} has an empty 'text' or 'label'")
            if group_at is not None:
                key = row[group_at].strip() if group_at < len(row) else ""
                if not key:
                    raise DataFormatError(f"{path}: line {reader.line_num} has an empty group key in column "
                                          f"{header[group_at].strip()!r} (--group-column)")
                groups.append(key)
            texts.append(cells["text"])
            labels.append(cells["label"])
    except csv.Error as err:
        raise DataFormatError(f"{path}: line {reader.line_num}: not valid CSV with delimiter {delimiter!r} ({err})") from err
    if not texts:
        raise DataFormatError(f"{path}: expected a CSV header with columns 'text' and 'label' followed by records; "
                              f"found the header {header} (delimiter {delimiter!r}) and no records")
    return _build(texts, labels, path, classes, max_len, summary, groups if group_at is not None else None)


def read_tsv(path: str | Path, classes: list[str] | None = None, *, max_len: int = MAX_BYTES) -> LabeledArrays:
    """Every record of a `label<TAB>text` file (the SMS Spam Collection's format), one per line.

    A folder holding `SMSSpamCollection` is accepted; a UTF-8 byte-order mark is dropped.
    Returns x (N, max_len) int64 byte ids; longer texts are cut and counted in
    `meta["summary"]`. Raises DataFormatError naming the file and line.
    """
    path = Path(path)
    if path.is_dir():
        path = path / "SMSSpamCollection"
    texts, labels = [], []
    # Lines end at LF (CRLF too); str.splitlines would also split at form feeds and U+2028 inside a text.
    for line_no, line in enumerate(_read_utf8(path).split("\n"), start=1):
        line = line.removesuffix("\r")
        if not line.strip():
            continue
        label, sep, text = line.partition("\t")
        if not sep or not text.strip():
            raise DataFormatError(f"{path}: line {line_no} is not 'label<TAB>text'")
        texts.append(text)
        labels.append(label.strip())
    return _build(texts, labels, path, classes, max_len)


def load_sms_spam(path: str | Path, test_fraction: float = 0.2, seed: int = 0) -> dict[str, LabeledArrays]:
    """The SMS Spam Collection, classes ["ham", "spam"].

    No official split exists: returns a stratified {"train", "test"} split with a fixed
    seed, so every node and the server agree on it.
    """

    full = read_tsv(path, classes=["ham", "spam"])
    train_idx, test_idx = train_test_split(
        np.arange(len(full)), test_size=test_fraction, stratify=full.y, random_state=seed
    )
    return {"train": full.subset(np.sort(train_idx)), "test": full.subset(np.sort(test_idx))}
