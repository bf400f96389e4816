"""Bad-input suite: malformed audio, images, text and configuration each get a clear error
naming the file/field and what was expected, and leave no partial files behind."""

from __future__ import annotations

import io
import subprocess
import sys
import wave

import numpy as np
import pytest
import soundfile as sf
from PIL import Image

from shared_models.run_config import ConfigError, TrainingPlan
from shared_models.datasets import DataFormatError, load_audio_folder, load_fsdd, load_image_folder, load_local, load_npz
from shared_models.datasets.text import load_text_csv, read_tsv
from shared_models.datasets.partitioning import partition_indices


def _wav_bytes(samples: np.ndarray, rate: int = 8000) -> bytes:
    buffer = io.BytesIO()
    sf.write(buffer, samples, rate, format="WAV", subtype="PCM_16")
    return buffer.getvalue()


GOOD_WAV = _wav_bytes(np.sin(np.linspace(0, 200, 4000)).astype(np.float32) * 0.3)


def _audio_case(tmp, name, payload):
    """A two-class audio folder whose class 'b' holds one bad file `name`."""
    for label in ("a", "b"):
        (tmp / label).mkdir(parents=True, exist_ok=True)
        (tmp / label / "ok.wav").write_bytes(GOOD_WAV)
    if payload is not None:
        (tmp / "b" / name).write_bytes(payload)
    return lambda: load_audio_folder(tmp)


def _empty_wav() -> bytes:
    buffer = io.BytesIO()
    with wave.open(buffer, "wb") as w:
        w.setnchannels(1), w.setsampwidth(2), w.setframerate(8000)
    return buffer.getvalue()


AUDIO_CASES = {
    "truncated wav": ("cut.wav", GOOD_WAV[:30], r"cut.wav: not a readable WAV"),
    "not audio at all": ("notes.wav", b"hello, this is text", r"notes.wav: not a readable WAV"),
    "wav without samples": ("empty.wav", _empty_wav(), r"empty.wav: WAV file has no samples"),
    # (Other rates and stereo are resampled and downmixed now: tests/test_local_data_formats.py.)
    "header promises more samples": ("short.wav", GOOD_WAV[:44 + 2000],
                                     r"short.wav: truncated WAV file: its header promises 4000 samples per channel, the file holds 1000"),
}


@pytest.mark.parametrize("case", sorted(AUDIO_CASES))
def test_bad_audio_files_are_named(case, tmp_path):
    name, payload, message = AUDIO_CASES[case]
    load = _audio_case(tmp_path, name, payload)
    with pytest.raises(DataFormatError, match=message):
        load()


def test_bad_audio_folders(tmp_path):
    (tmp_path / "flat").mkdir()
    with pytest.raises(DataFormatError, match="expected one subfolder of WAV files per class"):
        load_audio_folder(tmp_path / "flat")
    (tmp_path / "cls" / "a").mkdir(parents=True)
    (tmp_path / "cls" / "b").mkdir()
    (tmp_path / "cls" / "a" / "x.wav").write_bytes(GOOD_WAV)
    with pytest.raises(DataFormatError, match=r"cls/b: class folder holds no .wav files"):
        load_audio_folder(tmp_path / "cls")
    (tmp_path / "fsdd").mkdir()
    (tmp_path / "fsdd" / "3_ann_x.wav").write_bytes(GOOD_WAV)
    with pytest.raises(DataFormatError, match=r"3_ann_x.wav: FSDD file names must look like"):
        load_fsdd(tmp_path / "fsdd")
    with pytest.raises(DataFormatError, match="no FSDD recordings"):
        load_fsdd(tmp_path / "nothing-here")


def _png(array) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


IMAGE_CASES = {
    "corrupt png": ("bad.png", b"\x89PNG\r\n\x1a\n broken", r"bad.png: not a readable image"),
    "text named png": ("readme.png", b"just text", r"readme.png: not a readable image"),
    "wrong size": ("big.png", _png(np.zeros((20, 20), np.uint8)), r"big.png: image is 20x20, expected 12x10"),
    "truncated png": ("half.png", _png(np.full((10, 12), 7, np.uint8))[:40], r"half.png: not a readable image"),
}


