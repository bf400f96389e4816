"""DP-SGD on the node: secret noise and sampling, and exactly the steps the ledger charges."""

import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from scipy import stats

from shared_models.datasets import load_digits_embedded
from privacy.dp_sgd import LocalTrainingSession, PoissonBatchSampler, poisson_sample_rate, steps_per_epoch
from privacy.secret_randomness import SecretRandom
from shared_models import build_model


def _session(train, sigma=1.0, batch=64):
    torch.manual_seed(0)
    model = build_model("vision", None, train.input_shape, train.num_classes)
    return LocalTrainingSession(model, train, batch_size=batch, lr=0.5, optimizer="sgd", noise_multiplier=sigma,
                                max_grad_norm=1.0, device=torch.device("cpu"))


def _flat(state):
    return torch.cat([v.reshape(-1) for v in state.values()])


def test_noise_and_sampling_come_from_the_nodes_secret_randomness_not_torchs_generator():
    train = load_digits_embedded()["train"].subset(np.arange(300))
    outcomes = []
    for key in (b"a" * 32, b"a" * 32, b"b" * 32, None, None):
        torch.manual_seed(123)  # what a run-config seed did before: it must not fix the noise
        randomness = SecretRandom(key) if key else None
        outcomes.append(_flat(_session(train).train_epochs(1, randomness).state))
    same_key, other_key, fresh_1, fresh_2 = outcomes[1], outcomes[2], outcomes[3], outcomes[4]
    assert torch.equal(outcomes[0], same_key)  # the draws are the key's, and only the key's
    for other in (other_key, fresh_1, fresh_2):
        assert not torch.equal(outcomes[0], other)
    assert not torch.equal(fresh_1, fresh_2)  # default: fresh OS entropy on every call


def test_the_noise_added_per_step_has_the_dp_sgd_standard_deviation():
    # All-zero inputs make every per-sample gradient of the first layer's weight zero, so
    # that weight moves by noise only: lr * N(0, (sigma*C)^2) / expected batch, per step.
    train = load_digits_embedded()["train"].subset(np.arange(256))
    train.x[:] = 0.0
    session = _session(train, sigma=2.0, batch=64)
    name = next(k for k in session.module.state_dict() if k.endswith("weight"))
    before = session.module.state_dict()[name].clone()
    result = session.train_epochs(1, SecretRandom(b"k" * 32))
    moved = (result.state[name] - before).reshape(-1).numpy().astype(np.float64)
    steps, expected_batch = steps_per_epoch(256, 64), 256 / steps_per_epoch(256, 64)
    expected_std = 0.5 * 2.0 * 1.0 / expected_batch * math.sqrt(steps)
    assert moved.std() == pytest.approx(expected_std, rel=0.1)
    assert abs(moved.mean()) < 4 * expected_std / math.sqrt(moved.size)
    # That noise is the key's: the same torch seed with another key moves the weight elsewhere,
    # the same key moves it identically.
    for key, same in ((b"k" * 32, True), (b"j" * 32, False)):
        torch.manual_seed(0)
        again = _session(train, sigma=2.0, batch=64)
        other = (again.train_epochs(1, SecretRandom(key)).state[name] - before).reshape(-1).numpy()
        assert np.array_equal(other, moved.astype(np.float32)) is same


def test_every_size_and_batch_runs_exactly_the_steps_charged():
    randomness = SecretRandom(b"s" * 32)
    opacus_short = 0
    for n in range(1, 5001):
        for b in (*range(1, 257), n - 1, n, n + 1, 2 * n):
            if b < 1:
                continue
            steps, q = steps_per_epoch(n, b), poisson_sample_rate(n, b)
            assert (steps - 1) * b < n <= steps * b and q == 1.0 / steps
            opacus_short += int(1 / q) != steps  # what Opacus's own Poisson loader would have run
    assert opacus_short > 0  # the float rounding the integer count avoids is real (e.g. 744 / 8)
    for n, b in ((744, 8), (1, 1), (5000, 3), (4999, 256), (37, 64)):
        steps = steps_per_epoch(n, b)
        sampler = PoissonBatchSampler(n, poisson_sample_rate(n, b), steps, randomness)
        batches = list(sampler)
        assert len(batches) == len(sampler) == steps
        assert all(len(ix) == len(set(ix.tolist())) and (len(ix) == 0 or 0 <= ix.min() and ix.max() < n) for ix in batches)
    # Batch sizes are Binomial(N, q): mean N*q over many steps.
    sizes = [len(ix) for ix in PoissonBatchSampler(1000, 0.05, 2000, randomness)]
    assert np.mean(sizes) == pytest.approx(50, rel=0.02)


