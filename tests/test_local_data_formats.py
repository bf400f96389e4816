"""Local data as sites really have it (issue 17): every case with a small generated file and the
right value computed independently (from the raw array, Python's csv module, sample counts).

Nothing is read silently wrong: 16-bit images keep their range, truncated WAVs are refused,
quoted newlines survive, cut texts are counted, hidden folders are no classes; common formats
(other sample rates, stereo, mixed image sizes, BOM, `;` delimiter, upper-case extensions)
are converted or read, and the data summary says so.
"""

from __future__ import annotations

import csv
import hashlib
import io
import statistics
import unicodedata
import wave
from collections import Counter

import numpy as np
import pytest
import soundfile as sf
from PIL import Image

from shared_models.datasets import (
    DataFormatError,
    LabeledArrays,
    LocalDataOptions,
    load_audio_folder,
    load_image_folder,
    load_local,
    load_text_csv,
    summary_lines,
)
from shared_models.datasets.audio import read_wav
from shared_models.datasets.named import _split_local


def _content_id(kind: str, content: bytes) -> str:
    """A record id computed by hand: SHA-256(kind, NUL, content), first 128 bits (records.content_record_ids)."""
    return hashlib.sha256(kind.encode() + b"\0" + content).hexdigest()[:32]


def _pixel_id(pixels: np.ndarray) -> str:
    arr = np.ascontiguousarray(pixels, dtype=np.float32)
    return _content_id("image", f"{arr.dtype.str}{arr.shape}".encode() + arr.tobytes())


def _decode(row: np.ndarray) -> str:
    """Byte ids (UTF-8 byte + 1, 0 = padding) back to text."""
    return bytes(int(v) - 1 for v in row if v).decode("utf-8")


# --- images ------------------------------------------------------------------------------------

def test_16bit_png_is_scaled_by_its_range_not_clipped_to_white(tmp_path):
    rng = np.random.default_rng(0)
    raws = {}
    for label in ("normal", "sick"):
        (tmp_path / label).mkdir()
        for i in range(2):
            raw = rng.integers(0, 65536, size=(12, 10), dtype=np.uint16)
            Image.fromarray(raw).save(tmp_path / label / f"{i}.png")
            raws[(label, i)] = raw
    assert Image.open(tmp_path / "normal" / "0.png").mode == "I;16"
    data = load_image_folder(tmp_path)
    expected = np.stack([raws[k] for k in sorted(raws)]).astype(np.float64) / 65535.0
    # Before: every pixel 1.0 (convert("L") clipped to 255). After: the raw mean (~0.5).
    assert data.x.mean() == pytest.approx(expected.mean(), abs=1e-6)
    np.testing.assert_allclose(data.x[:, 0], expected, atol=1e-7)
    assert data.record_ids[0] == _pixel_id(raws[("normal", 0)][None].astype(np.float32) / np.float32(65535))


def test_16bit_npz_is_scaled_by_its_range(tmp_path):
    raw = np.random.default_rng(3).integers(0, 65536, size=(4, 6, 6), dtype=np.uint16)
    np.savez(tmp_path / "site.npz", train_images=raw, train_labels=np.array([0, 1, 0, 1]))
    data = load_local(tmp_path / "site.npz", "vision")
    # Before: divided by 255, values up to 257.
    np.testing.assert_allclose(data.x[:, 0], raw / 65535.0, atol=1e-7)


def test_mixed_sizes_name_the_odd_files_against_the_common_size_and_the_option(tmp_path):
    for label in ("a", "b"):
        (tmp_path / label).mkdir()
        for i in range(4):
            Image.fromarray(np.full((28, 28), 30 * i, np.uint8)).save(tmp_path / label / f"img{i}.png")
    # First in sort order, and the only odd one: it must be named, not a good 28 px file.
    Image.fromarray(np.full((64, 64), 128, np.uint8)).save(tmp_path / "a" / "0_big.png")
    with pytest.raises(DataFormatError) as err:
        load_image_folder(tmp_path)
    message = str(err.value)
    assert message.startswith(f"{tmp_path / 'a' / '0_big.png'}: image is 64x64, expected 28x28")
    assert "1 of 9 differ: a/0_big.png (64x64)" in message and "--image-size" in message
    assert "img0.png" not in message


def test_image_size_option_resizes_and_says_so(tmp_path):
    for label in ("a", "b"):
        (tmp_path / label).mkdir()
        Image.fromarray(np.full((28, 28), 51, np.uint8)).save(tmp_path / label / "small.png")
    Image.fromarray(np.full((64, 48), 204, np.uint8)).save(tmp_path / "b" / "big.png")
    data = load_local(tmp_path, "vision", LocalDataOptions(image_size=28))
    assert data.x.shape == (3, 1, 28, 28)
    np.testing.assert_allclose(data.x[1], 204 / 255, atol=1e-6)  # sort order: a/small, b/big, b/small  # a constant image stays that constant
    assert data.meta["summary"]["converted"] == {"resized 48x64 to 28x28": 1}
    # Unresized 8-bit files keep the record id they always had (uint8 / 255 as float32).
    assert data.record_ids[0] == _pixel_id(np.full((1, 28, 28), 51, np.uint8).astype(np.float32) / np.float32(255))
    # The same file and size give the same record identity every time.
    assert load_local(tmp_path, "vision", LocalDataOptions(image_size=28)).record_ids == data.record_ids


