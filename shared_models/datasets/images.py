"""Images: MedMNIST-style .npz files, image folders, and the embedded digits set.

All loaders return float32 (N, C, H, W) in [0, 1]. Group keys (patient-level DP): an .npz's
`{split}_groups` arrays, an image folder's manifest (`--group-manifest` or `groups.csv`).

Wavelet scattering (`image_features="scattering"`, issue 14; `scattering_image_features`):
kymatio's Scattering2D (J=2, L=8: Morlet wavelets at 2 scales x 8 orientations, averaged over
2^J = 4 pixels; orders 0, 1 and 2, 1 + 16 + 64 = 81 maps of H/4 x W/4 per input channel;
Bruna & Mallat, PAMI 2013; Oyallon & Mallat, CVPR 2015), log, then each image's coefficients
centred and scaled within each scattering order by their own values (the image's features have
unit norm): a fixed, data-independent front-end that needs only a small trained head under
DP-SGD (Tramer & Boneh, ICLR 2021). The record id stays the pixels'.
"""

from __future__ import annotations

import dataclasses
import functools
import zipfile
from collections import Counter
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError
# scikit-learn at module level, not inside the loaders: imported lazily from two threads of one
# Flower process (a run's ServerApp and its nodes), its internal circular imports failed
# once with "partially initialized module" (CI, test_simulation_e2e).
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

from shared_models.records import DataFormatError, LabeledArrays, array_content, content_record_ids

from .local import IMAGE_FEATURES, DataSummary, manifest_groups, read_group_manifest, visible_entries

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff"}

