"""Audio: WAV files -> per-utterance-normalised features: log-mel frames or wavelet scattering.

WAV decoding by `soundfile` (libsndfile), the mel filterbank and spectrogram by `librosa`.
Clips at another rate are resampled to the model's rate (`librosa.resample` with soxr's
high-quality filter), multi-channel clips downmixed to mono (the channels' mean); both
happen before the record id is computed, so a file gives the same record every time, and
both are counted in the data summary. A WAV whose header promises more samples than the
file holds (a cut-off copy) is refused, never trained on as its first part.
Defaults suit 8 kHz speech (FSDD): 32 ms windows (n_fft=256), 16 ms hop, 40 mel bands,
64 frames (1.02 s; 99% of FSDD utterances are shorter). Longer clips are truncated, shorter
ones zero-padded after normalisation (so padding is the utterance mean).
Wavelet scattering (`features="scattering"`, issue 14): kymatio's Scattering1D (J=8, Q=12,
averaged over T=8192 samples = 1.02 s at 8 kHz; orders 1 and 2, 76 + 260 = 336 coefficients),
log, then within each order each clip's coefficients centred and scaled to norm 1/sqrt(2) by
their own values (the two orders' very different log-magnitudes no longer set one scale for
both), then each coefficient standardised with fixed constants, the mean and std of the same
features over 300 seeded synthetic noise clips (`reference_statistics`: no record involved),
and the row scaled to unit norm by its own values: a fixed, data-independent front-end
(Tramer & Boneh, ICLR 2021; Anden & Mallat 2014) that needs only a small trained head. The
standardisation made gradient descent on the head converge faster
(`benchmarks/feature_standardisation.py`; features cache key `scattering-v3`).
Group keys (patient-level DP): FSDD's speaker, or an audio folder's manifest (`--group-manifest`
or `groups.csv`, `shared_models.datasets.local.read_group_manifest`).
"""

from __future__ import annotations

import functools
import hashlib
import re
import struct
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import librosa
import numpy as np
import soundfile as sf

from shared_models.records import DataFormatError, LabeledArrays, array_content, content_record_ids

from .local import AUDIO_FEATURES, DataSummary, manifest_groups, read_group_manifest, visible_entries

FSDD_NAME = re.compile(r"^(?P<label>\d)_(?P<speaker>[A-Za-z]+)_(?P<take>\d+)\.wav$", re.IGNORECASE)


def is_wav(path: Path) -> bool:
    """A WAV file by its extension, in any case (`.wav`, `.WAV`)."""
    return path.suffix.lower() == ".wav"


# Scattering1D settings (module docstring): samples per clip (zero-padded / cut), the
# wavelet octaves J and wavelets per octave Q; with T = SCATTER_SAMPLES one time frame.
SCATTER_SAMPLES, SCATTER_J, SCATTER_Q = 8192, 8, 12
SCATTER_LOG_FLOOR = 1e-6  # log(S + floor): silent clips stay finite
SCATTER_FEATURES = 336  # orders 1 (76) and 2 (260) at J=8, Q=12 (kymatio's meta()["order"])
SCATTER_BATCH = 256  # clips per Scattering1D call (memory: ~ batch x 8192 x Q x 8 bytes x a few)
REFERENCE_CLIPS = 300  # synthetic clips behind the fixed standardisation constants


@dataclass(frozen=True)
class LogMelConfig:
    """Feature settings. sample_rate in Hz; n_fft and hop_length in samples."""

    sample_rate: int = 8000
    n_fft: int = 256
    hop_length: int = 128
    n_mels: int = 40
    frames: int = 64


def declared_frames(path: Path) -> int | None:
    """The sample frames a RIFF/WAVE header promises (data chunk size / block align), or None.

    None when the file is not plain RIFF/WAVE or its data size is left open (0 or 0xFFFFFFFF,
    as streaming writers do): then there is no promise to check.
    """
    try:
        with open(path, "rb") as f:
            head = f.read(12)
            if len(head) < 12 or head[:4] != b"RIFF" or head[8:12] != b"WAVE":
                return None
            block_align = None
            while True:
                chunk = f.read(8)
                if len(chunk) < 8:
                    return None
                chunk_id, size = chunk[:4], struct.unpack("<I", chunk[4:])[0]
                if chunk_id == b"fmt ":
                    fmt = f.read(size)
                    if len(fmt) < 16:
                        return None
                    block_align = struct.unpack("<H", fmt[12:14])[0]
                    if size % 2:
                        f.read(1)
                elif chunk_id == b"data":
                    if not block_align or size in (0, 0xFFFFFFFF):
                        return None
                    return size // block_align
                else:
                    f.seek(size + size % 2, 1)
    except (OSError, struct.error):
        return None


