"""Image sources: arrays, folders, CIFAR batches, digits; every bad input is a DataError."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from elude_export.errors import DataError
from elude_export.models import normalize_images
from elude_export.models import embedded_input_spec
from elude_export.data.sources import digits_source, open_source


def test_npz_with_labels_and_npy_layouts(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    nchw = rng.integers(0, 256, (6, 3, 32, 32), dtype=np.uint8)
    np.savez(tmp_path / "set.npz", images=nchw, labels=np.arange(6))
    source = open_source(str(tmp_path / "set.npz"))
    assert len(source) == 6 and source.labels.tolist() == list(range(6))
    assert np.array_equal(source.load(np.array([2])), nchw[2:3].transpose(0, 2, 3, 1))
    np.save(tmp_path / "float.npy", rng.random((4, 32, 32, 3), dtype=np.float32))
    floats = open_source(str(tmp_path / "float.npy"))
    assert floats.load(np.arange(4)).dtype == np.uint8 and floats.load(np.arange(4)).max() > 200


def test_image_folder_labels_from_subfolders(tmp_path: Path) -> None:
    for label, colour in (("cats", (255, 0, 0)), ("dogs", (0, 0, 255))):
        (tmp_path / label).mkdir()
        for i in range(2):
            Image.new("RGB", (40, 30), colour).save(tmp_path / label / f"{i}.png")
    source = open_source(str(tmp_path), target_size=(32, 32))
    assert source.class_names == ["cats", "dogs"] and source.labels.tolist() == [0, 0, 1, 1]
    images = source.load(np.arange(4))
    assert images.shape == (4, 32, 32, 3) and images[0, 0, 0].tolist() == [255, 0, 0]


def test_cifar_batches_load_without_arbitrary_pickles(tmp_path: Path) -> None:
    data = np.random.default_rng(1).integers(0, 256, (5, 3 * 32 * 32), dtype=np.uint8)
    with open(tmp_path / "data_batch_1", "wb") as handle:
        pickle.dump({b"data": data, b"labels": [0, 1, 2, 3, 4]}, handle)
    source = open_source(str(tmp_path))
    assert len(source) == 5 and source.labels.tolist() == [0, 1, 2, 3, 4]
    assert np.array_equal(source.load(np.array([0]))[0], data[0].reshape(3, 32, 32).transpose(1, 2, 0))

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    evil_dir = tmp_path / "evil"
    evil_dir.mkdir()
    with open(evil_dir / "data_batch_1", "wb") as handle:
        pickle.dump({b"data": Evil()}, handle)
    with pytest.raises(DataError, match="refusing"):
        open_source(str(evil_dir))


def test_digits_are_bundled_and_split() -> None:
    train, test = digits_source("train"), digits_source("test")
    assert len(test) == 500 and len(train) + len(test) == 1797
    assert train.load(np.arange(2)).shape == (2, 32, 32, 3)
    assert set(test.labels.tolist()) == set(range(10))


def test_bad_inputs_are_data_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="not found"):
        open_source(str(tmp_path / "missing"))
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(DataError, match="unsupported"):
        open_source(str(tmp_path / "notes.txt"))
    (tmp_path / "broken.npy").write_bytes(b"\x93NUMPY garbage")
    with pytest.raises(DataError, match="cannot read"):
        open_source(str(tmp_path / "broken.npy"))
    np.save(tmp_path / "vector.npy", np.zeros(10))
    with pytest.raises(DataError, match="image array"):
        open_source(str(tmp_path / "vector.npy"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no images"):
        open_source(str(tmp_path / "empty"))
    (tmp_path / "corrupt").mkdir()
    (tmp_path / "corrupt" / "x.png").write_bytes(b"not a png")
    with pytest.raises(DataError, match="cannot read image"):
        open_source(str(tmp_path / "corrupt")).load(np.array([0]))
    with pytest.raises(DataError, match="digits split"):
        open_source("digits:nope")


def test_normalisation_matches_spec() -> None:
    spec = embedded_input_spec()
    images = np.full((2, 32, 32, 3), 255, dtype=np.uint8)
    out = normalize_images(images, spec)
    assert out.shape == (2, 3, 32, 32)
    assert np.allclose(out.numpy(), (1.0 - spec.mean[0]) / spec.std[0])
    resized = normalize_images(np.zeros((1, 64, 48, 3), dtype=np.uint8), spec)
    assert resized.shape == (1, 3, 32, 32)
