"""Experiment tracking in a tool researchers already use (`fedpriv simulate/run --track tensorboard`).

A run with tracking on also writes TensorBoard event files under `<run folder>/tensorboard/`
(`tensorboard --logdir runs/` shows every run side by side): the resolved run-config as
text at step 0, then per round (the step is the round number)
    test/accuracy, test/loss, test/auc         the global model on the coordinator's test split
    epsilon/<node>                             each node's sample-level epsilon as it reported it
    client_level/epsilon                       client-level epsilon of the released aggregates
    nodes/trained, nodes/declined, nodes/refused, nodes/failed   how many nodes did what
    round/seconds                              the round's wall time (s)
Everything logged is already in metrics.jsonl and ledger.json: tracking adds no release.
Events are written with torch's `SummaryWriter` and need the `tensorboard` package
(`pip install fedpriv[track]`); MLflow is not supported yet.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

TRACKERS = ("tensorboard",)
TRACKING_DIR = "tensorboard"


class TrackingUnavailable(RuntimeError):
    """The tracking tool asked for is not installed (the message says what to install)."""


def check_tracker(kind: str) -> None:
    """Raise ValueError for an unknown kind, TrackingUnavailable when its package is missing."""
    if kind not in TRACKERS:
        raise ValueError(f"tracking must be one of {TRACKERS}, got {kind!r}")
    if importlib.util.find_spec("tensorboard") is None:
        raise TrackingUnavailable("--track tensorboard needs the tensorboard package: "
                                  "pip install 'fedpriv[track]' (or tensorboard)")


class TensorBoardTracker:
    """Writes one run's config and per-round metrics as TensorBoard event files in `run_dir/tensorboard`.

    Raises TrackingUnavailable when tensorboard is not installed.
    """

    def __init__(self, run_dir: Path, config: dict) -> None:
        check_tracker("tensorboard")
        from torch.utils.tensorboard import SummaryWriter

        self.path = Path(run_dir) / TRACKING_DIR
        self.writer = SummaryWriter(log_dir=str(self.path))
        rows = "\n".join(f"| {key} | {json.dumps(value)} |" for key, value in sorted(config.items()))
        self.writer.add_text("config", "| key | value |\n|---|---|\n" + rows, global_step=0)

    def log_round(self, server_round: int, test: dict, epsilons: dict[str, float | None], client_epsilon: float | None,
                  counts: dict[str, int], seconds: float) -> None:
        """One round's scalars at step `server_round` (names in the module docstring)."""
        for key in ("accuracy", "loss", "auc"):
            if test.get(key) is not None:
                self.writer.add_scalar(f"test/{key}", float(test[key]), server_round)
        for node, epsilon in sorted(epsilons.items()):
            if epsilon is not None:
                self.writer.add_scalar(f"epsilon/{node}", float(epsilon), server_round)
        if client_epsilon is not None:
            self.writer.add_scalar("client_level/epsilon", float(client_epsilon), server_round)
        for key, count in counts.items():
            self.writer.add_scalar(f"nodes/{key}", count, server_round)
        self.writer.add_scalar("round/seconds", float(seconds), server_round)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


def make_tracker(kind: str, run_dir: Path, config: dict) -> TensorBoardTracker | None:
    """The tracker for run-config `track` ("" = none)."""
    if not kind:
        return None
    check_tracker(kind)
    return TensorBoardTracker(run_dir, config)
