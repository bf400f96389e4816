"""The run report: one self-contained HTML page with PNG plots of a finished run (DESIGN 8).

    fedpriv report RUN_DIR      (re)writes RUN_DIR/report.html and RUN_DIR/plots/*.png

Reads the run folder's summary.json, metrics.jsonl, ledger.json and config.json (written by
`server.server_app`), draws four PNGs with matplotlib's Agg renderer (no display needed):

    plots/accuracy_loss.png   global test accuracy (and AUC) and loss by round; rounds that
                              did not change the model are shaded
    plots/epsilon.png         each node's sample-level epsilon by round against its budget
                              (max-epsilon); declined and failed rounds marked
    plots/participation.png   node x round: trained, declined, refused, failed, not sampled
    plots/classes.png         the final model's confusion matrix on the test split, and its
                              ROC curve with the threshold used for a binary task

and writes report.html with the PNGs embedded as base64 data URIs, so the one file can be
mailed (e.g. to a privacy officer) and opened anywhere without the folder. Every number
on the page is taken from summary.json; each carries a stable `data-key` (and, for a
node's values, the row's `data-node`) and its exact value in `data-value`, so a test or
a script can read the page back. The page has no scripts and loads nothing from the network.
"""

from __future__ import annotations

import base64
import io
import json
import math
from dataclasses import dataclass
from pathlib import Path

import jinja2
import numpy as np
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

from privacy.releases import NODE_RELEASES
from server.report_template import TEMPLATE
from server.run_folder import RunFolder

REPORT_FILE = "report.html"
PLOTS_DIR = "plots"
PLOT_FILES = {
    "accuracy": "accuracy_loss.png",
    "epsilon": "epsilon.png",
    "participation": "participation.png",
    "classes": "classes.png",
}

# Colours of the participation grid and the epsilon markers (colour-blind-safe Okabe-Ito).
_TRAINED, _DECLINED, _REFUSED, _FAILED, _ABSENT = "#009E73", "#E69F00", "#CC79A7", "#D55E00", "#FFFFFF"


class RunReportError(ValueError):
    """A run folder that cannot be reported: a file is missing, not valid JSON, or lacks a field."""


@dataclass
class RunRecord:
    """What a run folder holds, as read from its files.

    summary: summary.json (see `server.summary.build_summary`).
    rows: metrics.jsonl, one dict per round, in file order.
    ledger: ledger.json, {"nodes": {name: record with "epsilon_by_round"}, "client_level": {...}}.
    config: config.json, the resolved run-config.
    """

    path: Path
    summary: dict
    rows: list[dict]
    ledger: dict
    config: dict


# ---------------------------------------------------------------------------- reading


def _read_json(path: Path) -> object:
    if not path.is_file():
        raise RunReportError(f"{path}: missing (a fedpriv run folder holds summary.json, metrics.jsonl, "
                             "ledger.json and config.json)")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise RunReportError(f"{path}: not valid JSON ({err})") from err


def _require(obj: object, field: str | tuple[str, ...], kind: type | tuple[type, ...], where: str | Path) -> object:
    """obj[a][b]... for field 'a.b' (or ("a", "b") when a key may hold a dot), checked to be of `kind`.

    Raises RunReportError naming `where` (the file) and the field.
    """
    parts = field if isinstance(field, tuple) else tuple(field.split("."))
    dotted = ".".join(parts)
    value = obj
    for part in parts:
        if not isinstance(value, dict) or part not in value:
            raise RunReportError(f"{where}: field '{dotted}' is missing")
        value = value[part]
    if not isinstance(value, kind) or isinstance(value, bool) and bool not in _as_tuple(kind):
        names = " or ".join("null" if k is type(None) else k.__name__ for k in _as_tuple(kind))
        raise RunReportError(f"{where}: field '{dotted}' should be {names}, got {type(value).__name__}")
    return value


