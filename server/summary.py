"""summary.json and report.md of a run.

summary.json keys promised to users (issue 2; add keys, never rename): `rounds_completed`,
`final.test_accuracy`, `clients.<node>.epsilon`, `.delta`, `.declined_rounds`; issue 12 adds
`clients.<node>.refused_rounds`, `.refusals` and the top-level `refusals` (what each site's
policy refused and why), and `client_level.assumption`; issue 15 adds `clients.<node>.declines`
and the top-level `declines` (each declined round and the reason the node gave); issue 19
adds `clients.<node>.privacy_unit` / `.num_groups` and the top-level `privacy_unit` (what
`max_client_epsilon` is about: "record", a group unit such as "patient", or "mixed"); issue 14
adds `server_optimizer` (its name and the hyper-parameters it uses), `ema_decay` and
`released_model` ("ema" when `final` and final_model.pt are the global model's moving
average, else "global"), and `logit_adjustment` (only when nodes sent DP label counts:
`label_counts`, `class_prior`, `nodes`, `tau`; `server.logit_adjustment`).
"""

from __future__ import annotations

from server.ledger import CoordinatorLedger
from server.run_folder import RunFolder
from server.server_optimizer import ServerOptimizer, optimizer_config
from shared_models import DEFAULT_MODELS
from shared_models.run_config import TrainingPlan


def build_summary(plan: TrainingPlan, cfg: dict, rows: list[dict], ledger: CoordinatorLedger, initial_test: dict,
                  majority_rate: float, seconds: float) -> dict:
    """The run's headline numbers as a JSON-ready dict.

    rows: every round's metrics.jsonl record, including rounds run before a resume.
    """
    last = rows[-1]["test"] if rows else initial_test
    clients = {}
    for name, rec in ledger.to_dict().items():
        clients[name] = {
            "epsilon": rec["epsilon"],
            "delta": rec["delta"],
            "max_epsilon": rec["max_epsilon"],
            "declined_rounds": rec["declined_rounds"],
            "declines": rec["declines"],
            "refused_rounds": rec["refused_rounds"],
            "refusals": rec["refusals"],
            "failed_rounds": rec["failed_rounds"],
            "rounds_trained": rec["rounds_trained"],
            "steps": rec["steps"],
            "noise_multiplier": rec["noise_multiplier"],
            "sample_rate": rec["sample_rate"],
            "num_examples": rec["num_examples"],
            "failures": rec["failures"],
            "privacy_unit": rec.get("privacy_unit"),
            "num_groups": rec.get("num_groups"),
        }
    return {
        "run_name": plan.run_name,
        "task": plan.task,
        "dataset": plan.dataset,
        "model": plan.model or DEFAULT_MODELS[plan.task],
        "activation": plan.activation,
        "dp": plan.dp,
        "target_epsilon": plan.epsilon if plan.dp else None,
        "delta": plan.delta if plan.dp else None,
        "rounds_planned": plan.rounds,
        "rounds_completed": len(rows),
        "rounds_aggregated": sum(bool(r["aggregated"]) for r in rows),
        "resumed_after_round": cfg.get("resumed-after-round"),
        "initial": {"test_accuracy": initial_test.get("accuracy"), "test_loss": initial_test.get("loss")},
        "final": {
            "test_accuracy": last.get("accuracy"),
            "test_loss": last.get("loss"),
            **({"test_auc": last["auc"]} if "auc" in last else {}),
            **({"test_balanced_accuracy": last["balanced_accuracy"]} if "balanced_accuracy" in last else {}),
        },
        "majority_class_rate": majority_rate,
        "server_optimizer": ServerOptimizer(**optimizer_config(cfg)).describe(),
        "ema_decay": float(cfg.get("ema-decay", 0.0)),
        # What `final` (and final_model.pt) is: the last round's evaluated model (rows of older runs: the global).
        "released_model": rows[-1].get("evaluated_model", "global") if rows else "global",
        "secure_aggregation": bool(cfg.get("secagg", False)),
        "client_level": ledger.client_level or None,
        "secure_rounds_failed": [r["round"] for r in rows if (r.get("secure_aggregation") or {}).get("error")],
        "failures": sorted(
            ({"round": f["round"], "node": name, "error": f["error"]} for name, c in clients.items() for f in c["failures"]),
            key=lambda f: (f["round"], f["node"]),
        ),
        "refusals": sorted(
            ({"round": f["round"], "node": name, "reason": f["reason"]} for name, c in clients.items()
             for f in c["refusals"]),
            key=lambda f: (f["round"], f["node"]),
        ),
        "declines": sorted(
            ({"round": f["round"], "node": name, "reason": f["reason"]} for name, c in clients.items()
             for f in c["declines"]),
            key=lambda f: (f["round"], f["node"]),
        ),
        "max_client_epsilon": max((c["epsilon"] for c in clients.values() if c["epsilon"] is not None), default=None),
        "privacy_unit": run_privacy_unit(clients),
        "clients": clients,
        "seconds": seconds,
    }


