"""Server optimisers and the global model's EMA (issue 14): free post-processing on the server.

Expected values come from an independent numpy transcription of Reddi et al. 2021's
Algorithm 2 (and Hsu et al. 2019's FedAvgM) and of the moving average, written here as
loops over plain dicts; the resume test drives the real round loop (`run_federation`) with
scripted replies through a checkpoint written and read as the ServerApp does. The last test
runs `fedpriv simulate` twice and checks that the server's post-processing changes nothing
in any node's ledger.
"""

import io
import json
import subprocess
import sys
import tomllib
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, MetricRecord, RecordDict

from server.federation import FederationSettings, RoundReport, TrainReplies
from server.server_optimizer import SERVER_OPTIMIZERS, ModelEMA, ServerOptimizer

HYPER = {"lr": 0.05, "momentum": 0.8, "beta2": 0.95, "tau": 1e-3}


def _state(rng, scale=1.0) -> dict[str, np.ndarray]:
    return {"conv.weight": (scale * rng.normal(size=(2, 3))).astype(np.float32),
            "conv.bias": (scale * rng.normal(size=3)).astype(np.float32),
            "norm.num_batches_tracked": np.array(int(rng.integers(0, 100)), dtype=np.int64)}


def _record(state: dict[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in state.items()})


def _plain(record: ArrayRecord) -> dict[str, np.ndarray]:
    return {k: record[k].numpy() for k in record.keys()}


# Per round, the scale of the aggregate's move: large moves (Delta^2 > v) and tiny ones
# (Delta^2 < v) so that Yogi's sign takes both values.
SCALES = (0.1, 1e-4, 0.05, 1e-3, 0.2)


def _aggregates(x0: dict[str, np.ndarray], seed=1):
    """A function round, x_t -> the round's aggregate x_t + Delta_t (Delta_t seeded by the round)."""
    def aggregate(round_, x):
        rng = np.random.default_rng(seed + round_)
        out = {}
        for k, v in x.items():
            if np.issubdtype(v.dtype, np.floating):
                out[k] = (v + SCALES[round_ % len(SCALES)] * rng.normal(size=v.shape)).astype(v.dtype)
            else:
                out[k] = v + 7  # an integer counter: whatever the nodes' aggregate says
        return out
    return aggregate


def _reference(name, rounds, x0, aggregate, lr, momentum, beta2, tau):
    """Reddi et al. 2021 Algorithm 2 (m_{-1} = 0, v_{-1} = tau^2, no bias correction) and Hsu et
    al.'s FedAvgM, per coordinate in float64 with plain loops; returns each round's model and
    how often Yogi's sign was +1 and -1."""
    x, models, signs = dict(x0), [], {1.0: 0, -1.0: 0}
    m = {k: np.zeros(v.shape) for k, v in x0.items()}
    v2 = {k: np.full(v.shape, tau ** 2) for k, v in x0.items()}
    for t in range(rounds):
        agg = aggregate(t, x)
        new = {}
        for k in x:
            if not np.issubdtype(x[k].dtype, np.floating):
                new[k] = agg[k]
                continue
            cur, out = x[k].astype(np.float64).ravel(), np.empty(x[k].size)
            a = agg[k].astype(np.float64).ravel()
            mk, vk = m[k].ravel(), v2[k].ravel()
            for i in range(cur.size):
                d = a[i] - cur[i]
                if name == "fedavg":
                    out[i] = a[i]
                elif name == "fedavgm":
                    mk[i] = momentum * mk[i] + d
                    out[i] = cur[i] + lr * mk[i]
                else:
                    mk[i] = momentum * mk[i] + (1 - momentum) * d
                    if name == "fedadam":
                        vk[i] = beta2 * vk[i] + (1 - beta2) * d * d
                    else:
                        s = 1.0 if vk[i] > d * d else -1.0 if vk[i] < d * d else 0.0
                        signs[s] = signs.get(s, 0) + 1
                        vk[i] = vk[i] - (1 - beta2) * d * d * s
                    out[i] = cur[i] + lr * mk[i] / (np.sqrt(vk[i]) + tau)
            new[k] = out.reshape(x[k].shape).astype(agg[k].dtype)
        x = new
        models.append(new)
    return models, signs