def test_secret_randomness_draws_are_uniform_gaussian_and_unshared():
    r = SecretRandom()
    assert stats.kstest(r.uniform(100_000), "uniform").pvalue > 1e-4
    assert stats.kstest(r.standard_normal(100_000), "norm").pvalue > 1e-4
    g = r.gaussian(200_000, 3.0)
    assert g.std() == pytest.approx(3.0, rel=0.01) and stats.kstest(g / 3.0, "norm").pvalue > 1e-4
    assert not np.array_equal(SecretRandom().uniform(8), SecretRandom().uniform(8))
    keyed = SecretRandom(b"x" * 32)
    assert np.array_equal(keyed.uniform(8), SecretRandom(b"x" * 32).uniform(8))
    assert not np.array_equal(keyed.uniform(8), keyed.uniform(8))  # each call continues the stream
    # The values, from RFC 8439 ChaCha20 keystream words read independently here: the top 53 bits
    # of each little-endian 64-bit word times 2^-53; the second call takes the next nonce.
    from cryptography.hazmat.primitives.ciphers import Cipher, algorithms

    def stream(call, words):
        nonce = b"\0" * 4 + call.to_bytes(12, "little")
        raw = Cipher(algorithms.ChaCha20(b"y" * 32, nonce), mode=None).encryptor().update(bytes(8 * words))
        return [(int.from_bytes(raw[8 * i:8 * i + 8], "little") >> 11) / 2**53 for i in range(words)]

    fresh = SecretRandom(b"y" * 32)
    assert fresh.uniform(5).tolist() == stream(0, 5) and fresh.uniform(3).tolist() == stream(1, 3)
    with pytest.raises(ValueError, match="32 bytes"):
        SecretRandom(b"short")


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_a_forked_process_draws_a_stream_of_its_own():
    code = ("import os, sys; from privacy.secret_randomness import SecretRandom\n"
            "r = SecretRandom(b'f' * 32); r.uniform(1)\n"
            "pid = os.fork()\n"
            "sys.stdout.write(('child ' if pid == 0 else 'parent ') + r.uniform(4).tobytes().hex() + '\\n')\n"
            "sys.stdout.flush()\n"
            "os._exit(0) if pid == 0 else os.waitpid(pid, 0)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True).stdout
    draws = dict(line.split() for line in out.splitlines())
    assert draws["child"] != draws["parent"]


@pytest.mark.parametrize("sigma", [1.0, None], ids=["dp-sgd", "no-dp"])
def test_fedprox_adds_exactly_mu_times_the_distance_to_the_global_weights_after_clipping_and_noise(sigma):
    """FedProx (Li et al. 2020) under DP-SGD: the proximal gradient mu (w - w_global) depends on
    no record, so it is added after per-sample clipping and the secret noise. Expected value, by
    hand: from the same weights w = w_global + delta, with the same key (same Poisson batch, same
    noise), one SGD step with mu moves w by exactly -lr * mu * delta more than one without.

    Mutation checked: the term in the loss (before clipping): under DP Opacus's per-sample
    gradients never see it and the difference is 0; clipped with the records, it would be < mu * delta.
    """
    train = load_digits_embedded()["train"].subset(np.arange(40))
    lr, mu = 0.5, 0.3
    torch.manual_seed(7)
    global_state = build_model("vision", None, train.input_shape, train.num_classes).state_dict()
    delta = {k: torch.randn_like(v) * 0.05 for k, v in global_state.items()}
    after = {}
    for m in (0.0, mu):
        torch.manual_seed(0)
        model = build_model("vision", None, train.input_shape, train.num_classes)
        session = LocalTrainingSession(model, train, batch_size=40, lr=lr, optimizer="sgd", noise_multiplier=sigma,
                                       max_grad_norm=0.01, device=torch.device("cpu"), proximal_mu=m)
        session.load_global(global_state)  # anchors the proximal term at the global weights
        with torch.no_grad():  # a local model that has moved from the global one, as after some steps
            for name, p in session.module.named_parameters():
                p.add_(delta[name])
        torch.manual_seed(1)  # the no-DP batch order
        after[m] = session.train_epochs(1, SecretRandom(b"p" * 32) if sigma else None).state  # one step: N = B
    for name in global_state:
        expected = -lr * mu * delta[name]
        assert torch.allclose(after[mu][name] - after[0.0][name], expected, atol=1e-6), name
        assert expected.abs().max() > 1e-3  # large against the clipped (C = 0.01) gradient step


def test_fedprox_refuses_a_negative_mu_and_leaves_the_accounting_alone(tmp_path):
    train = load_digits_embedded()["train"].subset(np.arange(100))
    model = build_model("vision", None, train.input_shape, train.num_classes)
    with pytest.raises(ValueError, match="proximal mu must be finite and >= 0"):
        LocalTrainingSession(model, train, batch_size=20, lr=0.1, optimizer="sgd", noise_multiplier=1.0,
                             max_grad_norm=1.0, device=torch.device("cpu"), proximal_mu=-0.1)
    # Same steps seen by Opacus's accountant (at the same sampling rate) with and without the term.
    histories = []
    for m in (0.0, 1.0):
        model = build_model("vision", None, train.input_shape, train.num_classes)
        session = LocalTrainingSession(model, train, batch_size=20, lr=0.1, optimizer="sgd", noise_multiplier=1.0,
                                       max_grad_norm=1.0, device=torch.device("cpu"), proximal_mu=m)
        session.train_epochs(2, SecretRandom(b"q" * 32))
        histories.append(session.accountant.history)
    assert histories[0] == histories[1] == [(1.0, 0.2, 10)]
    # The run-config key, as a node reads it.
    from shared_models.run_config import ConfigError, TrainingPlan

    cfg = {"task": "vision", "dataset": "digits", "model": "", "num-server-rounds": 1, "local-epochs": 1,
           "batch-size": 8, "lr": 0.1, "optimizer": "sgd", "dp": True, "epsilon": 2.0, "delta": 1e-5,
           "max-grad-norm": 1.0, "val-fraction": 0.0, "partition": "iid", "alpha": 0.5, "seed": 0, "run-name": "t"}
    assert TrainingPlan.from_run_config(cfg).proximal_mu == 0.0
    assert TrainingPlan.from_run_config({**cfg, "proximal-mu": 0.01}).proximal_mu == 0.01
    with pytest.raises(ConfigError, match="'proximal-mu' must be a finite number >= 0"):
        TrainingPlan.from_run_config({**cfg, "proximal-mu": -1.0})
