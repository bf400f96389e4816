"""Issue 14: the wavelet scattering front-end for images and the small heads over it.

The features must be data-independent (an image's maps depend on that image only), match an
independent computation (kymatio's NumPy front-end, normalised here by hand), keep every
record's label and id, and reach every node as the run chose them, whatever the site's own
format options.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from shared_models import build_model, default_lr
from shared_models.datasets import DataFormatError, load_local
from shared_models.datasets.images import image_features, scattering_image_features
from shared_models.datasets.local import LocalDataOptions
from shared_models.datasets.named import data_dir, load_dataset
from shared_models.run_config import ConfigError
from shared_models.vision import VisionLinear

ORDER_BLOCKS = ((0, 1), (1, 17), (17, 81))  # kymatio's map order: order 0, then 16 first-, 64 second-order maps


def _images(n: int = 3, seed: int = 0, size: int = 28) -> np.ndarray:
    """(n, 1, size, size) float32 images in [0, 1]: smooth blobs and stripes with a little noise."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size] / size
    out = []
    for _ in range(n):
        cy, cx, width, freq = rng.uniform(0.2, 0.8), rng.uniform(0.2, 0.8), rng.uniform(0.05, 0.3), rng.uniform(2, 6)
        blob = np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / width ** 2)
        stripes = 0.5 + 0.5 * np.sin(2 * np.pi * freq * (xx + 0.3 * yy))
        out.append(np.clip(0.6 * blob + 0.3 * stripes + 0.05 * rng.normal(size=(size, size)), 0, 1))
    return np.asarray(out, dtype=np.float32)[:, None]


def test_an_images_scattering_maps_depend_on_that_image_only():
    images = _images()
    together = scattering_image_features(images)
    assert together.shape == (3, 81, 7, 7) and together.dtype == np.float32
    for i in range(len(images)):
        alone = scattering_image_features(images[i:i + 1])[0]
        np.testing.assert_allclose(alone, together[i], rtol=0, atol=1e-5)  # float32 FFTs of other batch sizes round apart
    # Other records changing (brighter, more of them) leaves an image's maps unchanged.
    brighter = np.clip(images * 3 + 0.2, 0, 1)
    others = scattering_image_features(np.concatenate([brighter, _images(4, seed=5), images[1:2]]))
    np.testing.assert_allclose(others[-1], together[1], rtol=0, atol=1e-5)
    # Per image and order: centred and of norm 1/sqrt(3), by its own values; each image unit norm.
    for lo, hi in ORDER_BLOCKS:
        block = together[:, lo:hi].reshape(3, -1)
        np.testing.assert_allclose(block.mean(axis=1), 0.0, atol=1e-6)
        np.testing.assert_allclose(np.linalg.norm(block, axis=1), 3 ** -0.5, rtol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(together.reshape(3, -1), axis=1), 1.0, rtol=1e-5)


def test_scattering_maps_match_kymatios_numpy_front_end_normalised_by_hand():
    from kymatio.scattering2d.frontend.numpy_frontend import ScatteringNumPy2D

    images = _images()
    reference = ScatteringNumPy2D(J=2, shape=(28, 28), L=8)
    for image, maps in zip(images, scattering_image_features(images)):
        z = np.log(reference(image[0].astype(np.float64)) + 1e-3)  # (81, 7, 7)
        expected = np.concatenate([
            (z[lo:hi] - z[lo:hi].mean()) / np.linalg.norm(z[lo:hi] - z[lo:hi].mean()) / np.sqrt(3)
            for lo, hi in ORDER_BLOCKS
        ])
        np.testing.assert_allclose(maps, expected, rtol=0, atol=2e-4)


def test_each_channel_is_scattered_on_its_own_and_bad_sizes_are_refused():
    grey = _images(6)
    rgb = grey.reshape(2, 3, 28, 28)  # 2 images of 3 channels
    maps = scattering_image_features(rgb)
    assert maps.shape == (2, 243, 7, 7)
    # Channel c's maps are rows 81c..81c+80: the channel alone, each block scaled to 1/sqrt(3*3).
    alone = scattering_image_features(grey).reshape(2, 3, 81, 7, 7)
    np.testing.assert_allclose(maps.reshape(2, 3, 81, 7, 7), alone / np.sqrt(3), rtol=0, atol=1e-5)
    assert scattering_image_features(_images(2, size=8)).shape == (2, 81, 2, 2)  # digits' 8x8
    with pytest.raises(ValueError, match="multiples of 4"):
        scattering_image_features(_images(1, size=30))
    with pytest.raises(ValueError, match="at least 8"):
        scattering_image_features(_images(1, size=4))
    with pytest.raises(ValueError, match="image features must be one of"):
        image_features(load_dataset("digits")["test"], "wavelets")
    with pytest.raises(ValueError, match="image features must be 'pixels' or 'scattering'"):
        LocalDataOptions(image_features="wavelets")