def _as_tuple(kind: type | tuple[type, ...]) -> tuple[type, ...]:
    return kind if isinstance(kind, tuple) else (kind,)


_NUMBER = (int, float)
_OPT_NUMBER = (int, float, type(None))


def load_run(run_dir: str | Path) -> RunRecord:
    """Read and check a run folder.

    Raises RunReportError naming the file (and field or line) when run_dir is not a folder,
    a file is missing or not JSON, or a field the report shows is missing or of the wrong type.
    """
    path = Path(run_dir)
    if not path.is_dir():
        raise RunReportError(f"{path}: not a folder (expected a fedpriv run folder)")
    summary_path, ledger_path, config_path = path / "summary.json", path / "ledger.json", path / "config.json"
    summary = _read_json(summary_path)
    if not isinstance(summary, dict):
        raise RunReportError(f"{summary_path}: expected a JSON object, got {type(summary).__name__}")
    for field, kind in (("run_name", str), ("dataset", str), ("task", str), ("model", str), ("dp", bool),
                        ("rounds_planned", int), ("rounds_completed", int), ("rounds_aggregated", int),
                        ("final", dict), ("final.test_accuracy", _OPT_NUMBER), ("final.test_loss", _OPT_NUMBER),
                        ("majority_class_rate", _NUMBER), ("secure_aggregation", bool), ("failures", list),
                        ("clients", dict)):
        _require(summary, field, kind, summary_path)
    for name in summary["clients"]:
        for field, kind in (("epsilon", _OPT_NUMBER), ("delta", _OPT_NUMBER), ("max_epsilon", _OPT_NUMBER),
                            ("declined_rounds", list), ("failed_rounds", list), ("rounds_trained", list)):
            _require(summary, ("clients", name, field), kind, summary_path)
    for i, failure in enumerate(summary["failures"]):
        for field, kind in (("round", int), ("node", str), ("error", str)):
            _require(failure, field, kind, f"{summary_path} (failures[{i}])")
    ledger = _read_json(ledger_path)
    if not isinstance(ledger, dict):
        raise RunReportError(f"{ledger_path}: expected a JSON object, got {type(ledger).__name__}")
    _require(ledger, "nodes", dict, ledger_path)
    for name in ledger["nodes"]:
        _require(ledger, ("nodes", name, "epsilon_by_round"), dict, ledger_path)
    config = _read_json(config_path)
    if not isinstance(config, dict):
        raise RunReportError(f"{config_path}: expected a JSON object, got {type(config).__name__}")
    return RunRecord(path=path, summary=summary, rows=_read_rows(path / "metrics.jsonl"), ledger=ledger, config=config)


def _read_rows(path: Path) -> list[dict]:
    if not path.is_file():
        raise RunReportError(f"{path}: missing (a fedpriv run folder holds summary.json, metrics.jsonl, "
                             "ledger.json and config.json)")
    rows = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path} line {number}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise RunReportError(f"{where}: not valid JSON ({err.msg})") from err
        _require(row, "round", int, where)
        _require(row, "test", dict, where)
        for field in ("trained", "declined", "failed"):
            _require(row, field, list, where)
        _require(row, "aggregated", bool, where)
        rows.append(row)
    return rows


# ---------------------------------------------------------------------------- plots


def _png(fig: Figure) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight", metadata={"Software": None})
    return buffer.getvalue()