def test_hidden_folders_are_no_classes_and_upper_case_image_extensions_count(tmp_path):
    for label in ("normal", "sick"):
        (tmp_path / label).mkdir()
        Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / label / "scan.PNG")
    (tmp_path / ".ipynb_checkpoints").mkdir()
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / ".ipynb_checkpoints" / "scan.png")
    (tmp_path / "sick" / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
    data = load_image_folder(tmp_path)
    # Before: a third class '.ipynb_checkpoints' with one image.
    assert data.classes == ["normal", "sick"] and np.bincount(data.y).tolist() == [1, 1]
    assert data.meta["summary"]["skipped"] == {"hidden (name starts with '.') folder": 1,
                                               "hidden (name starts with '.') file": 1}


# --- audio -------------------------------------------------------------------------------------

def _wav(path, samples: np.ndarray, rate: int) -> None:
    sf.write(path, samples, rate, subtype="PCM_16")


def _raw_int16(path) -> np.ndarray:
    """(frames, channels) int16 straight from the file with the standard library's wave module."""
    with wave.open(str(path), "rb") as w:
        frames = np.frombuffer(w.readframes(w.getnframes()), dtype="<i2")
        return frames.reshape(-1, w.getnchannels())


def test_other_rates_are_resampled_to_the_models_rate(tmp_path):
    t16, t44 = np.arange(16000) / 16000, np.arange(22050) / 44100
    _wav(tmp_path / "a16k.wav", 0.5 * np.sin(2 * np.pi * 440 * t16), 16000)
    _wav(tmp_path / "b44k.wav", 0.5 * np.sin(2 * np.pi * 1000 * t44), 44100)
    one_second, half_second = read_wav(tmp_path / "a16k.wav", 8000), read_wav(tmp_path / "b44k.wav", 8000)
    assert len(one_second) == 8000 and len(half_second) == 4000  # 1 s and 0.5 s at 8 kHz
    for samples, tone in ((one_second, 440), (half_second, 1000)):
        spectrum = np.abs(np.fft.rfft(samples))
        assert np.fft.rfftfreq(len(samples), 1 / 8000)[spectrum.argmax()] == pytest.approx(tone, abs=2.0)
        assert np.abs(samples).max() == pytest.approx(0.5, abs=0.02)


def test_stereo_is_downmixed_to_the_mean_of_its_channels(tmp_path):
    rng = np.random.default_rng(1)
    _wav(tmp_path / "st.wav", rng.uniform(-0.5, 0.5, size=(800, 2)), 8000)
    raw = _raw_int16(tmp_path / "st.wav").astype(np.float64) / 32768.0
    np.testing.assert_array_equal(read_wav(tmp_path / "st.wav", 8000), raw.mean(axis=1).astype(np.float32))


def test_audio_folder_reads_upper_case_wav_converts_and_summarises(tmp_path):
    for label in ("cough", "speech"):
        (tmp_path / label).mkdir()
        _wav(tmp_path / label / "ok.WAV", 0.3 * np.sin(np.arange(4000) / 7.0), 8000)
    _wav(tmp_path / "cough" / "phone.Wav", 0.3 * np.sin(np.arange(8000) / 5.0), 16000)
    _wav(tmp_path / "speech" / "studio.wav", 0.3 * np.ones((44100, 2)) * [[1.0, -0.5]], 44100)
    (tmp_path / "speech" / "._studio.wav").write_bytes(b"AppleDouble")  # a macOS resource fork
    data = load_audio_folder(tmp_path)
    # Before: "class folder holds no .wav files" (case-sensitive glob), then rate/stereo refusals.
    assert data.classes == ["cough", "speech"] and np.bincount(data.y).tolist() == [2, 2]
    summary = data.meta["summary"]
    assert summary["converted"] == {"resampled 16000 Hz to 8000 Hz": 1, "downmixed 2 channels to mono": 1,
                                    "resampled 44100 Hz to 8000 Hz": 1}
    assert summary["skipped"] == {"hidden (name starts with '.') file": 1}
    # Record ids come from the converted samples, the same on every read.
    assert load_audio_folder(tmp_path).record_ids == data.record_ids
    mono = read_wav(tmp_path / "cough" / "ok.WAV", 8000)
    inner = hashlib.sha256(f"{mono.dtype.str}{mono.shape}".encode() + mono.tobytes()).digest()
    assert data.record_ids[0] == _content_id("audio", inner)


def test_truncated_wav_is_an_error_with_samples_expected_and_found(tmp_path):
    for label in ("a", "b"):
        (tmp_path / label).mkdir()
        _wav(tmp_path / label / "ok.wav", 0.3 * np.sin(np.arange(3000) / 7.0), 8000)
    buffer = io.BytesIO()
    sf.write(buffer, 0.3 * np.sin(np.arange(6000) / 7.0), 8000, format="WAV", subtype="PCM_16")
    (tmp_path / "b" / "cut.wav").write_bytes(buffer.getvalue()[: 44 + 2 * 2000])  # a third of the samples
    # Before: trained on as its first 2,000 samples without a word.
    with pytest.raises(DataFormatError, match=r"cut.wav: truncated WAV file: its header promises 6000 samples "
                                              r"per channel, the file holds 2000"):
        load_audio_folder(tmp_path)


# --- text --------------------------------------------------------------------------------------

def test_csv_quoted_newlines_and_delimiters_match_pythons_csv_module(tmp_path):
    rng = np.random.default_rng(2)
    words = ["fever", "cough", "no", "pain", "line", "a,b", 'said "ok"', "x;y"]
    path = tmp_path / "notes.csv"
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["text", "label"])
        for i in range(200):
            text = " ".join(rng.choice(words, size=5))
            if i % 10 == 0:
                text = text.replace(" ", "\n", 1)  # a quoted newline inside the field
            writer.writerow([text, "urgent" if i % 3 == 0 else "routine"])
    with open(path, newline="", encoding="utf-8") as f:
        expected = [row["text"].strip() for row in csv.DictReader(f)]
    data = load_text_csv(path)
    got = [_decode(row) for row in data.x]
    # Before: 20 of 200 texts differed (the newline dropped, the words glued).
    assert got == expected
    assert data.record_ids[5] == _content_id("text", unicodedata.normalize("NFC", expected[5]).encode())