def read_wav(path: Path, expected_rate: int, summary: DataSummary | None = None) -> np.ndarray:
    """Mono float32 samples in [-1, 1] of one WAV file, at `expected_rate` Hz.

    Returns shape (samples,). Multi-channel audio is downmixed (mean of the channels) and
    other rates are resampled to `expected_rate` (librosa with soxr, high quality); each
    conversion is counted in `summary.converted` when a summary is given.
    Raises DataFormatError naming the file when it cannot be decoded, holds no samples, or
    is truncated (its header promises more samples than the file holds: expected vs found).
    """
    try:
        samples, rate = sf.read(str(path), dtype="float32", always_2d=True)
    except (sf.LibsndfileError, RuntimeError, OSError) as err:
        raise DataFormatError(f"{path}: not a readable WAV file ({err})") from err
    promised = declared_frames(path)
    if promised is not None and promised > samples.shape[0]:
        raise DataFormatError(f"{path}: truncated WAV file: its header promises {promised} samples per channel, "
                              f"the file holds {samples.shape[0]}")
    if samples.shape[0] == 0:
        raise DataFormatError(f"{path}: WAV file has no samples")
    channels = samples.shape[1]
    mono = samples.mean(axis=1, dtype=np.float32) if channels > 1 else samples[:, 0]
    if channels > 1 and summary is not None:
        summary.converted[f"downmixed {channels} channels to mono"] += 1
    if rate != expected_rate:
        mono = librosa.resample(mono, orig_sr=rate, target_sr=expected_rate, res_type="soxr_hq").astype(np.float32)
        if summary is not None:
            summary.converted[f"resampled {rate} Hz to {expected_rate} Hz"] += 1
        if len(mono) == 0:
            raise DataFormatError(f"{path}: too short to resample from {rate} Hz to {expected_rate} Hz")
    return np.ascontiguousarray(mono, dtype=np.float32)


def _sample_digest(samples: np.ndarray) -> bytes:
    """SHA-256 of a clip's decoded samples: the content its record id is derived from."""
    return hashlib.sha256(array_content(samples)).digest()


def log_mel_frames(samples: np.ndarray, cfg: LogMelConfig) -> np.ndarray:
    """(cfg.frames, cfg.n_mels) float32 log-mel frames, each band normalised per utterance."""
    mel = librosa.feature.melspectrogram(
        y=samples, sr=cfg.sample_rate, n_fft=cfg.n_fft, hop_length=cfg.hop_length, n_mels=cfg.n_mels
    )
    logmel = librosa.power_to_db(mel, ref=1.0, top_db=80.0).T[: cfg.frames]  # (T, n_mels)
    logmel = (logmel - logmel.mean(axis=0)) / (logmel.std(axis=0) + 1e-5)
    out = np.zeros((cfg.frames, cfg.n_mels), dtype=np.float32)
    out[: len(logmel)] = logmel
    return out


@functools.lru_cache(maxsize=1)
def _scattering():
    # The 1-D torch front-end module itself: `kymatio.torch` also imports the 3-D one, which
    # needs scipy's `sph_harm` (removed in scipy 1.17).
    from kymatio.scattering1d.frontend.torch_frontend import ScatteringTorch1D

    return ScatteringTorch1D(J=SCATTER_J, shape=SCATTER_SAMPLES, Q=SCATTER_Q, T=SCATTER_SAMPLES)


