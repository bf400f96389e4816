"""Audio: WAV files -> per-utterance-normalised log-mel frames (N, T, n_mels).

WAV decoding by `soundfile` (libsndfile), the mel filterbank and spectrogram by `librosa`.
Defaults suit 8 kHz speech (FSDD): 32 ms windows (n_fft=256), 16 ms hop, 40 mel bands,
64 frames (1.02 s; 99% of FSDD utterances are shorter). Longer clips are truncated, shorter
ones zero-padded after normalisation (so padding is the utterance mean).
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path

import librosa
import numpy as np
import soundfile as sf

from shared_models.records import DataFormatError, LabeledArrays, array_content, content_record_ids

FSDD_NAME = re.compile(r"^(?P<label>\d)_(?P<speaker>[A-Za-z]+)_(?P<take>\d+)\.wav$")


@dataclass(frozen=True)
class LogMelConfig:
    """Feature settings. sample_rate in Hz; n_fft and hop_length in samples."""

    sample_rate: int = 8000
    n_fft: int = 256
    hop_length: int = 128
    n_mels: int = 40
    frames: int = 64


def read_wav(path: Path, expected_rate: int) -> np.ndarray:
    """Mono float32 samples in [-1, 1] of one WAV file.

    Raises DataFormatError naming the file when it cannot be decoded, is empty, is not
    mono, or is not at `expected_rate` Hz (resampling silently would hide a data mix-up).
    """
    try:
        samples, rate = sf.read(str(path), dtype="float32", always_2d=True)
    except (sf.LibsndfileError, RuntimeError, OSError) as err:
        raise DataFormatError(f"{path}: not a readable WAV file ({err})") from err
    if samples.shape[1] != 1:
        raise DataFormatError(f"{path}: expected mono audio, got {samples.shape[1]} channels")
    if rate != expected_rate:
        raise DataFormatError(f"{path}: expected sample rate {expected_rate} Hz, got {rate} Hz")
    if samples.shape[0] == 0:
        raise DataFormatError(f"{path}: WAV file has no samples")
    return samples[:, 0]


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


def load_fsdd(folder: str | Path, cfg: LogMelConfig = LogMelConfig()) -> dict[str, LabeledArrays]:
    """The Free Spoken Digit Dataset from its `recordings/` folder (or the folder above it).

    Returns {"train": takes 5-49, "test": takes 0-4} (FSDD's official split), with the
    speaker as the natural partition id. Raises DataFormatError for a missing folder, a file
    name not of the form `{digit}_{speaker}_{take}.wav`, or an unreadable WAV.
    """
    folder = Path(folder)
    if (folder / "recordings").is_dir():
        folder = folder / "recordings"
    files = sorted(folder.glob("*.wav")) if folder.is_dir() else []
    if not files:
        raise DataFormatError(f"{folder}: no FSDD recordings (*.wav) found")
    xs, ys, speakers, digests, is_test = [], [], [], [], []
    for path in files:
        match = FSDD_NAME.match(path.name)
        if not match:
            raise DataFormatError(f"{path}: FSDD file names must look like '7_george_12.wav'")
        samples = read_wav(path, cfg.sample_rate)
        xs.append(log_mel_frames(samples, cfg))
        ys.append(int(match["label"]))
        speakers.append(match["speaker"])
        digests.append(_sample_digest(samples))
        is_test.append(int(match["take"]) < 5)
    full = LabeledArrays(
        task="speech",
        x=np.stack(xs),
        y=np.asarray(ys, dtype=np.int64),
        classes=[str(d) for d in range(10)],
        record_ids=content_record_ids(digests, "audio"),
        groups=np.asarray(speakers),
        source=str(folder),
    )
    test_mask = np.asarray(is_test)
    return {"train": full.subset(np.flatnonzero(~test_mask)), "test": full.subset(np.flatnonzero(test_mask))}


def load_audio_folder(folder: str | Path, cfg: LogMelConfig = LogMelConfig()) -> LabeledArrays:
    """A hospital's audio folder: one subfolder per class holding WAV files.

    A flat folder of FSDD-named files (`{label}_{speaker}_{n}.wav`) is read the same way
    with the speaker as natural partition id. Raises DataFormatError naming the folder or
    file at fault.
    """
    folder = Path(folder)
    class_dirs = sorted(p for p in folder.iterdir() if p.is_dir()) if folder.is_dir() else []
    if not class_dirs:
        wavs = sorted(folder.glob("*.wav")) if folder.is_dir() else []
        if wavs and all(FSDD_NAME.match(p.name) for p in wavs):
            split = load_fsdd(folder, cfg)
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
            )
            return merged.subset(both)
        raise DataFormatError(f"{folder}: expected one subfolder of WAV files per class")
    xs, ys, digests = [], [], []
    for label, class_dir in enumerate(class_dirs):
        wavs = sorted(class_dir.glob("*.wav"))
        if not wavs:
            raise DataFormatError(f"{class_dir}: class folder holds no .wav files")
        for path in wavs:
            samples = read_wav(path, cfg.sample_rate)
            xs.append(log_mel_frames(samples, cfg))
            ys.append(label)
            digests.append(_sample_digest(samples))
    return LabeledArrays(
        task="speech",
        x=np.stack(xs),
        y=np.asarray(ys, dtype=np.int64),
        classes=[d.name for d in class_dirs],
        record_ids=content_record_ids(digests, "audio"),
        source=str(folder),
    )
