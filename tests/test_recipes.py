"""Issue 14: the CLIs' recommended models and their measured settings, and full-batch DP-SGD.

What is checked, on the real code paths:
- `fedpriv simulate` on speech trains `linear` on scattering features with full batch, lr 8,
  FedAvgM and an EMA 0.9 unless told otherwise; every flag the user sets wins; the resolved
  values are written into the run-config (a run folder says what it trained) and parse;
- vision trains `linear-pool3` on scattering maps with the same settings (`linear` on the full
  maps keeps them; the cnn on pixels when pixels are asked for), text `ngram-sqrt` with full
  batch, FedAvgM and an EMA 0.5 (`ngram-linear` keeps its EMA 0.9);
- batch size 0 (full batch) uses every record in every step, one step per epoch, with or
  without DP, and the node's noise is calibrated at sampling rate 1: its epsilon, computed
  independently (the Gaussian mechanism's RDP alpha/(2 sigma^2) per step, Mironov 2017,
  converted by Balle et al. 2020), meets the budget.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from client.node_training import plan_noise
from privacy.dp_sgd import FULL_BATCH, LocalTrainingSession, poisson_sample_rate, steps_per_epoch
from privacy.secret_randomness import SecretRandom
from shared_models.records import LabeledArrays
from shared_models.run_config import ConfigError, TrainingPlan
from simulations.cli import build_parser
from simulations.cli_options import check_training_args, training_run_config

CPU = torch.device("cpu")


def _run_config(tmp_path, *argv: str) -> dict:
    args = build_parser().parse_args(["simulate", "--no-secagg", *argv])
    task = check_training_args(args, 6)
    return {**training_run_config(args, task, tmp_path / "run"), "partition": "iid", "alpha": 0.5}


def test_speech_defaults_to_the_scattering_linear_recipe_and_writes_it_into_the_run_config(tmp_path):
    cfg = _run_config(tmp_path, "--dataset", "fsdd")
    assert (cfg["model"], cfg["audio-features"], cfg["batch-size"], cfg["lr"]) == ("linear", "scattering", 0, 8.0)
    assert (cfg["server-optimizer"], cfg["server-momentum"], cfg["ema-decay"]) == ("fedavgm", 0.9, 0.9)
    plan = TrainingPlan.from_run_config(cfg)
    assert (plan.model, plan.audio_features, plan.batch_size) == ("linear", "scattering", 0)


@pytest.mark.parametrize("argv, expected", [
    (["--batch-size", "32"], {"batch-size": 32, "model": "linear", "audio-features": "scattering"}),
    (["--ema-decay", "0"], {"ema-decay": 0.0, "server-optimizer": "fedavgm"}),
    (["--server-optimizer", "fedavg"], {"server-optimizer": "fedavg", "ema-decay": 0.9}),
    (["--lr", "2"], {"lr": 2.0, "batch-size": 0}),
    # log-mel frames asked for: the convolutional model and its settings.
    (["--audio-features", "logmel"], {"model": "conv", "batch-size": 64, "lr": 0.5, "server-optimizer": "fedavg",
                                      "ema-decay": 0.0}),
    (["--model", "conv"], {"model": "conv", "audio-features": "logmel", "batch-size": 64, "lr": 0.5}),
])
def test_every_flag_the_user_sets_wins_over_the_recipe(tmp_path, argv, expected):
    cfg = _run_config(tmp_path, "--dataset", "fsdd", *argv)
    assert {key: cfg[key] for key in expected} == expected
    TrainingPlan.from_run_config(cfg)  # a valid plan


def test_a_vision_scattering_model_brings_its_input_and_settings(tmp_path):
    cfg = _run_config(tmp_path, "--dataset", "pneumoniamnist", "--model", "linear")
    assert (cfg["image-features"], cfg["batch-size"], cfg["server-optimizer"], cfg["ema-decay"], cfg["lr"]) == \
        ("scattering", 0, "fedavgm", 0.9, 8.0)
    assert _run_config(tmp_path, "--dataset", "pneumoniamnist", "--model", "scatter-cnn")["image-features"] == "scattering"
    assert _run_config(tmp_path, "--dataset", "pneumoniamnist", "--model", "linear", "--image-features",
                       "pixels")["image-features"] == "pixels"
    assert TrainingPlan.from_run_config(cfg).image_features == "scattering"


def test_vision_defaults_to_the_scattering_linear_recipe_and_pixels_bring_the_cnn(tmp_path):
    cfg = _run_config(tmp_path, "--dataset", "digits")
    assert (cfg["model"], cfg["image-features"], cfg["batch-size"], cfg["lr"], cfg["server-optimizer"],
            cfg["ema-decay"], cfg["label-count-share"]) == ("linear-pool3", "scattering", 0, 8.0, "fedavgm", 0.9, 0.05)
    assert TrainingPlan.from_run_config(cfg).label_count_share == 0.05
    assert _run_config(tmp_path, "--dataset", "digits", "--label-count-share", "0")["label-count-share"] == 0.0
    full_maps = _run_config(tmp_path, "--dataset", "digits", "--model", "linear")
    assert (full_maps["image-features"], full_maps["batch-size"], full_maps["ema-decay"],
            full_maps["label-count-share"]) == ("scattering", 0, 0.9, 0.0)
    pixels = _run_config(tmp_path, "--dataset", "digits", "--image-features", "pixels")
    assert (pixels["model"], pixels["image-features"], pixels["batch-size"], pixels["lr"], pixels["server-optimizer"],
            pixels["ema-decay"], pixels["label-count-share"]) == ("cnn", "pixels", 64, 0.5, "fedavg", 0.0, 0.0)
    assert _run_config(tmp_path, "--dataset", "digits", "--model", "cnn")["image-features"] == "pixels"


def test_text_defaults_to_full_batch_with_fedavgm_and_an_ema(tmp_path):
    cfg = _run_config(tmp_path, "--dataset", "sms_spam")
    assert (cfg["model"], cfg["batch-size"], cfg["lr"], cfg["server-optimizer"], cfg["ema-decay"],
            cfg["label-count-share"]) == ("ngram-sqrt", 0, 8.0, "fedavgm", 0.5, 0.0)
    counts = _run_config(tmp_path, "--dataset", "sms_spam", "--model", "ngram-linear")
    assert (counts["batch-size"], counts["lr"], counts["server-optimizer"], counts["ema-decay"]) == \
        (0, 8.0, "fedavgm", 0.9)
    conv = _run_config(tmp_path, "--dataset", "sms_spam", "--model", "conv")
    assert (conv["batch-size"], conv["server-optimizer"], conv["ema-decay"]) == (64, "fedavg", 0.0)
    TrainingPlan.from_run_config(cfg)


def test_a_negative_batch_size_is_refused_by_the_cli_and_by_a_node(tmp_path, capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["simulate", "--batch-size", "-1"])
    assert "0 for full batch" in capsys.readouterr().err
    cfg = _run_config(tmp_path, "--dataset", "digits")
    with pytest.raises(ConfigError, match="'batch-size' must be an integer >= 1, or 0 for full batch"):
        TrainingPlan.from_run_config({**cfg, "batch-size": -1})


def test_a_label_count_share_past_half_the_budget_is_refused_by_the_cli():
    args = build_parser().parse_args(["simulate", "--no-secagg", "--label-count-share", "0.6"])
    with pytest.raises(ValueError, match=r"--label-count-share must be in \[0, 0.5\] \(0: off\), got 0.6"):
        check_training_args(args, 6)


def _data(n: int = 12, dim: int = 5) -> LabeledArrays:
    rng = np.random.default_rng(3)
    x = rng.normal(size=(n, dim)).astype(np.float32) * 3.0  # per-sample gradients well above C = 1
    y = (np.arange(n) % 2).astype(np.int64)
    return LabeledArrays("vision", x, y, ["a", "b"], [f"r{i}" for i in range(n)])


def _by_hand_full_batch_step(model: nn.Module, data: LabeledArrays, clip: float | None) -> torch.Tensor:
    """w - lr * mean over ALL records of each record's gradient (clipped to `clip` if given), lr = 1."""
    params = list(model.parameters())
    total = [torch.zeros_like(p) for p in params]
    for i in range(len(data)):
        loss = nn.functional.cross_entropy(model(torch.from_numpy(data.x[i:i + 1])), torch.from_numpy(data.y[i:i + 1]))
        grads = torch.autograd.grad(loss, params)
        norm = torch.sqrt(sum((g ** 2).sum() for g in grads))
        scale = min(1.0, clip / float(norm)) if clip is not None else 1.0
        total = [t + scale * g for t, g in zip(total, grads)]
    return torch.cat([(p - t / len(data)).detach().flatten() for p, t in zip(params, total)])


