"""What a node needs to know, read from Flower's run-config and node-config.

Run-config (the coordinator's, same for every node): the training plan
(`shared_models.run_config.TrainingPlan`).
Node-config (the data owner's, set when the SuperNode starts): where the data is, and the
site's privacy policy: its budget (`max-epsilon`, `delta`), whether DP and secure
aggregation are required, and the validation share it keeps out of training. Nothing in
the run-config can override the policy of a deployed node (DESIGN 3: the node is the trust
anchor); a run that breaks it is refused (`policy_refusal`). In a simulation the run-config
stands in for the owners of the simulated nodes.
"""

from __future__ import annotations

import dataclasses
import os
import re
from dataclasses import dataclass
from pathlib import Path

from flwr.app import Context

from privacy.secagg.identity import IdentityError, SigningIdentity, load_identity
from shared_models.datasets.local import LocalDataOptions
from shared_models.records import LabeledArrays
from shared_models.run_config import ConfigError, TrainingPlan, as_bool


GROUP_UNITS = ("patient", "user")  # names a site may give a group privacy unit (user-level DP-SGD)
PRIVACY_UNITS = ("auto", "record", *GROUP_UNITS)  # see NodeIdentity.privacy_unit

# A deployed node's policy when its node-config leaves a key out (`fedpriv node` always sets
# them): never the run-config's values, which the coordinator chooses.
DEFAULT_MAX_EPSILON = 8.0
DEFAULT_DELTA = 1e-5


@dataclass(frozen=True)
class NodeIdentity:
    """Who this node is and the policy its data owner set.

    max_epsilon: lifetime budget of the owner's data (sample-level epsilon at `delta`).
    require_dp / require_secagg: refuse runs that train without DP-SGD / rounds that would
    send the update without SecAgg+. val_fraction: share of the records kept out of
    training (chosen by record content, `client.node_training.split_validation`) whose
    metrics the node reports; 0 releases no validation metrics. privacy_unit: what the
    node's epsilon protects: "record", a group unit ("patient", "user": user-level DP-SGD,
    group keys required) or "auto" (a group unit when the data has group keys);
    `privacy_unit` resolves it against the data.
    """

    name: str
    state_dir: Path
    max_epsilon: float
    delta: float
    data_path: str | None  # None in simulation: data comes from the run's partition
    partition_id: int | None
    num_partitions: int | None
    require_dp: bool = True
    require_secagg: bool = True
    val_fraction: float = 0.0
    data_options: LocalDataOptions = LocalDataOptions()  # how the local files are read (deployment)
    privacy_unit: str = "record"


def default_state_dir() -> Path:
    """Per-user folder for node ledgers: $FEDPRIV_STATE_DIR or the platform's user state dir."""
    env = os.environ.get("FEDPRIV_STATE_DIR")
    if env:
        return Path(env).expanduser()
    from platformdirs import user_state_dir

    return Path(user_state_dir("fedpriv"))


def resolved_state_dir(state_dir: Path | None) -> Path:
    """The node's state folder, absolute: `state_dir` (a `--state-dir` value) or `default_state_dir()`."""
    return (state_dir or default_state_dir()).expanduser().resolve()


def add_state_view_options(parser, rows: str) -> None:
    """`--state-dir` and `--json` for the commands that show a node its own records (`fedpriv log`,
    `fedpriv ledger`); `rows` names what `--json` prints one line per."""
    parser.add_argument("--state-dir", type=Path, default=None,
                        help="the node's state folder (the `fedpriv node --state-dir`; default: the per-user one)")
    parser.add_argument("--json", action="store_true", help=f"print the {rows} as JSON lines instead of a table")