# Scattering2D settings (module docstring): scales J (maps downsampled by 2^J) and orientations L.
SCATTER_J, SCATTER_L = 2, 8
SCATTER_ORDER_SIZES = (1, SCATTER_J * SCATTER_L, SCATTER_L ** 2 * SCATTER_J * (SCATTER_J - 1) // 2)  # 1, 16, 64
SCATTER_CHANNELS = sum(SCATTER_ORDER_SIZES)  # 81 maps per input channel
SCATTER_LOG_FLOOR = 1e-3  # log(S + floor): a blank region's coefficients stay finite
SCATTER_BATCH = 512  # images per Scattering2D call (28x28: ~1 s per 1000 images on one core)


def _canonical_pixels(image: np.ndarray) -> np.ndarray:
    """One image as float32 (C, H, W), integer pixels scaled by their type's maximum.

    What an image's record id is derived from: the same picture stored as uint8 or as
    floats in [0, 1], as (H, W), (H, W, 1) or (1, H, W), in an .npz or a PNG, is one record.
    """
    if image.ndim == 2:
        image = image[None]
    elif image.ndim == 3 and image.shape[-1] in (1, 3) and image.shape[0] not in (1, 3):
        image = image.transpose(2, 0, 1)
    if np.issubdtype(image.dtype, np.integer):
        return image.astype(np.float32) / np.float32(np.iinfo(image.dtype).max)
    return np.ascontiguousarray(image, dtype=np.float32)


def image_record_ids(images) -> list[str]:
    """Content record ids of images (any layout and pixel type, see `_canonical_pixels`)."""
    return content_record_ids((array_content(_canonical_pixels(np.asarray(img))) for img in images), "image")


def _to_nchw(images: np.ndarray, where: str) -> np.ndarray:
    """Integer or float (N,H,W) or (N,H,W,C) -> float32 (N,C,H,W) in [0, 1].

    Integer pixels are divided by their type's maximum (uint8 by 255, uint16 by 65535, as
    their record ids are); floats above 1 are taken as 0-255 values.
    """
    if images.ndim == 3:
        images = images[:, None, :, :]
    elif images.ndim == 4 and images.shape[-1] in (1, 3):
        images = images.transpose(0, 3, 1, 2)
    else:
        raise DataFormatError(f"{where}: expected images shaped (N,H,W) or (N,H,W,C), got {images.shape}")
    if np.issubdtype(images.dtype, np.integer):
        return images.astype(np.float32) / np.float32(np.iinfo(images.dtype).max)
    images = images.astype(np.float32)
    if images.max(initial=0.0) > 1.0:
        images /= 255.0
    return images


@functools.lru_cache(maxsize=4)
def _scattering(height: int, width: int):
    # The 2-D torch front-end module itself: `kymatio.torch` also imports the 3-D one, which
    # needs scipy's `sph_harm` (removed in scipy 1.17).
    from kymatio.scattering2d.frontend.torch_frontend import ScatteringTorch2D

    return ScatteringTorch2D(J=SCATTER_J, shape=(height, width), L=SCATTER_L)


def scattering_image_features(images: np.ndarray) -> np.ndarray:
    """(N, 81*C, H/4, W/4) float32 log wavelet-scattering maps of images (module docstring).

    images: float (N, C, H, W) pixels (the loaders' [0, 1]); H and W multiples of 4 = 2^J and
    at least 8 (28x28 MedMNIST -> 7x7 maps; 8x8 digits -> 2x2). Each channel is scattered on its
    own; its 81 maps keep kymatio's order (order 0: 1 map, order 1: J*L = 16, order 2:
    L^2*J*(J-1)/2 = 64) and channel c's maps are rows 81c .. 81c+80. Each image's log
    coefficients (log(S + 1e-3)) are normalised within each of its 3C (channel, order) blocks
    by that block's own values: centred (mean 0 over its maps x pixels) and scaled to L2 norm
    1/sqrt(3C), so every image's features have unit norm (the same rule as the speech
    front-end; the orders' very different log-magnitudes no longer set one scale for all; a
    constant block becomes zeros). Nothing is estimated from other records: a row depends on
    its own image only. Raises ValueError for another shape or a size that is not a multiple
    of 4 or under 8.
    """
    import torch

    images = np.asarray(images)
    if images.ndim != 4:
        raise ValueError(f"scattering features need images shaped (N, C, H, W), got {images.shape}")
    n, channels, height, width = images.shape
    step = 2 ** SCATTER_J
    if height % step or width % step or min(height, width) < 2 * step:
        raise ValueError(f"scattering features (J={SCATTER_J}) need images whose height and width are multiples of "
                         f"{step} and at least {2 * step} pixels, got {height}x{width} (resize them, e.g. "
                         "--image-size 28)")
    out = np.zeros((n, SCATTER_CHANNELS * channels, height // step, width // step), dtype=np.float32)
    if n == 0:
        return out
    scattering = _scattering(height, width)
    bounds = np.cumsum((0,) + SCATTER_ORDER_SIZES)
    for start in range(0, n, SCATTER_BATCH):
        batch = torch.from_numpy(np.ascontiguousarray(images[start:start + SCATTER_BATCH], dtype=np.float32))
        with torch.no_grad():
            coefficients = scattering(batch).double().numpy()  # (B, C, 81, H/4, W/4)
        z = np.log(coefficients + SCATTER_LOG_FLOOR)
        for lo, hi in zip(bounds[:-1], bounds[1:]):
            block = z[:, :, lo:hi]  # a view: (B, C, maps of one order, H/4, W/4)
            block -= block.mean(axis=(2, 3, 4), keepdims=True)
            norm = np.sqrt((block ** 2).sum(axis=(2, 3, 4), keepdims=True))
            block /= np.where(norm > 1e-12, norm, 1.0) * np.sqrt(3 * channels)
        out[start:start + len(batch)] = z.reshape(len(batch), -1, height // step, width // step)
    return out


def image_features(data: LabeledArrays, features: str) -> LabeledArrays:
    """`data` with x replaced by its `features`: "pixels" (unchanged) or "scattering"
    (`scattering_image_features`); labels, record ids (the pixels'), groups kept. Raises
    ValueError for another name or an image size scattering cannot take."""
    if features == "pixels":
        return data
    if features != "scattering":
        raise ValueError(f"image features must be one of {list(IMAGE_FEATURES)}, got {features!r}")
    return dataclasses.replace(data, x=scattering_image_features(data.x))


def load_npz(path: str | Path, task: str = "vision", classes: list[str] | None = None) -> dict[str, LabeledArrays]:
    """A MedMNIST-style .npz: keys `{split}_images` and `{split}_labels` per split.

    Returns {split: LabeledArrays} for each split present (train/val/test). An optional
    `{split}_groups` array ((N,) or (N, 1), e.g. `train_groups` of patient ids, strings or
    integers) becomes that split's `groups`, as str keys. Raises DataFormatError naming the
    file and key when the archive is unreadable, a split lacks its labels, images, labels or
    groups disagree in length, or a group key is empty.
    """
    path = Path(path)
    try:
        archive = np.load(path, allow_pickle=False)
        keys = set(archive.files)
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as err:
        raise DataFormatError(f"{path}: not a readable .npz archive ({err})") from err
    splits = sorted(k[: -len("_images")] for k in keys if k.endswith("_images"))
    if not splits:
        raise DataFormatError(f"{path}: no '<split>_images' arrays (found keys {sorted(keys)})")
    raw = {}
    for split in splits:
        if f"{split}_labels" not in keys:
            raise DataFormatError(f"{path}: '{split}_images' has no matching '{split}_labels'")
        try:
            images, labels = archive[f"{split}_images"], archive[f"{split}_labels"].reshape(-1)
        except (OSError, ValueError, zipfile.BadZipFile, EOFError) as err:
            raise DataFormatError(f"{path}: array '{split}' is truncated or corrupt ({err})") from err
        if len(images) != len(labels):
            raise DataFormatError(f"{path}: '{split}_images' has {len(images)} rows, '{split}_labels' {len(labels)}")
        if not np.issubdtype(labels.dtype, np.integer):
            raise DataFormatError(f"{path}: '{split}_labels' must be integers, got {labels.dtype}")
        raw[split] = (images, labels.astype(np.int64))
    groups = {split: _npz_groups(archive, path, split, len(raw[split][1])) for split in raw
              if f"{split}_groups" in keys}
    num_classes = int(max(labels.max(initial=0) for _, labels in raw.values())) + 1
    classes = classes or [str(c) for c in range(max(num_classes, 2))]
    # Ids over the whole archive, so a record repeated in two splits stays two records.
    ids = image_record_ids(img for images, _ in raw.values() for img in images)
    ends = np.cumsum([len(labels) for _, labels in raw.values()])
    return {
        split: LabeledArrays(
            task=task,
            x=_to_nchw(images, f"{path}:{split}_images"),
            y=labels,
            classes=classes,
            record_ids=ids[end - len(labels):end],
            groups=groups.get(split),
            source=str(path),
        )
        for (split, (images, labels)), end in zip(raw.items(), ends)
    }


def _npz_groups(archive, path: Path, split: str, n: int) -> np.ndarray:
    """(n,) str group keys of an .npz's `{split}_groups` array. Raises DataFormatError naming the array."""
    key = f"{split}_groups"
    try:
        groups = archive[key]
    except ValueError as err:
        # allow_pickle=False: an object array (e.g. Python strings saved as objects) is refused here.
        raise DataFormatError(f"{path}: array '{key}' cannot be read without pickle ({err}); save the group keys "
                              "as a string or integer array") from err
    except (OSError, zipfile.BadZipFile, EOFError) as err:
        raise DataFormatError(f"{path}: array '{key}' is truncated or corrupt ({err})") from err
    if groups.ndim == 2 and groups.shape[1] == 1:
        groups = groups.reshape(-1)
    if groups.ndim != 1:
        raise DataFormatError(f"{path}: '{key}' must be shaped (N,) or (N, 1), got {groups.shape}")
    if len(groups) != n:
        raise DataFormatError(f"{path}: '{key}' has {len(groups)} rows, '{split}_labels' {n}")
    keys = np.char.strip(groups.astype(str))
    empty = np.flatnonzero(keys == "")
    if len(empty):
        raise DataFormatError(f"{path}: '{key}' has an empty group key at row {empty[0]}")
    return keys


_SIXTEEN_BIT_MODES = {"I;16", "I;16B", "I;16L", "I;16N"}


def read_image(path: Path) -> np.ndarray:
    """One image file as float32 (H, W) greyscale in [0, 1], scaled by its pixel type's real range.

    8-bit modes (L, P, RGB, RGBA, 1, ...) are converted to greyscale by PIL and divided by 255;
    16-bit greyscale (I;16 and its byte orders, a usual medical export) is divided by 65535,
    never clipped to 8 bits; 32-bit integer images (mode I, as some 16-bit files open) must
    hold values in [0, 65535] and are divided by 65535; float images (mode F) must hold
    values in [0, 1]. Raises DataFormatError naming the file when it is unreadable or its
    values fall outside that range.
    """
    try:
        with Image.open(path) as img:
            img.load()
            mode = img.mode
            if mode in _SIXTEEN_BIT_MODES:
                raw = np.asarray(img).astype(np.uint16)
            elif mode == "I":
                raw = np.asarray(img)
                if raw.size and (raw.min() < 0 or raw.max() > 65535):
                    raise DataFormatError(f"{path}: 32-bit integer image with values in [{raw.min()}, {raw.max()}]; "
                                          "expected 16-bit values in [0, 65535]")
                raw = raw.astype(np.uint16)
            elif mode == "F":
                raw = np.asarray(img, dtype=np.float32)
                if raw.size and not (np.isfinite(raw).all() and raw.min() >= 0.0 and raw.max() <= 1.0):
                    raise DataFormatError(f"{path}: floating-point image with values in [{raw.min()}, {raw.max()}]; "
                                          "expected values in [0, 1]")
            else:
                raw = np.asarray(img.convert("L"), dtype=np.uint8)
    except (UnidentifiedImageError, OSError, ValueError) as err:
        if isinstance(err, DataFormatError):
            raise
        raise DataFormatError(f"{path}: not a readable image ({err})") from err
    return _canonical_pixels(raw)[0]


def _resize(pixels: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """float32 (H, W) in [0, 1] -> (size[0], size[1]), PIL bilinear (antialiased) on 32-bit floats."""
    resized = Image.fromarray(np.ascontiguousarray(pixels, dtype=np.float32)).resize((size[1], size[0]), Image.Resampling.BILINEAR)
    return np.clip(np.asarray(resized, dtype=np.float32), 0.0, 1.0)


def load_image_folder(folder: str | Path, size: int | tuple[int, int] | None = None, *,
                      group_manifest: str | Path | None = None) -> LabeledArrays:
    """A hospital's image folder: one subfolder per class. Images are read as greyscale.

    Returns x (N, 1, H, W) float32 in [0, 1] (`read_image`: 16-bit images keep their range).
    size: N or (height, width) to resize every image to (PIL, bilinear; `--image-size` of
    `fedpriv node` and `fedpriv simulate`); by default images keep their size and must all
    share one. Extensions match in any case; hidden files and folders (name starting with
    '.', e.g. `.ipynb_checkpoints`) and non-image files are skipped and counted in
    `meta["summary"]`, as are resized images. Record ids come from the pixels after any
    resize, so the same file and size give the same record every time.
    group_manifest: a CSV with columns `file,group` giving each image's group key
    (`read_group_manifest`; a relative path is taken from `folder`); without it a
    `groups.csv` at the folder's root is read when present. With a manifest, `groups` is an
    (N,) str array and every image needs a row. Raises DataFormatError naming the file that
    is unreadable or has no row in the manifest, or, for mixed sizes without `size`, the
    common size and the files that differ from it.
    """
    folder = Path(folder)
    if isinstance(size, int):
        size = (size, size)
    summary = DataSummary()
    entries = visible_entries(folder, summary) if folder.is_dir() else []
    class_dirs = [p for p in entries if p.is_dir()]
    if len(class_dirs) < 2:
        raise DataFormatError(f"{folder}: expected one subfolder of images per class (at least 2)")
    manifest = read_group_manifest(folder, group_manifest)
    for entry in entries:
        # The manifest is read, not skipped: it sits at the root, beside the class folders.
        if not entry.is_dir() and (manifest is None or entry.resolve() != manifest[0].resolve()):
            summary.skipped["file beside the class folders"] += 1
    xs, ys, paths = [], [], []
    for label, class_dir in enumerate(class_dirs):
        files = []
        for entry in visible_entries(class_dir, summary):
            if entry.is_file() and entry.suffix.lower() in IMAGE_SUFFIXES:
                files.append(entry)
            else:
                summary.skipped["not an image file" if entry.is_file() else "folder inside a class folder"] += 1
        if not files:
            raise DataFormatError(f"{class_dir}: class folder holds no images ({sorted(IMAGE_SUFFIXES)})")
        for path in files:
            pixels = read_image(path)
            if size is not None and pixels.shape != size:
                summary.converted[f"resized {pixels.shape[1]}x{pixels.shape[0]} to {size[1]}x{size[0]}"] += 1
                pixels = _resize(pixels, size)
            xs.append(pixels)
            ys.append(label)
            paths.append(path)
    shapes = Counter(x.shape for x in xs)
    if len(shapes) > 1:
        # The common size is the one most images have (ties: the larger count first, then sort order).
        common = max(shapes, key=lambda shape: (shapes[shape], -sorted(shapes).index(shape)))
        odd = [(p, x.shape) for p, x in zip(paths, xs) if x.shape != common]
        first, shape = odd[0]
        listed = ", ".join(f"{p.relative_to(folder)} ({s[1]}x{s[0]})" for p, s in odd[:10])
        more = f" and {len(odd) - 10} more" if len(odd) > 10 else ""
        raise DataFormatError(
            f"{first}: image is {shape[1]}x{shape[0]}, expected {common[1]}x{common[0]} like the other "
            f"{shapes[common]} images; {len(odd)} of {len(xs)} differ: {listed}{more}. Pass --image-size N "
            "(fedpriv node / fedpriv simulate) to resize every image to NxN"
        )
    groups = None if manifest is None else manifest_groups(folder, paths, manifest, summary)
    return LabeledArrays(
        task="vision",
        x=np.stack(xs)[:, None, :, :],
        y=np.asarray(ys, dtype=np.int64),
        classes=[d.name for d in class_dirs],
        record_ids=image_record_ids(xs),
        groups=groups,
        source=str(folder),
        meta={"summary": summary.as_dict()},
    )


def load_digits_embedded(test_fraction: float = 0.2, seed: int = 0) -> dict[str, LabeledArrays]:
    """scikit-learn's embedded 8x8 digits (1,797 images, 10 classes; no download).

    Returns {"train", "test"}: a stratified split with a fixed seed, so every node and the
    server agree on it.
    """

    digits = load_digits()
    images = (digits.images / 16.0).astype(np.float32)[:, None, :, :]
    full = LabeledArrays(
        task="vision",
        x=images,
        y=digits.target.astype(np.int64),
        classes=[str(d) for d in range(10)],
        record_ids=image_record_ids(digits.images / 16.0),
        source="sklearn.datasets.load_digits",
    )
    train_idx, test_idx = train_test_split(
        np.arange(len(full)), test_size=test_fraction, stratify=full.y, random_state=seed
    )
    return {"train": full.subset(np.sort(train_idx)), "test": full.subset(np.sort(test_idx))}