def _run(opt: ServerOptimizer, rounds, x0, aggregate, start=0, x=None):
    x, models = dict(x if x is not None else x0), []
    for t in range(start, rounds):
        x = _plain(opt.step(_record(x), _record(aggregate(t, x))))
        models.append(x)
    return models


@pytest.mark.parametrize("name", ["fedavgm", "fedadam", "fedyogi"])
def test_each_optimizer_follows_reddi_et_al_over_five_rounds(name):
    x0 = _state(np.random.default_rng(0))
    aggregate = _aggregates(x0)
    expected, signs = _reference(name, 5, x0, aggregate, **HYPER)
    got = _run(ServerOptimizer(name, **HYPER), 5, x0, aggregate)
    for t, (want, have) in enumerate(zip(expected, got)):
        for k in want:
            assert have[k].dtype == want[k].dtype, (t, k)
            np.testing.assert_allclose(have[k], want[k], rtol=2e-6, atol=1e-7, err_msg=f"{name} round {t + 1} {k}")
        assert have["norm.num_batches_tracked"] == x0["norm.num_batches_tracked"] + 7 * (t + 1)  # the aggregate's
        assert not np.array_equal(have["conv.weight"], aggregate(t, got[t - 1] if t else x0)["conv.weight"])
    if name == "fedyogi":  # both branches of Yogi's sign were exercised
        assert signs[1.0] > 0 and signs[-1.0] > 0
    assert ServerOptimizer(name, **HYPER).describe()["name"] == name


def test_the_optimizers_differ_from_one_another_and_yogi_from_adam():
    x0 = _state(np.random.default_rng(0))
    aggregate = _aggregates(x0)
    finals = {name: _run(ServerOptimizer(name, **HYPER), 5, x0, aggregate)[-1]["conv.weight"] for name in SERVER_OPTIMIZERS}
    for a in SERVER_OPTIMIZERS:
        for b in SERVER_OPTIMIZERS:
            if a < b:
                assert not np.allclose(finals[a], finals[b], rtol=1e-4), (a, b)


def test_fedavg_returns_the_aggregate_itself_bit_for_bit():
    rng = np.random.default_rng(3)
    opt = ServerOptimizer()  # the defaults: fedavg
    assert opt.describe() == {"name": "fedavg"}
    for _ in range(3):
        current, aggregate = _record(_state(rng)), _record(_state(rng))
        out = opt.step(current, aggregate)
        assert out is aggregate
        for k in aggregate.keys():
            assert out[k].numpy().tobytes() == aggregate[k].numpy().tobytes() and out[k].dtype == aggregate[k].dtype
    assert opt.state_dict() == {"name": "fedavg", "steps": 0, "keys": None}  # no moments


def test_ema_matches_an_independent_average_and_starts_from_the_first_aggregated_model():
    rng = np.random.default_rng(7)
    globals_ = [_state(rng) for _ in range(4)]
    ema = ModelEMA(0.6)
    assert ema.arrays is None
    expected = None
    for g in globals_:
        ema.update(_record(g))
        w = g["conv.weight"].astype(np.float64)
        expected = w if expected is None else 0.6 * expected + 0.4 * w
        out = _plain(ema.arrays)
        assert out["conv.weight"].dtype == np.float32
        np.testing.assert_allclose(out["conv.weight"], expected, rtol=1e-6)
        assert out["norm.num_batches_tracked"] == g["norm.num_batches_tracked"]  # integer state: the latest global's
    assert ema.updates == 4
    with pytest.raises(ValueError, match="EMA decay must be in"):
        ModelEMA(1.0)


