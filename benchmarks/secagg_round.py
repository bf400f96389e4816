"""Benchmark: one aggregation round of a 1M-parameter update, four ways, in one run.

- plain:   Message API FedAvg, each node sends its float32 update in the clear;
- fedpriv: fedpriv's SecAgg+ (`server.secure_aggregation` / `client.secure_aggregation`,
           signed keys and the consistency stage included) at Flower's neighbourhood size 5
           and threshold 3;
- fedpriv-bounds: the same at the k and t fedpriv's server picks (Bell et al.'s bounds at
           the default corrupt and dropout fractions: the complete graph up to ~50 nodes);
- exchange-floor: the plain round followed by 5 empty query exchanges with every node: the
           least any protocol with fedpriv's 6 sequential exchanges (train, advertise, share,
           masked input, consistency, unmask) pays on this engine, whose every exchange waits
           on polls (Flower's simulation engine polls for messages every 0.1 s, the Grid for
           replies every 0.1 s), whatever the protocol computes;
- flower:  Flower 1.42's legacy SecAgg+ (`SecAggPlusWorkflow` + `secaggplus_mod`, on the
           legacy strategy stack — benchmark only, fedpriv itself does not use it).

All run on Flower's simulation engine (Ray) with the same number of SuperNodes. Each configuration runs `--rounds` rounds (default 2) and
reports the last: `round_seconds`, its wall time (server side, from sending the first message
to holding the sum), with `first_round_seconds` beside it (the first round also pays the
nodes' cold start: Ray actors, imports: torch for fedpriv's node code; until this option the
benchmark reported that first round), and the bytes each node sent per round (mean over
nodes, payload bytes of its replies: arrays, keys, ciphertexts, shares); fedpriv rows add `stage_seconds`: each stage's message round trip, and the server's own work.
fedpriv's grid is the one its server picks (`EncodingParams.fitted`: k bits per coordinate).

    python benchmarks/secagg_round.py [--clients 10 50 100] [--params 1000000] [--rounds 2]

Prints JSON and writes benchmarks/results/secagg_round.json. Ratios are against `plain`
measured in the same run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

NUM_SHARES, THRESHOLD_FRACTION = 5, 0.6


def record_bytes(content) -> int:
    """Payload bytes of a RecordDict: array data, config values (numbers count 8 B), metrics."""
    def size(v):
        if isinstance(v, (bytes, str)):
            return len(v.encode() if isinstance(v, str) else v)
        if isinstance(v, list):
            return sum(size(x) for x in v)
        return 8

    total = sum(len(a.data) for rec in content.array_records.values() for a in rec.values())
    total += sum(size(v) for rec in content.config_records.values() for v in rec.values())
    total += sum(8 for rec in content.metric_records.values() for _ in rec)
    return total


def measuring_mod(msg, context, call_next):
    """Client mod: append the size of every reply this node sends to $BENCH_BYTES."""
    reply = call_next(msg, context)
    if not reply.has_error():
        with open(os.environ["BENCH_BYTES"], "a") as handle:
            handle.write(json.dumps({"node": context.node_id, "bytes": record_bytes(reply.content)}) + "\n")
    return reply


def _timing(path: str, seconds: float, stages: dict | None = None, secagg: dict | None = None) -> None:
    """Append one round's timing (a JSON line) to `path`; `secagg`: the round's k, t and ring bits."""
    with open(path, "a") as handle:
        handle.write(json.dumps({"round_seconds": seconds, **({"stage_seconds": dict(stages)} if stages else {}),
                                 **({"secagg": secagg} if secagg else {})}) + "\n")


def build_apps(kind: str, num_nodes: int, dim: int):
    """(ServerApp, ClientApp) for one kind of aggregation."""
    import numpy as np
    from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
    from flwr.clientapp import ClientApp
    from flwr.serverapp import ServerApp

    threshold = max(2, int(round(THRESHOLD_FRACTION * min(NUM_SHARES, num_nodes))))
    timing_file = os.environ["BENCH_TIMING"]
    rounds = int(os.environ.get("BENCH_ROUNDS", "1"))

    def update_for(node_id: int):
        return np.random.default_rng(node_id % 2**32).normal(0, 0.01, dim).astype(np.float32)

    if kind == "flower":
        from flwr.client import ClientApp as LegacyClientApp, NumPyClient
        from flwr.client.mod import secaggplus_mod
        from flwr.common import ndarrays_to_parameters
        from flwr.server import LegacyContext, ServerApp as LegacyServerApp, ServerConfig
        from flwr.server.strategy import FedAvg
        from flwr.server.workflow import DefaultWorkflow, SecAggPlusWorkflow

        class TimedFedAvg(FedAvg):
            def configure_fit(self, server_round, parameters, client_manager):
                self.t0 = time.perf_counter()
                return super().configure_fit(server_round, parameters, client_manager)

            def aggregate_fit(self, server_round, results, failures):
                out = super().aggregate_fit(server_round, results, failures)
                _timing(timing_file, time.perf_counter() - self.t0)
                return out

        strategy = TimedFedAvg(fraction_fit=1.0, fraction_evaluate=0.0, min_available_clients=num_nodes,
                               min_fit_clients=num_nodes, initial_parameters=ndarrays_to_parameters([np.zeros(dim, np.float32)]))
        server = LegacyServerApp()

        @server.main()
        def _main(grid, context):
            legacy = LegacyContext(context=context, config=ServerConfig(num_rounds=rounds), strategy=strategy)
            DefaultWorkflow(fit_workflow=SecAggPlusWorkflow(num_shares=NUM_SHARES, reconstruction_threshold=threshold))(grid, legacy)

        class Client(NumPyClient):
            def __init__(self, node_id):
                self.node_id = node_id

            def fit(self, parameters, config):
                return [update_for(self.node_id)], 1, {}

        client = LegacyClientApp(client_fn=lambda context: Client(context.node_id).to_client(),
                                 mods=[measuring_mod, secaggplus_mod])
        return server, client

    server, client = ServerApp(), ClientApp(mods=[measuring_mod])

    if kind in ("plain", "exchange-floor"):
        extra_exchanges = 5 if kind == "exchange-floor" else 0

        @server.main()
        def _main(grid, context):
            nodes = _wait(grid, num_nodes)
            zeros = ArrayRecord({"w": Array(np.zeros(dim, np.float32))})
            for _ in range(rounds):
                t0 = time.perf_counter()
                msgs = [Message(RecordDict({"arrays": zeros}), dst_node_id=n, message_type=MessageType.TRAIN) for n in nodes]
                replies = list(grid.send_and_receive(msgs))
                total = sum(r.content["arrays"]["w"].numpy().astype(np.float64) for r in replies)
                for _ in range(extra_exchanges):
                    pings = [Message(RecordDict(), dst_node_id=n, message_type="query.ping") for n in nodes]
                    assert len(list(grid.send_and_receive(pings))) == num_nodes
                _timing(timing_file, time.perf_counter() - t0)
                assert len(replies) == num_nodes and total.shape == (dim,)

        @client.train()
        def _train(msg, context):
            return Message(RecordDict({"arrays": ArrayRecord({"w": Array(update_for(context.node_id))})}), reply_to=msg)

        @client.query("ping")
        def _ping(msg, context):
            return Message(RecordDict(), reply_to=msg)

        return server, client

    # fedpriv SecAgg+
    from client import secure_aggregation as node_side
    from privacy.secagg import EncodingParams, RoundSetup
    from privacy.secagg.identity import load_identity
    from privacy.secagg.parameters import parameters_for
    from privacy.secagg.protocol import encoding_to_config
    from privacy.secret_randomness import SecretRandom
    from server import secure_aggregation as server_side
    from server.secure_aggregation import secure_sum

    stages: dict[str, float] = {}
    exchange = server_side._exchange

    def timed_exchange(grid, stage, payloads, timeout, outcome):
        """Time each stage's message round trip (the server's own work is the rest of the round)."""
        started = time.perf_counter()
        try:
            return exchange(grid, stage, payloads, timeout, outcome)
        finally:
            stages[stage] = time.perf_counter() - started

    server_side._exchange = timed_exchange  # this benchmark process only

    # fedpriv: Flower's neighbourhood size and threshold (same work per node); fedpriv-bounds:
    # the k and t fedpriv's server picks from Bell et al.'s bounds (default fractions).
    if kind == "fedpriv-bounds":
        chosen = parameters_for(num_nodes)
        num_shares, threshold = chosen.num_shares, chosen.threshold
    else:
        num_shares = NUM_SHARES
    identities = Path(os.environ["BENCH_IDS"])
    # The grid the server would pick (encoding.default_scale): k bits per coordinate on the wire.
    params = EncodingParams.fitted(clip_norm=10.0, noise_multiplier=0.0, min_clients=threshold, max_clients=num_nodes,
                                   dimension=dim)

    @server.main()
    def _main(grid, context):
        nodes = _wait(grid, num_nodes)
        for server_round in range(1, rounds + 1):
            stages.clear()
            t0 = time.perf_counter()
            msgs = [Message(RecordDict({"config": ConfigRecord(encoding_to_config(params))}), dst_node_id=n,
                            message_type=MessageType.TRAIN) for n in nodes]
            names = {r.metadata.src_node_id: str(r.content["node"]["name"])
                     for r in grid.send_and_receive(msgs) if not r.has_error()}
            stages["train (encode, spool)"] = time.perf_counter() - t0
            setup = RoundSetup(round_id=f"bench/{server_round}".encode(), participants=tuple(names.values()),
                               num_shares=num_shares, threshold=threshold, params=params, graph_seed=os.urandom(16))
            result = secure_sum(grid, names, setup, dim, timeout=3600)
            elapsed = time.perf_counter() - t0
            stages["server compute (sum, unmask, decode)"] = elapsed - sum(stages.values())
            _timing(timing_file, elapsed, stages, {"num_shares": num_shares, "threshold": threshold,
                                                   "modulus_bits": params.modulus_bits})
            assert len(result.survivors) == num_nodes

    @client.train()
    def _train(msg, context):
        node_side.store_encoded_update(context, update_for(context.node_id).astype(np.float64),
                                       msg.content["config"], SecretRandom(),
                                       spool_dir=Path(tempfile.gettempdir()) / "fedpriv-bench-spool")
        return Message(RecordDict({"metrics": MetricRecord({"trained": 1}),
                                   "node": ConfigRecord({"name": _name(context)})}), reply_to=msg)

    def _name(context):
        return f"node-{context.node_config['partition-id']}"

    for stage in node_side.STAGES:
        def handler(msg, context, stage=stage):
            identity = load_identity(identities / _name(context), _name(context))
            reply = node_side.handle_stage(stage, msg.content, context, identity)
            return Message(reply, reply_to=msg)
        client.query(stage)(handler)
    return server, client


def _wait(grid, n):
    while len(list(grid.get_node_ids())) < n:
        time.sleep(0.2)
    return sorted(grid.get_node_ids())


def run_one(kind: str, num_nodes: int, dim: int) -> dict:
    """Run one configuration in this process (called in a fresh subprocess per configuration)."""
    import warnings

    warnings.filterwarnings("ignore")
    from flwr.simulation import run_simulation

    if kind.startswith("fedpriv"):  # each simulated node signs with its own key, as in a run
        from privacy.secagg.identity import write_identities

        os.environ["BENCH_IDS"] = tempfile.mkdtemp(prefix="fedpriv-bench-ids-")
        write_identities(Path(os.environ["BENCH_IDS"]), [f"node-{i}" for i in range(num_nodes)])
    server, client = build_apps(kind, num_nodes, dim)
    run_simulation(server_app=server, client_app=client, num_supernodes=num_nodes,
                   backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0},
                                   "init_args": {"logging_level": "ERROR", "log_to_driver": False}})
    timings = [json.loads(line) for line in Path(os.environ["BENCH_TIMING"]).read_text().splitlines()]
    rounds = int(os.environ.get("BENCH_ROUNDS", "1"))
    assert len(timings) == rounds, f"{len(timings)} rounds timed, {rounds} run"
    sent = [json.loads(line) for line in Path(os.environ["BENCH_BYTES"]).read_text().splitlines()]
    per_node: dict[int, int] = {}
    for row in sent:
        per_node[row["node"]] = per_node.get(row["node"], 0) + row["bytes"]
    last = timings[-1]  # every round sends the same, so bytes per round = total / rounds
    return {"round_seconds": last["round_seconds"], "first_round_seconds": timings[0]["round_seconds"],
            "rounds": rounds, "bytes_sent_per_node": sum(per_node.values()) / max(len(per_node), 1) / rounds,
            "nodes_reporting": len(per_node), **{key: last[key] for key in ("stage_seconds", "secagg") if key in last}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, nargs="+", default=[10, 50, 100])
    parser.add_argument("--params", type=int, default=1_000_000)
    parser.add_argument("--kinds", nargs="+", default=["plain", "exchange-floor", "fedpriv", "fedpriv-bounds", "flower"],
                        help="fedpriv: Flower's k and t; fedpriv-bounds: the k and t fedpriv picks from Bell et al.'s bounds")
    parser.add_argument("--rounds", type=int, default=2,
                        help="rounds per configuration; the last is reported (the first includes the nodes' cold start)")
    parser.add_argument("--one", nargs=3, metavar=("KIND", "CLIENTS", "PARAMS"), help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "secagg_round.json")
    args = parser.parse_args()
    if args.one:
        kind, n, d = args.one
        print(json.dumps(run_one(kind, int(n), int(d))))
        return

    rows = []
    for n in args.clients:
        for kind in args.kinds:
            with tempfile.TemporaryDirectory() as tmp:
                env = {**os.environ, "BENCH_TIMING": f"{tmp}/t.jsonl", "BENCH_BYTES": f"{tmp}/b.jsonl",
                       "BENCH_ROUNDS": str(args.rounds), "RAY_USAGE_STATS_ENABLED": "0", "PYTHONWARNINGS": "ignore"}
                Path(env["BENCH_BYTES"]).touch()
                started = time.perf_counter()
                proc = subprocess.run([sys.executable, __file__, "--one", kind, str(n), str(args.params)],
                                      capture_output=True, text=True, env=env, timeout=3000)
                row = {"kind": kind, "clients": n, "params": args.params, "wall_seconds": time.perf_counter() - started,
                       "load_average_1m_after": os.getloadavg()[0]}
                if proc.returncode != 0:
                    row["error"] = (proc.stderr or proc.stdout)[-800:]
                else:
                    row.update(json.loads(proc.stdout.strip().splitlines()[-1]))
                rows.append(row)
                print(json.dumps(row), file=sys.stderr, flush=True)
    baseline = {r["clients"]: r for r in rows if r["kind"] == "plain" and "error" not in r}
    for r in rows:
        base = baseline.get(r["clients"])
        if base and "error" not in r:
            r["time_ratio_vs_plain"] = r["round_seconds"] / base["round_seconds"]
            r["bytes_ratio_vs_plain"] = r["bytes_sent_per_node"] / base["bytes_sent_per_node"]
    result = {
        "benchmark": "secagg_round",
        "num_shares": NUM_SHARES,
        "threshold_fraction": THRESHOLD_FRACTION,
        "rounds": args.rounds,
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()},
        "command": "python benchmarks/secagg_round.py " + " ".join(sys.argv[1:]),
        "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
