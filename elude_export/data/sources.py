"""Image sources: where calibration and evaluation images come from.

Every source yields uint8 NHWC batches in a fixed order (so two passes see the same images)
and may carry labels. Sources: the embedded concept splits, scikit-learn's digits, `.npy` /
`.npz` arrays, image folders (labels from sub-folder names) and CIFAR-style python batches
(read with an unpickler that only admits numpy arrays).
"""

from __future__ import annotations

import io
import pickle
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np

from elude_export.errors import DataError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif", ".tif", ".tiff"}


@dataclass
class ImageSource:
    """A fixed, ordered collection of images; `load(indices)` returns uint8 NHWC."""

    name: str
    size: int
    labels: np.ndarray | None = None
    concepts: np.ndarray | None = None  # ground-truth concept ids, where the data has them
    class_names: list[str] | None = None

    def __len__(self) -> int:
        return self.size

    def load(self, indices: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def batches(self, batch_size: int, limit: int | None = None) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """(indices, uint8 NHWC images) in order, at most `limit` images."""
        total = self.size if limit is None else min(self.size, limit)
        for start in range(0, total, batch_size):
            indices = np.arange(start, min(start + batch_size, total))
            yield indices, self.load(indices)

    def subset(self, indices: np.ndarray) -> "ImageSource":
        return SubsetSource(self, np.asarray(indices, dtype=np.int64))


@dataclass
class ArraySource(ImageSource):
    images: np.ndarray = field(default_factory=lambda: np.zeros((0, 1, 1, 3), np.uint8))

    def load(self, indices: np.ndarray) -> np.ndarray:
        return self.images[indices]


class SubsetSource(ImageSource):
    """A view on some images of another source, in the order given."""

    def __init__(self, parent: ImageSource, indices: np.ndarray):
        pick = (lambda a: None if a is None else a[indices])
        super().__init__(f"{parent.name}[subset]", len(indices), pick(parent.labels), pick(parent.concepts),
                         parent.class_names)
        self.parent = parent
        self.indices = indices

    def load(self, indices: np.ndarray) -> np.ndarray:
        return self.parent.load(self.indices[indices])


@dataclass
class FolderSource(ImageSource):
    files: list[Path] = field(default_factory=list)
    target_size: tuple[int, int] = (224, 224)

    def load(self, indices: np.ndarray) -> np.ndarray:
        from PIL import Image, UnidentifiedImageError

        out = np.empty((len(indices), self.target_size[0], self.target_size[1], 3), dtype=np.uint8)
        for row, index in enumerate(indices):
            path = self.files[int(index)]
            try:
                with Image.open(path) as image:
                    image = image.convert("RGB").resize((self.target_size[1], self.target_size[0]))
                    out[row] = np.asarray(image)
            except (UnidentifiedImageError, OSError) as exc:
                raise DataError(f"cannot read image {path}: {exc}") from exc
        return out


def as_uint8_nhwc(array: np.ndarray, origin: str) -> np.ndarray:
    """Accept NHWC/NCHW, grayscale or RGB, uint8 or float in [0,1]; return uint8 NHWC RGB."""
    array = np.asarray(array)
    if array.ndim == 3:  # (N, H, W) grayscale
        array = array[..., None]
    if array.ndim != 4:
        raise DataError(f"{origin}: expected an image array (N, H, W[, C]), got shape {array.shape}")
    if array.shape[1] in (1, 3) and array.shape[-1] not in (1, 3):
        array = array.transpose(0, 2, 3, 1)
    if array.shape[-1] not in (1, 3):
        raise DataError(f"{origin}: images need 1 or 3 channels, got shape {array.shape}")
    if array.dtype != np.uint8:
        if not np.issubdtype(array.dtype, np.number):
            raise DataError(f"{origin}: image array has non-numeric dtype {array.dtype}")
        high = float(np.nanmax(array)) if array.size else 1.0
        scale = 255.0 if high <= 1.0 else 1.0
        array = np.clip(np.nan_to_num(array.astype(np.float32)) * scale, 0, 255).round().astype(np.uint8)
    if array.shape[-1] == 1:
        array = np.repeat(array, 3, axis=-1)
    if len(array) == 0:
        raise DataError(f"{origin}: contains no images")
    return np.ascontiguousarray(array)


def _array_source(path: Path) -> ImageSource:
    try:
        loaded = np.load(path, allow_pickle=False)
    except Exception as exc:  # corrupt or non-numpy file
        raise DataError(f"cannot read array file {path}: {exc.__class__.__name__}: {exc}") from exc
    labels = None
    if isinstance(loaded, np.lib.npyio.NpzFile):
        with loaded:
            keys = list(loaded.keys())
            image_key = next((k for k in ("images", "x", "X", "data") if k in keys), keys[0] if keys else None)
            if image_key is None:
                raise DataError(f"{path}: empty .npz archive")
            images = loaded[image_key]
            label_key = next((k for k in ("labels", "y", "targets") if k in keys), None)
            labels = loaded[label_key].astype(np.int64) if label_key else None
    else:
        images = loaded
    images = as_uint8_nhwc(images, str(path))
    if labels is not None and len(labels) != len(images):
        raise DataError(f"{path}: {len(labels)} labels for {len(images)} images")
    return ArraySource(path.name, len(images), labels, images=images)


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """CIFAR batches are pickles; admit only what numpy arrays need, never arbitrary code."""

    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"), ("builtins", "bytes"),
    }

    def find_class(self, module: str, name: str):  # type: ignore[override]
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a data batch")


