"""A run's output folder (DESIGN 8).

    config.json      resolved run configuration
    metrics.jsonl    one JSON object per round
    ledger.json      the coordinator's privacy ledger (per node and round)
    checkpoint.pt    global model + round + ledger (+ server-optimiser and EMA state) after the last complete round
    final_model.pt   the released model's state_dict: the final global model, or its EMA (--ema-decay)
    summary.json     headline numbers (keys promised in issue 2; add, never rename)
    report.md        a short human-readable report

Every file is written atomically (temp file, then rename), so a crash never leaves half a file.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any

import torch


def _json_default(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def _clean(value: Any) -> Any:
    """Replace NaN/Inf by None (JSON has no NaN)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


class RunFolder:
    """Writes one run's outputs under `path` (created if missing)."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self.path.mkdir(parents=True, exist_ok=True)

    def _atomic_write(self, name: str, write) -> Path:
        target = self.path / name
        fd, tmp = tempfile.mkstemp(dir=self.path, prefix=f".{name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as handle:
                write(handle)
            os.replace(tmp, target)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return target

    def write_json(self, name: str, data: Any) -> Path:
        """Write `data` as indented JSON (NaN/Inf become null), atomically; returns the path."""
        text = json.dumps(_clean(data), indent=2, default=_json_default).encode()
        return self._atomic_write(name, lambda h: h.write(text))

    def write_text(self, name: str, text: str) -> Path:
        """Write UTF-8 text atomically; returns the path."""
        return self._atomic_write(name, lambda h: h.write(text.encode()))

    def write_bytes(self, name: str, data: bytes) -> Path:
        """Write raw bytes (e.g. a PNG) atomically; returns the path."""
        return self._atomic_write(name, lambda h: h.write(data))

    def write_torch(self, name: str, obj: Any) -> Path:
        """`torch.save(obj)` atomically; returns the path."""
        return self._atomic_write(name, lambda h: torch.save(obj, h))

    def read_metrics(self, up_to_round: int | None = None) -> list[dict]:
        """metrics.jsonl records (rounds <= up_to_round when given); a torn last line is dropped."""
        path = self.path / "metrics.jsonl"
        rows = []
        if path.exists():
            for line in path.read_text(encoding="utf-8").splitlines():
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    break
                if up_to_round is None or row["round"] <= up_to_round:
                    rows.append(row)
        return rows

    def rewrite_metrics(self, rows: list[dict]) -> None:
        """Replace metrics.jsonl by `rows` (atomically): used to drop rounds after a checkpoint."""
        text = "".join(json.dumps(_clean(r), default=_json_default) + "\n" for r in rows)
        self.write_text("metrics.jsonl", text)

    def append_metrics(self, record: dict) -> None:
        """Append one round's metrics as a JSON line (flushed and fsynced)."""
        with open(self.path / "metrics.jsonl", "a", encoding="utf-8") as handle:
            handle.write(json.dumps(_clean(record), default=_json_default) + "\n")
            handle.flush()
            os.fsync(handle.fileno())
