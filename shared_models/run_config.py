"""The run-config schema: the coordinator's training plan, read identically by every node and the server.

`TrainingPlan.from_run_config` parses Flower's run-config (keys as in pyproject's
`[tool.flwr.app.config]`) and range-checks every value a node accepts; a node's own policy
(budget, delta, what it requires) is node-config, read in `client.config`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from shared_models.datasets.local import AUDIO_FEATURES, IMAGE_FEATURES, MAX_BYTES, TEXT_COLUMNS, LocalDataOptions


# Ranges a node accepts from the coordinator's run-config. Outside them DP-SGD's arithmetic
# breaks: a clipping norm near float32's denormals rounds clipped gradients above C (more
# spent than charged), and Opacus's noise search never ends for an epsilon near 1e15.
MAX_GRAD_NORM_RANGE = (1e-4, 1e4)
MAX_EPSILON_PER_RUN = 1e3
MAX_LABEL_COUNT_SHARE = 0.5  # at most half of a node's budget on its label counts: training keeps the rest

# DP-SGD's per-sample clipping rules a run may ask for (`privacy.dp_sgd.SecretNoiseDPOptimizer`).
CLIPPING_MODES = ("flat", "automatic")


# Vision models that take scattering maps (`image-features = "scattering"`), and those that take nothing else.
SCATTERING_IMAGE_MODELS = ("linear", "linear-pool3", "scatter-cnn")
SCATTERING_ONLY_MODELS = ("linear-pool3", "scatter-cnn")


class ConfigError(ValueError):
    """A run-config or node-config value is missing or out of range (message names the key)."""


def as_bool(value, where: str) -> bool:
    """A TOML boolean, or the strings "true"/"false"; anything else raises ConfigError naming `where`.

    (Python's bool("false") is True: a run-config string must never switch DP on or off by accident.)
    """
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "false"):
        return value.lower() == "true"
    raise ConfigError(f"{where} must be true or false, got {value!r}")


@dataclass(frozen=True)
class TrainingPlan:
    """The coordinator's training plan, identical on every node of a run."""

    task: str
    dataset: str
    model: str  # "" = DEFAULT_MODELS[task] (what "" always meant; the CLIs write the resolved name)
    activation: str  # "tanh" (DP-friendly default) or "relu"
    rounds: int
    local_epochs: int
    batch_size: int  # expected records (or groups) per DP-SGD step; 0 = full batch (privacy.dp_sgd.FULL_BATCH)
    lr: float
    optimizer: str
    momentum: float  # SGD momentum
    dp: bool
    epsilon: float  # what this run may spend per node: sets the noise multiplier
    delta: float
    max_grad_norm: float  # per-sample clipping norm C
    val_fraction: float
    partition: str
    alpha: float
    seed: int
    run_name: str
    data_dir: str  # folder of the named datasets ("" = default)
    canaries: int = 0  # simulation audit aid: canaries built, half inserted (privacy.audit.canaries)
    reproducible_noise: bool = False  # simulation only: noise derived from the seed (deployed nodes refuse)
    proximal_mu: float = 0.0  # FedProx's mu (0 = FedAvg's local objective); data-independent, costs no privacy
    # Format options for a `dataset` that is a local path (`LocalDataOptions`); named datasets ignore them.
    image_size: int = 0  # 0 = keep each image's size (a folder of mixed sizes is refused)
    max_text_bytes: int = MAX_BYTES
    csv_delimiter: str = ""  # "" = sniffed
    # Issue 19. A simulation aid: seeded pseudo-patients (1-8 records each) as group keys of a
    # named dataset without natural groups (`shared_models.datasets.synthetic_patients`).
    synthetic_patients: bool = False
    # User-level DP-SGD: at most this many records of a sampled group per step (0 = all); a
    # compute cap, not a privacy parameter (each group is clipped as one unit whatever its size).
    max_records_per_group: int = 0
    group_column: str = ""  # a text CSV's group-key column (patient-level DP); "" = none
    group_manifest: str = ""  # an image/audio folder's file,group CSV; "" = its groups.csv if any
    # Issue 14. What an audio clip becomes (`shared_models.datasets.audio.clip_features`): the
    # model's input, so every node takes it from the run, whatever its own format options.
    audio_features: str = "logmel"
    # Per-sample clipping of DP-SGD, "flat" or "automatic" (privacy.dp_sgd.CLIPPING_MODES): both
    # bound each unit's contribution by C, so a node's noise and epsilon do not depend on it.
    clipping: str = "flat"
    # What an image becomes (`shared_models.datasets.images.image_features`): likewise the run's.
    image_features: str = "pixels"
    # Logit adjustment (Menon et al., ICLR 2021): the share of each node's budget that its one
    # DP release of its label counts may take (`privacy.label_counts`); 0 = no release. The node
    # charges it to its ledger and calibrates DP-SGD around it, so epsilon stays the plan's.
    label_count_share: float = 0.0

    def data_options(self) -> LocalDataOptions:
        """The run's format options for a local-path dataset (the central test set, simulated nodes)."""
        return LocalDataOptions(image_size=self.image_size or None, max_text_bytes=self.max_text_bytes,
                                csv_delimiter=self.csv_delimiter or None, group_column=self.group_column or None,
                                group_manifest=self.group_manifest or None, audio_features=self.audio_features,
                                image_features=self.image_features)

    @classmethod
    def from_run_config(cls, cfg: dict) -> TrainingPlan:
        """Parse and range-check Flower's run-config. Raises ConfigError naming the key."""
        def get(key, kind):
            if key not in cfg:
                raise ConfigError(f"run-config is missing '{key}'")
            if kind is bool:
                return as_bool(cfg[key], f"run-config '{key}'")
            try:
                return kind(cfg[key])
            except (TypeError, ValueError) as err:
                raise ConfigError(f"run-config '{key}' must be {kind.__name__}, got {cfg[key]!r}") from err

        plan = cls(
            task=get("task", str),
            dataset=get("dataset", str),
            model=get("model", str),
            activation=str(cfg.get("activation", "tanh")),
            rounds=get("num-server-rounds", int),
            local_epochs=get("local-epochs", int),
            batch_size=get("batch-size", int),
            lr=get("lr", float),
            optimizer=get("optimizer", str),
            momentum=float(cfg.get("momentum", 0.0)),
            dp=get("dp", bool),
            epsilon=get("epsilon", float),
            delta=get("delta", float),
            max_grad_norm=get("max-grad-norm", float),
            val_fraction=get("val-fraction", float),
            partition=get("partition", str),
            alpha=get("alpha", float),
            seed=get("seed", int),
            run_name=get("run-name", str),
            data_dir=str(cfg.get("data-dir", "")),
            canaries=get("canaries", int) if "canaries" in cfg else 0,
            reproducible_noise=get("reproducible-noise", bool) if "reproducible-noise" in cfg else False,
            proximal_mu=get("proximal-mu", float) if "proximal-mu" in cfg else 0.0,
            image_size=get("image-size", int) if "image-size" in cfg else 0,
            max_text_bytes=get("max-text-bytes", int) if "max-text-bytes" in cfg else MAX_BYTES,
            csv_delimiter=get("csv-delimiter", str) if "csv-delimiter" in cfg else "",
            synthetic_patients=get("synthetic-patients", bool) if "synthetic-patients" in cfg else False,
            max_records_per_group=get("max-records-per-group", int) if "max-records-per-group" in cfg else 0,
            group_column=get("group-column", str) if "group-column" in cfg else "",
            group_manifest=get("group-manifest", str) if "group-manifest" in cfg else "",
            audio_features=get("audio-features", str) if "audio-features" in cfg else "logmel",
            clipping=get("clipping", str) if "clipping" in cfg else "flat",
            image_features=get("image-features", str) if "image-features" in cfg else "pixels",
            label_count_share=get("label-count-share", float) if "label-count-share" in cfg else 0.0,
        )
        checks = [
            (plan.rounds >= 1, "num-server-rounds", "an integer >= 1"),
            (plan.local_epochs >= 1, "local-epochs", "an integer >= 1"),
            (plan.batch_size >= 0, "batch-size", "an integer >= 1, or 0 for full batch"),
            (0 < plan.lr < math.inf, "lr", "a finite number > 0"),
            (plan.optimizer in ("sgd", "adam"), "optimizer", "'sgd' or 'adam'"),
            (0 <= plan.momentum < 1, "momentum", "in [0, 1)"),
            (plan.activation in ("tanh", "relu"), "activation", "'tanh' or 'relu'"),
            (not plan.dp or 0 < plan.epsilon <= MAX_EPSILON_PER_RUN, "epsilon", f"in (0, {MAX_EPSILON_PER_RUN:g}]"),
            (0 < plan.delta < 1, "delta", "in (0, 1)"),
            (MAX_GRAD_NORM_RANGE[0] <= plan.max_grad_norm <= MAX_GRAD_NORM_RANGE[1], "max-grad-norm",
             "in [%g, %g]" % MAX_GRAD_NORM_RANGE),
            (0 <= plan.val_fraction < 0.5, "val-fraction", "in [0, 0.5)"),
            (plan.canaries >= 0, "canaries", "an integer >= 0"),
            (0 <= plan.proximal_mu < math.inf, "proximal-mu", "a finite number >= 0"),
            (plan.image_size >= 0, "image-size", "an integer >= 0 (0: keep each image's size)"),
            (plan.max_text_bytes >= 1, "max-text-bytes", "an integer >= 1"),
            (len(plan.csv_delimiter) <= 1, "csv-delimiter", "one character, or empty to sniff it"),
            (plan.max_records_per_group >= 0, "max-records-per-group", "an integer >= 0 (0: all of a group's records)"),
            (not plan.group_column or plan.group_column.strip().lower() not in ("", *TEXT_COLUMNS), "group-column",
             "a column name other than 'text' and 'label', or empty for none"),
            (not plan.group_manifest or plan.group_manifest.strip(), "group-manifest",
             "a file path, or empty for none"),
            (plan.audio_features in AUDIO_FEATURES, "audio-features", "'logmel' or 'scattering'"),
            (plan.clipping in CLIPPING_MODES, "clipping", "'flat' or 'automatic'"),
            (plan.audio_features == "logmel" or plan.task == "speech", "audio-features",
             f"'logmel' (the default) for a {plan.task} task: audio features are for speech"),
            (plan.audio_features == "logmel" or plan.task != "speech" or plan.model == "linear", "audio-features",
             f"'logmel' for the speech model {plan.model or 'conv (the default)'!r}: scattering gives one frame of "
             "coefficients per clip, for model 'linear'"),
            (0 <= plan.label_count_share <= MAX_LABEL_COUNT_SHARE, "label-count-share",
             f"in [0, {MAX_LABEL_COUNT_SHARE:g}] (0: no label-count release)"),
            (plan.image_features in IMAGE_FEATURES, "image-features", "'pixels' or 'scattering'"),
            (plan.image_features == "pixels" or plan.task == "vision", "image-features",
             f"'pixels' (the default) for a {plan.task} task: image features are for vision"),
            (plan.image_features == "pixels" or plan.task != "vision" or plan.model in SCATTERING_IMAGE_MODELS,
             "image-features", f"'pixels' for the vision model {plan.model or 'cnn (the default)'!r}: scattering "
             f"gives 81 maps per channel at a quarter of the size, for models {', '.join(SCATTERING_IMAGE_MODELS)}"),
            (plan.image_features == "scattering" or plan.task != "vision" or plan.model not in SCATTERING_ONLY_MODELS,
             "image-features", f"'scattering' for the vision model {plan.model!r}: it is built for scattering maps"),
        ]
        for ok, key, expected in checks:
            if not ok:
                raise ConfigError(f"run-config '{key}' must be {expected}, got {cfg[key]!r}")
        return plan
