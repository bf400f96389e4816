"""Loaders on real files (../shared/data) and on broken ones (clear errors naming the file)."""

import csv
import hashlib
import shutil

import numpy as np
import pytest
import soundfile as sf
from PIL import Image

from shared_models.datasets import (
    DataFormatError,
    encode_bytes,
    load_audio_folder,
    load_digits_embedded,
    load_fsdd,
    load_image_folder,
    load_local,
    load_npz,
    load_sms_spam,
    load_text_csv,
    read_tsv,
)


@pytest.fixture()
def fsdd_subset(shared_data, tmp_path):
    """A few real FSDD recordings (2 speakers x 2 digits x takes 0 and 7)."""
    folder = tmp_path / "fsdd"
    folder.mkdir()
    for speaker in ("george", "theo"):
        for digit in (3, 8):
            for take in (0, 7):
                name = f"{digit}_{speaker}_{take}.wav"
                shutil.copy(shared_data / "fsdd" / "recordings" / name, folder / name)
    return folder


def test_fsdd_real_files_give_normalised_log_mel_frames_and_official_split(fsdd_subset):
    splits = load_fsdd(fsdd_subset)
    train, test = splits["train"], splits["test"]
    assert len(train) == 4 and len(test) == 4  # take 0 is test, take 7 train
    assert train.x.shape == (4, 64, 40) and train.x.dtype == np.float32
    assert sorted(set(train.groups)) == ["george", "theo"]
    assert set(train.y) == {3, 8} and train.classes == [str(d) for d in range(10)]
    # Record ids come from the decoded samples (SHA-256 of kind and content), computed here by hand.
    samples, _ = sf.read(str(fsdd_subset / "3_george_7.wav"), dtype="float32")
    inner = hashlib.sha256(f"{samples.dtype.str}{samples.shape}".encode() + samples.tobytes()).digest()
    assert train.record_ids[train.y.tolist().index(3)] == hashlib.sha256(b"audio\0" + inner).hexdigest()[:32]
    assert len(set(train.record_ids + test.record_ids)) == 8
    # Per-utterance normalisation: each band of a clip's voiced frames has mean ~0.
    first = train.x[0]
    voiced = first[np.abs(first).sum(axis=1) > 0]
    assert np.abs(voiced.mean(axis=0)).max() < 1e-3


def test_audio_folder_by_class_and_wav_errors(fsdd_subset, tmp_path):
    folder = tmp_path / "by_class"
    for label in ("three", "eight"):
        (folder / label).mkdir(parents=True)
    shutil.copy(fsdd_subset / "3_george_7.wav", folder / "three" / "a.wav")
    shutil.copy(fsdd_subset / "8_george_7.wav", folder / "eight" / "b.wav")
    data = load_audio_folder(folder)
    assert data.classes == ["eight", "three"] and list(data.y) == [0, 1]

    (folder / "three" / "broken.wav").write_bytes(b"RIFF\x00\x00")
    with pytest.raises(DataFormatError, match="broken.wav: not a readable WAV"):
        load_audio_folder(folder)
    (folder / "three" / "broken.wav").unlink()

    # Other rates and stereo are converted (resampled, downmixed) and the summary says so.
    sf.write(folder / "three" / "fast.wav", np.zeros(16000, dtype=np.float32), 16000)
    sf.write(folder / "three" / "stereo.wav", np.zeros((800, 2), dtype=np.float32), 8000)
    converted = load_audio_folder(folder).meta["summary"]["converted"]
    assert converted == {"resampled 16000 Hz to 8000 Hz": 1, "downmixed 2 channels to mono": 1}


def test_fsdd_rejects_foreign_file_names(fsdd_subset):
    shutil.copy(fsdd_subset / "3_george_7.wav", fsdd_subset / "hello.wav")
    with pytest.raises(DataFormatError, match="hello.wav: FSDD file names"):
        load_fsdd(fsdd_subset)