@pytest.mark.parametrize("case", sorted(IMAGE_CASES))
def test_bad_images_are_named(case, tmp_path):
    name, payload, message = IMAGE_CASES[case]
    for label in ("normal", "sick"):
        (tmp_path / label).mkdir()
        (tmp_path / label / "a.png").write_bytes(_png(np.zeros((10, 12), np.uint8)))
    (tmp_path / "sick" / name).write_bytes(payload)
    with pytest.raises(DataFormatError, match=message):
        load_image_folder(tmp_path)


def test_bad_image_folders(tmp_path):
    (tmp_path / "one" / "only").mkdir(parents=True)
    with pytest.raises(DataFormatError, match="one subfolder of images per class \\(at least 2\\)"):
        load_image_folder(tmp_path / "one")
    (tmp_path / "two" / "a").mkdir(parents=True)
    (tmp_path / "two" / "b").mkdir()
    (tmp_path / "two" / "a" / "x.png").write_bytes(_png(np.zeros((4, 4), np.uint8)))
    with pytest.raises(DataFormatError, match=r"two/b: class folder holds no images"):
        load_image_folder(tmp_path / "two")


def _npz(tmp, name, **arrays):
    path = tmp / name
    np.savez(path, **arrays)
    return path


NPZ_CASES = {
    "no image arrays": (dict(x=np.zeros(3)), r"no '<split>_images' arrays"),
    "labels missing": (dict(train_images=np.zeros((2, 4, 4), np.uint8)), r"'train_images' has no matching 'train_labels'"),
    "length mismatch": (dict(train_images=np.zeros((2, 4, 4), np.uint8), train_labels=np.zeros(3, np.int64)), r"has 2 rows, 'train_labels' 3"),
    "float labels": (dict(train_images=np.zeros((2, 4, 4), np.uint8), train_labels=np.array([0.5, 1.0])), r"'train_labels' must be integers"),
    "negative label": (dict(train_images=np.zeros((2, 4, 4), np.uint8), train_labels=np.array([0, -1])), r"labels must be in \[0, "),
    "1-D images": (dict(train_images=np.zeros(4, np.uint8), train_labels=np.zeros(4, np.int64)), r"expected images shaped"),
}


