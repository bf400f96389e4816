"""Did a finished run train at all? If not, why not, per site, and what can the reader do?

A run in which no node trained (every node declined, refused, failed or never answered) or
whose model never changed ends with the untrained model: `fedpriv run` and `fedpriv simulate`
then exit with `EXIT_NOTHING_TRAINED` instead of 0, printing `untrained_run_message`.

The reasons come from summary.json only (`server.summary`): `clients.<node>.declines`
(declined rounds and the node's own reason; `declined_rounds` with `epsilon`/`max_epsilon`
for runs written before `declines` existed), `.refusals` (the site's policy), `.failures`,
and, for a deployed run, the kit's nodes that never answered at all. The advice depends on
who reads it (`ROLES`): a coordinator cannot raise a site's lifetime budget or point a node
at another ledger (both are the site owner's node-config); a simulation user owns every
simulated node and can.
"""

from __future__ import annotations

from collections.abc import Iterable

EXIT_NOTHING_TRAINED = 3
ROLES = ("coordinator", "simulation")


def nothing_trained(summary: dict) -> bool:
    """True when no node trained in any round, or no round changed the global model.

    summary: a parsed summary.json (`clients.<node>.rounds_trained`, `rounds_aggregated`).
    """
    trained = any((c.get("rounds_trained") or []) for c in (summary.get("clients") or {}).values())
    return not trained or int(summary.get("rounds_aggregated") or 0) == 0


def _rounds(rounds: Iterable[int]) -> str:
    rounds = sorted(set(rounds))
    return ("round " if len(rounds) == 1 else "rounds ") + ",".join(map(str, rounds))


def _unique(items: Iterable[str]) -> list[str]:
    return list(dict.fromkeys(items))


def site_reasons(summary: dict, expected_nodes: Iterable[str] = ()) -> dict[str, list[str]]:
    """Site name -> one line per thing that kept it from training, from summary.json.

    expected_nodes: nodes that should have taken part (a deployed run's kit nodes); one that
    never replied is listed as such. A node that trained in some round gets no entry.
    """
    clients = summary.get("clients") or {}
    reasons: dict[str, list[str]] = {}
    for name, c in sorted(clients.items()):
        if c.get("rounds_trained"):
            continue
        lines = []
        declines = c.get("declines") or []
        if declines:
            for reason in _unique(d["reason"] for d in declines):
                lines.append(f"declined {_rounds(d['round'] for d in declines if d['reason'] == reason)}: {reason}")
        elif c.get("declined_rounds"):
            spent = "-" if c.get("epsilon") is None else f"{c['epsilon']:.3f}"
            lines.append(f"declined {_rounds(c['declined_rounds'])}: a round would pass its lifetime budget "
                         f"max-epsilon={c.get('max_epsilon')} (spent so far: epsilon {spent})")
        refusals = c.get("refusals") or []
        for reason in _unique(r["reason"] for r in refusals):
            lines.append(f"refused {_rounds(r['round'] for r in refusals if r['reason'] == reason)}: {reason}")
        failures = c.get("failures") or []
        for error in _unique(f["error"] for f in failures):
            lines.append(f"failed {_rounds(f['round'] for f in failures if f['error'] == error)}: {error}")
        reasons[name] = lines or ["sent no train reply"]
    for name in sorted(set(expected_nodes) - set(clients)):
        reasons[name] = ["never answered (not connected, or never sampled)"]
    return reasons


def _advice(summary: dict, reasons: dict[str, list[str]], role: str, out_dir: str) -> list[str]:
    lines = [line for site in reasons.values() for line in site]
    declined = any(line.startswith("declined") for line in lines)
    refused = any(line.startswith("refused") for line in lines)
    failed = any(line.startswith("failed") for line in lines)
    absent = any(line.startswith(("never answered", "sent no train reply")) for line in lines)
    advice = []
    if role == "coordinator":
        if declined:
            left = [f"{name} {c['max_epsilon'] - c['epsilon']:.2f}" for name, c in sorted(summary["clients"].items())
                    if c.get("declined_rounds") and c.get("max_epsilon") is not None and c.get("epsilon") is not None]
            advice.append(
                "declined: a site's lifetime budget (its `fedpriv node --max-epsilon`) and its ledger are its owner's; "
                "you cannot raise or reset them. Submit a run that spends less: an --epsilon below what each site has "
                "left" + (f" (max-epsilon minus spent: {', '.join(left)})" if left else "")
                + ", or ask the site's owner whether they will allow more spend on this data")
        if refused:
            advice.append("refused: the site's policy is its node-config, not yours; submit a run that meets it "
                          "(the reason says what, e.g. keep DP-SGD or SecAgg+ on), or ask the site")
        if failed:
            advice.append("failed: a deployed node keeps the error's message in its own log; ask the site for it, "
                          f"and see {out_dir}/flower.log for the coordinator's side")
        if absent:
            advice.append("never answered: check the site is running `fedpriv node` with its kit and can reach "
                          "your SuperLink (`flwr supernode ls`), then resubmit")
    else:
        if declined:
            advice.append("declined: the simulated nodes' ledgers persist across runs (the budget belongs to the "
                          "data); use a fresh --state-dir to simulate new data owners, or raise --max-epsilon "
                          "(their lifetime budget), or spend less per run with a smaller --epsilon")
        if refused:
            advice.append("refused: change the run to meet the nodes' policy named above")
        if failed or absent:
            advice.append(f"failed: see the errors above and {out_dir}/flower.log")
    if not lines and summary.get("secure_rounds_failed"):
        advice.append(f"SecAgg+ failed in {_rounds(summary['secure_rounds_failed'])}, so no round changed the model: "
                      f"see {out_dir}/flower.log (too few nodes left for the threshold?)")
    if not advice:
        advice.append(f"see {out_dir}/flower.log and the report's failures")
    return advice


def untrained_run_message(summary: dict, role: str, expected_nodes: Iterable[str] = (), out_dir: str = "RUN_DIR") -> str:
    """The error for a run that trained nothing, or "" when some round changed the model.

    role: "coordinator" (`fedpriv run`) or "simulation" (`fedpriv simulate`); it decides the
    advice. expected_nodes: the kit's node names for a deployed run. Raises ValueError for
    an unknown role.
    """
    if role not in ROLES:
        raise ValueError(f"role must be one of {ROLES}, got {role!r}")
    if not nothing_trained(summary):
        return ""
    reasons = site_reasons(summary, expected_nodes)
    acc = (summary.get("final") or {}).get("test_accuracy")
    head = ("no node trained in this run" if not any(c.get("rounds_trained") for c in summary.get("clients", {}).values())
            else "no round changed the model")
    lines = [f"{head}: the result is the untrained model"
             + (f" (test accuracy {acc:.3f})" if acc is not None else "") + ". Each site's reason:"]
    for name, site in reasons.items():
        lines += [f"  {name}: {line}" for line in site]
    if not reasons:
        lines.append("  (no node is recorded in summary.json)")
    lines.append("What you can do:")
    lines += [f"  - {line}" for line in _advice(summary, reasons, role, out_dir)]
    return "\n".join(lines)