@pytest.mark.parametrize("dp", [True, False])
def test_full_batch_uses_every_record_in_one_step_per_epoch(dp):
    data = _data()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 2))
    expected = _by_hand_full_batch_step(model, data, clip=1.0 if dp else None)
    session = LocalTrainingSession(model, data, batch_size=FULL_BATCH, lr=1.0, optimizer="sgd",
                                   noise_multiplier=0.0 if dp else None, max_grad_norm=1.0, device=CPU)
    assert session.steps_per_epoch == 1 and session.sample_rate == 1.0
    result = session.train_epochs(1, SecretRandom())
    assert result.steps == 1
    got = torch.cat([p.detach().flatten() for p in session.module.parameters()])
    assert torch.allclose(got, expected, atol=1e-5)


def _gaussian_epsilon(sigma: float, steps: int, delta: float) -> float:
    """(epsilon, delta) of `steps` Gaussian mechanisms without subsampling: RDP steps*alpha/(2 sigma^2)
    (Mironov 2017, Prop. 7), Balle et al. 2020's conversion, minimised over orders 1.01..256."""
    orders = np.concatenate([np.linspace(1.01, 10, 900), np.linspace(10, 256, 2000)])
    eps = steps * orders / (2 * sigma ** 2) + np.log((orders - 1) / orders) - (math.log(delta) + np.log(orders)) / (orders - 1)
    return float(eps.min())


