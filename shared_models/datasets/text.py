"""Text: CSV (`text,label`) and the SMS Spam Collection TSV -> byte-level token ids (N, L).

The tokenizer is data-independent on purpose: id = UTF-8 byte + 1, 0 = padding. A vocabulary
built from one client's messages would put words from its records into the shared model.
"""

from __future__ import annotations

import csv
import unicodedata
from pathlib import Path

import numpy as np
from sklearn.model_selection import train_test_split

from shared_models.records import DataFormatError, LabeledArrays, content_record_ids

MAX_BYTES = 200  # covers ~95% of SMS messages


def encode_bytes(texts: list[str], max_len: int = MAX_BYTES) -> np.ndarray:
    """(N, max_len) int64 ids: UTF-8 bytes + 1, truncated, right-padded with 0."""
    out = np.zeros((len(texts), max_len), dtype=np.int64)
    for i, text in enumerate(texts):
        raw = np.frombuffer(text.encode("utf-8")[:max_len], dtype=np.uint8)
        out[i, : len(raw)] = raw.astype(np.int64) + 1
    return out


def _read_utf8(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise DataFormatError(f"{path}: not UTF-8 text (byte {err.start}: {err.reason})") from err
    except OSError as err:
        raise DataFormatError(f"{path}: cannot read ({err})") from err


def _build(texts: list[str], labels: list[str], path: Path, classes: list[str] | None) -> LabeledArrays:
    if not texts:
        raise DataFormatError(f"{path}: no records")
    classes = classes or sorted(set(labels))
    if len(classes) < 2:
        raise DataFormatError(f"{path}: need at least 2 distinct labels, found {classes}")
    index = {c: i for i, c in enumerate(classes)}
    unknown = sorted(set(labels) - set(index))
    if unknown:
        raise DataFormatError(f"{path}: labels {unknown} are not in the class set {classes}")
    return LabeledArrays(
        task="text",
        x=encode_bytes(texts),
        y=np.asarray([index[l] for l in labels], dtype=np.int64),
        classes=classes,
        # Ids from the text as a person wrote it: Unicode NFC, surrounding white space dropped.
        record_ids=content_record_ids((unicodedata.normalize("NFC", t.strip()).encode("utf-8") for t in texts), "text"),
        source=str(path),
    )


def load_text_csv(path: str | Path, classes: list[str] | None = None) -> LabeledArrays:
    """A CSV with a header containing `text` and `label` columns (UTF-8).

    Raises DataFormatError naming the file, and the line for an empty text or label.
    """
    path = Path(path)
    rows = list(csv.DictReader(_read_utf8(path).splitlines()))
    if not rows or not {"text", "label"} <= set(rows[0]):
        raise DataFormatError(f"{path}: expected a CSV header with columns 'text' and 'label'")
    texts, labels = [], []
    for line, row in enumerate(rows, start=2):
        text, label = (row.get("text") or "").strip(), (row.get("label") or "").strip()
        if not text or not label:
            raise DataFormatError(f"{path}: line {line} has an empty 'text' or 'label'")
        texts.append(text)
        labels.append(label)
    return _build(texts, labels, path, classes)


def read_tsv(path: str | Path, classes: list[str] | None = None) -> LabeledArrays:
    """Every record of a `label<TAB>text` file (the SMS Spam Collection's format).

    A folder holding `SMSSpamCollection` is accepted. Raises DataFormatError naming the
    file and line.
    """
    path = Path(path)
    if path.is_dir():
        path = path / "SMSSpamCollection"
    texts, labels = [], []
    for line_no, line in enumerate(_read_utf8(path).splitlines(), start=1):
        if not line.strip():
            continue
        label, sep, text = line.partition("\t")
        if not sep or not text.strip():
            raise DataFormatError(f"{path}: line {line_no} is not 'label<TAB>text'")
        texts.append(text)
        labels.append(label.strip())
    return _build(texts, labels, path, classes)


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