def test_pneumoniamnist_gives_81_maps_of_7x7_with_labels_and_record_ids_unchanged():
    root = data_dir()
    if not (root / "pneumoniamnist" / "pneumoniamnist.npz").is_file():
        pytest.skip(f"PneumoniaMNIST not found at {root} (set FEDPRIV_DATA_DIR or lay out ../shared/data)")
    pixels = load_dataset("pneumoniamnist")
    maps = load_dataset("pneumoniamnist", options=LocalDataOptions(image_features="scattering"))
    for split, n in (("train", 4707), ("test", 624)):
        assert pixels[split].x.shape == (n, 1, 28, 28)  # the default is unchanged
        assert maps[split].x.shape == (n, 81, 7, 7) and maps[split].x.dtype == np.float32
        np.testing.assert_array_equal(maps[split].y, pixels[split].y)
        assert maps[split].record_ids == pixels[split].record_ids  # the record is the image, whatever its features
        assert maps[split].classes == ["normal", "pneumonia"]
    np.testing.assert_allclose(maps["test"].x[:5], scattering_image_features(pixels["test"].x[:5]), rtol=0, atol=1e-5)


def test_local_npz_image_folders_and_digits_take_the_scattering_option(tmp_path):
    images = (_images(4) * 255).astype(np.uint8)[:, 0]
    np.savez(tmp_path / "site.npz", train_images=images, train_labels=np.array([0, 1, 0, 1]))
    options = LocalDataOptions(image_features="scattering")
    data = load_local(tmp_path / "site.npz", "vision", options)
    assert data.x.shape == (4, 81, 7, 7)
    assert data.record_ids == load_local(tmp_path / "site.npz", "vision").record_ids
    folder = tmp_path / "folder"
    for label in ("normal", "pneumonia"):
        (folder / label).mkdir(parents=True)
        for i in range(2):
            Image.fromarray(images[i + 2 * (label == "pneumonia")]).save(folder / label / f"{i}.png")
    from_folder = load_local(folder, "vision", options)
    assert from_folder.x.shape == (4, 81, 7, 7) and from_folder.classes == ["normal", "pneumonia"]
    np.testing.assert_allclose(from_folder.x, data.x, rtol=0, atol=1e-5)  # same pixels, same maps
    with pytest.raises(DataFormatError, match="multiples of 4.*--image-size"):
        load_local(folder, "vision", LocalDataOptions(image_size=30, image_features="scattering"))
    digits = load_dataset("digits", options=options)
    assert digits["train"].x.shape == (1437, 81, 2, 2)
    assert digits["train"].record_ids == load_dataset("digits")["train"].record_ids


def test_the_heads_over_scattering_maps_are_what_they_say_and_train_under_opacus():
    from opacus.validators import ModuleValidator

    model = build_model("vision", "linear", (81, 7, 7), 2)
    assert ModuleValidator.validate(model, strict=False) == []
    assert sum(p.numel() for p in model.parameters()) == 81 * 7 * 7 * 2 + 2
    x = torch.randn(4, 81, 7, 7)
    expected = x.reshape(4, -1) @ model.linear.weight.T + model.linear.bias  # computed apart from forward()
    torch.testing.assert_close(model(x), expected)
    cnn = build_model("vision", "scatter-cnn", (81, 7, 7), 2)
    assert ModuleValidator.validate(cnn, strict=False) == []
    assert sum(p.numel() for p in cnn.parameters()) == 6002
    assert cnn(x).shape == (4, 2)
    assert default_lr("vision", "linear", "sgd") == 8.0


