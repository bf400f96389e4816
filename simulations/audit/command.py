"""`fedpriv audit RUN_DIR`: membership inference against a finished run's final model.

Prints one row per attack (AUC, advantage, TPR at 0.1% and 1% FPR) beside what the run's
(epsilon, delta) allows, and writes the full report as JSON (RUN_DIR/audit.json, or --out).
`--unit group` makes the targets whole groups (patients, users, speakers) instead of
records; the default is the run's privacy unit (summary.json `privacy_unit`).
Exit code 0 when no attack beats the bound, 3 when one does (that would be a bug in the
privacy machinery, or a wrongly reported epsilon), 2 on bad input.
"""

from __future__ import annotations

import argparse
import json
import os
import warnings
from pathlib import Path

from rich.console import Console
from rich.table import Table

from simulations.audit.audit import AuditError, audit_run


def register(subparsers) -> None:
    """Add the `audit` command to the `fedpriv` parser."""
    parser = subparsers.add_parser(
        "audit", help="membership-inference audit of a finished run vs its (epsilon, delta) bound")
    parser.add_argument("run_dir", type=Path, metavar="RUN_DIR", help="a finished `fedpriv simulate` run folder")
    parser.add_argument("--shadow-models", type=int, default=4,
                        help="shadow models for LiRA offline (0: loss-threshold attack only; else >= 2)")
    parser.add_argument("--shadow-training", choices=("federated", "central"), default="federated",
                        help="how each LiRA shadow model is trained: a simulated federation like the run "
                             "(its nodes, partition, rounds, local epochs, DP-SGD) or centrally")
    parser.add_argument("--shadow-epochs", type=int, default=None,
                        help="epochs per shadow model with --shadow-training central "
                             "(default: the run's rounds x local-epochs)")
    parser.add_argument("--max-targets", type=int, default=None,
                        help="cap on members (and as many non-members) to score (default: all held-out records)")
    parser.add_argument("--unit", choices=("record", "group"), default=None,
                        help="what membership is inferred of: one record, or a whole group (all of a patient's, "
                             "user's or speaker's records), compared with the epsilon of that unit (default: the "
                             "run's privacy unit, summary.json privacy_unit; group needs a group-level DP run)")
    parser.add_argument("--seed", type=int, default=0, help="seed for the target draw and the shadow models")
    parser.add_argument("--out", type=Path, default=None, help="where to write the JSON report (default RUN_DIR/audit.json)")
    parser.set_defaults(handler=run_audit_command)


def _pct(x: float) -> str:
    return f"{100 * x:.2f}%"


