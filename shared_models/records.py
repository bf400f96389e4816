"""The record type both roles share: what every loader returns, the error it raises, record ids.

`LabeledArrays` holds a dataset in memory; `content_record_ids` gives each record the id the
privacy ledger knows it by (DESIGN 4.1); `DataFormatError` names the file or field at fault.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np


class DataFormatError(ValueError):
    """A data file or field is not what fedpriv expects. The message names the file/field."""


def content_record_ids(contents: Iterable[bytes], kind: str) -> list[str]:
    """Record ids derived from what each record *is*, for the privacy ledger (DESIGN 4.1).

    contents: one bytes object per record, in a canonical form decoded from its file before
    any feature transform (a text's NFC UTF-8 without surrounding white space, an image's
    float32 (C, H, W) pixels scaled by their type, an audio clip's float32 samples), so that
    the same record exported another way is the same record. kind: "text", "image" or
    "audio" (keeps kinds apart). Each id is the
    first 128 bits of SHA-256(kind, content) in hex; the k-th repeat of identical content
    (k >= 1) gets "#k" appended, so duplicates stay distinct records. A renamed file, a new
    order or another export of the same records gives the same ids; a changed preprocessing
    (log-mel settings, scaling) does not change them.
    """
    ids, seen = [], {}
    for content in contents:
        digest = hashlib.sha256(kind.encode() + b"\0" + content).hexdigest()[:32]
        repeat = seen.get(digest, 0)
        seen[digest] = repeat + 1
        ids.append(digest if repeat == 0 else f"{digest}#{repeat}")
    return ids


def array_content(array: np.ndarray) -> bytes:
    """An array's dtype, shape and bytes: the content `content_record_ids` hashes for pixels and samples."""
    array = np.ascontiguousarray(array)
    return f"{array.dtype.str}{array.shape}".encode() + array.tobytes()


@dataclass
class LabeledArrays:
    """A labelled dataset held as arrays.

    x: examples stacked on axis 0 — vision (N, C, H, W) float32 in [0, 1] (or its
       scattering maps, (N, 81*C, H/4, W/4), with image features "scattering"); speech
       (N, T, n_mels) float32 log-mel frames; text (N, L) int64 byte ids (0 = padding).
    y: (N,) int64 class indices into `classes`.
    record_ids: N ids derived from each record's content (`content_record_ids`), by which
       the privacy ledger knows a record whatever its file name or position.
    groups: optional (N,) natural partition ids (e.g. the FSDD speaker), or None.
    """

    task: str
    x: np.ndarray
    y: np.ndarray
    classes: list[str]
    record_ids: list[str]
    groups: np.ndarray | None = None
    source: str = ""
    meta: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        n = len(self.x)
        if len(self.y) != n or len(self.record_ids) != n or (self.groups is not None and len(self.groups) != n):
            raise DataFormatError(
                f"{self.source or 'dataset'}: x, y, record_ids and groups must have the same length "
                f"(got {n}, {len(self.y)}, {len(self.record_ids)}, "
                f"{None if self.groups is None else len(self.groups)})"
            )
        if n and (self.y.min() < 0 or self.y.max() >= len(self.classes)):
            raise DataFormatError(
                f"{self.source or 'dataset'}: labels must be in [0, {len(self.classes) - 1}] "
                f"for classes {self.classes}, got range [{self.y.min()}, {self.y.max()}]"
            )

    def __len__(self) -> int:
        return len(self.x)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def input_shape(self) -> tuple[int, ...]:
        """One example's shape, without the batch axis."""
        return tuple(self.x.shape[1:])

    def subset(self, indices: np.ndarray) -> LabeledArrays:
        """The examples at `indices` (int array), same classes and task."""
        indices = np.asarray(indices, dtype=np.int64)
        return LabeledArrays(
            task=self.task,
            x=self.x[indices],
            y=self.y[indices],
            classes=self.classes,
            record_ids=[self.record_ids[i] for i in indices],
            groups=None if self.groups is None else self.groups[indices],
            source=self.source,
            meta=dict(self.meta),
        )


def concat(parts: list[LabeledArrays]) -> LabeledArrays:
    """Stack datasets of one task and class list into one (record ids kept).

    Group keys are kept when every part has them (e.g. a node's share and the canaries added
    to it in a simulation); when any part has none, the result has none, since a record
    without a key would have no privacy unit. Raises ValueError for an empty list.
    """
    if not parts:
        raise ValueError("nothing to concatenate")
    first = parts[0]
    keyed = all(p.groups is not None for p in parts)
    return LabeledArrays(
        task=first.task,
        x=np.concatenate([p.x for p in parts]),
        y=np.concatenate([p.y for p in parts]),
        classes=first.classes,
        record_ids=[r for p in parts for r in p.record_ids],
        groups=np.concatenate([p.groups for p in parts]) if keyed else None,
        source=first.source,
    )
