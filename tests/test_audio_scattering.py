"""Issue 14: the wavelet scattering front-end for speech and the linear head over it.

The features must be data-independent (a clip's row depends on that clip only), match an
independent computation (kymatio's NumPy front-end, normalised here by hand), and reach every
node as the run chose them, whatever the site's own format options.
"""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch

from shared_models import build_model, default_lr
from shared_models.datasets import load_audio_folder, load_fsdd
from shared_models.datasets.audio import SCATTER_SAMPLES, clip_features, scattering_features
from shared_models.datasets.local import LocalDataOptions
from shared_models.run_config import ConfigError


def _clips(seed: int = 0) -> list[np.ndarray]:
    """Three clips of different lengths: a chirp, a tone in noise, and one longer than the window."""
    rng = np.random.default_rng(seed)
    t = np.arange(4000) / 8000
    chirp = np.sin(2 * np.pi * (200 + 1500 * t) * t).astype(np.float32)
    tone = (0.3 * np.sin(2 * np.pi * 440 * np.arange(6000) / 8000) + 0.05 * rng.normal(size=6000)).astype(np.float32)
    long = rng.normal(size=SCATTER_SAMPLES + 3000).astype(np.float32) * 0.1
    return [chirp, tone, long]


def test_a_clips_scattering_row_depends_on_that_clip_only():
    clips = _clips()
    together = scattering_features(clips)
    assert together.shape == (3, 1, 336) and together.dtype == np.float32
    for i, clip in enumerate(clips):
        alone = scattering_features([clip])[0]
        np.testing.assert_allclose(alone, together[i], rtol=0, atol=1e-5)  # float32 FFTs of other batch sizes round apart
    # Other records changing (louder, more of them) leaves a clip's row unchanged.
    others = scattering_features([clips[0] * 10, *_clips(seed=5), clips[1]])
    np.testing.assert_allclose(others[-1], together[1], rtol=0, atol=1e-5)  # float32 FFTs of other batch sizes round apart
    np.testing.assert_allclose(np.linalg.norm(together[:, 0, :], axis=1), 1.0, rtol=1e-5)  # each row unit norm


def _per_order_by_hand(scatter, clip) -> np.ndarray:
    """(336,) kymatio's NumPy front-end on the zero-padded clip, log, each order centred and scaled
    to norm 1/sqrt(2) by the clip's own values."""
    padded = np.zeros(SCATTER_SAMPLES)
    padded[:min(len(clip), SCATTER_SAMPLES)] = clip[:SCATTER_SAMPLES]  # zero-padded or cut
    z = np.log(scatter(padded)[1:, 0] + 1e-6)  # orders 1 and 2; order 0 (the mean) dropped
    first, second = z[:76] - z[:76].mean(), z[76:] - z[76:].mean()  # 76 first-order coefficients
    return np.concatenate([first / np.linalg.norm(first), second / np.linalg.norm(second)]) / np.sqrt(2)


def test_scattering_rows_match_kymatios_numpy_front_end_normalised_by_hand(monkeypatch):
    from kymatio.scattering1d.frontend.numpy_frontend import ScatteringNumPy1D

    from shared_models.datasets import audio

    # A small synthetic reference set keeps the independent computation short; the code under
    # test standardises with whatever `synthetic_reference_clips` gives, as it does with 300.
    small = audio.synthetic_reference_clips(count=6, seed=3)
    monkeypatch.setattr(audio, "synthetic_reference_clips", lambda: small)
    audio.reference_statistics.cache_clear()
    try:
        rows = scattering_features(_clips())[:, 0, :]
    finally:
        audio.reference_statistics.cache_clear()
    scatter = ScatteringNumPy1D(J=8, shape=SCATTER_SAMPLES, Q=12, T=SCATTER_SAMPLES)
    reference = np.stack([_per_order_by_hand(scatter, clip) for clip in small])
    mean, std = reference.mean(axis=0), reference.std(axis=0)
    for clip, row in zip(_clips(), rows):
        z = (_per_order_by_hand(scatter, clip) - mean) / std
        np.testing.assert_allclose(row, z / np.linalg.norm(z), rtol=0, atol=5e-4)