def test_pneumoniamnist_npz_real(shared_data):
    splits = load_npz(shared_data / "pneumoniamnist" / "pneumoniamnist.npz", classes=["normal", "pneumonia"])
    assert {k: len(v) for k, v in splits.items()} == {"train": 4707, "val": 524, "test": 624}
    test = splits["test"]
    assert test.x.shape == (624, 1, 28, 28) and 0.0 <= test.x.min() and test.x.max() <= 1.0
    assert np.bincount(test.y).tolist() == [234, 390]  # the official test split


def test_npz_errors_name_file_and_key(tmp_path):
    bad = tmp_path / "bad.npz"
    bad.write_bytes(b"not a zip")
    with pytest.raises(DataFormatError, match="bad.npz: not a readable .npz"):
        load_npz(bad)
    nolabels = tmp_path / "nolabels.npz"
    np.savez(nolabels, train_images=np.zeros((3, 4, 4), np.uint8))
    with pytest.raises(DataFormatError, match="'train_images' has no matching 'train_labels'"):
        load_npz(nolabels)
    mismatch = tmp_path / "mismatch.npz"
    np.savez(mismatch, train_images=np.zeros((3, 4, 4), np.uint8), train_labels=np.zeros(2, np.int64))
    with pytest.raises(DataFormatError, match="has 3 rows, 'train_labels' 2"):
        load_npz(mismatch)
    # Truncated archive: cut a valid file in half.
    good = tmp_path / "good.npz"
    np.savez(good, train_images=np.zeros((50, 28, 28), np.uint8), train_labels=np.zeros(50, np.int64))
    truncated = tmp_path / "truncated.npz"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(DataFormatError, match="truncated.npz"):
        load_npz(truncated)


def test_sms_spam_real_split(shared_data):
    splits = load_sms_spam(shared_data / "sms_spam")
    train, test = splits["train"], splits["test"]
    assert len(train) + len(test) == 5574
    assert train.classes == ["ham", "spam"]
    assert np.bincount(np.concatenate([train.y, test.y])).tolist() == [4827, 747]
    assert train.x.shape[1] == 200 and train.x.dtype == np.int64


def test_text_encoding_is_byte_level_and_data_independent():
    ids = encode_bytes(["hi", "é"], max_len=4)
    assert ids.tolist() == [[ord("h") + 1, ord("i") + 1, 0, 0], [0xC3 + 1, 0xA9 + 1, 0, 0]]


def test_text_csv_and_errors(tmp_path):
    good = tmp_path / "notes.csv"
    good.write_text("text,label\nall fine,ok\nsend help,urgent\n", encoding="utf-8")
    data = load_text_csv(good)
    assert data.classes == ["ok", "urgent"] and list(data.y) == [0, 1]
    nocol = tmp_path / "nocol.csv"
    nocol.write_text("message,label\nx,y\n")
    with pytest.raises(DataFormatError, match="nocol.csv: expected a CSV header with columns 'text' and 'label'"):
        load_text_csv(nocol)
    empty = tmp_path / "empty.csv"
    empty.write_text("text,label\nhello,a\n,b\n")
    with pytest.raises(DataFormatError, match="empty.csv: line 3 has an empty"):
        load_text_csv(empty)
    latin = tmp_path / "latin.csv"
    latin.write_bytes("text,label\ncaf\xe9,a\n".encode("latin-1"))
    with pytest.raises(DataFormatError, match="latin.csv: not UTF-8"):
        load_text_csv(latin)
    with pytest.raises(DataFormatError, match="not in the class set"):
        load_text_csv(good, classes=["ok", "fine"])


def test_image_folder_and_errors(tmp_path):
    root = tmp_path / "xray"
    for label in ("normal", "pneumonia"):
        (root / label).mkdir(parents=True)
        for i in range(2):
            Image.fromarray(np.full((10, 12), 40 * i, np.uint8)).save(root / label / f"{i}.png")
    data = load_image_folder(root)
    assert data.x.shape == (4, 1, 10, 12) and data.classes == ["normal", "pneumonia"]
    Image.fromarray(np.zeros((5, 5), np.uint8)).save(root / "normal" / "small.png")
    with pytest.raises(DataFormatError, match="small.png: image is 5x5, expected 12x10"):
        load_image_folder(root)
    assert load_image_folder(root, size=(8, 8)).x.shape == (5, 1, 8, 8)
    (root / "normal" / "junk.png").write_bytes(b"\x89PNG broken")
    with pytest.raises(DataFormatError, match="junk.png: not a readable image"):
        load_image_folder(root, size=(8, 8))


