"""TensorBoard tracking: what the tracker writes, read back with TensorBoard's own reader."""

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from server.tracking import check_tracker, make_tracker


def test_rounds_config_and_epsilons_read_back_by_tensorboard(tmp_path):
    tracker = make_tracker("tensorboard", tmp_path, {"epsilon": 8.0, "dataset": "digits"})
    tracker.log_round(1, {"accuracy": 0.5, "loss": 1.5}, {"site-a": 1.25, "site-b": None}, None,
                      {"trained": 1, "declined": 0, "refused": 0, "failed": 1}, 2.0)
    tracker.log_round(2, {"accuracy": 0.75, "loss": 0.9, "auc": 0.8}, {"site-a": 2.5, "site-b": 2.0}, 0.7,
                      {"trained": 2, "declined": 0, "refused": 0, "failed": 0}, 1.5)
    tracker.close()
    events = EventAccumulator(str(tmp_path / "tensorboard")).Reload()
    scalars = {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}
    assert scalars["test/accuracy"] == [(1, 0.5), (2, 0.75)]
    assert scalars["test/auc"] == [(2, pytest.approx(0.8))]
    assert scalars["epsilon/site-a"] == [(1, 1.25), (2, 2.5)]
    assert scalars["epsilon/site-b"] == [(2, 2.0)]  # nothing logged before the node reported
    assert scalars["client_level/epsilon"] == [(2, pytest.approx(0.7))]
    assert scalars["nodes/failed"] == [(1, 1.0), (2, 0.0)]
    text = events.Tensors("config/text_summary")[0].tensor_proto.string_val[0].decode()
    assert '| epsilon | 8.0 |' in text and '| dataset | "digits" |' in text


def test_no_tracking_and_unknown_kinds():
    assert make_tracker("", None, {}) is None
    with pytest.raises(ValueError, match="tracking must be one of"):
        check_tracker("wandb")