def node_identity(context: Context, plan: TrainingPlan) -> NodeIdentity:
    """Read the node's identity and policy from node-config (deployment) or the run (simulation).

    Deployment node-config keys: `data-path` (required), `node-name`, `task`, `max-epsilon`
    (default 8), `delta` (default 1e-5), `require-dp` and `require-secagg` (default true),
    `val-fraction` (default 0), `state-dir`, `privacy-unit` (default "auto": user-level
    when the data has group keys), and how the local files are read: `image-size`
    (0 = keep), `max-text-bytes` (default 200), `csv-delimiter` ("" = sniffed). Every one of
    them is the data owner's alone: a run-config value never stands in for a missing one, and the ledger folder is never the
    run-config's (a coordinator must not be able to point a node at a fresh ledger).
    Simulation: Flower sets `partition-id`/`num-partitions`; the run-config's `max-epsilon`,
    `delta`, `dp`, `secagg`, `val-fraction`, `state-dir` and `privacy-unit` (default
    "record") stand in for the data owner's.
    Raises ConfigError naming the key (also when the node's `task` is not the run's).
    """
    node_cfg, run_cfg = dict(context.node_config), dict(context.run_config)
    data_path = node_cfg.get("data-path")
    if data_path is None and "partition-id" not in node_cfg:
        raise ConfigError("node-config needs 'data-path' (deployment) or 'partition-id' (simulation)")
    if data_path is None:
        pid, n = int(node_cfg["partition-id"]), int(node_cfg["num-partitions"])
        name = f"node-{pid}"
    else:
        pid = n = None
        name = str(node_cfg.get("node-name", "node"))
        node_task = node_cfg.get("task")
        if node_task is not None and str(node_task) != plan.task:
            raise ConfigError(f"this node holds {node_task} data (node-config 'task'), but the run trains a {plan.task} "
                              "model (run-config 'task')")
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
        raise ConfigError(f"node-config 'node-name' must use letters, digits, '_', '.', '-' only, got {name!r}")
    if data_path is None:  # simulation: the researcher's run-config is the owners' policy
        max_eps = float(run_cfg.get("max-epsilon", 0.0) or plan.epsilon)
        delta, require_dp = plan.delta, plan.dp
        require_secagg = as_bool(run_cfg.get("secagg", False), "run-config 'secagg'")
        val_fraction = plan.val_fraction
        state = run_cfg.get("state-dir") or ""
        unit = str(run_cfg.get("privacy-unit", "record"))
    else:
        try:
            max_eps = float(node_cfg.get("max-epsilon", DEFAULT_MAX_EPSILON))
            delta = float(node_cfg.get("delta", DEFAULT_DELTA))
            val_fraction = float(node_cfg.get("val-fraction", 0.0))
        except (TypeError, ValueError) as err:
            raise ConfigError(f"node-config 'max-epsilon', 'delta' and 'val-fraction' must be numbers ({err})") from err
        require_dp = as_bool(node_cfg.get("require-dp", True), "node-config 'require-dp'")
        require_secagg = as_bool(node_cfg.get("require-secagg", True), "node-config 'require-secagg'")
        state = node_cfg.get("state-dir") or ""
        data_options = _data_options(node_cfg)
        unit = str(node_cfg.get("privacy-unit", "auto"))
    if data_path is None:
        data_options = plan.data_options()
    # What a clip or an image becomes is the run's model input (its shape), not a format of the site's files.
    data_options = dataclasses.replace(data_options, audio_features=plan.audio_features,
                                       image_features=plan.image_features)
    if not max_eps > 0:
        raise ConfigError(f"'max-epsilon' must be > 0, got {max_eps}")
    if not 0 < delta < 1:
        raise ConfigError(f"'delta' must be in (0, 1), got {delta}")
    if not 0 <= val_fraction < 0.5:
        raise ConfigError(f"'val-fraction' must be in [0, 0.5), got {val_fraction}")
    if unit not in PRIVACY_UNITS:
        raise ConfigError(f"'privacy-unit' must be one of {', '.join(PRIVACY_UNITS)}, got {unit!r}")
    return NodeIdentity(
        name=name,
        state_dir=Path(state).expanduser() if state else default_state_dir(),
        max_epsilon=max_eps,
        delta=delta,
        data_path=str(data_path) if data_path is not None else None,
        partition_id=pid,
        num_partitions=n,
        require_dp=require_dp,
        require_secagg=require_secagg,
        val_fraction=val_fraction,
        data_options=data_options,
        privacy_unit=unit,
    )