def _read_cifar_batch(path: Path) -> dict:
    try:
        raw = _NumpyOnlyUnpickler(io.BytesIO(path.read_bytes()), encoding="bytes").load()
    except Exception as exc:
        raise DataError(f"cannot read CIFAR batch {path}: {exc}") from exc
    if not isinstance(raw, dict):
        raise DataError(f"{path}: not a CIFAR-style batch (expected a dict)")
    return {k.decode() if isinstance(k, bytes) else k: v for k, v in raw.items()}


def _cifar_source(folder: Path, batch_files: list[Path]) -> ImageSource:
    images, labels = [], []
    for path in batch_files:
        batch = _read_cifar_batch(path)
        data = np.asarray(batch.get("data"))
        if data.ndim != 2 or data.shape[1] % 3:
            raise DataError(f"{path}: 'data' must be (N, 3*H*W), got {data.shape}")
        side = int(round((data.shape[1] // 3) ** 0.5))
        images.append(data.reshape(-1, 3, side, side).transpose(0, 2, 3, 1))
        labels.append(np.asarray(batch.get("labels", batch.get("fine_labels", [])), dtype=np.int64))
    stacked = as_uint8_nhwc(np.concatenate(images), str(folder))
    all_labels = np.concatenate(labels)
    return ArraySource(folder.name, len(stacked), all_labels if len(all_labels) == len(stacked) else None,
                       images=stacked)


def _folder_source(folder: Path, target_size: tuple[int, int]) -> ImageSource:
    cifar = sorted(p for p in folder.iterdir() if p.is_file() and (p.name.startswith("data_batch") or p.name == "test_batch"))
    if cifar:
        return _cifar_source(folder, cifar)
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise DataError(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) found under {folder}")
    class_names = sorted({p.parent.relative_to(folder).as_posix() for p in files})
    labels = None
    if len(class_names) > 1:
        index = {name: i for i, name in enumerate(class_names)}
        labels = np.array([index[p.parent.relative_to(folder).as_posix()] for p in files], dtype=np.int64)
    return FolderSource(folder.name, len(files), labels, None, class_names if labels is not None else None,
                        files=files, target_size=target_size)


def digits_source(split: str = "all", upsample: int = 4) -> ImageSource:
    """scikit-learn's bundled hand-written digits (8x8, 0..16), upsampled to RGB uint8."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = (digits.images / 16.0 * 255.0).round().astype(np.uint8)
    images = np.repeat(np.repeat(images, upsample, axis=1), upsample, axis=2)
    order = np.random.default_rng(0).permutation(len(images))
    cut = len(images) - 500
    picked = {"all": order, "train": order[:cut], "test": order[cut:]}
    if split not in picked:
        raise DataError(f"unknown digits split '{split}' (use all, train or test)")
    chosen = picked[split]
    return ArraySource(f"digits:{split}", len(chosen), digits.target[chosen].astype(np.int64),
                       images=as_uint8_nhwc(images[chosen], "digits"))


def concept_source(split: str) -> ImageSource:
    from elude_export.data.concepts import load_split

    data = load_split(split)
    return ArraySource(f"embedded:{split}", len(data), data.labels, data.concepts,
                       [f"class {i}" for i in range(int(data.labels.max()) + 1)], images=data.images)


def open_source(spec: str, target_size: tuple[int, int] = (224, 224)) -> ImageSource:
    """Resolve a data argument: `embedded[:split]`, `digits[:split]`, a .npy/.npz file or a folder."""
    if spec == "embedded" or spec.startswith("embedded:"):
        return concept_source(spec.split(":", 1)[1] if ":" in spec else "calib")
    if spec == "digits" or spec.startswith("digits:"):
        return digits_source(spec.split(":", 1)[1] if ":" in spec else "all")
    path = Path(spec).expanduser()
    if not path.exists():
        raise DataError(f"data not found: {spec} (expected embedded[:split], digits[:split], a .npy/.npz file "
                        "or an image folder)")
    if path.is_dir():
        return _folder_source(path, target_size)
    if path.suffix in (".npy", ".npz"):
        return _array_source(path)
    raise DataError(f"unsupported data file {path}: use .npy/.npz arrays or a folder of images")
