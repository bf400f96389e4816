"""Playing the coordinator against a node, on the node's real code path (issue 12).

The adversary has only what a coordinator controls or knows: the run-config, the round
schedule and the messages it sends, the code (it is open source), what nodes reply, and,
for the neighbouring-dataset adversary DP is defined against, every record of a node but
one. The node runs `client.client_app.train`, the handler Flower calls. Each test here
failed on 14c484c (the code the review attacked) and passes now:
1. replaying a node's round on D and on D' does not match its release;
2. a server that knows the seed and the node names cannot strip client-level noise;
3. a deployed node refuses `dp=false`, a round without SecAgg+, and reproducible noise;
4. another seed, another validation share, one added record or a renamed file never let
   the node's cumulative epsilon pass its `max-epsilon`;
5. N=744, B=8 (where Opacus's loader runs one step less than ceil(N/B)) trains every round;
6. weights crafted so that one chosen record's gradient overflows do not turn the node's
   reply (failed or not) into a membership test (found by a review after the fix of 1-5).
"""

from __future__ import annotations

import csv
import multiprocessing
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.supercore.task_identity import TaskIdentity
from opacus.accountants import RDPAccountant

from privacy.releases import NODE_RELEASES
from privacy.accountants.sample_level import RDP_ORDERS
from shared_models import build_model

DELTA = 1e-5
RUN_CONFIG = {
    "task": "vision", "dataset": "digits", "model": "", "num-server-rounds": 2, "local-epochs": 1,
    "batch-size": 64, "lr": 0.5, "optimizer": "sgd", "dp": True, "epsilon": 2.0, "max-epsilon": 0.0,
    "delta": DELTA, "max-grad-norm": 1.0, "val-fraction": 0.1, "partition": "iid", "alpha": 0.5, "seed": 0,
    "run-name": "adversary", "secagg": False, "state-dir": "",
}


@pytest.fixture(autouse=True)
def _flower_task(monkeypatch):
    # Flower's Message needs the identity of the task it runs in; Flower sets it in a real run.
    monkeypatch.setattr(TaskIdentity, "_run_id", 1)
    monkeypatch.setattr(TaskIdentity, "_node_id", 1)
    monkeypatch.setattr(TaskIdentity, "_task_id", 1)