def test_csv_with_bom_and_semicolons_is_read_and_header_errors_name_what_was_found(tmp_path):
    path = tmp_path / "export.csv"
    path.write_bytes("\ufefftext;label\n\"chest pain; short of breath\";urgent\nroutine check;routine\n".encode())
    data = load_text_csv(path)
    assert data.classes == ["routine", "urgent"]
    assert [_decode(r) for r in data.x] == ["chest pain; short of breath", "routine check"]
    wrong = tmp_path / "wrong.csv"
    wrong.write_text("message,label\nhi,a\nho,b\n", encoding="utf-8")
    with pytest.raises(DataFormatError, match=r"wrong.csv: expected a CSV header with columns 'text' and 'label'; "
                                              r"found columns \['message', 'label'\] with delimiter ','"):
        load_text_csv(wrong)
    tabs = tmp_path / "tabs.csv"
    tabs.write_text("text\tlabel\nhello there\tham\nwin cash\tspam\n", encoding="utf-8")
    assert [_decode(r) for r in load_text_csv(tabs, delimiter="\t").x] == ["hello there", "win cash"]
    with pytest.raises(DataFormatError, match=r"found columns \['text\\tlabel'\] with delimiter ';' \(given"):
        load_text_csv(tabs, delimiter=";")


def test_upper_case_csv_extension_is_read_as_csv(tmp_path):
    path = tmp_path / "NOTES.CSV"
    path.write_text("text,label\nall fine,ok\nsend help,urgent\n", encoding="utf-8")
    # Before: read as TSV ("line 1 is not 'label<TAB>text'").
    data = load_local(path, "text")
    assert [_decode(r) for r in data.x] == ["all fine", "send help"] and data.classes == ["ok", "urgent"]


def test_long_texts_are_counted_and_the_length_is_an_option(tmp_path):
    path = tmp_path / "notes.csv"
    texts = [("clinical note " * 30).strip() if i % 4 == 0 else f"short {i}" for i in range(12)]  # 3 of 12 long
    with open(path, "w", newline="", encoding="utf-8") as f:
        csv.writer(f).writerows([["text", "label"], *[[t, "a" if i % 2 else "b"] for i, t in enumerate(texts)]])
    long_count = sum(len(t.encode()) > 200 for t in texts)
    data = load_local(path, "text")
    assert data.x.shape == (12, 200)
    assert data.meta["summary"]["converted"] == {"texts longer than 200 bytes cut to 200 (--max-text-bytes)": long_count}
    assert "converted: texts longer than 200 bytes cut to 200 (--max-text-bytes): 3" in summary_lines(data)
    full = load_local(path, "text", LocalDataOptions(max_text_bytes=512))
    assert [_decode(r) for r in full.x] == texts and full.meta["summary"]["converted"] == {}
    assert full.record_ids == data.record_ids  # ids come from the whole text, whatever the cut


# --- splits ------------------------------------------------------------------------------------