@pytest.mark.parametrize("case", sorted(NPZ_CASES))
def test_bad_npz_files_name_the_key(case, tmp_path):
    arrays, message = NPZ_CASES[case]
    path = _npz(tmp_path, "site.npz", **arrays)
    with pytest.raises(DataFormatError, match=message):
        load_npz(path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["site.npz"]  # nothing written beside it


def test_npz_without_train_split_for_a_node(tmp_path):
    path = _npz(tmp_path, "only_test.npz", test_images=np.zeros((2, 4, 4), np.uint8), test_labels=np.array([0, 1]))
    with pytest.raises(DataFormatError, match=r"only_test.npz: .npz has no 'train_images'"):
        load_local(path, "vision")


TEXT_CASES = {
    "csv missing label column": ("a.csv", "text,kind\nhi,x\n", load_text_csv, r"a.csv: expected a CSV header with columns 'text' and 'label'"),
    "csv empty text": ("b.csv", "text,label\nhello,x\n ,y\n", load_text_csv, r"b.csv: line 3 has an empty 'text' or 'label'"),
    "csv only header": ("c.csv", "text,label\n", load_text_csv, r"c.csv: expected a CSV header"),
    "csv empty file": ("d.csv", "", load_text_csv, r"d.csv: expected a CSV header"),
    "csv one class": ("e.csv", "text,label\nhi,x\nho,x\n", load_text_csv, r"e.csv: need at least 2 distinct labels"),
    "tsv line without tab": ("f.tsv", "ham\thello\nspam no tab here\n", read_tsv, r"f.tsv: line 2 is not 'label<TAB>text'"),
    "tsv empty text": ("g.tsv", "ham\thello\nspam\t  \n", read_tsv, r"g.tsv: line 2 is not 'label<TAB>text'"),
    "tsv empty file": ("h.tsv", "\n\n", read_tsv, r"h.tsv: no records"),
}


@pytest.mark.parametrize("case", sorted(TEXT_CASES))
def test_bad_text_files_name_file_and_line(case, tmp_path):
    name, content, loader, message = TEXT_CASES[case]
    (tmp_path / name).write_text(content, encoding="utf-8")
    with pytest.raises(DataFormatError, match=message):
        loader(tmp_path / name)


def test_non_utf8_text_names_the_byte(tmp_path):
    (tmp_path / "latin.tsv").write_bytes("ham\tcaf\xe9\n".encode("latin-1"))
    with pytest.raises(DataFormatError, match=r"latin.tsv: not UTF-8 text \(byte 7"):
        read_tsv(tmp_path / "latin.tsv")


BASE = {
    "task": "vision", "dataset": "digits", "model": "", "num-server-rounds": 2, "local-epochs": 1, "batch-size": 32,
    "lr": 0.1, "optimizer": "sgd", "dp": True, "epsilon": 2.0, "delta": 1e-5, "max-grad-norm": 1.0,
    "val-fraction": 0.1, "partition": "iid", "alpha": 0.5, "seed": 0, "run-name": "t",
}
CONFIG_CASES = {
    "epsilon zero": ({"epsilon": 0.0}, "'epsilon' must be in \\(0, 1000\\]"),
    "delta one": ({"delta": 1.0}, "'delta' must be in \\(0, 1\\)"),
    "rounds zero": ({"num-server-rounds": 0}, "'num-server-rounds' must be an integer >= 1"),
    "batch negative": ({"batch-size": -1}, "'batch-size' must be an integer >= 1, or 0 for full batch"),
    "negative lr": ({"lr": -0.1}, "'lr' must be a finite number > 0"),
    "bad optimizer": ({"optimizer": "rmsprop"}, "'optimizer' must be 'sgd' or 'adam'"),
    "validation too big": ({"val-fraction": 0.6}, "'val-fraction' must be in \\[0, 0.5\\)"),
    "momentum one": ({"momentum": 1.0}, "'momentum' must be in \\[0, 1\\)"),
    "rounds not a number": ({"num-server-rounds": "many"}, "'num-server-rounds' must be int"),
}


@pytest.mark.parametrize("case", sorted(CONFIG_CASES))
def test_bad_run_config_names_the_key(case):
    override, message = CONFIG_CASES[case]
    with pytest.raises(ConfigError, match=message):
        TrainingPlan.from_run_config({**BASE, **override})


def test_partition_requests_that_cannot_be_met():
    labels = np.array([0, 1] * 5)
    with pytest.raises(ValueError, match="clients must be in \\[1, 10\\]"):
        partition_indices(labels, 11, "iid")
    with pytest.raises(ValueError, match="needs a dataset with natural ids"):
        partition_indices(labels, 2, "natural")


CLI_CASES = {
    "unknown dataset path": (["--dataset", "no/such/folder", "--task", "vision"], "nor an existing path"),
    "misspelled dataset name": (["--dataset", "pneumonia"], "neither a named dataset (digits, fsdd, pneumoniamnist"),
    "natural partition without ids": (["--dataset", "digits", "--partition", "natural"], "needs a dataset with natural ids"),
    "threshold above clients": (["--clients", "3", "--threshold", "4"], "needs t in [2, 3]"),
    "threshold below the bounds": (["--clients", "10", "--num-shares", "5", "--threshold", "4"], "k = 5, t = 4 refused"),
    "corrupt fraction one": (["--corrupt-fraction", "1.0"], "corrupt fraction must be in [0, 1)"),
    "dropout rate one": (["--dropout-rate", "1.0"], "--dropout-rate must be in [0, 1)"),
    "client noise without clip": (["--client-noise-multiplier", "0.5"], "needs an explicit --clip-norm"),
    "path without task": (["--dataset", "."], "say its --task"),
    "model of another task": (["--model", "conv-lstm"], "--model for task 'vision' must be one of"),
    "clipping norm nodes refuse": (["--max-grad-norm", "1e-9"], "--max-grad-norm must be in [0.0001, 10000]"),
    "epsilon nodes refuse": (["--epsilon", "1e15"], "--epsilon must be at most 1000"),
    "client delta above 1/clients": (["--client-noise-multiplier", "0.5", "--clip-norm", "1", "--client-delta", "0.5"],
                                     "--client-delta must be < 1/--clients = 0.2"),
}


@pytest.mark.e2e  # each case starts the `fedpriv` command in a new process
@pytest.mark.parametrize("case", sorted(CLI_CASES))
def test_cli_rejects_bad_configuration_before_starting_anything(case, tmp_path):
    args, message = CLI_CASES[case]
    proc = subprocess.run([sys.executable, "-m", "simulations.cli", "simulate", *args, "--out", str(tmp_path / "run")],
                          capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert proc.returncode != 0
    assert message in " ".join((proc.stdout + proc.stderr).split())  # rich wraps long lines
    assert not (tmp_path / "run").exists()  # failed before creating the run folder
