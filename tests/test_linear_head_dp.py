"""The closed-form DP step of a linear head on fixed features (issue 14: the DP step of the
default speech/vision/text heads without materialised per-sample gradients).

- `clipped_linear_head_sums` equals the sum of per-record gradients clipped one by one, each
  computed by autograd on that record alone (independent of Opacus and of the closed form),
  for flat and automatic clipping, with records above and below C, and a record whose logits
  overflow contributes nothing;
- a session on the closed-form path trains to the same weights as Opacus's hooks with the same
  secret randomness (same Poisson batches, same noise), and its accountant counts the same
  noised steps, empty batches included;
- only a model whose sole trainable part is its `linear` over `features` takes that path: the
  cnn, a model with a trainable front-end, and user-level DP keep Opacus's hooks.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from opacus import GradSampleModule
from torch import nn

from privacy.dp_sgd import AUTOMATIC_CLIPPING_GAMMA, LocalTrainingSession, clipped_linear_head_sums, linear_head
from privacy.secret_randomness import SecretRandom
from shared_models import build_model
from shared_models.records import LabeledArrays

CPU = torch.device("cpu")


def _speech(n: int = 40, seed: int = 0) -> LabeledArrays:
    rng = np.random.default_rng(seed)
    # Scales from 0.05 to 5: some records' gradients far below C = 1, some far above.
    x = (rng.normal(size=(n, 3, 12)) * rng.uniform(0.05, 5.0, size=(n, 1, 1))).astype(np.float32)
    y = rng.integers(0, 4, size=n).astype(np.int64)
    return LabeledArrays("speech", x, y, ["a", "b", "c", "d"], [f"r{i}" for i in range(n)])


def _by_hand_clipped_sum(model: nn.Module, x: torch.Tensor, y: torch.Tensor, clip: float, rule: str):
    """Sum of each record's own cross-entropy gradient (autograd, one record at a time), scaled
    by min(1, C/(||g|| + 1e-6)) ("flat") or C/(||g|| + gamma) ("automatic"); a record whose
    gradient is not finite is left out."""
    params = [model.linear.weight, model.linear.bias]
    total = [torch.zeros_like(p) for p in params]
    for i in range(len(y)):
        loss = nn.functional.cross_entropy(model(x[i:i + 1]), y[i:i + 1])
        grads = torch.autograd.grad(loss, params)
        norm = float(torch.sqrt(sum((g ** 2).sum() for g in grads)))
        if not np.isfinite(norm):
            continue
        scale = min(1.0, clip / (norm + 1e-6)) if rule == "flat" else clip / (norm + AUTOMATIC_CLIPPING_GAMMA)
        total = [t + scale * g for t, g in zip(total, grads)]
    return total


@pytest.mark.parametrize("rule", ["flat", "automatic"])
def test_closed_form_clipped_sums_equal_per_record_clipping(rule):
    torch.manual_seed(0)
    model = build_model("speech", "linear", (3, 12), 4)
    data = _speech()
    x, y = torch.from_numpy(data.x), torch.from_numpy(data.y)
    with torch.no_grad():  # a lying coordinator's weights: one record's logits overflow
        x[7] *= 1e38
    weight, bias = clipped_linear_head_sums(model.features(x), model(x).detach(), y, 1.0, rule)
    expected_weight, expected_bias = _by_hand_clipped_sum(model, x, y, 1.0, rule)
    assert torch.isfinite(weight).all() and torch.isfinite(bias).all()
    torch.testing.assert_close(weight, expected_weight, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(bias, expected_bias, atol=1e-5, rtol=1e-4)
    # The data straddle C: without clipping the sum would differ.
    unclipped = _by_hand_clipped_sum(model, x, y, 1e9, "flat")
    assert (unclipped[0] - expected_weight).abs().max() > 0.1


def test_a_bad_clipping_name_is_refused():
    with pytest.raises(ValueError, match="clipping must be one of"):
        clipped_linear_head_sums(torch.zeros(2, 3), torch.zeros(2, 2), torch.zeros(2, dtype=torch.long), 1.0, "l1")


@pytest.mark.parametrize("task, model_name, shape, batch", [
    ("speech", "linear", (3, 12), 8),  # sampling rate 1/5: empty Poisson batches are likely too
    ("text", "ngram-linear", (16,), 10),
    ("text", "ngram-sqrt", (16,), 10),
    ("vision", "linear-pool3", (2, 7, 7), 10),
])
def test_closed_form_session_trains_like_opacus_hooks_with_the_same_randomness(task, model_name, shape, batch):
    if task == "speech":
        data = _speech()
    elif task == "vision":
        x = np.random.default_rng(2).normal(size=(40, 2, 7, 7)).astype(np.float32)
        data = LabeledArrays("vision", x, (np.arange(40) % 2).astype(np.int64), ["normal", "pneumonia"],
                             [f"r{i}" for i in range(40)])
    else:
        rng = np.random.default_rng(1)
        x = rng.integers(1, 257, size=(40, 16)).astype(np.int64)
        data = LabeledArrays("text", x, (np.arange(40) % 2).astype(np.int64), ["ham", "spam"],
                             [f"r{i}" for i in range(40)])
    classes = len(data.classes)
    torch.manual_seed(0)
    start = build_model(task, model_name, shape, classes).state_dict()
    weights, steps = {}, {}
    for mode in ("auto", "hooks"):
        model = build_model(task, model_name, shape, classes)
        model.load_state_dict(start)
        session = LocalTrainingSession(model, data, batch_size=batch, lr=0.5, optimizer="sgd", momentum=0.5,
                                       noise_multiplier=0.7, max_grad_norm=1.0, device=CPU,
                                       per_sample_gradients=mode)
        assert isinstance(session.model, GradSampleModule) == (mode == "hooks")  # the path under test
        result = session.train_epochs(3, SecretRandom(key=bytes(range(32))))
        weights[mode], steps[mode] = result.state, (result.steps, session.opacus_steps())
    for key in start:
        torch.testing.assert_close(weights["auto"][key], weights["hooks"][key], atol=2e-5, rtol=1e-4)
        assert (weights["auto"][key] - start[key]).abs().max() > 1e-3  # it trained
    assert steps["auto"] == steps["hooks"] == (3 * 5 if task == "speech" else 3 * 4,) * 2


class _TrainableFrontEnd(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(4))
        self.linear = nn.Linear(4, 2)

    def features(self, x):
        return x * self.scale

    def forward(self, x):
        return self.linear(self.features(x))


def test_only_a_linear_head_over_fixed_features_takes_the_closed_form():
    assert linear_head(build_model("speech", "linear", (3, 12), 4)) is not None
    assert linear_head(build_model("vision", "linear", (81, 7, 7), 2)) is not None
    assert linear_head(build_model("vision", "linear-pool3", (81, 7, 7), 2)) is not None
    assert linear_head(build_model("text", "ngram-wordchar", (16,), 2)) is not None
    assert linear_head(build_model("vision", "cnn", (1, 28, 28), 2)) is None
    assert linear_head(nn.Sequential(nn.Linear(5, 2))) is None
    assert linear_head(_TrainableFrontEnd()) is None
    # User-level DP: a group's mean gradient is not rank one, so Opacus's hooks.
    data = _speech(12)
    session = LocalTrainingSession(build_model("speech", "linear", (3, 12), 4), data, batch_size=2, lr=0.5,
                                   optimizer="sgd", noise_multiplier=1.0, max_grad_norm=1.0, device=CPU,
                                   groups=np.arange(12) % 4)
    assert isinstance(session.model, GradSampleModule)
    with pytest.raises(ValueError, match="per_sample_gradients must be one of"):
        LocalTrainingSession(build_model("speech", "linear", (3, 12), 4), data, batch_size=2, lr=0.5,
                             optimizer="sgd", noise_multiplier=1.0, max_grad_norm=1.0, device=CPU,
                             per_sample_gradients="ghost")