def _finite(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _shade_unaggregated(ax, rows: list[dict]) -> None:
    first = True
    for row in rows:
        if not row["aggregated"]:
            ax.axvspan(row["round"] - 0.5, row["round"] + 0.5, color="#BBBBBB", alpha=0.45, lw=0,
                       label="model unchanged (nothing aggregated)" if first else None)
            first = False


def plot_accuracy_loss(run: RunRecord) -> bytes:
    """PNG bytes (about 950 x 460 px): test accuracy (and AUC when present) and test loss by round.

    Round 0 is the initial model (summary.json "initial"); rounds whose metrics.jsonl row says
    `aggregated: false` are shaded. Values that are null are left out of the lines.
    """
    initial = run.summary.get("initial") or {}
    rounds = [0] + [row["round"] for row in run.rows]
    accuracy = [initial.get("test_accuracy")] + [row["test"].get("accuracy") for row in run.rows]
    loss = [initial.get("test_loss")] + [row["test"].get("loss") for row in run.rows]
    auc = [None] + [row["test"].get("auc") for row in run.rows]
    fig = Figure(figsize=(10, 3.6))
    ax_acc, ax_loss = fig.subplots(1, 2)
    _line(ax_acc, rounds, accuracy, "test accuracy", "#0072B2")
    if any(_finite(v) for v in auc):
        _line(ax_acc, rounds, auc, "test AUC", "#CC79A7")
    ax_acc.axhline(run.summary["majority_class_rate"], color="#555555", ls=":", lw=1.2, label="majority class")
    ax_acc.set_ylim(0, 1.02)
    ax_acc.set_ylabel("accuracy")
    ax_acc.set_title("Global model on the test split")
    _line(ax_loss, rounds, loss, "test loss", "#D55E00")
    ax_loss.set_ylabel("cross-entropy loss")
    ax_loss.set_title("Test loss")
    for ax in (ax_acc, ax_loss):
        _shade_unaggregated(ax, run.rows)
        ax.set_xlabel("round (0 = initial model)")
        ax.set_xlim(-0.5, max(rounds) + 0.5)
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=2, frameon=False)
    return _png(fig)


def _line(ax, xs: list, ys: list, label: str, color: str) -> None:
    points = [(x, y) for x, y in zip(xs, ys) if _finite(y)]
    if points:
        ax.plot(*zip(*points), marker="o", ms=4, color=color, label=label)


def _node_names(run: RunRecord) -> list[str]:
    names = set(run.summary["clients"]) | set(run.ledger["nodes"])
    for row in run.rows:
        names.update(row["trained"], row["declined"], row.get("refused", {}), row["failed"])
    return sorted(names)


def plot_epsilon(run: RunRecord) -> bytes:
    """PNG bytes: each node's epsilon by round (ledger.json) with its budget as a dashed line.

    About 1070 x 420 px. Declined rounds are marked x and failed rounds v, at the node's
    epsilon at that round (0 before its first report). Without DP the plot says so instead.
    """
    fig = Figure(figsize=(10, 3.8))
    ax = fig.subplots()
    ax.set_title("Sample-level epsilon per node (at each node's delta)")
    ax.set_xlabel("round")
    ax.set_ylabel("epsilon spent (cumulative)")
    ax.grid(alpha=0.3)
    last_round = max([row["round"] for row in run.rows] + [run.summary["rounds_planned"], 1])
    ax.set_xlim(0.5, last_round + 0.5)
    ax.xaxis.get_major_locator().set_params(integer=True)
    if not run.summary["dp"]:
        ax.text(0.5, 0.5, "differential privacy was off in this run: no epsilon to show",
                transform=ax.transAxes, ha="center", va="center", fontsize=12)
        return _png(fig)
    colors = [f"C{i % 10}" for i in range(len(_node_names(run)))]
    budgets: dict[float, list[str]] = {}
    for color, name in zip(colors, _node_names(run)):
        by_round = {int(r): e for r, e in run.ledger["nodes"].get(name, {}).get("epsilon_by_round", {}).items()
                    if _finite(e)}
        if by_round:
            xs = sorted(by_round)
            ax.plot(xs, [by_round[x] for x in xs], marker="o", ms=3, color=color, label=name)
        client = run.summary["clients"].get(name, {})

        def at(r: int) -> float:
            earlier = [by_round[x] for x in by_round if x <= r]
            return earlier[-1] if earlier else 0.0

        declined, failed = client.get("declined_rounds", []), client.get("failed_rounds", [])
        if declined:
            ax.scatter(declined, [at(r) for r in declined], marker="x", s=60, color=_DECLINED, zorder=3, lw=2)
        if failed:
            ax.scatter(failed, [at(r) for r in failed], marker="v", s=50, color=_FAILED, zorder=3)
        if _finite(client.get("max_epsilon")):
            budgets.setdefault(float(client["max_epsilon"]), []).append(name)
    for budget, names in budgets.items():
        who = f" ({', '.join(names)})" if len(budgets) > 1 else ""  # name nodes only when budgets differ
        ax.axhline(budget, color="#333333", ls="--", lw=1.2, label=f"budget {budget:g}{who}")
    # Legend entries for the markers, drawn once whatever node they belong to.
    ax.scatter([], [], marker="x", color=_DECLINED, lw=2, label="declined round")
    ax.scatter([], [], marker="v", color=_FAILED, label="failed round")
    ax.set_ylim(bottom=0)
    ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5))
    return _png(fig)


