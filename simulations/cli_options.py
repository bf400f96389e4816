"""The training options `fedpriv simulate` and `fedpriv run` share, and how both print a run's outcome.

Flag names are a promise to users: add, never rename.
"""

from __future__ import annotations

import argparse
import datetime as dt
from pathlib import Path

from rich.console import Console
from rich.table import Table

from privacy.secagg.parameters import (DEFAULT_CORRUPT_FRACTION, DEFAULT_DROPOUT_FRACTION, SecAggParameterError,
                                       parameters_for)
from server.robust_aggregation import AGGREGATIONS
from server.server_optimizer import DEFAULT_SERVER_LR, SERVER_OPTIMIZERS
from server.tracking import TRACKERS, TrackingUnavailable, check_tracker
from shared_models import TASKS, default_lr, model_names
from shared_models.datasets.local import AUDIO_FEATURES, IMAGE_FEATURES, add_local_data_options
from shared_models.datasets.named import DATASET_TASKS, data_dir, dataset_task
from shared_models.recipes import recipe_for, recommended_model
from shared_models.run_config import CLIPPING_MODES, MAX_EPSILON_PER_RUN, MAX_GRAD_NORM_RANGE, MAX_LABEL_COUNT_SHARE
from simulations.ray_cluster import parse_ray_address

# Without client-level DP, clipping the update serves only to bound SecAgg+'s encoding range:
# a bound far above the update norms seen here (8-50) keeps the update intact; the SecAgg+
# grid's precision is relative to C (`privacy.secagg.encoding`, 16 bits by default), so the
# quantisation error's RMS is about 2^-16 * C / ||x||, 0.2% of a typical coordinate or less.
UNCLIPPED_NORM = 1000.0

