"""Recommended models and the training settings measured to suit each (issue 14).

`fedpriv simulate` and `fedpriv run` fill every flag a user leaves unset from here and write
the resolved values into the run-config, so a run folder always says what it trained (a
run-config's `model = ""` keeps its old meaning, `DEFAULT_MODELS`, for folders written before).
None of these settings touches a node's privacy: the node calibrates its noise to its own
budget whatever the batch size, and the server optimiser and EMA are post-processing.

Why these (benchmarks/README.md, FSDD 6 speaker nodes, per-node epsilon 1 / 3 / 8, delta 1e-5):
speech `linear` on wavelet scattering features, full-batch DP gradient descent, FedAvgM 0.9 and
an EMA 0.9 of the global model reached 0.47 / 0.70 / 0.79 (README's command, 3 runs each; 0.62
with 20 rounds instead of 40 at epsilon 1, where each step's noise is smaller) where
log-mel frames + `conv` (batch 32) reached 0.13 / 0.19 / 0.51-0.55 (Tramer & Boneh, ICLR 2021:
few trained parameters on good fixed features). Vision `linear` on Scattering2D maps with the
same settings: digits (README's main job, 5 nodes, epsilon 8, 10 rounds) 0.894 where `cnn` on
pixels reached 0.819; PneumoniaMNIST (README's command, 60 rounds, 3 runs each) AUC 0.89 / 0.94 /
0.96 where `cnn` reached 0.82 / 0.93 / 0.94 (benchmarks/results/vision_scattering.json); then
`linear-pool3` (each map pooled to 3 x 3) AUC 0.89 / 0.94 / 0.96 with accuracy 0.79 / 0.85 / 0.86
where `linear` had 0.79 / 0.84 / 0.83. Text
`ngram-linear` with the same full-batch settings: SMS Spam (README's command, 40 rounds, 3 runs
each) 0.917 / 0.947 / 0.962 where batch 64 and FedAvg reached 0.878 / 0.911 / 0.941; then
`ngram-sqrt` (square-rooted counts) with an EMA 0.5 0.923 / 0.969 / 0.977
(benchmarks/results/text_recipe.json).
"""

from __future__ import annotations

from dataclasses import dataclass

# What a CLI trains when --model is unset. Speech on log-mel frames (an explicit
# --audio-features logmel) gets the convolutional model, vision on pixels (an explicit
# --image-features pixels) the cnn: a linear head on raw frames or pixels is no recommendation.
RECOMMENDED_MODELS = {"vision": "linear-pool3", "speech": "linear", "text": "ngram-sqrt"}
RECOMMENDED_ON_LOGMEL = "conv"
RECOMMENDED_ON_PIXELS = "cnn"


@dataclass(frozen=True)
class Recipe:
    """Settings for the flags a user leaves unset, per (task, model).

    audio_features: speech input, "logmel" or "scattering" (`shared_models.datasets.audio`).
    image_features: vision input, "pixels" or "scattering" (`shared_models.datasets.images`).
    batch_size: expected records per DP-SGD step; 0 = full batch (sampling rate 1).
    server_optimizer: "fedavg", "fedavgm", "fedadam" or "fedyogi" (`server.server_optimizer`).
    ema_decay: D of the released global model's moving average, in [0, 1); 0 = off.
    label_count_share: share of each node's budget for its label-count release (logit
    adjustment, `privacy.label_counts`); 0 = off.
    """

    audio_features: str = "logmel"
    image_features: str = "pixels"
    batch_size: int = 64
    server_optimizer: str = "fedavg"
    ema_decay: float = 0.0
    label_count_share: float = 0.0


_RECIPES = {
    ("speech", "linear"): Recipe(audio_features="scattering", batch_size=0, server_optimizer="fedavgm", ema_decay=0.9),
    # PneumoniaMNIST, 5 Dirichlet(0.5) nodes (benchmarks/results/vision_scattering.json): test AUC
    # 0.92-0.95 / 0.95 / 0.96 at epsilon 1 / 3 / 8 where cnn on pixels reached 0.82 / 0.93 / 0.94
    # (accuracy at 0.5: 0.85 / 0.84-0.85 / 0.83 against 0.63 / 0.78 / 0.83); digits 0.894 vs 0.819.
    ("vision", "linear"): Recipe(image_features="scattering", batch_size=0, server_optimizer="fedavgm", ema_decay=0.9),
    # The same head on maps pooled to 3 x 3 (benchmarks/vision_pooling.py's lead). PneumoniaMNIST,
    # README's command (vision_scattering.json, 3 runs each): AUC 0.891 / 0.943 / 0.960, accuracy
    # 0.789 / 0.847 / 0.856 at epsilon 1 / 3 / 8 where `linear` on the full maps reached 0.892 /
    # 0.938 / 0.957 and 0.793 / 0.839 / 0.831. Digits' 2 x 2 maps are used as they are. Then with
    # each node's DP label counts (a 5% share of its RDP at full batch: DP-SGD's noise +2%) and the released model logit-adjusted for
    # balanced error (`labelcounts-*` rows): accuracy and balanced accuracy up by 0.03-0.07, see README.
    ("vision", "linear-pool3"): Recipe(image_features="scattering", batch_size=0, server_optimizer="fedavgm",
                                       ema_decay=0.9, label_count_share=0.05),
    ("vision", "scatter-cnn"): Recipe(image_features="scattering"),  # untuned: it only needs its input
    # SMS Spam, 5 Dirichlet(0.5) nodes, epsilon 3, SecAgg+ (benchmarks/results/text_recipe.json):
    # 0.963 (AUC 0.984) in 40 rounds where batch 64, 15 rounds x 2 local epochs, FedAvg reached 0.911.
    ("text", "ngram-linear"): Recipe(batch_size=0, server_optimizer="fedavgm", ema_decay=0.9),
    # The same head on square-rooted counts, EMA 0.5. SMS Spam, README's command (40 rounds, 3 runs
    # each; benchmarks/results/text_recipe.json): 0.923 / 0.969 / 0.977 at epsilon 1 / 3 / 8 where
    # ngram-linear with EMA 0.9 reached 0.917 / 0.947 / 0.962, and with EMA 0.5 - / 0.962 / 0.974:
    # most of the gain is the shorter EMA (0.9 still lags the last of 40 rounds), the rest the
    # square roots (in the pooled stand-in, text_features.json, they gain at epsilon 1 and 3).
    ("text", "ngram-sqrt"): Recipe(batch_size=0, server_optimizer="fedavgm", ema_decay=0.5),
}


def recommended_model(task: str, audio_features: str | None = None, image_features: str | None = None) -> str:
    """The model a CLI trains for `task` when the user names none; `audio_features` and
    `image_features` are the user's explicit choices, if any. Raises KeyError for an unknown task."""
    if task == "speech" and audio_features == "logmel":
        return RECOMMENDED_ON_LOGMEL
    if task == "vision" and image_features == "pixels":
        return RECOMMENDED_ON_PIXELS
    return RECOMMENDED_MODELS[task]


def recipe_for(task: str, model: str) -> Recipe:
    """The measured settings for `model` of `task` (the plain defaults for a model without its own)."""
    return _RECIPES.get((task, model), Recipe())
