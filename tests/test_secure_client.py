"""The node's SecAgg+ stage handlers over Flower records, driven like the server does it.

Checks that everything a node keeps between stages survives Flower's record types (the
state round-trips through ConfigRecord/ArrayRecord), that the unmasked sum is the sum of the
nodes' encoded deltas, and that a simulated dropout makes a node answer with an error.
"""

import numpy as np
import pytest
import torch
from flwr.app import ConfigRecord, Context, RecordDict

from client import secure_aggregation as node_side
from privacy.secagg import EncodingParams, RoundSetup, SecAggServer, decode_sum, default_scale
from privacy.secagg.identity import new_identities
from privacy.secagg.protocol import encoding_to_config
from privacy.secret_randomness import SecretRandom

D = 1_000


def _contexts(n):
    return {nid: Context(run_id=1, node_id=nid, node_config={}, state=RecordDict(), run_config={}) for nid in range(101, 101 + n)}


def _params(n, t):
    return EncodingParams(clip_norm=10.0, noise_multiplier=0.0, min_clients=t, scale=default_scale(10.0, D), max_clients=n)


def _run(contexts, params, t, drop_stage=None, dropper=None):
    setup = RoundSetup(round_id=b"r/1", participants=tuple(str(n) for n in contexts), num_shares=len(contexts),
                       threshold=t, params=params, graph_seed=b"g")
    server = SecAggServer(setup, dimension=D)
    ids = new_identities(list(setup.participants))
    if dropper is not None:
        contexts[dropper].state["secagg-dropout"] = ConfigRecord({"stage": drop_stage})

    def ask(stage, payloads):
        replies = {}
        for nid, payload in payloads.items():
            try:
                replies[nid] = node_side.handle_stage(stage, payload, contexts[nid], ids[str(nid)])
            except node_side.SimulatedDropout:
                pass
        return replies

    cfg = ConfigRecord(setup.to_config())
    rep = ask("secagg_advertise", {n: RecordDict({"secagg": cfg}) for n in contexts})
    views = server.collect_keys({str(n): (bytes(r["secagg"]["c-pk"]), bytes(r["secagg"]["s-pk"]),
                                          bytes(r["secagg"]["signature"])) for n, r in rep.items()})
    rep = ask("secagg_share", {int(u): RecordDict({"secagg": ConfigRecord({
        "neighbours": sorted(k), "c-pks": [k[v][0] for v in sorted(k)], "s-pks": [k[v][1] for v in sorted(k)],
        "signatures": [k[v][2] for v in sorted(k)]})})
        for u, k in views.items()})
    routed = server.route_shares({str(n): dict(zip(r["secagg"]["recipients"], map(bytes, r["secagg"]["ciphertexts"])))
                                  for n, r in rep.items()})
    rep = ask("secagg_masked", {int(u): RecordDict({"secagg": ConfigRecord({
        "senders": sorted(box), "ciphertexts": [box[s] for s in sorted(box)], "u2": server.u2})}) for u, box in routed.items()})
    u3 = server.collect_masked({str(n): r["masked"]["y"].numpy() for n, r in rep.items()})
    rep = ask("secagg_consistency", {int(u): RecordDict({"secagg": ConfigRecord({"u3": u3})}) for u in u3})
    signatures = server.collect_signatures({str(n): bytes(r["secagg"]["signature"]) for n, r in rep.items()})
    signers = sorted(signatures)
    rep = ask("secagg_unmask", {int(u): RecordDict({"secagg": ConfigRecord({
        "signers": signers, "signatures": [signatures[v] for v in signers]})}) for u in signers})
    revealed = {str(n): {o: (k, int(i), bytes(s)) for o, k, i, s in zip(r["secagg"]["owners"], r["secagg"]["kinds"],
                                                                         r["secagg"]["indices"], r["secagg"]["shares"])}
                for n, r in rep.items()}
    return decode_sum(server.unmask(revealed), params), u3


def _train(contexts, params, spool):
    rng = np.random.default_rng(0)
    deltas = {}
    for nid, ctx in contexts.items():
        global_state = {"w": torch.zeros(D // 2), "b": torch.zeros(D // 2)}
        local = {"w": torch.from_numpy(rng.normal(0, 0.1, D // 2)).float(), "b": torch.from_numpy(rng.normal(0, 0.1, D // 2)).float()}
        deltas[nid] = node_side.flatten_delta(local, global_state)
        path = node_side.store_encoded_update(ctx, deltas[nid], encoding_to_config(params), SecretRandom(),
                                             spool_dir=spool)
        assert path.stat().st_mode & 0o777 == 0o600
    return deltas


def test_five_stages_over_flower_records_give_the_exact_sum(tmp_path):
    contexts = _contexts(4)
    params = _params(4, 3)
    deltas = _train(contexts, params, tmp_path)
    total, u3 = _run(contexts, params, t=3)
    assert len(u3) == 4
    assert np.abs(total - sum(deltas.values())).max() < 4 / params.scale
    # Secrets and the plain encoding are gone from every node's state and disk after the round.
    assert all("secagg-state" not in c.state and "secagg-input" not in c.state for c in contexts.values())
    assert list(tmp_path.iterdir()) == []


def test_a_node_dropping_after_masking_is_still_summed_and_one_dropping_before_is_not(tmp_path):
    for stage, included in (("secagg_unmask", True), ("secagg_masked", False)):
        contexts = _contexts(5)
        params = _params(5, 3)
        deltas = _train(contexts, params, tmp_path / stage)
        dropper = 102
        total, u3 = _run(contexts, params, t=3, drop_stage=stage, dropper=dropper)
        expected = sum(d for n, d in deltas.items() if included or n != dropper)
        assert (str(dropper) in u3) is included
        assert np.abs(total - expected).max() < 5 / params.scale


def test_a_node_without_a_trained_update_refuses_to_aggregate():
    ctx = _contexts(1)[101]
    setup = RoundSetup(round_id=b"r", participants=("101", "102"), num_shares=2, threshold=2, params=_params(2, 2),
                       graph_seed=b"g")
    with pytest.raises(RuntimeError, match="holds no trained update"):
        node_side.handle_stage("secagg_advertise", RecordDict({"secagg": ConfigRecord(setup.to_config())}), ctx,
                               new_identities(["101", "102"])["101"])