def participation(run: RunRecord) -> dict[str, dict[int, str]]:
    """node -> round -> "trained" | "declined" | "refused" | "failed" (from metrics.jsonl; absent = not sampled).

    A node that trained but then dropped out of secure aggregation counts as failed.
    """
    grid: dict[str, dict[int, str]] = {name: {} for name in _node_names(run)}
    for row in run.rows:
        for state in ("trained", "declined", "refused", "failed"):  # later states win
            for name in row.get(state, ()):  # "refused" (a dict: node -> reason) is absent in older runs
                grid[name][row["round"]] = state
    return grid


def plot_participation(run: RunRecord) -> bytes:
    """PNG bytes (about 1100-1300 px wide, 35 px per node): a node x round grid coloured by what each node did."""
    grid = participation(run)
    names = list(grid)
    rounds = [row["round"] for row in run.rows]
    fig = Figure(figsize=(10, 0.9 + 0.32 * max(len(names), 1)))
    ax = fig.subplots()
    palette = {"trained": _TRAINED, "declined": _DECLINED, "refused": _REFUSED, "failed": _FAILED}
    for y, name in enumerate(names):
        for r in rounds:
            ax.add_patch(_cell(r, y, palette.get(grid[name].get(r, ""), _ABSENT)))
    ax.set_xlim(min(rounds, default=1) - 0.5, max(rounds, default=1) + 0.5)
    ax.set_ylim(len(names) - 0.5, -0.5)
    ax.set_yticks(range(len(names)), names)
    ax.set_xticks(rounds)
    ax.set_xlabel("round")
    ax.set_title("What each node did in each round")
    for state, color in (*palette.items(), ("not sampled", _ABSENT)):
        ax.add_patch(_cell(-10, -10, color, label=state))
    ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5))
    return _png(fig)


def _cell(x: float, y: float, color: str, label: str | None = None) -> Rectangle:
    return Rectangle((x - 0.45, y - 0.4), 0.9, 0.8, facecolor=color, edgecolor="#777777", lw=0.6, label=label)