def _checkpointed(state: dict) -> dict:
    """`state` after torch.save / torch.load(weights_only=False), as checkpoint.pt carries it."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=False)


@pytest.mark.parametrize("name", SERVER_OPTIMIZERS)
def test_saved_and_restored_state_continues_the_uninterrupted_sequence_exactly(name):
    x0 = _state(np.random.default_rng(0))
    aggregate = _aggregates(x0)
    whole, whole_ema = ServerOptimizer(name, **HYPER), ModelEMA(0.5)
    uninterrupted = []
    x = x0
    for t in range(5):
        x = _plain(whole.step(_record(x), _record(aggregate(t, x))))
        whole_ema.update(_record(x))
        uninterrupted.append((x, _plain(whole_ema.arrays)))

    first, first_ema = ServerOptimizer(name, **HYPER), ModelEMA(0.5)
    x = x0
    for t in range(2):
        x = _plain(first.step(_record(x), _record(aggregate(t, x))))
        first_ema.update(_record(x))
    saved = _checkpointed({"opt": first.state_dict(), "ema": first_ema.state_dict(), "x": x})
    resumed, resumed_ema = ServerOptimizer(name, **HYPER), ModelEMA(0.5)
    resumed.load_state_dict(saved["opt"])
    resumed_ema.load_state_dict(saved["ema"])
    x = saved["x"]
    for t in range(2, 5):
        x = _plain(resumed.step(_record(x), _record(aggregate(t, x))))
        resumed_ema.update(_record(x))
        want_x, want_ema = uninterrupted[t]
        for k in want_x:
            assert np.array_equal(x[k], want_x[k]), (name, t, k)
            assert np.array_equal(_plain(resumed_ema.arrays)[k], want_ema[k]), (name, t, k)
    assert resumed.steps == whole.steps == (0 if name == "fedavg" else 5)
    with pytest.raises(ValueError, match="checkpoint holds server optimizer"):
        ServerOptimizer("fedyogi" if name != "fedyogi" else "fedadam").load_state_dict(saved["opt"])


def test_bad_settings_are_refused_naming_the_key():
    for kwargs, match in (({"name": "sgd"}, "one of"), ({"lr": 0.0}, "lr"), ({"momentum": 1.0}, "momentum"),
                          ({"beta2": -0.1}, "beta2"), ({"tau": 0.0}, "tau")):
        with pytest.raises(ValueError, match=match):
            ServerOptimizer(**kwargs)
    with pytest.raises(ValueError, match="'server-optimizer'"):
        FederationSettings(rounds=1, server_optimizer="adam")
    with pytest.raises(ValueError, match="'ema-decay'"):
        FederationSettings(rounds=1, ema_decay=1.0)
    with pytest.raises(ValueError, match="differ from the global model's"):
        ServerOptimizer("fedadam").step(_record({"a": np.zeros(2, np.float32)}), _record({"b": np.zeros(2, np.float32)}))


# ---------------------------------------------------------------- the round loop, resumed


def _scripted_round_loop(monkeypatch, tmp_path, settings, x0, rounds_to_run, resume=None, name="run"):
    """run_federation with two scripted nodes (their local models: global + a move seeded by
    round and node, round 3 trained by nobody); checkpoints as server_app does.
    Returns (released arrays, checkpoint path, metrics rows)."""
    import server.federation as federation
    from server.ledger import CoordinatorLedger
    from server.run_folder import RunFolder

    def train_stage(grid, arrays, config, sampled, settings_, ledger, report: RoundReport, known_names):
        out = TrainReplies()
        if report.round == 3:  # nothing to aggregate: the model, the moments and the average stay
            return out
        for nid in sampled:
            rng = np.random.default_rng(100 * report.round + nid)
            local = {k: (v.numpy() + 0.1 * rng.normal(size=v.shape)).astype(v.numpy().dtype)
                     if np.issubdtype(v.numpy().dtype, np.floating) else v.numpy() for k, v in arrays.items()}
            out.trained[nid] = RecordDict({"arrays": _record(local),
                                           "metrics": MetricRecord({"num-examples": float(10 * nid)})})
            report.trained.append(f"node-{nid}")
        return out

    monkeypatch.setattr(federation, "wait_for_nodes", lambda grid, minimum, timeout: [1, 2])
    monkeypatch.setattr(federation, "_train_stage", train_stage)
    folder = RunFolder(tmp_path / name)

    def checkpoint(report, arrays, state):
        folder.write_torch("checkpoint.pt", {"arrays": arrays.to_torch_state_dict(), "state": state})

    def evaluate(arrays):  # a stand-in for test accuracy: a function of every weight
        return {"accuracy": float(sum(np.sum(arrays[k].numpy().astype(np.float64)) for k in arrays.keys()))}

    start = _record(x0)
    if resume is not None:
        saved = torch.load(resume, weights_only=False)
        start = ArrayRecord(saved["arrays"])
        resume = saved["state"]
        folder.rewrite_metrics(folder.read_metrics(up_to_round=resume["round"]))
    settings = FederationSettings(**{**settings.__dict__, "rounds": rounds_to_run})
    released, _ = federation.run_federation(None, start, settings, evaluate, folder, CoordinatorLedger(), checkpoint,
                                            resume=resume)
    return released, folder.path / "checkpoint.pt", folder.read_metrics()


@pytest.mark.parametrize("name", ["fedavgm", "fedyogi"])
def test_a_resumed_round_loop_ends_where_the_uninterrupted_one_does(monkeypatch, tmp_path, name):
    import shutil

    x0 = {k: v for k, v in _state(np.random.default_rng(0)).items()}
    settings = FederationSettings(rounds=5, server_optimizer=name, server_lr=0.05, ema_decay=0.5)
    whole, whole_ckpt, whole_rows = _scripted_round_loop(monkeypatch, tmp_path, settings, x0, 5, name="whole")
    _, ckpt, _ = _scripted_round_loop(monkeypatch, tmp_path, settings, x0, 2, name="cut")
    shutil.copy(ckpt, tmp_path / "after-2.pt")
    resumed, resumed_ckpt, rows = _scripted_round_loop(monkeypatch, tmp_path, settings, x0, 5,
                                                       resume=tmp_path / "after-2.pt", name="cut")
    for k in whole.keys():
        assert np.array_equal(resumed[k].numpy(), whole[k].numpy()), k
    a, b = torch.load(whole_ckpt, weights_only=False), torch.load(resumed_ckpt, weights_only=False)
    assert a["state"]["server_optimizer"]["steps"] == b["state"]["server_optimizer"]["steps"] == 4  # round 3: none
    assert a["state"]["ema"]["updates"] == b["state"]["ema"]["updates"] == 4
    for k in a["arrays"]:
        assert torch.equal(a["arrays"][k], b["arrays"][k]), k
    assert [r["test"] for r in rows] == [r["test"] for r in whole_rows]
    assert all(r["evaluated_model"] == "ema" and "test_global" in r for r in rows)
    # The EMA is released, not the global model, and round 3 (nothing trained) left both unchanged.
    assert rows[2]["aggregated"] is False and rows[2]["test"] == rows[1]["test"]
    assert rows[-1]["test"] != rows[-1]["test_global"]


def test_the_default_round_loop_releases_the_aggregate_unchanged(monkeypatch, tmp_path):
    from server.robust_aggregation import aggregate_in_clear

    x0 = _state(np.random.default_rng(0))
    released, ckpt, rows = _scripted_round_loop(monkeypatch, tmp_path, FederationSettings(rounds=1), x0, 1)
    # Round 1's aggregate, recomputed from the same scripted replies.
    replies = []
    for nid in (1, 2):
        rng = np.random.default_rng(100 + nid)
        local = {k: (v + 0.1 * rng.normal(size=v.shape)).astype(v.dtype) if np.issubdtype(v.dtype, np.floating)
                 else v for k, v in x0.items()}
        replies.append(RecordDict({"arrays": _record(local), "metrics": MetricRecord({"num-examples": 10.0 * nid})}))
    expected = aggregate_in_clear("fedavg", replies)
    for k in expected.keys():
        assert released[k].numpy().tobytes() == expected[k].numpy().tobytes(), k
    assert rows[0]["evaluated_model"] == "global" and "test_global" not in rows[0]


# ---------------------------------------------------------------- flags, run-config, summary


def test_flags_reach_the_run_config_pyproject_defaults_and_the_summary(tmp_path):
    from server.ledger import CoordinatorLedger
    from server.report import config_table
    from server.server_app import federation_settings
    from server.summary import build_summary
    from shared_models.run_config import TrainingPlan
    from simulations.cli import build_parser
    from simulations.cli_options import check_training_args, training_run_config

    parser = build_parser()
    args = parser.parse_args(["simulate", "--server-optimizer", "fedyogi", "--server-lr", "0.03", "--server-momentum",
                              "0.5", "--server-beta2", "0.9", "--server-tau", "0.01", "--ema-decay", "0.9"])
    cfg = {**training_run_config(args, "vision", tmp_path / "run"), "partition": "iid", "alpha": 0.5}
    assert {k: cfg[k] for k in ("server-optimizer", "server-lr", "server-momentum", "server-beta2", "server-tau",
                                "ema-decay")} == {"server-optimizer": "fedyogi", "server-lr": 0.03,
                                                  "server-momentum": 0.5, "server-beta2": 0.9, "server-tau": 0.01,
                                                  "ema-decay": 0.9}
    # Flower drops a run-config override whose key has no default in pyproject: every key must have one.
    pyproject = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())
    defaults = pyproject["tool"]["flwr"]["app"]["config"]
    assert set(training_run_config(args, "vision", tmp_path / "run")) <= set(defaults)
    # A model without its own recipe (shared_models.recipes) takes the flags' plain defaults: the
    # run-config's, which `model = ""` (the cnn) also stands for.
    plain = training_run_config(parser.parse_args(["simulate", "--model", "cnn"]), "vision", tmp_path / "run")
    for key in ("server-optimizer", "server-lr", "server-momentum", "server-beta2", "server-tau", "ema-decay"):
        assert defaults[key] == plain[key], key  # the flag's default is the run-config's
    # Adaptive optimisers default to a small eta: at 1.0 they wreck the model (digits: chance accuracy).
    adam = training_run_config(parser.parse_args(["simulate", "--server-optimizer", "fedadam"]), "vision", tmp_path)
    assert adam["server-lr"] == 0.01

    plan = TrainingPlan.from_run_config(cfg)
    settings = federation_settings(cfg, plan, run_id="r")
    assert (settings.server_optimizer, settings.server_lr, settings.server_momentum, settings.server_beta2,
            settings.server_tau, settings.ema_decay) == ("fedyogi", 0.03, 0.5, 0.9, 0.01, 0.9)
    rows = [{"round": 1, "test": {"accuracy": 0.5, "loss": 1.0}, "aggregated": True, "evaluated_model": "ema"}]
    summary = build_summary(plan, cfg, rows, CoordinatorLedger(), {"accuracy": 0.1, "loss": 2.0}, 0.1, 1.0)
    assert summary["server_optimizer"] == {"name": "fedyogi", "lr": 0.03, "beta1": 0.5, "beta2": 0.9, "tau": 0.01}
    assert summary["ema_decay"] == 0.9 and summary["released_model"] == "ema"
    old = build_summary(plan, {}, [{**rows[0], "evaluated_model": "global"}], CoordinatorLedger(), {}, 0.1, 1.0)
    assert old["server_optimizer"] == {"name": "fedavg"} and old["ema_decay"] == 0.0 and old["released_model"] == "global"
    for kind in ({"num-supernodes": 2}, {"num-supernodes": 0, "state-dir": ""}):  # simulated and deployed runs
        assert {"server-optimizer", "server-lr", "ema-decay"} <= set(config_table({**cfg, **kind}))

    for argv, flag in ((["--server-momentum", "1"], "--server-momentum"), (["--server-beta2", "-0.5"], "--server-beta2"),
                       (["--ema-decay", "1.0"], "--ema-decay")):
        with pytest.raises(ValueError, match=flag):
            check_training_args(parser.parse_args(["simulate", "--no-secagg", *argv]), 2)
    with pytest.raises(SystemExit):
        parser.parse_args(["simulate", "--server-optimizer", "adam"])
    with pytest.raises(SystemExit):
        parser.parse_args(["simulate", "--server-lr", "0"])


def test_report_md_names_the_optimizer_and_the_released_model(tmp_path):
    from server.run_folder import RunFolder
    from server.summary import write_report

    summary = {"run_name": "r", "task": "vision", "dataset": "digits", "model": "cnn", "rounds_completed": 2,
               "rounds_planned": 2, "rounds_aggregated": 2, "final": {"test_accuracy": 0.5}, "majority_class_rate": 0.1,
               "secure_aggregation": True, "dp": False, "client_level": None, "clients": {}, "refusals": [],
               "server_optimizer": {"name": "fedadam", "lr": 0.01, "beta1": 0.9, "beta2": 0.99, "tau": 0.001},
               "ema_decay": 0.5, "released_model": "ema"}
    write_report(RunFolder(tmp_path), summary)
    text = (tmp_path / "report.md").read_text()
    assert "- server: fedadam (lr 0.01, beta1 0.9, beta2 0.99, tau 0.001); released model: the moving average " \
           "(EMA, decay 0.5) of the global model" in text


# ---------------------------------------------------------------- end to end: no node's ledger changes


def _simulate(*args, cwd):
    proc = subprocess.run([sys.executable, "-m", "simulations.cli", "simulate", *args],
                          capture_output=True, text=True, timeout=900, cwd=cwd)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


def _charges(state: Path) -> list[tuple]:
    """Every ledger event of a state folder: what each node charged (its time left out)."""
    events = [json.loads(line) for line in (state / "ledgers" / "events.jsonl").read_text().splitlines()]
    return sorted((e["node"], e["round"], e["steps"], e["noise_multiplier"], e["sample_rate"], e["records"],
                   e["epsilon_after"], e["declined"]) for e in events)


@pytest.mark.e2e
def test_fedadam_with_ema_changes_no_nodes_ledger_end_to_end(tmp_path):
    from shared_models import build_model
    from shared_models.datasets.named import load_dataset
    from shared_models.run_config import TrainingPlan

    common = ["--dataset", "digits", "--clients", "2", "--rounds", "2", "--reproducible-noise", "--seed", "3"]
    _simulate(*common, "--server-optimizer", "fedadam", "--server-lr", "0.01", "--ema-decay", "0.5",
              "--out", str(tmp_path / "adam"), "--state-dir", str(tmp_path / "s-adam"), cwd=tmp_path)
    _simulate(*common, "--server-optimizer", "fedavg", "--ema-decay", "0", "--out", str(tmp_path / "avg"),
              "--state-dir", str(tmp_path / "s-avg"), cwd=tmp_path)
    adam, avg = (json.loads((tmp_path / run / "summary.json").read_text()) for run in ("adam", "avg"))
    assert adam["rounds_aggregated"] == avg["rounds_aggregated"] == 2
    assert adam["server_optimizer"] == {"name": "fedadam", "lr": 0.01, "beta1": 0.9, "beta2": 0.99, "tau": 0.001}
    assert adam["ema_decay"] == 0.5 and adam["released_model"] == "ema"
    assert avg["server_optimizer"] == {"name": "fedavg"} and avg["released_model"] == "global"
    # A node's epsilon is its ledger's, from its record count, the plan's noise and its steps:
    # the server's post-processing touches none of them.
    assert set(adam["clients"]) == {"node-0", "node-1"}
    for name, node in adam["clients"].items():
        assert node["epsilon"] == avg["clients"][name]["epsilon"] > 0
        for key in ("steps", "noise_multiplier", "sample_rate", "rounds_trained", "declined_rounds"):
            assert node[key] == avg["clients"][name][key], key
    assert _charges(tmp_path / "s-adam") == _charges(tmp_path / "s-avg")
    # The models differ (FedAdam moved them), and the released final_model.pt is the evaluated EMA.
    rows = [json.loads(line) for line in (tmp_path / "adam" / "metrics.jsonl").read_text().splitlines()]
    assert [r["evaluated_model"] for r in rows] == ["ema", "ema"] and all("test_global" in r for r in rows)
    plan = TrainingPlan.from_run_config(json.loads((tmp_path / "adam" / "config.json").read_text()))
    test = load_dataset(plan.dataset, plan.task, plan.data_dir, plan.data_options())["test"]
    model = build_model(plan.task, plan.model or None, test.input_shape, test.num_classes, plan.activation)
    model.load_state_dict(torch.load(tmp_path / "adam" / "final_model.pt"))
    # The vision default releases the model logit-adjusted by the nodes' DP label counts: logits
    # minus log(prior) (summary.json's), applied here by hand to final_model.pt's weights.
    prior = torch.tensor(adam["logit_adjustment"]["class_prior"])
    with torch.no_grad():
        logits = model.eval()(torch.from_numpy(test.x)) - torch.log(prior)
    assert float((logits.argmax(1).numpy() == test.y).mean()) == pytest.approx(adam["final"]["test_accuracy"], abs=1e-9)
    a, b = torch.load(tmp_path / "adam" / "final_model.pt"), torch.load(tmp_path / "avg" / "final_model.pt")
    assert any(not torch.equal(a[k], b[k]) for k in a)
    # The reports say what was released (report.html is written by the ServerApp, which only warns if it cannot).
    assert "released model: the moving average (EMA, decay 0.5)" in (tmp_path / "adam" / "report.md").read_text()
    page = (tmp_path / "adam" / "report.html").read_text()
    assert 'data-key="ema_decay" data-value="0.5"' in page and 'data-value="&#34;fedadam&#34;"' in page
    assert 'data-config="server-optimizer"' in page and 'data-config="ema-decay"' in page
    assert "data-key=\"ema_decay\"" not in (tmp_path / "avg" / "report.html").read_text()