def test_a_full_batch_nodes_noise_is_calibrated_at_sampling_rate_one(tmp_path):
    assert steps_per_epoch(500, FULL_BATCH) == 1 and poisson_sample_rate(500, FULL_BATCH) == 1.0
    plan = TrainingPlan.from_run_config(_run_config(tmp_path, "--dataset", "fsdd", "--rounds", "40",
                                                    "--local-epochs", "2", "--epsilon", "3"))
    sigma, q, steps = plan_noise(plan, 450, 1e-5)
    assert (q, steps) == (1.0, 2)
    epsilon = _gaussian_epsilon(sigma, 40 * 2, 1e-5)
    assert 2.85 <= epsilon <= 3.0 + 1e-6  # meets the budget, wasting little (Opacus searches to 0.01)


def _by_hand_automatic_step(model: nn.Module, data: LabeledArrays, clip: float, gamma: float) -> torch.Tensor:
    """w - mean over all records of C g_i / (||g_i|| + gamma) (Bu et al. 2023, eq. 3), lr = 1."""
    params = list(model.parameters())
    total = [torch.zeros_like(p) for p in params]
    for i in range(len(data)):
        loss = nn.functional.cross_entropy(model(torch.from_numpy(data.x[i:i + 1])), torch.from_numpy(data.y[i:i + 1]))
        grads = torch.autograd.grad(loss, params)
        norm = float(torch.sqrt(sum((g ** 2).sum() for g in grads)))
        total = [t + clip / (norm + gamma) * g for t, g in zip(total, grads)]
    return torch.cat([(p - t / len(data)).detach().flatten() for p, t in zip(params, total)])


def test_automatic_clipping_normalises_every_gradient_and_bounds_each_record_by_c():
    data = _data()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 2))
    # C = 50 is above every gradient's norm: flat clipping keeps them as they are, automatic
    # clipping scales each up to norm ~C.
    expected = _by_hand_automatic_step(model, data, clip=50.0, gamma=0.01)
    flat = _by_hand_full_batch_step(model, data, clip=50.0)
    session = LocalTrainingSession(model, data, batch_size=FULL_BATCH, lr=1.0, optimizer="sgd", noise_multiplier=0.0,
                                   max_grad_norm=50.0, device=CPU, clipping="automatic")
    session.train_epochs(1, SecretRandom())
    got = torch.cat([p.detach().flatten() for p in session.module.parameters()])
    assert torch.allclose(got, expected, atol=1e-4)
    assert (got - flat).abs().max() > 1.0  # not flat clipping
    # Sensitivity: one record's contribution to the clipped sum has norm < C, however large its gradient.
    one = LabeledArrays("vision", data.x[:1] * 1e6, data.y[:1], ["a", "b"], ["big"])
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 2))
    w0 = torch.cat([p.detach().flatten().clone() for p in model.parameters()])
    session = LocalTrainingSession(model, one, batch_size=FULL_BATCH, lr=1.0, optimizer="sgd", noise_multiplier=0.0,
                                   max_grad_norm=0.5, device=CPU, clipping="automatic")
    session.train_epochs(1, SecretRandom())
    moved = float((w0 - torch.cat([p.detach().flatten() for p in session.module.parameters()])).norm())
    assert 0.49 < moved < 0.5  # expected batch 1: the step is the record's contribution itself


def test_the_clipping_rule_reaches_the_plan_and_a_bad_one_is_refused(tmp_path):
    cfg = _run_config(tmp_path, "--dataset", "digits", "--clipping", "automatic")
    assert TrainingPlan.from_run_config(cfg).clipping == "automatic"
    assert TrainingPlan.from_run_config(_run_config(tmp_path, "--dataset", "digits")).clipping == "flat"
    with pytest.raises(ConfigError, match="'clipping' must be 'flat' or 'automatic'"):
        TrainingPlan.from_run_config({**cfg, "clipping": "adaptive"})