def test_local_split_is_stratified_when_every_class_has_two_records():
    y = np.repeat(np.arange(24), 10)  # balanced: 24 classes x 10 records
    data = LabeledArrays(task="vision", x=np.zeros((240, 1, 2, 2), np.float32), y=y,
                         classes=[str(c) for c in range(24)], record_ids=[str(i) for i in range(240)])
    split = _split_local(data)
    # Before: 0-5 test records per class (never stratified: bincount(...).min(initial=0) is 0).
    assert np.bincount(split["test"].y, minlength=24).tolist() == [2] * 24
    assert np.bincount(split["train"].y, minlength=24).tolist() == [8] * 24
    lonely = LabeledArrays(task="vision", x=np.zeros((11, 1, 2, 2), np.float32), y=np.array([0] * 10 + [1]),
                           classes=["a", "b"], record_ids=[str(i) for i in range(11)])
    assert len(_split_local(lonely)["test"]) == 3  # one record in a class: a plain split, no error


# --- fedpriv node and simulate -----------------------------------------------------------------

def test_fedpriv_node_prints_a_data_summary_and_passes_the_options_to_the_node(tmp_path, capsys, monkeypatch):
    from flwr.common.config import parse_config_args

    from client.config import node_identity
    from privacy.provisioning import provision
    from shared_models.run_config import TrainingPlan
    from simulations.cli import main

    kit = provision(tmp_path / "fed", ["127.0.0.1"], ["h1"]).node_kits["h1"]
    data = tmp_path / "notes.csv"
    data.write_bytes("\ufefftext;label\n".encode() + "".join(
        f"{'a long clinical note ' * (3 if i < 2 else 0)}record {i};{'ham' if i % 2 else 'spam'}\n"
        for i in range(6)).encode())
    launched = []

    class FakeSuperNode:
        pid = 4242

        def __init__(self, command):
            launched.append(command)

        def wait(self):
            return 0

    monkeypatch.setattr("client.supernode.wait_for_superlink", lambda *args, **kwargs: 1)  # no SuperLink here
    monkeypatch.setattr("client.supernode.start_flower", lambda command, **kwargs: FakeSuperNode(command))
    monkeypatch.setattr("client.supernode.stop_process_tree", lambda process: None)
    monkeypatch.setattr("signal.signal", lambda *args: None)
    assert main(["node", "--kit", str(kit), "--data", str(data), "--task", "text", "--delta", "0.01",
                 "--max-text-bytes", "32", "--csv-delimiter", ";"]) == 0
    out = capsys.readouterr().out
    assert "data: records per class: ham 3, spam 3" in out
    assert "data: converted: texts longer than 32 bytes cut to 32 (--max-text-bytes): 2" in out
    assert "data: skipped: nothing" in out
    # The deployed ClientApp reads the data with the same options (node-config).
    command = launched[0]
    # ... and its ClientApps start behind the app approval gate, watching the SuperNode's pid
    assert launched[1][1:3] == ["-m", "client.app_approval"] and launched[1][-2:] == ["--parent-pid", "4242"]
    node_cfg = parse_config_args([command[command.index("--node-config") + 1]])
    cfg = {"task": "text", "dataset": "sms_spam", "model": "", "num-server-rounds": 1, "local-epochs": 1,
           "batch-size": 8, "lr": 1.0, "optimizer": "sgd", "dp": True, "epsilon": 8.0, "delta": 1e-5,
           "max-grad-norm": 1.0, "val-fraction": 0.0, "partition": "iid", "alpha": 0.5, "seed": 0, "run-name": "t"}

    class Context:
        node_config, run_config = node_cfg, cfg

    node = node_identity(Context, TrainingPlan.from_run_config(cfg))
    assert node.data_options == LocalDataOptions(image_size=None, max_text_bytes=32, csv_delimiter=";")


def test_simulate_options_reach_the_run_config_and_plan(tmp_path):
    from shared_models.run_config import TrainingPlan
    from simulations.cli import build_parser
    from simulations.cli_options import training_run_config

    args = build_parser().parse_args(["simulate", "--dataset", str(tmp_path), "--task", "vision",
                                      "--image-size", "32", "--max-text-bytes", "300", "--csv-delimiter", "tab"])
    cfg = {**training_run_config(args, "vision", tmp_path / "run"), "partition": "iid", "alpha": 0.5}
    # The vision default (linear) reads scattering maps (shared_models.recipes).
    assert TrainingPlan.from_run_config(cfg).data_options() == LocalDataOptions(32, 300, "\t",
                                                                                image_features="scattering")