def run_privacy_unit(clients: dict[str, dict]) -> str | None:
    """The unit every reporting node's epsilon is about ("record", "patient", "user"), "mixed"
    when they differ, None when none reported an epsilon."""
    units = {c["privacy_unit"] for c in clients.values() if c.get("epsilon") is not None and c.get("privacy_unit")}
    return None if not units else units.pop() if len(units) == 1 else "mixed"


def _optimizer_line(described: dict) -> str:
    """`server_optimizer` as text: "fedavg", "fedadam (lr 0.01, beta1 0.9, beta2 0.99, tau 0.001)"."""
    params = ", ".join(f"{key} {value:g}" for key, value in described.items() if key != "name")
    return described["name"] + (f" ({params})" if params else "")


def write_report(folder: RunFolder, summary: dict) -> None:
    """A short Markdown report of the run beside summary.json."""
    final = summary["final"]
    lines = [
        f"# fedpriv run `{summary['run_name']}`",
        "",
        f"- task **{summary['task']}**, dataset **{summary['dataset']}**, model {summary['model']}",
        f"- rounds completed: {summary['rounds_completed']} of {summary['rounds_planned']}, "
        f"of which {summary['rounds_aggregated']} changed the model",
        f"- final test accuracy: **{final['test_accuracy']:.4f}** (majority class {summary['majority_class_rate']:.4f})"
        + (f", balanced accuracy {final['test_balanced_accuracy']:.4f}" if "test_balanced_accuracy" in final else "")
        + (f", AUC {final['test_auc']:.4f}" if "test_auc" in final else ""),
        f"- secure aggregation: {'SecAgg+ (the server saw only sums)' if summary['secure_aggregation'] else 'off'}",
        f"- differential privacy: {'DP-SGD, target epsilon %g at delta %g per node' % (summary['target_epsilon'], summary['delta']) if summary['dp'] else 'off'}"
        + (f"; privacy unit: {summary['privacy_unit']}" if summary.get("privacy_unit") else ""),
        f"- server: {_optimizer_line(summary.get('server_optimizer') or {'name': 'fedavg'})}; released model: "
        + (f"the moving average (EMA, decay {summary['ema_decay']:g}) of the global model"
           if summary.get("released_model") == "ema" else "the final global model")
        + " (post-processing of the aggregates: no privacy cost)",
        *([f"- logit adjustment: the released model subtracts log(class prior) from its logits (balanced error); "
           f"prior {', '.join(f'{p:.3f}' for p in summary['logit_adjustment']['class_prior'])} from "
           f"{summary['logit_adjustment']['nodes']} nodes' DP label counts, inside each node's epsilon"]
          if summary.get("logit_adjustment") else []),
        *([f"- client-level DP: epsilon {summary['client_level']['epsilon']:.3g} at delta "
           f"{summary['client_level']['delta']:g} (noise multiplier {summary['client_level']['noise_multiplier']:g}, "
           f"{summary['client_level']['rounds']} released rounds)"] if (summary.get("client_level") or {}).get("enabled")
          else ["- client-level DP: off (no client-level noise; each node's protection is its sample-level epsilon)"]),
        "",
        "| node | epsilon | per | delta | budget | rounds trained | declined | refused | failed |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, c in summary["clients"].items():
        eps = "-" if c["epsilon"] is None else f"{c['epsilon']:.3f}"
        lines.append(
            f"| {name} | {eps} | {c.get('privacy_unit') or '-'} | {c['delta'] if c['delta'] is not None else '-'} | "
            f"{c['max_epsilon'] if c['max_epsilon'] is not None else '-'} | {len(c['rounds_trained'])} | "
            f"{c['declined_rounds'] or '-'} | {c['refused_rounds'] or '-'} | {c['failed_rounds'] or '-'} |"
        )
    refusals = {(r["node"], r["reason"]) for r in summary["refusals"]}
    lines += [f"- {node} refused: {reason}" for node, reason in sorted(refusals)]
    lines += [
        "",
        "Threat model: each node's epsilon is computed on its own machine from secret noise and bounds what",
        "the coordinator and the released model and metrics reveal about any one of its units: a record",
        "(sample-level DP), or all the records of one patient/user where the table says so (user-level DP-SGD);",
        "the coordinator cannot change a node's budget, its DP or SecAgg+ requirement, or its noise.",
        "Record counts per node are reported and treated as public metadata.",
    ]
    folder.write_text("report.md", "\n".join(lines) + "\n")