def privacy_unit(requested: str, data: LabeledArrays) -> str:
    """The unit the node's epsilon is about: "record", or the group unit the owner named.

    requested: the owner's `privacy-unit`: "record"; "patient"/"user" (group keys required);
    "auto": "user" when the records carry group keys, else "record". Raises ValueError for
    an unknown name, and for a group unit on data without group keys (the node refuses).
    """
    if requested not in PRIVACY_UNITS:
        raise ValueError(f"privacy-unit must be one of {list(PRIVACY_UNITS)}, got {requested!r}")
    if requested == "auto":
        return "record" if data.groups is None else "user"
    if requested in GROUP_UNITS and data.groups is None:
        raise ValueError(f"the site's privacy unit is '{requested}' but its data has no group keys (a CSV "
                         "--group-column, a --group-manifest or groups.csv beside image/audio folders, an .npz "
                         "'train_groups' array): refusing to train at record level")
    return requested


def _data_options(node_cfg: dict) -> LocalDataOptions:
    """node-config `image-size`, `max-text-bytes`, `csv-delimiter`, `group-column`, `group-manifest` ("" = none).

    Set by `fedpriv node`. Raises ConfigError.
    """
    try:
        image_size = int(node_cfg.get("image-size", 0))
        max_text_bytes = int(node_cfg.get("max-text-bytes", LocalDataOptions.max_text_bytes))
        delimiter = str(node_cfg.get("csv-delimiter", ""))
        group_column = str(node_cfg.get("group-column", ""))
        group_manifest = str(node_cfg.get("group-manifest", ""))
        return LocalDataOptions(image_size=image_size or None, max_text_bytes=max_text_bytes,
                                csv_delimiter=delimiter or None, group_column=group_column or None,
                                group_manifest=group_manifest or None)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"node-config 'image-size', 'max-text-bytes', 'csv-delimiter', 'group-column' or "
                          f"'group-manifest' is invalid ({err})") from err


def signing_identity(context: Context, node: NodeIdentity) -> SigningIdentity:
    """The node's SecAgg+ signing key and the federation's keyring (`privacy.secagg.identity`).

    Deployment: node-config `secagg-identity`, the node's kit folder (`fedpriv node` sets it);
    never the run-config's. Simulation: run-config `secagg-identities`/<node name>, written by
    the simulation runner. Raises ConfigError naming the key or the file.
    """
    if node.data_path is not None:
        folder = context.node_config.get("secagg-identity")
        key = "node-config 'secagg-identity'"
    else:
        base = context.run_config.get("secagg-identities")
        folder = Path(str(base)) / node.name if base else None
        key = "run-config 'secagg-identities'"
    if not folder:
        raise ConfigError(f"{key} is missing: SecAgg+ needs this node's signing key and the federation's keyring "
                          "(`fedpriv provision` writes them into each node kit)")
    try:
        return load_identity(Path(str(folder)), node.name)
    except IdentityError as err:
        raise ConfigError(f"{key}: {err}") from err


def policy_refusal(node: NodeIdentity, plan: TrainingPlan, secure: bool) -> str:
    """Why this node's policy refuses a round of `plan` (secure: sent through SecAgg+), or "".

    E.g. "DP is required by the site". The node replies with this reason and trains nothing.
    """
    reasons = []
    if node.data_path is not None and plan.reproducible_noise:
        reasons.append("reproducible noise is a simulation switch; a deployed node draws its noise from secret entropy")
    if node.require_dp and not plan.dp:
        reasons.append("DP is required by the site")
    if node.require_secagg and not secure:
        reasons.append("secure aggregation is required by the site")
    return "; ".join(reasons)