def synthetic_reference_clips(count: int = REFERENCE_CLIPS, seed: int = 0) -> list[np.ndarray]:
    """`count` seeded synthetic clips, 0.25-1 s at 8 kHz, float32 mono: Gaussian noise coloured by
    a random spectral slope f^-a (a in [0.3, 1.5]) under a Hann envelope of random level. No
    recording is involved: the standardisation constants of `scattering_features` come from these."""
    rng = np.random.default_rng(seed)
    clips = []
    for _ in range(count):
        n = int(rng.integers(2000, 8000))
        spectrum = np.fft.rfft(rng.normal(size=n)) / (np.arange(n // 2 + 1) + 1.0) ** rng.uniform(0.3, 1.5)
        clip = np.fft.irfft(spectrum, n)
        clips.append((clip / (np.abs(clip).max() + 1e-9) * np.hanning(n) * rng.uniform(0.05, 1.0)).astype(np.float32))
    return clips


@functools.lru_cache(maxsize=1)
def reference_statistics() -> tuple[np.ndarray, np.ndarray]:
    """((336,), (336,)) float64 mean and std of the per-order-normalised coefficients of the
    synthetic reference clips (`synthetic_reference_clips`): fixed constants (computed once per
    process, ~30 s on 2 cores), the same on every node, from no record."""
    reference = _per_order_log_scattering(synthetic_reference_clips())
    return reference.mean(axis=0), np.maximum(reference.std(axis=0), 1e-6)


def scattering_features(clips: list[np.ndarray]) -> np.ndarray:
    """(N, 1, 336) float32 log wavelet-scattering coefficients of mono clips (module docstring).

    clips: N float arrays of samples at 8 kHz (any length: cut or zero-padded to
    SCATTER_SAMPLES). Each row depends on its own clip only: within each scattering order,
    centred by its own mean and scaled to L2 norm 1/sqrt(2); then each coefficient
    standardised with fixed constants (`reference_statistics`, from synthetic clips: no
    record) and the row scaled to unit norm by its own values. The order-0 coefficient (the
    clip's mean) is dropped.
    """
    if not clips:
        return np.zeros((0, 1, SCATTER_FEATURES), dtype=np.float32)
    z = _per_order_log_scattering(clips)
    mean, std = reference_statistics()
    z = (z - mean) / std  # gradient descent on the head converged faster (benchmarks/feature_standardisation.py)
    z /= np.maximum(np.linalg.norm(z, axis=1, keepdims=True), 1e-12)
    return z.astype(np.float32)[:, None, :]


def _per_order_log_scattering(clips: list[np.ndarray]) -> np.ndarray:
    """(N, 336) float64: log scattering, each order centred and scaled by the clip's own values."""
    import torch

    scattering = _scattering()
    orders = np.asarray(scattering.meta()["order"])[1:]  # (336,) 1 or 2
    out = []
    for start in range(0, len(clips), SCATTER_BATCH):
        batch = np.zeros((len(clips[start:start + SCATTER_BATCH]), SCATTER_SAMPLES), dtype=np.float32)
        for row, clip in enumerate(clips[start:start + SCATTER_BATCH]):
            clip = np.asarray(clip, dtype=np.float32)[:SCATTER_SAMPLES]
            batch[row, :len(clip)] = clip
        with torch.no_grad():
            coefficients = scattering(torch.from_numpy(batch))[:, 1:, 0].double().numpy()  # (B, 336)
        z = np.log(coefficients + SCATTER_LOG_FLOOR)
        for order in (1, 2):
            part = z[:, orders == order]
            part -= part.mean(axis=1, keepdims=True)
            part /= np.maximum(np.linalg.norm(part, axis=1, keepdims=True), 1e-12) * np.sqrt(2)
            z[:, orders == order] = part
        out.append(z)
    return np.concatenate(out)


def clip_features(clips: list[np.ndarray], cfg: LogMelConfig, features: str) -> np.ndarray:
    """(N, T, F) float32 features of mono clips at cfg.sample_rate: "logmel" (cfg.frames,
    cfg.n_mels) or "scattering" (1, 336; needs 8 kHz). Raises ValueError for another name."""
    if features == "logmel":
        return np.stack([log_mel_frames(clip, cfg) for clip in clips]) if clips else \
            np.zeros((0, cfg.frames, cfg.n_mels), dtype=np.float32)
    if features == "scattering":
        if cfg.sample_rate != 8000:
            raise ValueError(f"scattering features are set for 8 kHz audio, got sample rate {cfg.sample_rate}")
        return scattering_features(clips)
    raise ValueError(f"audio features must be one of {list(AUDIO_FEATURES)}, got {features!r}")


def load_fsdd(folder: str | Path, cfg: LogMelConfig = LogMelConfig(),
              summary: DataSummary | None = None, features: str = "logmel") -> dict[str, LabeledArrays]:
    """The Free Spoken Digit Dataset from its `recordings/` folder (or the folder above it).

    Returns {"train": takes 5-49, "test": takes 0-4} (FSDD's official split), with the
    speaker as the natural partition id; x is (N, cfg.frames, cfg.n_mels) float32 log-mel
    frames, or (N, 1, 336) with features="scattering" (`clip_features`). WAV
    extensions match in any case; hidden files are skipped (counted in `summary`). Raises
    DataFormatError for a missing folder, a file name not of the form
    `{digit}_{speaker}_{take}.wav`, or an unreadable or truncated WAV.
    """
    folder = Path(folder)
    summary = summary if summary is not None else DataSummary()
    if (folder / "recordings").is_dir():
        folder = folder / "recordings"
    files = [p for p in visible_entries(folder, summary) if is_wav(p)] if folder.is_dir() else []
    if not files:
        raise DataFormatError(f"{folder}: no FSDD recordings (*.wav) found")
    xs, ys, speakers, digests, is_test = [], [], [], [], []
    for path in files:
        match = FSDD_NAME.match(path.name)
        if not match:
            raise DataFormatError(f"{path}: FSDD file names must look like '7_george_12.wav'")
        samples = read_wav(path, cfg.sample_rate, summary)
        xs.append(samples)
        ys.append(int(match["label"]))
        speakers.append(match["speaker"])
        digests.append(_sample_digest(samples))
        is_test.append(int(match["take"]) < 5)
    full = LabeledArrays(
        task="speech",
        x=clip_features(xs, cfg, features),
        y=np.asarray(ys, dtype=np.int64),
        classes=[str(d) for d in range(10)],
        record_ids=content_record_ids(digests, "audio"),
        groups=np.asarray(speakers),
        source=str(folder),
        meta={"summary": summary.as_dict()},
    )
    test_mask = np.asarray(is_test)
    return {"train": full.subset(np.flatnonzero(~test_mask)), "test": full.subset(np.flatnonzero(test_mask))}


def load_audio_folder(folder: str | Path, cfg: LogMelConfig = LogMelConfig(), *,
                      group_manifest: str | Path | None = None, features: str = "logmel") -> LabeledArrays:
    """A hospital's audio folder: one subfolder per class holding WAV files (any rate, any channels).

    A flat folder of FSDD-named files (`{label}_{speaker}_{n}.wav`) is read the same way
    with the speaker as natural partition id. Returns x (N, cfg.frames, cfg.n_mels) float32
    (features="scattering": (N, 1, 336), `clip_features`).
    Extensions match in any case (`.wav`, `.WAV`); hidden files and folders (name starting
    with '.') and files that are not WAV are skipped and counted in `meta["summary"]`, with
    the clips resampled to cfg.sample_rate Hz or downmixed to mono (`read_wav`).
    group_manifest: a CSV with columns `file,group` giving each clip's group key
    (`read_group_manifest`; a relative path is taken from `folder`); without it a
    `groups.csv` at the folder's root is read when present. With a manifest, `groups` is an
    (N,) str array (replacing FSDD's speakers) and every clip needs a row. Raises
    DataFormatError naming the folder or file at fault (a clip without a manifest row too).
    """
    folder = Path(folder)
    summary = DataSummary()
    entries = visible_entries(folder, summary) if folder.is_dir() else []
    class_dirs = [p for p in entries if p.is_dir()]
    if not class_dirs:
        wavs = [p for p in entries if is_wav(p)]
        if wavs and all(FSDD_NAME.match(p.name) for p in wavs):
            manifest = read_group_manifest(folder, group_manifest)  # its errors before the costly features
            split = load_fsdd(folder, cfg, features=features)  # lists the folder again: its own summary
            train, test = split["train"], split["test"]
            both = np.concatenate([np.arange(len(train)), len(train) + np.arange(len(test))])
            merged = LabeledArrays(
                task="speech",
                x=np.concatenate([train.x, test.x]),
                y=np.concatenate([train.y, test.y]),
                classes=train.classes,
                record_ids=train.record_ids + test.record_ids,
                groups=np.concatenate([train.groups, test.groups]),
                source=str(folder),
                meta=dict(train.meta),
            )
            if manifest is not None:
                # load_fsdd's record order: train takes (5-49) then test takes (0-4), each in file order.
                is_test = np.asarray([int(FSDD_NAME.match(p.name)["take"]) < 5 for p in wavs])
                files = [wavs[i] for i in np.concatenate([np.flatnonzero(~is_test), np.flatnonzero(is_test)])]
                found = merged.meta.get("summary", {})
                fsdd_summary = DataSummary(Counter(found.get("converted", {})), Counter(found.get("skipped", {})))
                merged.groups = manifest_groups(folder, files, manifest, fsdd_summary)
                merged.meta = {**merged.meta, "summary": fsdd_summary.as_dict()}
            return merged.subset(both)
        raise DataFormatError(f"{folder}: expected one subfolder of WAV files per class")
    manifest = read_group_manifest(folder, group_manifest)
    for entry in entries:
        # The manifest is read, not skipped: it sits at the root, beside the class folders.
        if not entry.is_dir() and (manifest is None or entry.resolve() != manifest[0].resolve()):
            summary.skipped["file beside the class folders"] += 1
    xs, ys, digests, paths = [], [], [], []
    for label, class_dir in enumerate(class_dirs):
        wavs = []
        for entry in visible_entries(class_dir, summary):
            if is_wav(entry) and entry.is_file():
                wavs.append(entry)
            else:
                summary.skipped["not a .wav file" if entry.is_file() else "folder inside a class folder"] += 1
        if not wavs:
            raise DataFormatError(f"{class_dir}: class folder holds no .wav files")
        for path in wavs:
            samples = read_wav(path, cfg.sample_rate, summary)
            xs.append(samples)
            ys.append(label)
            digests.append(_sample_digest(samples))
            paths.append(path)
    groups = None if manifest is None else manifest_groups(folder, paths, manifest, summary)
    return LabeledArrays(
        task="speech",
        x=clip_features(xs, cfg, features),
        y=np.asarray(ys, dtype=np.int64),
        classes=[d.name for d in class_dirs],
        record_ids=content_record_ids(digests, "audio"),
        groups=groups,
        source=str(folder),
        meta={"summary": summary.as_dict()},
    )
