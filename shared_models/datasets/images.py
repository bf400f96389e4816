"""Images: MedMNIST-style .npz files, image folders, and the embedded digits set.

All loaders return float32 (N, C, H, W) in [0, 1].
"""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np
# scikit-learn at module level, not inside the loaders: imported lazily from two threads of one
# Flower process (a run's ServerApp and its nodes), its internal circular imports failed
# once with "partially initialized module" (CI, test_simulation_e2e).
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

from shared_models.records import DataFormatError, LabeledArrays, array_content, content_record_ids

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff"}


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
    """uint8/float (N,H,W) or (N,H,W,C) -> float32 (N,C,H,W) in [0, 1]."""
    if images.ndim == 3:
        images = images[:, None, :, :]
    elif images.ndim == 4 and images.shape[-1] in (1, 3):
        images = images.transpose(0, 3, 1, 2)
    else:
        raise DataFormatError(f"{where}: expected images shaped (N,H,W) or (N,H,W,C), got {images.shape}")
    images = images.astype(np.float32)
    if images.max(initial=0.0) > 1.0:
        images /= 255.0
    return images


def load_npz(path: str | Path, task: str = "vision", classes: list[str] | None = None) -> dict[str, LabeledArrays]:
    """A MedMNIST-style .npz: keys `{split}_images` and `{split}_labels` per split.

    Returns {split: LabeledArrays} for each split present (train/val/test). Raises
    DataFormatError naming the file and key when the archive is unreadable, a split lacks
    its labels, or images and labels disagree in length.
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
            source=str(path),
        )
        for (split, (images, labels)), end in zip(raw.items(), ends)
    }


def load_image_folder(folder: str | Path, size: tuple[int, int] | None = None) -> LabeledArrays:
    """A hospital's image folder: one subfolder per class. Images are read as greyscale.

    size: (height, width) to resize to; by default every image must share the first one's
    size. Raises DataFormatError naming the file that is unreadable or of the wrong size.
    """
    from PIL import Image, UnidentifiedImageError

    folder = Path(folder)
    class_dirs = sorted(p for p in folder.iterdir() if p.is_dir()) if folder.is_dir() else []
    if len(class_dirs) < 2:
        raise DataFormatError(f"{folder}: expected one subfolder of images per class (at least 2)")
    xs, ys = [], []
    for label, class_dir in enumerate(class_dirs):
        files = sorted(p for p in class_dir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise DataFormatError(f"{class_dir}: class folder holds no images ({sorted(IMAGE_SUFFIXES)})")
        for path in files:
            try:
                with Image.open(path) as img:
                    img = img.convert("L")
                    if size is not None:
                        img = img.resize((size[1], size[0]))
                    arr = np.asarray(img, dtype=np.uint8)
            except (UnidentifiedImageError, OSError) as err:
                raise DataFormatError(f"{path}: not a readable image ({err})") from err
            if xs and arr.shape != xs[0].shape:
                raise DataFormatError(
                    f"{path}: image is {arr.shape[1]}x{arr.shape[0]}, expected {xs[0].shape[1]}x{xs[0].shape[0]} "
                    "like the others (pass a size to resize)"
                )
            xs.append(arr)
            ys.append(label)
    return LabeledArrays(
        task="vision",
        x=_to_nchw(np.stack(xs), str(folder)),
        y=np.asarray(ys, dtype=np.int64),
        classes=[d.name for d in class_dirs],
        record_ids=image_record_ids(xs),
        source=str(folder),
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