class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """argparse's defaults formatter, except for options without a default (their help says what None means)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        return action.help if action.default is None else super()._get_help_string(action)


def positive_float(text: str) -> float:
    """argparse type: a float > 0 (ArgumentTypeError otherwise)."""
    value = float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1 (ArgumentTypeError otherwise)."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {text}")
    return value


def batch_size_arg(text: str) -> int:
    """argparse type: an integer >= 1, or 0 for full batch (ArgumentTypeError otherwise)."""
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 1, or 0 for full batch, got {text}")
    return value


def ray_address(text: str) -> str:
    """argparse type: a Ray cluster address, `HOST:PORT`, `ray://HOST:PORT` or `auto` (ArgumentTypeError
    saying what was expected otherwise; `simulations.ray_cluster.parse_ray_address`)."""
    try:
        return parse_ray_address(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def add_training_options(parser: argparse.ArgumentParser, dataset_help: str) -> None:
    """The training plan's options, shared by `fedpriv simulate` and `fedpriv run` (same names, same defaults)."""
    parser.add_argument("--task", choices=TASKS, help="model family; inferred for named datasets")
    parser.add_argument("--dataset", default="digits", help=dataset_help)
    parser.add_argument("--rounds", type=positive_int, default=10, help="federated rounds")
    parser.add_argument("--epsilon", type=positive_float, default=8.0,
                        help="epsilon each node may spend in this run (sets the DP-SGD noise multiplier)")
    parser.add_argument("--max-epsilon", type=positive_float, default=None,
                        help="each node's lifetime budget on its data; rounds that would exceed it are declined "
                             "(default: --epsilon; a deployed node's own --max-epsilon always wins)")
    parser.add_argument("--delta", type=positive_float, default=1e-5, help="DP delta; must be < 1/(records per node)")
    parser.add_argument("--no-dp", action="store_true", help="train without differential privacy (for comparison)")
    parser.add_argument("--max-grad-norm", type=positive_float, default=1.0, help="DP-SGD per-sample clipping norm C")
    parser.add_argument("--clipping", choices=CLIPPING_MODES, default="flat",
                        help="DP-SGD per-sample clipping: flat, g*min(1, C/||g||) (Abadi et al. 2016), or automatic, "
                             "g*C/(||g||+0.01) (Bu et al. 2023: every gradient normalised, less sensitive to C); "
                             "both bound each record by C, so the noise and epsilon are the same")
    parser.add_argument("--local-epochs", type=positive_int, default=1, help="passes over local data per round")
    parser.add_argument("--batch-size", type=batch_size_arg, default=None,
                        help="(expected, under Poisson sampling) batch size; 0: full batch (sampling rate 1, DP "
                             "gradient descent). Default: the model's measured setting, 0 for the linear heads (linear, "
                             "linear-pool3, ngram-sqrt, ngram-linear), 64 for the others")
    parser.add_argument("--lr", type=positive_float, default=None,
                        help="learning rate (default: per model for sgd, e.g. 0.5 cnn/conv under DP, 0.05 without, "
                             "8 for the linear heads (linear, linear-pool3, ngram-sqrt, ngram-linear, ngram-wordchar); "
                             "0.002 for adam)")
    parser.add_argument("--optimizer", choices=("sgd", "adam"), default="sgd")
    parser.add_argument("--momentum", type=float, default=0.0,
                        help="SGD momentum (0 by default: under DP-SGD momentum amplified the clipping bias here)")
    parser.add_argument("--proximal-mu", type=float, default=0.0,
                        help="FedProx (Li et al. 2020): each node's local objective gains mu/2 ||w - w_global||^2; "
                             "under DP-SGD its gradient is added after clipping and noise, so epsilon is unchanged "
                             "(0: FedAvg)")
    parser.add_argument("--activation", choices=("tanh", "relu"), default="tanh",
                        help="hidden activation (tanh suits DP-SGD: Papernot et al. 2021)")
    parser.add_argument("--model", default=None,
                        help="model name (vision: linear-pool3, linear, cnn, scatter-cnn; speech: linear, conv, conv-lstm, conv-gru; "
                             "text: ngram-sqrt, ngram-linear, ngram-wordchar, conv, lstm, gru). Default: the first named, measured best under DP "
                             "(speech: conv when --audio-features logmel; vision: cnn when --image-features pixels); every flag left unset then takes that "
                             "model's measured setting (shared_models.recipes), written into the run's config")
    parser.add_argument("--audio-features", choices=AUDIO_FEATURES, default=None,
                        help="speech: what each clip becomes, log-mel frames or wavelet scattering coefficients "
                             "(kymatio Scattering1D, 336 per clip, for --model linear); fixed per clip, nothing "
                             "learnt from the data; every node follows the run. Default: scattering for speech "
                             "linear, logmel otherwise")
    parser.add_argument("--image-features", choices=IMAGE_FEATURES, default=None,
                        help="vision: what each image becomes, its pixels or wavelet scattering maps (kymatio "
                             "Scattering2D J=2 L=8: 81 maps per channel at a quarter of the size, each image "
                             "standardised by its own values; for --model linear-pool3, linear or scatter-cnn); fixed per image, "
                             "nothing learnt from the data; every node follows the run. Default: scattering for "
                             "vision linear-pool3, linear and scatter-cnn, pixels otherwise")
    parser.add_argument("--val-fraction", type=float, default=0.1,
                        help="share of each simulated node's records kept for validation (chosen by record content); "
                             "a deployed node keeps the share its owner set with `fedpriv node --val-fraction`")
    parser.add_argument("--max-records-per-group", type=int, default=0, metavar="M",
                        help="user-level (patient-level) DP-SGD: use at most M records of a sampled group per step "
                             "(0: all); bounds compute, not privacy (each group is clipped as one unit)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None, help="run folder (default: runs/<dataset>-<time>)")
    parser.add_argument("--resume", type=Path, default=None, metavar="RUN_DIR",
                        help="continue an interrupted run from its last complete round (other options are taken "
                             "from RUN_DIR/config.json)")
    parser.add_argument("--round-timeout", type=positive_float, default=3600.0,
                        help="seconds the server waits for a round's replies (a node later than that counts as failed)")
    parser.add_argument("--aggregation", choices=AGGREGATIONS, default="fedavg",
                        help="how the server combines updates it sees one by one (needs --no-secagg for all but "
                             "fedavg): fedavg (weighted mean), median, trimmed-mean (--trim-fraction cut at each end), "
                             "krum (f = --corrupt-fraction of the round's nodes assumed Byzantine)")
    parser.add_argument("--trim-fraction", type=float, default=0.2,
                        help="--aggregation trimmed-mean: share of the values cut at each end, per coordinate")
    post = parser.add_argument_group("server post-processing (costs no privacy: computed from the released "
                                     "aggregates alone)")
    post.add_argument("--server-optimizer", choices=SERVER_OPTIMIZERS, default=None,
                      help="how the server steps along each round's pseudo-gradient (aggregate - global model), "
                           "whatever produced the aggregate (FedAvg, a robust rule, the SecAgg+ mean): fedavg (take "
                           "the aggregate), fedavgm (Hsu et al. 2019), fedadam, fedyogi (Reddi et al. 2021). "
                           "Default: the model's measured setting, fedavgm for speech linear, fedavg for the others")
    post.add_argument("--server-lr", type=positive_float, default=None,
                      help="server learning rate eta (default 1.0 for fedavg/fedavgm, 0.01 for fedadam/fedyogi, "
                           "which move each coordinate by up to about eta a round)")
    post.add_argument("--server-momentum", type=float, default=0.9,
                      help="beta1: fedavgm's momentum, fedadam/fedyogi's first-moment decay, in [0, 1)")
    post.add_argument("--server-beta2", type=float, default=0.99,
                      help="fedadam/fedyogi's second-moment decay beta2, in [0, 1)")
    post.add_argument("--server-tau", type=positive_float, default=1e-3,
                      help="fedadam/fedyogi's adaptivity tau (added to sqrt(v); v starts at tau^2)")
    post.add_argument("--ema-decay", type=float, default=None, metavar="D",
                      help="keep an exponential moving average of the global model, ema = D*ema + (1-D)*global "
                           "after each aggregated round (starting from the first), and evaluate and release it "
                           "(final_model.pt); in [0, 1), 0: off. Default: the model's measured setting, 0.9 for "
                           "speech linear, 0 for the others")
    # Not post-processing: a release of its own, inside each node's epsilon.
    parser.add_argument("--label-count-share", type=float, default=None, metavar="S",
                        help="logit adjustment (Menon et al. 2021): each node releases its label counts once per "
                             "run with Gaussian noise sized to take share S of its RDP at full batch (DP-SGD's "
                             "noise is calibrated around it, so the node's epsilon is unchanged; none under "
                             "client-level noise), and the released model's logits are shifted by -log(class "
                             "prior) for balanced error; in [0, 0.5], 0: off. Default: the model's measured "
                             "setting (0.05 for vision linear-pool3, the default; 0 for the others)")
    local = parser.add_argument_group("local data formats (when --dataset is a path)")
    add_local_data_options(local)
    parser.add_argument("--track", choices=TRACKERS, default=None,
                        help="also log the config, per-round metrics and every node's epsilon to TensorBoard event "
                             "files in RUN_DIR/tensorboard, or to a local MLflow store RUN_DIR/mlflow.db (experiment "
                             "fedpriv, run named after RUN_DIR); needs tensorboard or mlflow-skinny: "
                             "pip install 'fedpriv[track]'")
    sec = parser.add_argument_group("secure aggregation (SecAgg+) and client-level DP")
    sec.add_argument("--secagg", action=argparse.BooleanOptionalAction, default=True,
                     help="aggregate with SecAgg+: the server sees only the sum of the nodes' updates")
    sec.add_argument("--num-shares", type=int, default=0,
                     help="SecAgg+ neighbourhood size k, self included (>= clients: everyone shares with everyone; "
                          "0: the sparsest that meets Bell et al.'s bounds for the corrupt and dropout fractions)")
    sec.add_argument("--threshold", type=int, default=0,
                     help="SecAgg+ reconstruction threshold t (0: the least that meets the bounds; a set value "
                          "below them is refused)")
    sec.add_argument("--corrupt-fraction", type=float, default=DEFAULT_CORRUPT_FRACTION,
                     help="SecAgg+: fraction of a round's nodes that may collude with a lying server; k and t are "
                          "sized so they learn nothing beyond the sum of the honest nodes")
    sec.add_argument("--dropout-fraction", type=float, default=DEFAULT_DROPOUT_FRACTION,
                     help="SecAgg+: fraction of a round's nodes that may drop without failing the round")
    sec.add_argument("--clip-norm", type=positive_float, default=None,
                     help="L2 clip C of each node's model update; required with --client-noise-multiplier > 0 "
                          f"(see update_norms in metrics.jsonl of a run without client-level noise). Without client-level noise the default {UNCLIPPED_NORM:g} "
                          "never binds and only bounds the SecAgg+ encoding")
    sec.add_argument("--client-noise-multiplier", type=float, default=0.0,
                     help="sigma of the distributed client-level Gaussian: the sum carries noise std >= sigma*C "
                          "(useful with hundreds of nodes; with 5 nodes sigma=0.03 already destroyed accuracy here)")
    sec.add_argument("--client-delta", type=positive_float, default=1e-5, help="client-level DP delta")
    sec.add_argument("--colluding-nodes", type=int, default=-1,
                     help="surviving nodes that may collude with the server against client-level DP: each node's "
                          "share of the client-level noise is sized so that the others alone carry sigma*C "
                          "(-1, and any value above: threshold - 1, the most SecAgg+ tolerates)")


def resolved_training_options(args: argparse.Namespace, task: str) -> dict:
    """The model and the settings that follow from it, for the flags the user left unset (None).

    Returns {"model", "audio_features", "image_features", "batch_size", "server_optimizer", "ema_decay", "lr",
    "label_count_share"}:
    the user's value where set, else the model's measured setting (`shared_models.recipes`).
    """
    model = args.model or recommended_model(task, args.audio_features, args.image_features)
    recipe = recipe_for(task, model)
    dp = not args.no_dp
    return {
        "model": model,
        "audio_features": args.audio_features or recipe.audio_features,
        "image_features": args.image_features or recipe.image_features,
        "batch_size": recipe.batch_size if args.batch_size is None else args.batch_size,
        "server_optimizer": args.server_optimizer or recipe.server_optimizer,
        "ema_decay": recipe.ema_decay if args.ema_decay is None else args.ema_decay,
        "lr": args.lr if args.lr is not None else default_lr(task, model, args.optimizer, dp=dp),
        "label_count_share": (recipe.label_count_share if getattr(args, "label_count_share", None) is None
                              else args.label_count_share),
    }


def check_training_args(args: argparse.Namespace, nodes: int, nodes_label: str = "--clients") -> str:
    """Range-check the shared training options for a federation of `nodes`; returns the task.

    nodes_label: how error messages name the node count (a flag, or the kit's nodes).
    Raises ValueError naming the flag.
    """
    task = dataset_task(args.dataset, args.task)
    if args.model and args.model not in model_names(task):
        raise ValueError(f"--model for task {task!r} must be one of {model_names(task)}, got {args.model!r}")
    if args.secagg and nodes < 2:
        raise ValueError("secure aggregation needs at least 2 clients (or use --no-secagg)")
    if args.secagg:
        if args.num_shares < 0 or args.threshold < 0:
            raise ValueError(f"--num-shares and --threshold must be >= 0 (0: from the bounds), got "
                             f"{args.num_shares}, {args.threshold}")
        try:
            parameters_for(nodes, args.num_shares, args.threshold, args.corrupt_fraction, args.dropout_fraction)
        except SecAggParameterError as err:
            raise ValueError(f"--num-shares/--threshold/--corrupt-fraction/--dropout-fraction for {nodes} nodes "
                             f"({nodes_label}): {err}") from err
    if args.client_noise_multiplier < 0:
        raise ValueError(f"--client-noise-multiplier must be >= 0, got {args.client_noise_multiplier}")
    low, high = MAX_GRAD_NORM_RANGE
    if not low <= args.max_grad_norm <= high:
        raise ValueError(f"--max-grad-norm must be in [{low:g}, {high:g}] (nodes refuse others), got {args.max_grad_norm}")
    if not args.no_dp and args.epsilon > MAX_EPSILON_PER_RUN:
        raise ValueError(f"--epsilon must be at most {MAX_EPSILON_PER_RUN:g} (nodes refuse more), got {args.epsilon}")
    if args.client_noise_multiplier > 0 and args.client_delta >= 1.0 / nodes:
        raise ValueError(f"--client-delta must be < 1/{nodes_label} = {1.0 / nodes:.3g}, got {args.client_delta:g}")
    if not 0 <= args.proximal_mu < float("inf"):
        raise ValueError(f"--proximal-mu must be a finite number >= 0, got {args.proximal_mu}")
    if args.secagg and args.aggregation != "fedavg":
        raise ValueError(f"--aggregation {args.aggregation} needs each node's update in the clear, but with SecAgg+ "
                         "(on by default) the server sees only their sum: add --no-secagg, or keep fedavg, where "
                         "--clip-norm bounds each node's influence on the sum")
    if args.track:
        try:
            check_tracker(args.track)
        except TrackingUnavailable as err:
            raise ValueError(str(err)) from err
    if not 0.0 <= args.trim_fraction < 0.5:
        raise ValueError(f"--trim-fraction must be in [0, 0.5), got {args.trim_fraction}")
    for flag, value in (("--server-momentum", args.server_momentum), ("--server-beta2", args.server_beta2),
                        ("--ema-decay", resolved_training_options(args, task)["ema_decay"])):
        if not 0.0 <= value < 1.0:
            raise ValueError(f"{flag} must be in [0, 1), got {value}")
    share = resolved_training_options(args, task)["label_count_share"]
    if not 0.0 <= share <= MAX_LABEL_COUNT_SHARE:
        raise ValueError(f"--label-count-share must be in [0, {MAX_LABEL_COUNT_SHARE:g}] (0: off), got {share}")
    if args.colluding_nodes < -1:
        raise ValueError(f"--colluding-nodes must be -1 (threshold - 1) or >= 0, got {args.colluding_nodes}")
    if args.client_noise_multiplier > 0 and args.clip_norm is None:
        raise ValueError("--client-noise-multiplier needs an explicit --clip-norm: the noise std is sigma*C, so C "
                         "should sit near the nodes' update norms (update_norms in metrics.jsonl of a run without client-level "
                         "noise)")
    return task


def run_folder_for(args: argparse.Namespace) -> Path:
    """--out, or runs/<dataset>-<time> (absolute)."""
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    return (args.out or Path("runs") / f"{Path(args.dataset).name}-{stamp}").resolve()


def training_run_config(args: argparse.Namespace, task: str, out: Path) -> dict:
    """The run-config keys (pyproject's [tool.flwr.app.config]) set by the shared training options."""
    chosen = resolved_training_options(args, task)
    return {
        "task": task,
        "dataset": args.dataset if args.dataset in DATASET_TASKS else str(Path(args.dataset).resolve()),
        "model": chosen["model"],
        "num-server-rounds": args.rounds,
        "local-epochs": args.local_epochs,
        "batch-size": chosen["batch_size"],
        "lr": chosen["lr"],
        "optimizer": args.optimizer,
        "momentum": args.momentum,
        "proximal-mu": args.proximal_mu,
        "activation": args.activation,
        "dp": not args.no_dp,
        "epsilon": args.epsilon,
        "max-epsilon": args.max_epsilon or args.epsilon,
        "delta": args.delta,
        "max-grad-norm": args.max_grad_norm,
        "clipping": args.clipping,
        "val-fraction": args.val_fraction,
        "seed": args.seed,
        "run-name": out.name,
        "data-dir": str(data_dir().resolve()),
        "round-timeout": args.round_timeout,
        "secagg": args.secagg,
        "num-shares": args.num_shares,
        "threshold": args.threshold,
        "corrupt-fraction": args.corrupt_fraction,
        "dropout-fraction": args.dropout_fraction,
        "clip-norm": args.clip_norm if args.clip_norm is not None else UNCLIPPED_NORM,
        "client-noise-multiplier": args.client_noise_multiplier,
        "client-delta": args.client_delta,
        "colluding-nodes": args.colluding_nodes,
        "aggregation": args.aggregation,
        "trim-fraction": args.trim_fraction,
        "server-optimizer": chosen["server_optimizer"],
        "server-lr": args.server_lr if args.server_lr is not None else DEFAULT_SERVER_LR[chosen["server_optimizer"]],
        "server-momentum": args.server_momentum,
        "server-beta2": args.server_beta2,
        "server-tau": args.server_tau,
        "ema-decay": chosen["ema_decay"],
        "label-count-share": chosen["label_count_share"],
        "track": args.track or "",
        "image-size": args.image_size or 0,
        "max-text-bytes": args.max_text_bytes,
        "csv-delimiter": args.csv_delimiter or "",
        "max-records-per-group": args.max_records_per_group,
        "group-column": args.group_column or "",
        "group-manifest": args.group_manifest or "",
        "audio-features": chosen["audio_features"],
        "image-features": chosen["image_features"],
    }


def print_summary(summary: dict, out: Path, console: Console, role: str = "simulation") -> None:
    """Print the run's headline, its privacy ledger table, refusals and declines, and the run folder.

    role: "simulation" (`fedpriv simulate`: the reader owns the simulated nodes) or
    "coordinator" (`fedpriv run`: the reader cannot change a site's budget or ledger); it
    decides the advice printed for declined rounds.
    """
    final = summary["final"]
    line = f"final test accuracy {final['test_accuracy']:.4f} (majority class {summary['majority_class_rate']:.4f})"
    if "test_balanced_accuracy" in final:
        line += f", balanced accuracy {final['test_balanced_accuracy']:.4f}"
    if "test_auc" in final:
        line += f", AUC {final['test_auc']:.4f}"
    console.print(f"[bold]{line}[/bold] after {summary['rounds_completed']} rounds")
    table = Table(title="privacy ledger (DP per node, per its privacy unit)")
    for col in ("node", "epsilon", "per", "delta", "budget", "rounds trained", "declined", "refused", "failed"):
        table.add_column(col)
    for node, c in summary["clients"].items():
        table.add_row(
            node,
            "-" if c["epsilon"] is None else f"{c['epsilon']:.3f}",
            c.get("privacy_unit") or "-",
            "-" if c["delta"] is None else f"{c['delta']:g}",
            "-" if c["max_epsilon"] is None else f"{c['max_epsilon']:g}",
            str(len(c["rounds_trained"])),
            ",".join(map(str, c["declined_rounds"])) or "-",
            ",".join(map(str, c.get("refused_rounds", []))) or "-",
            ",".join(map(str, c["failed_rounds"])) or "-",
        )
    console.print(table)
    for node, reason in sorted({(r["node"], r["reason"]) for r in summary.get("refusals", [])}):
        console.print(f"[yellow]{node} refused: {reason}[/yellow]")
    declined = sorted({n for n, c in summary["clients"].items() if c["declined_rounds"]})
    if declined and role == "coordinator":
        console.print(
            f"[yellow]{len(declined)} site(s) declined rounds ({', '.join(declined)}): training further would have "
            "passed their lifetime budget (each site's own --max-epsilon, kept in its ledger across runs). Only a "
            "site's owner can raise it; a later run with a smaller --epsilon spends less of what is left.[/yellow]"
        )
    elif declined:
        console.print(
            f"[yellow]{len(declined)} node(s) declined rounds: training further would have passed their max-epsilon. "
            "Their ledgers persist across runs (the budget belongs to the data); use a fresh --state-dir "
            "to simulate new data owners, or raise --max-epsilon.[/yellow]"
        )
    written = [name for name in ("summary.json", "metrics.jsonl", "ledger.json", "report.md", "report.html",
                                 "final_model.pt", "final_model.pt2") if (Path(out) / name).exists()]
    console.print(f"run folder: {out} ({', '.join(written)})")