def test_the_standardisation_constants_come_from_seeded_synthetic_clips_only():
    from shared_models.datasets import audio

    first, again = audio.synthetic_reference_clips(count=4), audio.synthetic_reference_clips(count=4)
    assert all(np.array_equal(a, b) for a, b in zip(first, again))  # fixed: the same on every node
    assert all(2000 <= len(c) < 8000 and np.abs(c).max() <= 1.0 for c in first)
    mean, std = audio.reference_statistics()
    assert mean.shape == std.shape == (336,) and (std > 0).all()


def test_feature_names_are_checked_and_logmel_is_unchanged():
    clips = _clips()[:2]
    from shared_models.datasets.audio import LogMelConfig, log_mel_frames

    np.testing.assert_array_equal(clip_features(clips, LogMelConfig(), "logmel")[1], log_mel_frames(clips[1], LogMelConfig()))
    with pytest.raises(ValueError, match="audio features must be one of"):
        clip_features(clips, LogMelConfig(), "mfcc")
    with pytest.raises(ValueError, match="8 kHz"):
        clip_features(clips, LogMelConfig(sample_rate=16000), "scattering")
    with pytest.raises(ValueError, match="audio features must be 'logmel' or 'scattering'"):
        LocalDataOptions(audio_features="mfcc")


def test_real_fsdd_files_and_an_audio_folder_give_scattering_rows(shared_data, tmp_path):
    folder = tmp_path / "fsdd"
    folder.mkdir()
    for name in ("3_george_0.wav", "3_george_7.wav", "8_theo_0.wav", "8_theo_7.wav"):
        shutil.copy(shared_data / "fsdd" / "recordings" / name, folder / name)
    splits = load_fsdd(folder, features="scattering")
    logmel = load_fsdd(folder)
    assert splits["train"].x.shape == (2, 1, 336) and splits["test"].x.shape == (2, 1, 336)
    assert splits["train"].record_ids == logmel["train"].record_ids  # the record is the clip, whatever its features
    by_class = tmp_path / "by_class"
    for label, digit in (("three", 3), ("eight", 8)):
        (by_class / label).mkdir(parents=True)
        for take in (0, 7):
            speaker = "george" if digit == 3 else "theo"
            shutil.copy(folder / f"{digit}_{speaker}_{take}.wav", by_class / label / f"{take}.wav")
    data = load_audio_folder(by_class, features="scattering")
    assert data.x.shape == (4, 1, 336) and data.classes == ["eight", "three"]


def test_the_linear_speech_head_averages_frames_and_trains_under_opacus():
    from opacus.validators import ModuleValidator

    model = build_model("speech", "linear", (1, 336), 10)
    assert ModuleValidator.validate(model, strict=False) == []
    assert sum(p.numel() for p in model.parameters()) == 336 * 10 + 10
    x = torch.randn(4, 3, 336)
    expected = x.mean(dim=1) @ model.linear.weight.T + model.linear.bias  # computed apart from forward()
    torch.testing.assert_close(model(x), expected)
    assert default_lr("speech", "linear", "sgd") == 8.0


def test_the_runs_audio_features_reach_a_deployed_node_whatever_its_own_options(tmp_path):
    from flwr.app import Context, RecordDict

    from client.config import node_identity
    from shared_models.run_config import TrainingPlan
    from simulations.cli import build_parser
    from simulations.cli_options import training_run_config

    args = build_parser().parse_args(["simulate", "--dataset", "fsdd", "--audio-features", "scattering",
                                      "--model", "linear"])
    cfg = {**training_run_config(args, "speech", tmp_path / "run"), "partition": "natural", "alpha": 0.5}
    assert cfg["audio-features"] == "scattering"
    plan = TrainingPlan.from_run_config(cfg)
    assert plan.audio_features == "scattering" and plan.data_options().audio_features == "scattering"
    context = Context(run_id=1, node_id=1, node_config={"data-path": str(tmp_path), "node-name": "site-a"},
                      state=RecordDict(), run_config=cfg)
    assert node_identity(context, plan).data_options.audio_features == "scattering"
    with pytest.raises(ConfigError, match="'audio-features' must be 'logmel' or 'scattering'"):
        TrainingPlan.from_run_config({**cfg, "audio-features": "mfcc"})
    with pytest.raises(ConfigError, match="'audio-features' must be 'logmel' \\(the default\\) for a vision task"):
        TrainingPlan.from_run_config({**cfg, "task": "vision", "dataset": "digits"})
    with pytest.raises(ConfigError, match="'audio-features' must be 'logmel' for the speech model 'conv"):
        TrainingPlan.from_run_config({**cfg, "model": ""})