def test_load_local_dispatch_and_missing_path(tmp_path):
    with pytest.raises(DataFormatError, match="data-path does not exist"):
        load_local(tmp_path / "nope", "vision")
    npz = tmp_path / "site.npz"
    np.savez(npz, train_images=np.zeros((4, 6, 6), np.uint8), train_labels=np.array([0, 1, 0, 1]))
    assert load_local(npz, "vision").x.shape == (4, 1, 6, 6)
    with pytest.raises(DataFormatError, match="task must be one of"):
        load_local(npz, "tabular")


def test_digits_embedded_split_is_stratified_and_fixed():
    a, b = load_digits_embedded(), load_digits_embedded()
    assert len(a["train"]) == 1437 and len(a["test"]) == 360
    assert a["test"].record_ids == b["test"].record_ids
    assert np.bincount(a["test"].y).min() >= 35


def test_record_ids_follow_content_not_names_order_or_format(tmp_path):
    rows = [("call me back", "ham"), ("WIN a prize now", "spam"), ("see you at 5", "ham"), ("call me back", "ham")]

    def write(path, records):
        with open(path, "w", newline="", encoding="utf-8") as handle:
            writer = csv.writer(handle)
            writer.writerow(["text", "label"])
            writer.writerows(records)
        return load_text_csv(path)

    first = write(tmp_path / "notes.csv", rows)
    expected = hashlib.sha256(b"text\0" + b"WIN a prize now").hexdigest()[:32]
    assert first.record_ids[1] == expected
    # A repeated text is a second record, not the same one.
    assert first.record_ids[3] == first.record_ids[0] + "#1" and len(set(first.record_ids)) == 4
    # Renamed and re-ordered: the same ids; one record added: the others keep theirs.
    moved = write(tmp_path / "renamed.csv", [rows[2], rows[1], rows[0], rows[3]])
    assert sorted(moved.record_ids) == sorted(first.record_ids)
    grown = write(tmp_path / "grown.csv", rows + [("new record", "ham")])
    assert set(first.record_ids) < set(grown.record_ids) and len(grown.record_ids) == 5
    # The same pixels in an .npz and as PNG files in class folders are the same records.
    pixels = np.arange(2 * 6 * 6, dtype=np.uint8).reshape(2, 6, 6)
    np.savez(tmp_path / "site.npz", train_images=pixels, train_labels=np.array([0, 1]))
    for label, image in zip(("a", "b"), pixels):
        (tmp_path / "folder" / label).mkdir(parents=True)
        Image.fromarray(image).save(tmp_path / "folder" / label / "x.png")
    assert load_npz(tmp_path / "site.npz")["train"].record_ids == load_image_folder(tmp_path / "folder").record_ids
    # ... and so are the same pixels exported as (N, H, W, 1) or as floats in [0, 1].
    np.savez(tmp_path / "hwc.npz", train_images=pixels[..., None], train_labels=np.array([0, 1]))
    np.savez(tmp_path / "float.npz", train_images=pixels.astype(np.float32) / np.float32(255), train_labels=np.array([0, 1]))
    for other in ("hwc.npz", "float.npz"):
        assert load_npz(tmp_path / other)["train"].record_ids == load_npz(tmp_path / "site.npz")["train"].record_ids
    # A text re-saved from the SMS TSV format to CSV (or with white space around it) is the same record.
    (tmp_path / "sms.tsv").write_text("ham\tcall me back \nspam\tWIN a prize now\n", encoding="utf-8")
    tsv = read_tsv(tmp_path / "sms.tsv")
    csv_ids = write(tmp_path / "sms.csv", [("call me back", "ham"), (" WIN a prize now", "spam")]).record_ids
    assert tsv.record_ids == csv_ids