def test_fedpriv_simulate_reads_a_local_path_with_the_options_and_prints_its_summary(tmp_path, capsys, monkeypatch):
    import simulations.cli as cli

    folder = tmp_path / "scans"
    for label in ("a", "b"):
        (folder / label).mkdir(parents=True)
        for i in range(5):
            Image.fromarray(np.full((16 + 8 * (i == 0), 16), 20 * i, np.uint8)).save(folder / label / f"{i}.png")
    (folder / ".ipynb_checkpoints").mkdir()

    def no_flower(run_config, *args, **kwargs):
        raise cli.SimulationError(f"stopped before Flower (image-size {run_config['image-size']})")

    monkeypatch.setattr(cli, "run_simulation_job", no_flower)
    argv = ["simulate", "--dataset", str(folder), "--task", "vision", "--clients", "2", "--no-secagg",
            "--delta", "0.01", "--state-dir", str(tmp_path / "state"), "--out", str(tmp_path / "run")]
    assert cli.main(argv) == 2  # mixed sizes: refused, naming the odd files and the option
    assert "image is 16x24, expected 16x16 like the other 8 images" in capsys.readouterr().out
    assert cli.main([*argv, "--image-size", "16"]) == 1
    out = capsys.readouterr().out
    assert f"{folder}: train split records per class: a 4, b 4" in out
    assert f"{folder}: converted: resized 16x24 to 16x16: 2" in out
    assert f"{folder}: skipped: hidden (name starts with '.') folder: 1" in out
    assert "stopped before Flower (image-size 16)" in out


# --- group keys (issue 19: patient-level DP) ---------------------------------------------------

def _patient_csv(path, rows, header=("text", "label", "patient_id"), delimiter=","):
    with open(path, "w", newline="", encoding="utf-8") as f:
        csv.writer(f, delimiter=delimiter).writerows([list(header), *rows])


def test_csv_group_column_gives_each_record_its_stripped_key(tmp_path):
    path = tmp_path / "notes.csv"
    rows = [[f"note {i}", "urgent" if i % 2 else "routine", f" p{i % 3} "] for i in range(7)]
    _patient_csv(path, rows, header=("text", "label", " Patient_ID "), delimiter=";")
    with open(path, newline="", encoding="utf-8") as f:
        expected = [row[" Patient_ID "].strip() for row in csv.DictReader(f, delimiter=";")]
    data = load_local(path, "text", LocalDataOptions(group_column="patient_id"))
    assert data.groups.tolist() == expected == ["p0", "p1", "p2", "p0", "p1", "p2", "p0"]
    assert data.groups.dtype.kind == "U"
    # A subset (the node's train/validation split) keeps each record's key.
    assert data.subset(np.array([5, 1])).groups.tolist() == ["p2", "p1"]
    assert load_local(path, "text").groups is None  # without the option: no keys


def test_csv_group_column_errors_name_the_file_the_column_and_the_line(tmp_path):
    path = tmp_path / "notes.csv"
    _patient_csv(path, [["a", "x", "p1"], ["b", "y", "p2"]], header=("text", "label", "mrn"))
    with pytest.raises(DataFormatError) as err:
        load_text_csv(path, group_column="patient_id")
    assert str(err.value) == (f"{path}: no group column 'patient_id' (--group-column); found columns "
                              "['text', 'label', 'mrn'] with delimiter ','")
    empty = tmp_path / "empty_key.csv"
    _patient_csv(empty, [["a", "x", "p1"], ["b", "y", "  "], ["c", "x", "p3"]])
    with pytest.raises(DataFormatError, match=r"empty_key.csv: line 3 has an empty group key in column 'patient_id'"):
        load_text_csv(empty, group_column="patient_id")
    short = tmp_path / "short_row.csv"
    short.write_text("text,label,patient_id\na,x,p1\nb,y\n", encoding="utf-8")  # the key's cell is missing
    with pytest.raises(DataFormatError, match=r"short_row.csv: line 3 has an empty group key in column 'patient_id'"):
        load_text_csv(short, group_column="patient_id")
    tsv = tmp_path / "SMSSpamCollection"
    tsv.write_text("ham\thello\nspam\twin cash\n", encoding="utf-8")
    with pytest.raises(DataFormatError, match=r"SMSSpamCollection: --group-column 'patient_id' names a column of a "
                                              r"text .csv, but this file is read as 'label<TAB>text' lines"):
        load_local(tsv, "text", LocalDataOptions(group_column="patient_id"))


def test_group_options_that_the_format_cannot_use_are_errors_not_ignored(tmp_path):
    np.savez(tmp_path / "site.npz", train_images=np.zeros((2, 4, 4), np.uint8), train_labels=np.array([0, 1]))
    with pytest.raises(DataFormatError, match=r"site.npz: --group-column 'patient_id' names a column of a text "
                                              r"\.csv; --task vision data gives group keys in a 'train_groups' array"):
        load_local(tmp_path / "site.npz", "vision", LocalDataOptions(group_column="patient_id"))
    csv_path = tmp_path / "notes.csv"
    _patient_csv(csv_path, [["a", "x", "p1"], ["b", "y", "p2"]])
    with pytest.raises(DataFormatError, match=r"notes.csv: --group-manifest gives group keys to the files of an "
                                              r"image or audio folder; a text CSV holds them in a column"):
        load_local(csv_path, "text", LocalDataOptions(group_manifest="groups.csv"))
    for bad in ("", "  ", "label", " Text "):
        with pytest.raises(ValueError, match="group column"):
            LocalDataOptions(group_column=bad)
    with pytest.raises(ValueError, match="group manifest"):
        LocalDataOptions(group_manifest=" ")