def run_audit_command(args: argparse.Namespace, console: Console) -> int:
    """Handler of `fedpriv audit`; returns the exit code."""
    if args.shadow_models == 1 or args.shadow_models < 0:
        console.print(f"[red]error:[/red] --shadow-models must be 0 or >= 2, got {args.shadow_models}")
        return 2
    if args.max_targets is not None and args.max_targets < 1:
        console.print(f"[red]error:[/red] --max-targets must be >= 1, got {args.max_targets}")
        return 2
    if args.shadow_epochs is not None and args.shadow_training != "central":
        console.print("[red]error:[/red] --shadow-epochs applies to --shadow-training central (federated shadows "
                      "train for the run's rounds x local-epochs)")
        return 2
    if not args.run_dir.is_dir():
        console.print(f"[red]error:[/red] RUN_DIR {args.run_dir} is not a folder")
        return 2
    try:
        with warnings.catch_warnings():
            # Shadow training through Opacus: its notes on the PRNG (documented in the README) and on
            # backward hooks of input layers would otherwise interleave with the audit's own lines.
            warnings.filterwarnings("ignore", message="Secure RNG turned off")
            warnings.filterwarnings("ignore", message="Full backward hook is firing")
            report = audit_run(args.run_dir, shadow_models=args.shadow_models, seed=args.seed,
                               max_targets=args.max_targets, shadow_epochs=args.shadow_epochs,
                               shadow_training=args.shadow_training, unit=args.unit,
                               progress=lambda msg: console.print(f"audit: {msg}"))
    except (AuditError, ValueError) as err:
        console.print(f"[red]error:[/red] {err}")
        return 2
    out = args.out or args.run_dir / "audit.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(report, indent=2))
    os.replace(tmp, out)  # a reader never sees half a report

    bound = report["bound"]
    sizes = report["sizes"]
    if report["unit"] == "group":
        noun = report["target"]
        title = (f"membership inference of whole {noun}s (unit: group) on {report['dataset']} ({sizes['members']} "
                 f"member {noun}s, {sizes['member_records']} records, vs {sizes['nonmembers']} non-member {noun}s, "
                 f"{sizes['nonmember_records']} records)")
    else:
        title = (f"membership inference of records (unit: record) on {report['dataset']} ({sizes['members']} members "
                 f"vs {sizes['nonmembers']} non-members)")
    level = "sample" if bound["unit"] == "record" else bound["unit"]
    table = Table(title=title, caption="adv.: max(TPR - FPR); TPR@f: TPR at FPR f; eps LB: the epsilon the attack "
                                       "proves (95%); violated: beats the (epsilon, delta) bound beyond sampling error")
    # Short headers and unwrapped numbers: an 80-column log must show "0.5326", not "0.53…".
    table.add_column("attack", overflow="fold", min_width=16)
    for col in ("AUC", "adv.", "TPR@0.1%", "TPR@1%", "eps LB"):
        table.add_column(col, no_wrap=True)
    table.add_column("violated", overflow="fold")
    for name, a in report["attacks"].items():
        table.add_row(name, f"{a['auc']:.4f}", f"{a['advantage']:.4f}", _pct(a["tpr_at_fpr"]["0.001"]),
                      _pct(a["tpr_at_fpr"]["0.01"]), f"{a['epsilon_lower_bound']:.3g}",
                      "[red]YES[/red]" if a["bound_violated"]
                      else "no (point above, within noise)" if any(a["above_bound"].values()) else "no")
    canaries = report.get("canaries")
    for name, a in (canaries or {}).get("attacks", {}).items():
        table.add_row(f"{name} on canaries ({canaries['inserted']} in / {canaries['not_inserted']} out)",
                      f"{a['auc']:.4f}", f"{a['advantage']:.4f}", _pct(a["tpr_at_fpr"]["0.001"]),
                      _pct(a["tpr_at_fpr"]["0.01"]), f"{a['epsilon_lower_bound']:.3g}",
                      "[red]YES[/red]" if a["bound_violated"]
                      else "no (point above, within noise)" if any(a["above_bound"].values()) else "no")
    if bound["vacuous"]:
        table.add_row("bound (no DP)", "1", "1", "100%", "100%", "-", "-")
    else:
        table.add_row(f"bound eps={bound['epsilon']:.3g}, delta={bound['delta']:g} ({level}-level)",
                      f"{bound['auc']:.4f}",
                      f"{bound['advantage']:.4f}", _pct(bound["tpr_at_fpr"]["0.001"]),
                      _pct(bound["tpr_at_fpr"]["0.01"]), f"{bound['epsilon']:.3g}", "-")
    console.print(table)
    if sizes["nonmembers"] < 1000:
        what = "non-members" if report["unit"] == "record" else f"non-member {report['target']}s"
        console.print(f"[yellow]only {sizes['nonmembers']} {what}: TPR at 0.1% FPR is TPR at FPR 0 "
                      "(1000+ are needed to resolve it)[/yellow]")
    if not bound["vacuous"]:
        console.print(f"unit: {report['unit']}; bound: epsilon {bound['epsilon']:.3g} at delta {bound['delta']:g}, "
                      f"{level}-level ({bound['note']})")
    if bound["vacuous"]:
        console.print("the run trained without DP: no bound applies")
    console.print(f"report: {out}")
    if report["bound_violated"]:
        console.print("[red bold]an attack beats the (epsilon, delta) bound beyond sampling error (95% confidence): "
                      "the privacy accounting or training is wrong somewhere[/red bold]")
        return 3
    return 0