def plot_classes(run: RunRecord) -> bytes:
    """The final model's confusion matrix on the test split (colour: share of each true class,
    text: counts) and, for a binary task, its ROC curve with the threshold used marked.
    A run folder written before per-class results existed gets a figure that says so."""
    final = run.summary["final"]
    per_class, roc = final.get("per_class"), final.get("roc")
    fig = Figure(figsize=(11 if roc else 6.5, 5), dpi=100)
    if not per_class:
        ax = fig.subplots()
        ax.axis("off")
        ax.text(0.5, 0.5, "no per-class results in this run folder (written before they were recorded)",
                ha="center", va="center")
        return _png(fig)
    axes = fig.subplots(1, 2 if roc else 1)
    ax = axes[0] if roc else axes
    counts = np.array(per_class["confusion_matrix"], dtype=float)
    shares = counts / np.maximum(counts.sum(1, keepdims=True), 1)
    ax.imshow(shares, cmap="Blues", vmin=0, vmax=1)
    names = per_class["classes"]
    ax.set_xticks(range(len(names)), names, rotation=45 if len(names) > 4 else 0, ha="right" if len(names) > 4 else "center")
    ax.set_yticks(range(len(names)), names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title("confusion matrix, final model (test split)")
    if len(names) <= 20:
        for i in range(len(names)):
            for j in range(len(names)):
                ax.text(j, i, f"{int(counts[i, j])}", ha="center", va="center", fontsize=8,
                        color="white" if shares[i, j] > 0.6 else "black")
    if roc:
        ax = axes[1]
        ax.plot(roc["fpr"], roc["tpr"], color="#0072B2", label=f"ROC (AUC {roc['auc']:.3f})")
        ax.plot([0, 1], [0, 1], ls="--", color="#999999", lw=0.8)
        thresholds = np.array(roc["thresholds"])
        at = int(np.argmin(np.abs(thresholds - roc["threshold_used"])))
        ax.plot([roc["fpr"][at]], [roc["tpr"][at]], "o", color="#D55E00",
                label=f"threshold used ({roc['threshold_used']:g} on p({names[1]}))")
        ax.set_xlabel("false positive rate")
        ax.set_ylabel("true positive rate")
        ax.set_title("ROC, final model (test split)")
        ax.legend(loc="lower right")
    fig.tight_layout()
    return _png(fig)


def draw_plots(run: RunRecord) -> dict[str, bytes]:
    """{"accuracy", "epsilon", "participation", "classes"} -> PNG bytes (file names in PLOT_FILES)."""
    return {"accuracy": plot_accuracy_loss(run), "epsilon": plot_epsilon(run), "participation": plot_participation(run),
            "classes": plot_classes(run)}


# ---------------------------------------------------------------------------- page


def threat_model(summary: dict) -> str:
    """The threat model of this run in three sentences (README "Threat model", DESIGN 3).

    With secure aggregation it is SecAgg+'s semi-honest model (Bell et al. 2020); the DP
    sentence is sample-level DP per node (Abadi et al. 2016), which holds against the
    coordinator because each node draws its noise from secret entropy and enforces its
    owner's policy and budget itself. Reads summary's "secure_aggregation" and "dp"
    (KeyError if absent; `load_run` checks both).
    """
    if summary["secure_aggregation"]:
        first = ("With SecAgg+ secure aggregation the server saw only the sum of at least t nodes' updates, as "
                 "long as it followed the protocol; nodes colluding with it know their own, so with t-1 of them the "
                 "sum is one honest node's update, which its sample-level DP still covers.")
    else:
        first = "Secure aggregation was off: the server saw each node's model update in the clear."
    if summary["dp"]:
        second = ("Each node's (epsilon, delta) below bounds what the coordinator, the released model and these "
                  "metrics reveal about any one of its units (the table's privacy unit: one record, or every record "
                  "of one patient or user under user-level DP-SGD): the node drew its DP-SGD noise and sampling from "
                  "secret entropy on its own machine and charged its own ledger, which no run-config, seed or "
                  "round schedule can reset. Record counts are public metadata.")
    else:
        second = ("Differential privacy was off, so nothing bounds what the model, the updates or these "
                  "metrics reveal about any one record.")
    third = ("A deployed node refuses runs that break its owner's policy (DP-SGD and SecAgg+ required by default); "
             "any refusal is listed below.")
    return f"{first} {second} {third}"


# Run-config keys that mean something only in one kind of run (pyproject's [tool.flwr.app.config]
# gives every key a default, so config.json holds them all): the report's config table leaves out
# the other kind's. A deployed node reads its budget, validation share and ledger folder from
# its owner's node-config, never from these.
SIMULATION_ONLY_KEYS = ("num-supernodes", "partition", "alpha", "fault-rate", "dropout-rate", "canaries",
                        "reproducible-noise", "state-dir", "secagg-identities", "max-epsilon", "val-fraction",
                        "privacy-unit", "synthetic-patients")
DEPLOYED_ONLY_KEYS = ("min-nodes", "fraction-train", "node-wait-timeout")


def run_kind(config: dict) -> str:
    """"deployed" (`fedpriv run`: no simulated nodes, no simulated ledger folder) or "simulation".

    config: config.json. `fedpriv simulate` records `num-supernodes` >= 1 and its nodes'
    `state-dir`; `fedpriv run` records `num-supernodes` 0 and an empty `state-dir`.
    """
    simulated = int(config.get("num-supernodes") or 0) > 0 or bool(str(config.get("state-dir") or ""))
    return "simulation" if simulated else "deployed"


def config_table(config: dict) -> dict:
    """config.json without the keys of the other kind of run (`run_kind`), in file order."""
    hidden = SIMULATION_ONLY_KEYS if run_kind(config) == "deployed" else DEPLOYED_ONLY_KEYS
    return {key: value for key, value in config.items() if key not in hidden}


def _fmt(value: object, spec: str) -> str:
    return format(value, spec) if _finite(value) else "-"


def _exact(value: object) -> str:
    """The value as JSON writes it (float repr round-trips), for data-value attributes."""
    return json.dumps(value)


def render_html(run: RunRecord, plots: dict[str, bytes]) -> str:
    """The report page as one HTML string with `plots` (PNG bytes) embedded as data URIs."""
    env = jinja2.Environment(autoescape=True, undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True)
    env.filters["fmt"] = _fmt
    env.filters["exact"] = _exact
    template = env.from_string(TEMPLATE)
    summary = run.summary
    client_level = summary.get("client_level") or {}
    table = config_table(run.config)
    return template.render(
        s=summary,
        final=summary["final"],
        client_level=client_level,
        client_level_on=bool(summary["secure_aggregation"] and client_level.get("enabled")),
        threat_model=threat_model(summary),
        plots={key: "data:image/png;base64," + base64.b64encode(png).decode("ascii") for key, png in plots.items()},
        plot_files=PLOT_FILES,
        unaggregated=[row["round"] for row in run.rows if not row["aggregated"]],
        config=table,
        run_kind=run_kind(run.config),
        config_json={key: _exact(value) for key, value in table.items()},
        releases=NODE_RELEASES,
    )


def write_run_report(run_dir: str | Path) -> Path:
    """(Re)write run_dir/plots/*.png and run_dir/report.html, each atomically; returns report.html's path.

    Raises RunReportError (naming the file and field) when the run folder cannot be read.
    """
    run = load_run(run_dir)
    plots = draw_plots(run)
    plot_folder = RunFolder(run.path / PLOTS_DIR)
    for key, png in plots.items():
        plot_folder.write_bytes(PLOT_FILES[key], png)
    return RunFolder(run.path).write_text(REPORT_FILE, render_html(run, plots))


# ---------------------------------------------------------------------------- command


def register(subparsers) -> None:
    """Add `fedpriv report RUN_DIR` to the CLI (see `simulations.cli._COMMAND_MODULES`)."""
    parser = subparsers.add_parser(
        "report", help="(re)write a run folder's report.html and plots/*.png",
        description="Write RUN_DIR/report.html (self-contained: plots embedded) and RUN_DIR/plots/*.png "
                    "from the run's summary.json, metrics.jsonl, ledger.json and config.json.",
    )
    parser.add_argument("run_dir", metavar="RUN_DIR", type=Path, help="a run folder written by `fedpriv simulate`")
    parser.set_defaults(handler=report_command)


def report_command(args, console) -> int:
    """Handler of `fedpriv report`: prints the report's path; exit code 0, or 2 for an unreadable run folder."""
    try:
        path = write_run_report(args.run_dir)
    except RunReportError as err:
        console.print(f"error: {err}", style="red", markup=False, highlight=False)
        return 2
    console.print(str(path), markup=False, highlight=False)
    return 0