def _scan_folder(root, files: dict[str, int]) -> None:
    """Greyscale 6x6 PNGs at `root/<relative path>`, each filled with its own value (distinct records)."""
    for name, value in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.full((6, 6), value, np.uint8)).save(root / name)


def _write_manifest(path, rows, header=("file", "group")) -> None:
    with open(path, "w", newline="", encoding="utf-8") as f:
        csv.writer(f).writerows([list(header), *rows])


def test_image_folder_reads_groups_csv_at_its_root_and_counts_rows_of_no_loaded_file(tmp_path):
    files = {"normal/img001.png": 10, "normal/img002.png": 20, "pneumonia/img003.png": 30,
             "pneumonia/img004.png": 40, "pneumonia/IMG005.PNG": 50}
    _scan_folder(tmp_path, files)
    (tmp_path / "pneumonia" / ".DS_Store").write_bytes(b"\0")
    (tmp_path / "normal" / "notes.txt").write_text("not an image")
    keys = {"normal/img001.png": "patient-7", "normal/img002.png": "patient-9", "pneumonia/img003.png": "patient-7",
            "pneumonia/img004.png": "patient-9", "pneumonia/IMG005.PNG": "patient-12"}
    # Rows in another order, a "./" prefix, an identical repeat, and rows naming a missing, a hidden
    # and a skipped (not an image) file: 3 rows that give no loaded file a key.
    _write_manifest(tmp_path / "groups.csv", [
        ["pneumonia/img004.png", "patient-9"], ["./normal/img001.png", "patient-7"], ["normal/img002.png", "patient-9"],
        ["pneumonia/img003.png", " patient-7 "], ["pneumonia/IMG005.PNG", "patient-12"],
        ["normal/img001.png", "patient-7"], ["normal/gone.png", "patient-1"], ["pneumonia/.DS_Store", "patient-1"],
        ["normal/notes.txt", "patient-1"]])
    data = load_local(tmp_path, "vision")
    assert data.classes == ["normal", "pneumonia"] and len(data) == 5  # groups.csv is no class and no record
    by_pixel = {value: keys[name] for name, value in files.items()}  # each record found by its own pixel value
    assert data.groups.tolist() == [by_pixel[round(float(x[0, 0, 0]) * 255)] for x in data.x]
    assert data.groups.tolist() == ["patient-7", "patient-9", "patient-12", "patient-7", "patient-9"]  # sort order
    summary = data.meta["summary"]
    assert summary["converted"] == {"group keys read from groups.csv": 5}
    assert summary["skipped"] == {"hidden (name starts with '.') file": 1, "not an image file": 1,
                                  "rows of groups.csv naming no loaded file": 3}  # not "file beside the class folders"
    assert load_image_folder(tmp_path).groups.tolist() == data.groups.tolist()  # found without the option too


def test_image_folder_group_manifest_option_relative_to_the_data_folder_or_absolute(tmp_path):
    scans = tmp_path / "scans"
    _scan_folder(scans, {"a/1.png": 1, "b/2.png": 2})
    _write_manifest(scans / "groups.csv", [["a/1.png", "stale"], ["b/2.png", "stale"]])
    _write_manifest(scans / "ids.csv", [["a/1.png", "P1"], ["b/2.png", "P2"]])
    data = load_local(scans, "vision", LocalDataOptions(group_manifest="ids.csv"))
    assert data.groups.tolist() == ["P1", "P2"]  # the named manifest, not groups.csv
    assert data.meta["summary"]["converted"] == {"group keys read from ids.csv": 2}
    # groups.csv is then a plain file beside the class folders, not read
    assert data.meta["summary"]["skipped"] == {"file beside the class folders": 1}
    outside = tmp_path / "site_ids.csv"
    _write_manifest(outside, [["a/1.png", "Q1"], ["b/2.png", "Q2"]])
    data = load_local(scans, "vision", LocalDataOptions(group_manifest=str(outside)))
    assert data.groups.tolist() == ["Q1", "Q2"]
    assert data.meta["summary"]["converted"] == {f"group keys read from {outside}": 2}
    with pytest.raises(DataFormatError, match=r"scans/nope.csv: group manifest \(--group-manifest\) not found"):
        load_local(scans, "vision", LocalDataOptions(group_manifest="nope.csv"))