def test_the_pooled_head_averages_each_map_over_3x3_cells_worked_by_hand():
    model = build_model("vision", "linear-pool3", (2, 7, 7), 2)
    assert sum(p.numel() for p in model.parameters()) == 2 * 9 * 2 + 2
    maps = torch.arange(2 * 49, dtype=torch.float32).reshape(1, 2, 7, 7)
    # PyTorch's adaptive cells on 7 rows: [0, 3), [2, 5), [4, 7); the mean of map[r0:r1, c0:c1].
    bounds = [(0, 3), (2, 5), (4, 7)]
    cells = [float(maps[0, c, r0:r1, c0:c1].mean()) for c in range(2) for r0, r1 in bounds for c0, c1 in bounds]
    expected = torch.tensor(cells) / torch.tensor(cells).norm()
    torch.testing.assert_close(model.features(maps)[0], expected)
    batch = torch.randn(5, 2, 7, 7)
    torch.testing.assert_close(model.features(batch), torch.cat([model.features(batch[i:i + 1]) for i in range(5)]))
    # Maps no larger than the cells (digits' 2 x 2) are used as they are, like `linear`.
    small = build_model("vision", "linear-pool3", (81, 2, 2), 10)
    x = torch.randn(3, 81, 2, 2)
    torch.testing.assert_close(small.features(x), x.flatten(1))
    with pytest.raises(ValueError, match="pool must be >= 1"):
        VisionLinear((1, 7, 7), 2, pool=0)
    assert default_lr("vision", "linear-pool3", "sgd") == 8.0


def test_the_pooled_head_takes_scattering_maps_only(tmp_path):
    from shared_models.run_config import TrainingPlan
    from simulations.cli import build_parser
    from simulations.cli_options import training_run_config

    args = build_parser().parse_args(["simulate", "--dataset", "pneumoniamnist", "--model", "linear-pool3"])
    cfg = {**training_run_config(args, "vision", tmp_path / "run"), "partition": "iid", "alpha": 0.5}
    assert (cfg["image-features"], cfg["batch-size"], cfg["server-optimizer"], cfg["ema-decay"]) == \
        ("scattering", 0, "fedavgm", 0.9)
    TrainingPlan.from_run_config(cfg)
    with pytest.raises(ConfigError, match="'scattering' for the vision model 'linear-pool3'"):
        TrainingPlan.from_run_config({**cfg, "image-features": "pixels"})


def test_the_runs_image_features_reach_a_deployed_node_whatever_its_own_options(tmp_path):
    from flwr.app import Context, RecordDict

    from client.config import node_identity
    from shared_models.run_config import TrainingPlan
    from simulations.cli import build_parser
    from simulations.cli_options import training_run_config

    args = build_parser().parse_args(["simulate", "--dataset", "pneumoniamnist", "--image-features", "scattering",
                                      "--model", "linear"])
    cfg = {**training_run_config(args, "vision", tmp_path / "run"), "partition": "dirichlet", "alpha": 0.5}
    assert cfg["image-features"] == "scattering"
    plan = TrainingPlan.from_run_config(cfg)
    assert plan.image_features == "scattering" and plan.data_options().image_features == "scattering"
    context = Context(run_id=1, node_id=1, node_config={"data-path": str(tmp_path), "node-name": "site-a"},
                      state=RecordDict(), run_config=cfg)
    assert node_identity(context, plan).data_options.image_features == "scattering"
    # The CLI's vision default is linear on scattering maps (shared_models.recipes); pixels bring the cnn.
    default = build_parser().parse_args(["simulate", "--dataset", "pneumoniamnist"])
    assert training_run_config(default, "vision", tmp_path / "run")["image-features"] == "scattering"
    pixels = build_parser().parse_args(["simulate", "--dataset", "pneumoniamnist", "--image-features", "pixels"])
    assert training_run_config(pixels, "vision", tmp_path / "run")["model"] == "cnn"
    assert TrainingPlan.from_run_config({k: v for k, v in cfg.items() if k != "image-features"}).image_features == "pixels"
    assert TrainingPlan.from_run_config({**cfg, "model": "scatter-cnn"}).model == "scatter-cnn"
    with pytest.raises(ConfigError, match="'image-features' must be 'pixels' or 'scattering', got 'wavelets'"):
        TrainingPlan.from_run_config({**cfg, "image-features": "wavelets"})
    with pytest.raises(ConfigError, match="'image-features' must be 'pixels' \\(the default\\) for a speech task"):
        TrainingPlan.from_run_config({**cfg, "task": "speech", "dataset": "fsdd"})
    with pytest.raises(ConfigError, match="'image-features' must be 'pixels' for the vision model 'cnn \\(the default"):
        TrainingPlan.from_run_config({**cfg, "model": ""})
    with pytest.raises(ConfigError, match="'image-features' must be 'scattering' for the vision model 'scatter-cnn'"):
        TrainingPlan.from_run_config({**cfg, "model": "scatter-cnn", "image-features": "pixels"})
