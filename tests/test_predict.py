"""`fedpriv predict` and the exported model: the probabilities a user gets are the model's own."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from server.model_export import export_model
from shared_models import build_model
from simulations.cli import main as fedpriv_main
from simulations.predict import PredictError, predict


def _run_folder(tmp_path, dp=True):
    run = tmp_path / "run"
    run.mkdir()
    torch.manual_seed(3)
    model = build_model("vision", None, (1, 6, 6), 3)
    torch.save(model.state_dict(), run / "final_model.pt")
    (run / "config.json").write_text(json.dumps({  # a run's resolved run-config, as the ServerApp writes it
        "task": "vision", "dataset": "digits", "model": "", "activation": "tanh", "num-server-rounds": 1,
        "local-epochs": 1, "batch-size": 8, "lr": 0.1, "optimizer": "sgd", "dp": dp, "epsilon": 2.5, "delta": 1e-5,
        "max-grad-norm": 1.0, "val-fraction": 0.1, "partition": "iid", "alpha": 0.5, "seed": 0, "run-name": "run"}))
    (run / "summary.json").write_text(json.dumps({
        "dp": dp, "delta": 1e-5, "max_client_epsilon": 2.5,
        "final": {"test_accuracy": 0.5, "per_class": {"classes": ["cat", "dog", "eel"]}}}))
    return run, model


def test_predictions_follow_the_runs_logit_adjustment(tmp_path):
    run, model = _run_folder(tmp_path)
    summary = json.loads((run / "summary.json").read_text())
    summary["logit_adjustment"] = {"label_counts": [10.0, 30.0, 60.0], "class_prior": [0.1, 0.3, 0.6], "nodes": 2,
                                   "tau": 1.0}
    (run / "summary.json").write_text(json.dumps(summary))
    folder, pixels = _images(tmp_path)
    predict(run, folder, tmp_path / "pred.csv")
    rows = (tmp_path / "pred.csv").read_text().splitlines()[1:]
    x = torch.from_numpy(np.stack([pixels[k] for k in sorted(pixels)])[:, None])
    with torch.no_grad():  # by hand: softmax of the logits minus log(prior)
        expected = torch.softmax(model.eval()(x) - torch.log(torch.tensor([0.1, 0.3, 0.6])), 1).numpy()
    got = np.array([[float(v) for v in row.split(",")[4:]] for row in rows])
    assert np.abs(got - expected).max() < 1e-6
    summary["logit_adjustment"]["class_prior"] = [0.4, 0.6]  # two classes for a three-class model
    (run / "summary.json").write_text(json.dumps(summary))
    with pytest.raises(PredictError, match="logit_adjustment.class_prior must be 3 probabilities"):
        predict(run, folder, tmp_path / "pred.csv")


def _images(tmp_path):
    """6x6 greyscale PNGs filed under class folders; returns (folder, {file: pixels in [0, 1]})."""
    rng = np.random.default_rng(0)
    folder, pixels = tmp_path / "data", {}
    for label in ("cat", "eel"):
        (folder / label).mkdir(parents=True)
        for i in range(3):
            raw = rng.integers(0, 256, (6, 6), dtype=np.uint8)
            Image.fromarray(raw).save(folder / label / f"{i}.png")
            pixels[(label, i)] = raw.astype(np.float32) / 255.0
    return folder, pixels


def test_predictions_are_the_models_softmax_and_the_export_loads_without_fedpriv(tmp_path, capsys):
    run, model = _run_folder(tmp_path)
    folder, pixels = _images(tmp_path)
    out = tmp_path / "pred.csv"
    assert fedpriv_main(["predict", str(run), "--data", str(folder), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "6 records predicted" in printed and "epsilon <= 2.5 at delta 1e-05" in printed
    rows = out.read_text().splitlines()
    assert rows[0] == "record,record_id,label,predicted,p_cat,p_dog,p_eel"
    # Expected, independently: the model applied to the pixels read here, in the loader's order (label, file).
    x = torch.from_numpy(np.stack([pixels[k] for k in sorted(pixels)])[:, None])
    with torch.no_grad():
        expected = torch.softmax(model.eval()(x), 1).numpy()
    got = np.array([[float(v) for v in row.split(",")[4:]] for row in rows[1:]])
    assert np.abs(got - expected).max() < 1e-6
    labels = [row.split(",")[2] for row in rows[1:]]
    predicted = [row.split(",")[3] for row in rows[1:]]
    assert labels == ["cat"] * 3 + ["eel"] * 3
    assert predicted == [["cat", "dog", "eel"][i] for i in expected.argmax(1)]
    accuracy = np.mean([p == g for p, g in zip(predicted, labels)])
    assert f"{accuracy:.4f}" in printed

    # The exported program gives the same outputs with torch alone (fedpriv's packages blocked).
    export_model(model, x.numpy(), run / "final_model.pt2")
    np.save(tmp_path / "x.npy", x.numpy())
    code = ("import sys\n"
            "for name in ('server', 'client', 'shared_models', 'privacy', 'simulations'): sys.modules[name] = None\n"
            "import numpy as np, torch\n"
            f"m = torch.export.load({str(run / 'final_model.pt2')!r}).module()\n"
            f"x = torch.from_numpy(np.load({str(tmp_path / 'x.npy')!r}))\n"
            "print(repr(torch.softmax(m(x), 1).detach().numpy().tolist()))\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert np.abs(np.array(eval(proc.stdout.strip().splitlines()[-1])) - expected).max() < 1e-6


def test_an_incomplete_run_folder_or_other_inputs_are_named(tmp_path):
    run, _ = _run_folder(tmp_path, dp=False)
    folder, _ = _images(tmp_path)
    (run / "final_model.pt").unlink()
    with pytest.raises(PredictError, match="final_model.pt: missing"):
        predict(run, folder, tmp_path / "p.csv")
    with pytest.raises(PredictError, match="config.json: missing"):
        predict(tmp_path / "nowhere", folder, tmp_path / "p.csv")
    config = json.loads((run / "config.json").read_text())
    del config["lr"]
    (run / "config.json").write_text(json.dumps(config))
    with pytest.raises(PredictError, match="config.json: run-config is missing 'lr'"):
        predict(run, folder, tmp_path / "p.csv")