def test_group_manifest_errors_name_the_manifest_and_the_file(tmp_path):
    _scan_folder(tmp_path, {"a/1.png": 1, "a/2.png": 2, "b/3.png": 3})
    manifest = tmp_path / "groups.csv"
    _write_manifest(manifest, [["a/1.png", "P1"], ["b/3.png", "P3"]])
    with pytest.raises(DataFormatError) as err:
        load_image_folder(tmp_path)
    assert str(err.value).startswith(f"{tmp_path / 'a' / '2.png'}: no row in the group manifest {manifest}")
    assert "1 of 3 files have none: a/2.png" in str(err.value)
    _write_manifest(manifest, [["a/1.png", "P1"], ["a/2.png", "P2"], ["b/3.png", "P3"], ["a/2.png", "P9"]])
    with pytest.raises(DataFormatError, match=r"groups.csv: the group manifest gives a/2.png two groups: 'P2' "
                                              r"\(line 3\) and 'P9' \(line 5\)"):
        load_image_folder(tmp_path)
    _write_manifest(manifest, [["a/1.png", "P1"]], header=("path", "patient"))
    with pytest.raises(DataFormatError) as err:
        load_image_folder(tmp_path)
    assert str(err.value) == (f"{manifest}: group manifest needs a header with columns 'file' and 'group'; "
                              "found columns ['path', 'patient']")
    _write_manifest(manifest, [["a/1.png", "P1"], ["a/2.png", ""], ["b/3.png", "P3"]])
    with pytest.raises(DataFormatError, match=r"groups.csv: line 3 of the group manifest has an empty 'file' or 'group'"):
        load_image_folder(tmp_path)


def test_audio_folder_group_manifest_and_flat_fsdd_folder_manifest_replacing_speakers(tmp_path):
    classes = tmp_path / "classes"
    for i, name in enumerate(["cough/c1.wav", "cough/c2.WAV", "speech/s1.wav"]):
        (classes / name).parent.mkdir(parents=True, exist_ok=True)
        _wav(classes / name, 0.2 * np.sin(np.arange(2000) / (3.0 + i)), 8000)
    _write_manifest(classes / "groups.csv", [["cough/c1.wav", "P1"], ["cough/c2.WAV", "P2"], ["speech/s1.wav", "P1"]])
    data = load_audio_folder(classes)
    assert data.groups.tolist() == ["P1", "P2", "P1"]
    assert data.meta["summary"]["converted"] == {"group keys read from groups.csv": 3}
    assert data.meta["summary"]["skipped"] == {}
    # A flat folder of FSDD names: speakers by default; a manifest replaces them, record by record.
    flat = tmp_path / "flat"
    flat.mkdir()
    names = ["0_anna_0.wav", "0_anna_7.wav", "1_bert_3.wav", "1_bert_12.wav", "1_anna_9.wav"]
    for i, name in enumerate(names):
        _wav(flat / name, 0.2 * np.sin(np.arange(2400) / (2.0 + i)), 8000)
    speakers = load_audio_folder(flat)
    assert sorted(speakers.groups.tolist()) == ["anna", "anna", "anna", "bert", "bert"]
    keys = {name: f"patient-{i}" for i, name in enumerate(names)}
    _write_manifest(flat / "groups.csv", [[name, key] for name, key in keys.items()])
    data = load_audio_folder(flat)
    # Each record's key is its own file's: the file found from the record id, computed by hand.
    ids = {}
    for name in names:
        mono = read_wav(flat / name, 8000)
        ids[_content_id("audio", hashlib.sha256(f"{mono.dtype.str}{mono.shape}".encode() + mono.tobytes()).digest())] = name
    assert data.groups.tolist() == [keys[ids[r]] for r in data.record_ids]
    assert sorted(data.groups.tolist()) == sorted(keys.values())
    assert data.meta["summary"]["converted"] == {"group keys read from groups.csv": 5}
    (flat / "groups.csv").write_text("file,group\n0_anna_0.wav,patient-0\n", encoding="utf-8")
    with pytest.raises(DataFormatError, match=r"0_anna_7.wav: no row in the group manifest .*groups.csv"):
        load_audio_folder(flat)


def test_npz_split_groups_become_str_keys_and_a_wrong_length_is_an_error(tmp_path):
    images = np.arange(5 * 4 * 4, dtype=np.uint8).reshape(5, 4, 4)
    path = tmp_path / "site.npz"
    np.savez(path, train_images=images, train_labels=np.array([0, 1, 0, 1, 1]), train_groups=np.array([17, 3, 17, 8, 3]),
             test_images=images[:2], test_labels=np.array([0, 1]))
    data = load_local(path, "vision")
    assert data.groups.tolist() == ["17", "3", "17", "8", "3"]
    from shared_models.datasets import load_npz
    splits = load_npz(path)
    assert splits["test"].groups is None  # no test_groups: no keys
    np.savez(path, train_images=images, train_labels=np.array([0, 1, 0, 1, 1]), train_groups=np.array(["a", "b", "c"]))
    with pytest.raises(DataFormatError) as err:
        load_npz(path)
    assert str(err.value) == f"{path}: 'train_groups' has 3 rows, 'train_labels' 5"