def _write_site(path: Path, count: int, offset: int = 0, extra: int = 0) -> Path:
    """A site's MedMNIST-style .npz of `count` real digits (from `offset`), plus `extra` more."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    rows = list(range(offset, offset + count)) + list(range(1700, 1700 + extra))
    images = (digits.images[rows] * (255 / 16)).astype(np.uint8)
    np.savez(path, train_images=images, train_labels=digits.target[rows])
    return path


def _site_context(data: Path, state: Path, task: str = "vision", **policy) -> Context:
    node_config = {"node-name": "site-a", "data-path": str(data), "task": task, "max-epsilon": 8.0,
                   "delta": DELTA, "state-dir": str(state), **policy}
    return Context(run_id=1, node_id=7, node_config=node_config, state=RecordDict(), run_config={})


def _global_arrays(seed: int = 0) -> ArrayRecord:
    torch.manual_seed(seed)
    return ArrayRecord(build_model("vision", None, (1, 8, 8), 10).state_dict())


def _ask_to_train(context: Context, run_config: dict, server_round: int = 1, arrays: ArrayRecord | None = None,
                  **config) -> Message:
    from client import client_app

    context.run_config = {**RUN_CONFIG, **run_config}
    msg = Message(RecordDict({"arrays": arrays or _global_arrays(),
                              "config": ConfigRecord({"server-round": server_round, "run-id": "r", **config})}),
                  dst_node_id=context.node_id, message_type=MessageType.TRAIN)
    reply = client_app.train(msg, context)
    assert not reply.content["metrics"].get("failed"), reply.content["node"]["error"]
    return reply


def _flat(arrays: ArrayRecord) -> np.ndarray:
    return np.concatenate([a.numpy().ravel() for a in arrays.values()]).astype(np.float64)


def _replay(data: str, state: str, run_config: dict) -> np.ndarray:
    """The coordinator's replay, in its own process: the node's own code on a dataset it built."""
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 1, 1
    reply = _ask_to_train(_site_context(Path(data), Path(state), **{"require-secagg": False}), run_config)
    return _flat(reply.content["arrays"])


def test_1_a_coordinator_replaying_a_round_on_d_and_d_prime_cannot_match_the_release(tmp_path):
    # The node holds D: 300 digits. The coordinator knows every record but the last one, which
    # is either digit 299 (D) or digit 1799 (D'), and everything in the run-config.
    d = _write_site(tmp_path / "d.npz", 300)
    d_prime = tmp_path / "d-prime.npz"
    with np.load(d) as z:
        images, labels = z["train_images"].copy(), z["train_labels"].copy()
    other = _write_site(tmp_path / "one.npz", 0, extra=1)
    with np.load(other) as z:
        images[-1], labels[-1] = z["train_images"][-1], z["train_labels"][-1]
    np.savez(d_prime, train_images=images, train_labels=labels)
    run = {"epsilon": 1.0}
    release = _flat(_ask_to_train(_site_context(d, tmp_path / "node", **{"require-secagg": False}), run)
                    .content["arrays"])

    spawn = multiprocessing.get_context("spawn")
    with spawn.Pool(1) as coordinator:
        replay_d, replay_d_prime = coordinator.starmap(_replay, [
            (str(d), str(tmp_path / "coord-d"), run), (str(d_prime), str(tmp_path / "coord-dp"), run)])
    start = _flat(_global_arrays())
    # The replay on the true D is no closer to the release than the replay on D': the
    # difference is the node's secret noise (on 14c484c the replay on D matched bit for bit).
    assert not np.array_equal(release, replay_d)
    dist_d, dist_d_prime = np.linalg.norm(release - replay_d), np.linalg.norm(release - replay_d_prime)
    assert dist_d > 0.5 * dist_d_prime
    # ... and that difference is of the size of the update itself, not a rounding error.
    assert dist_d > 0.1 * np.linalg.norm(release - start)


def test_2_a_server_with_the_seed_and_node_names_cannot_strip_client_level_noise(tmp_path):
    import zlib

    from privacy.secagg import RoundSetup, decode_sum
    from privacy.secagg.local_round import run_local_round
    from privacy.secagg.protocol import encoding_from_config
    from server.federation import FederationSettings, secagg_train_config

    sigma, clip, nodes = 1.0, 0.05, ("site-a", "site-b")
    settings = FederationSettings(rounds=1, secagg=True, clip_norm=clip, client_noise_multiplier=sigma,
                                  num_shares=2, threshold=2)
    arrays = _global_arrays()
    config = secagg_train_config(settings, arrays, len(nodes))
    encoded = {}
    for i, name in enumerate(nodes):
        data = _write_site(tmp_path / f"{name}.npz", 200, offset=200 * i)
        context = _site_context(data, tmp_path / name)
        context.node_config["node-name"] = name
        reply = _ask_to_train(context, {"secagg": True}, arrays=arrays, **config)
        assert "arrays" not in reply.content  # with SecAgg+ the update never leaves in the clear
        encoded[name] = np.load(str(context.state["secagg-input"]["path"]))
    setup = RoundSetup(round_id=b"r/1", participants=nodes, num_shares=2, threshold=2,
                       params=encoding_from_config(config), graph_seed=b"g")
    total, survivors, _ = run_local_round(setup, encoded)
    assert survivors == list(nodes)
    released = decode_sum(total, setup.params)

    # The server regenerates each node's noise the way 14c484c drew it: from the run's seed,
    # the round and the node's name.
    params, d = setup.params, released.size
    regenerated = sum(np.random.default_rng(RUN_CONFIG["seed"] * 1_000_003 + 1 * 7919 + zlib.crc32(n.encode()))
                      .normal(0.0, params.noise_std, d) for n in nodes)
    stripped = released - regenerated
    # Had it worked, what is left would be the sum of two clipped updates: norm <= 2 C.
    # It is the noise of both nodes instead: std sigma*C/sqrt(t - colluding) each.
    assert np.linalg.norm(stripped) > 20 * len(nodes) * clip
    expected_noise = params.noise_std * np.sqrt(2 * len(nodes) * d)  # actual minus regenerated noise
    assert np.linalg.norm(stripped) == pytest.approx(expected_noise, rel=0.05)


def test_3_a_deployed_node_refuses_what_its_policy_forbids_whatever_the_run_config_says(tmp_path):
    data = _write_site(tmp_path / "site.npz", 300)
    state = tmp_path / "node"
    cases = [
        ({"dp": False}, {"secagg": True}, "DP is required by the site"),
        ({}, {}, "secure aggregation is required by the site"),
        ({"dp": False}, {}, "DP is required by the site; secure aggregation is required by the site"),
        ({"reproducible-noise": True}, {"secagg": True}, "reproducible noise is a simulation switch"),
    ]
    for run, config, reason in cases:
        reply = _ask_to_train(_site_context(data, state), {**run, "secagg": bool(config)}, **config)
        assert reply.content["metrics"]["refused"] == 1 and "arrays" not in reply.content
        assert str(reply.content["node"]["reason"]).startswith(reason), reply.content["node"]["reason"]
    # An owner who set patient-level DP on data without group keys: refused, never trained per record.
    reply = _ask_to_train(_site_context(data, state, **{"privacy-unit": "patient"}), {"secagg": True}, secagg=True)
    assert reply.content["metrics"]["refused"] == 1 and "arrays" not in reply.content
    assert "privacy unit is 'patient' but its data has no group keys" in str(reply.content["node"]["reason"])
    # Nothing was trained or charged.
    assert not (state / "ledgers" / "records.json").exists()
    # An owner who allows both gets a plain round (the control: the refusals were the policy's).
    reply = _ask_to_train(_site_context(data, state, **{"require-dp": False, "require-secagg": False}), {"dp": False})
    assert "arrays" in reply.content and "refused" not in reply.content["metrics"]


def _rdp_epsilon(replies: list[Message]) -> float:
    """Cumulative epsilon of every round the node trained, composed independently with Opacus."""
    accountant = RDPAccountant()
    for reply in replies:
        m = reply.content["metrics"]
        if not m["declined"]:
            accountant.history.append((m["noise-multiplier"], m["sample-rate"], int(m["round-steps"])))
    return accountant.get_epsilon(delta=DELTA, alphas=RDP_ORDERS) if accountant.history else 0.0


def test_4_seed_validation_share_added_record_or_renamed_file_never_pass_max_epsilon(tmp_path):
    data = _write_site(tmp_path / "site.npz", 300)
    state = tmp_path / "node"
    policy = {"max-epsilon": 1.0, "require-secagg": False}
    replies = [_ask_to_train(_site_context(data, state, **policy), {"epsilon": 0.9}, r) for r in (1, 2)]
    assert [int(r.content["metrics"]["declined"]) for r in replies] == [0, 0]
    assert 0.8 < replies[-1].content["metrics"]["epsilon"] <= 1.0
    grown = _write_site(tmp_path / "grown.npz", 300, extra=1)
    renamed = tmp_path / "elsewhere" / "renamed.npz"
    renamed.parent.mkdir()
    shutil.copy(data, renamed)
    variants = [(data, {"seed": 7}), (data, {"val-fraction": 0.0}), (data, {"val-fraction": 0.3}),
                (grown, {}), (renamed, {})]
    for path, run in variants:
        reply = _ask_to_train(_site_context(path, state, **policy), {"epsilon": 0.9, **run})
        replies.append(reply)
        assert reply.content["metrics"]["declined"] == 1, (path.name, run)
        assert reply.content["metrics"]["epsilon"] <= 1.0
    assert _rdp_epsilon(replies) <= 1.0 + 1e-9


def test_4b_simulated_nodes_keep_their_records_budget_under_another_seed(tmp_path):
    replies = []
    for seed in (0, 5):
        for pid in (0, 1):
            context = Context(run_id=1, node_id=10 + pid, node_config={"partition-id": pid, "num-partitions": 2},
                              state=RecordDict(), run_config={})
            run = {"seed": seed, "epsilon": 0.9, "max-epsilon": 1.0, "num-server-rounds": 1, "state-dir": str(tmp_path),
                   "partition": "dirichlet"}
            replies.append(_ask_to_train(context, run))
    # Seed 5 deals the records out differently, but every one of them was trained under seed 0.
    assert [int(r.content["metrics"]["declined"]) for r in replies] == [0, 0, 1, 1]
    for pid in (0, 1):
        assert _rdp_epsilon([replies[pid], replies[2 + pid]]) <= 1.0 + 1e-9


def test_5_a_node_of_744_records_at_batch_8_trains_and_contributes_every_round(tmp_path):
    data = _write_site(tmp_path / "site.npz", 744)
    context = _site_context(data, tmp_path / "node", **{"require-secagg": False})
    arrays = _global_arrays()
    for server_round in (1, 2, 3):
        # (val-fraction 0 for 14c484c, which took the validation share from the run-config)
        reply = _ask_to_train(context, {"batch-size": 8, "num-server-rounds": 3, "val-fraction": 0.0}, server_round,
                              arrays)
        metrics = reply.content["metrics"]
        assert metrics["declined"] == 0 and metrics["round-steps"] == 93 == -(-744 // 8)
        assert metrics["steps-total"] == 93 * server_round and "arrays" in reply.content
        arrays = reply.content["arrays"]


def test_6_a_record_whose_gradient_overflows_does_not_make_the_reply_a_membership_test(tmp_path):
    from shared_models.datasets import load_local

    def write(path, rows):
        with open(path, "w", newline="", encoding="utf-8") as handle:
            csv.writer(handle).writerows([("text", "label"), *rows])
        return path

    others = [(f"visit {i}: blood pressure {100 + i % 40}, follow up in {i % 12 + 1} weeks", "ham" if i % 3 else "spam")
              for i in range(199)]
    target, substitute = ("xq zv jw kq vx zj qx wz jq xz vq kz", "spam"), ("visit 999: routine check", "ham")
    d, d_prime = write(tmp_path / "d.csv", others + [target]), write(tmp_path / "d-prime.csv", others + [substitute])
    # The coordinator computes every record's features with the public model code and sends
    # weights whose class-0 logit overflows float32 on the target's n-gram buckets only.
    model = build_model("text", None, (200,), 2)
    with torch.no_grad():
        features = model.features(torch.from_numpy(load_local(d, "text").x))
    buckets = features[-1] > 0
    target_mass, other_mass = float(features[-1][buckets].sum()), float(features[:-1][:, buckets].sum(1).max())
    assert other_mass < target_mass
    scale = float(np.finfo(np.float32).max) / np.sqrt(target_mass * max(other_mass, target_mass / 4))
    state = model.state_dict()
    state["linear.weight"] = torch.zeros_like(state["linear.weight"])
    state["linear.weight"][0, buckets] = scale
    state["linear.bias"] = torch.zeros_like(state["linear.bias"])
    run = {"task": "text", "dataset": "sms_spam", "lr": 8.0, "batch-size": 10_000, "epsilon": 1.0, "secagg": True}
    secagg = {"secagg": True, "clip-norm": 10.0, "client-noise-multiplier": 0.0, "min-clients": 2, "scale": 1e4,
              "max-clients": 3}
    for path in (d, d_prime):  # q = 1: the target is in every batch of D
        for trial in range(3):
            context = _site_context(path, tmp_path / f"{path.stem}-{trial}", task="text")
            reply = _ask_to_train(context, run, arrays=ArrayRecord(state), **secagg)  # asserts the node did not fail
            assert reply.content["metrics"]["declined"] == 0


def test_replies_carry_only_the_fields_listed_as_released(tmp_path):
    listed = {name.strip() for r in NODE_RELEASES for name in r.field.split("(")[0].split(",")}
    listed |= {"arrays", "metrics", "node"}
    context = Context(run_id=1, node_id=3, node_config={"partition-id": 0, "num-partitions": 3}, state=RecordDict(),
                      run_config={})
    reply = _ask_to_train(context, {"state-dir": str(tmp_path), "secagg": True}, secagg=True,
                          **{"clip-norm": 10.0, "client-noise-multiplier": 0.0, "min-clients": 2, "scale": 1e4,
                             "max-clients": 3})
    sent = set(reply.content.keys()) | set(reply.content["metrics"].keys()) | set(reply.content["node"].keys())
    assert sent <= listed, sent - listed
    assert "train-loss" not in sent  # computed on training records without noise: never sent