def test_summary_line_gives_the_number_of_groups_and_records_per_group(tmp_path):
    def expected_line(keys):
        sizes = sorted(Counter(keys).values())
        median = statistics.median(sizes)
        return (f"groups: {len(sizes)} (records per group: min {sizes[0]}, "
                f"median {int(median) if median == int(median) else median}, max {sizes[-1]})")

    rng = np.random.default_rng(4)
    keys = [f"p{int(k)}" for k in rng.integers(0, 9, size=40)]
    path = tmp_path / "notes.csv"
    _patient_csv(path, [[f"note {i}", "a" if i % 2 else "b", k] for i, k in enumerate(keys)])
    data = load_local(path, "text", LocalDataOptions(group_column="patient_id"))
    assert summary_lines(data)[1] == expected_line(keys)  # right after the records per class
    # An even number of groups whose middle sizes differ: a half-record median (1, 2, 3, 4 records: 2.5).
    even = ["a"] + ["b"] * 2 + ["c"] * 3 + ["d"] * 4
    _patient_csv(path, [[f"note {i}", "a" if i % 2 else "b", k] for i, k in enumerate(even)])
    data = load_local(path, "text", LocalDataOptions(group_column="patient_id"))
    assert summary_lines(data)[1] == expected_line(even) == "groups: 4 (records per group: min 1, median 2.5, max 4)"
    assert not any(line.startswith("groups:") for line in summary_lines(load_local(path, "text")))


def test_concat_keeps_groups_only_when_every_part_has_them():
    from shared_models.records import concat

    def part(n, groups):
        return LabeledArrays(task="vision", x=np.zeros((n, 1, 2, 2), np.float32), y=np.zeros(n, np.int64),
                             classes=["a", "b"], record_ids=[f"r{n}-{i}" for i in range(n)], groups=groups)

    keyed = concat([part(2, np.array(["p1", "p2"])), part(1, np.array(["canary-0"]))])
    assert keyed.groups.tolist() == ["p1", "p2", "canary-0"]
    assert concat([part(2, np.array(["p1", "p2"])), part(1, None)]).groups is None


def test_fsdd_named_dataset_has_speaker_groups(shared_data):
    from shared_models.datasets.named import load_dataset

    splits = load_dataset("fsdd", root=str(shared_data))
    speakers = ["george", "jackson", "lucas", "nicolas", "theo", "yweweler"]
    for split, takes in (("train", 45), ("test", 5)):
        data = splits[split]
        assert data.groups is not None and sorted(set(data.groups.tolist())) == speakers
        # 10 digits x `takes` takes per speaker (FSDD's official split: takes 0-4 are test)
        assert sorted(Counter(data.groups.tolist()).values()) == [10 * takes] * 6
    line = summary_lines(splits["train"])[1]
    assert line == "groups: 6 (records per group: min 450, median 450, max 450)"


def test_group_flags_reach_the_run_config_and_the_node_config(tmp_path):
    from flwr.common.config import parse_config_args

    from client.config import _data_options
    from client.supernode import node_config
    from shared_models.run_config import TrainingPlan
    from simulations.cli import build_parser
    from simulations.cli_options import training_run_config

    args = build_parser().parse_args(["simulate", "--dataset", str(tmp_path), "--task", "text",
                                      "--group-column", "patient_id", "--group-manifest", "ids.csv"])
    cfg = {**training_run_config(args, "text", tmp_path / "run"), "partition": "iid", "alpha": 0.5}
    assert cfg["group-column"] == "patient_id" and cfg["group-manifest"] == "ids.csv"
    assert TrainingPlan.from_run_config(cfg).data_options() == LocalDataOptions(group_column="patient_id",
                                                                                group_manifest="ids.csv")
    plain = build_parser().parse_args(["simulate", "--dataset", str(tmp_path), "--task", "text"])
    assert TrainingPlan.from_run_config({**training_run_config(plain, "text", tmp_path / "run"), "partition": "iid",
                                         "alpha": 0.5}).data_options() == LocalDataOptions()
    with pytest.raises(SystemExit):
        build_parser().parse_args(["simulate", "--dataset", str(tmp_path), "--task", "text", "--group-column", "label"])
    options = LocalDataOptions(group_column="patient id", group_manifest="/data/site 2/ids.csv")
    text = node_config(node="h1", data=tmp_path, task="text", max_epsilon=8.0, delta=1e-5, state_dir=tmp_path,
                       data_options=options)
    assert _data_options(parse_config_args([text])) == options
    assert _data_options(parse_config_args([node_config(node="h1", data=tmp_path, task="text", max_epsilon=8.0,
                                                         delta=1e-5, state_dir=tmp_path)])) == LocalDataOptions()
