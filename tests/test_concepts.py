"""The embedded concept dataset: deterministic, balanced, class mapping without shortcuts; the
committed checkpoint actually solves it."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from elude_export.data import concepts as C
from elude_export.errors import DataError


def test_same_seed_gives_identical_arrays() -> None:
    first, second = C.generate_concepts(64, seed=3), C.generate_concepts(64, seed=3)
    np.testing.assert_array_equal(first.images, second.images)
    np.testing.assert_array_equal(first.labels, second.labels)
    np.testing.assert_array_equal(first.concepts, second.concepts)
    assert first.factors.keys() == second.factors.keys()
    for key in first.factors:
        np.testing.assert_array_equal(first.factors[key], second.factors[key])


def test_different_seeds_differ() -> None:
    first, second = C.generate_concepts(64, seed=3), C.generate_concepts(64, seed=4)
    assert not np.array_equal(first.images, second.images)
    assert not np.array_equal(first.concepts, second.concepts)


def test_shapes_and_dtypes() -> None:
    data = C.generate_concepts(40, seed=0)
    assert len(data) == 40
    assert data.images.shape == (40, 32, 32, 3) and data.images.dtype == np.uint8
    assert data.labels.shape == (40,) and data.labels.dtype == np.int64
    assert data.concepts.shape == (40,) and data.concepts.dtype == np.int64
    assert data.concepts.min() >= 0 and data.concepts.max() < C.N_CONCEPTS
    assert set(data.factors) == {"shape", "colour", "texture", "x", "y", "size"}
    for values in data.factors.values():
        assert values.shape == (40,)
    np.testing.assert_array_equal(data.concepts, data.factors["shape"] * len(C.COLOURS) + data.factors["colour"])
    np.testing.assert_array_equal(data.labels, C.CLASS_OF_CONCEPT[data.concepts])
    assert data.factors["texture"].max() < len(C.TEXTURES)


def test_images_are_not_blank_and_object_has_its_colour() -> None:
    """The object's pixels carry its colour: the strongest channel at the object centre matches."""
    data = C.generate_concepts(64, seed=1)
    dominant = {"red": {0}, "green": {1}, "blue": {2}, "yellow": {0, 1}}
    for i in range(len(data)):
        x, y = int(round(data.factors["x"][i])), int(round(data.factors["y"][i]))
        pixel = data.images[i, y, x].astype(int)
        assert int(np.argmax(pixel)) in dominant[C.COLOURS[data.factors["colour"][i]]], (i, pixel)
    assert data.images.std() > 20


@pytest.mark.parametrize("n", [16, 160, 333])
def test_concepts_are_balanced(n: int) -> None:
    counts = np.bincount(C.generate_concepts(n, seed=7).concepts, minlength=C.N_CONCEPTS)
    assert counts.sum() == n
    assert counts.max() - counts.min() <= 1


def test_class_mapping_is_a_latin_square() -> None:
    """Each class holds every shape and every colour exactly once: neither factor alone predicts it."""
    assert C.N_CONCEPTS == len(C.SHAPES) * len(C.COLOURS) == 16
    assert C.CLASS_OF_CONCEPT.shape == (C.N_CONCEPTS,) and C.CLASS_OF_CONCEPT.dtype == np.int64
    square = C.CLASS_OF_CONCEPT.reshape(len(C.SHAPES), len(C.COLOURS))
    for klass in range(C.N_CLASSES):
        members = np.argwhere(square == klass)
        assert len(members) == 4
        assert sorted(members[:, 0]) == list(range(len(C.SHAPES)))  # every shape once
        assert sorted(members[:, 1]) == list(range(len(C.COLOURS)))  # every colour once


def test_concept_names() -> None:
    names = [C.concept_name(i) for i in range(C.N_CONCEPTS)]
    assert len(set(names)) == C.N_CONCEPTS
    assert C.concept_name(0) == f"{C.COLOURS[0]} {C.SHAPES[0]}"
    with pytest.raises(DataError):
        C.concept_name(C.N_CONCEPTS)


def test_unknown_split_names_the_valid_ones() -> None:
    with pytest.raises(DataError) as info:
        C.load_split("nope")
    for name in ("train", "calib", "test"):
        assert name in str(info.value)


def test_split_is_cached_and_independent_of_other_splits() -> None:
    test = C.load_split("test")
    assert C.load_split("test") is test
    assert len(test) == C.SPLITS["test"][0]
    calib = C.load_split("calib")
    assert not np.array_equal(test.images[:16], calib.images[:16])


def test_committed_checkpoint_solves_the_test_split() -> None:
    from elude_export.models import normalize_images
    from elude_export.models import EMBEDDED_WEIGHTS, create_embedded_model, embedded_input_spec

    assert EMBEDDED_WEIGHTS.is_file(), "run examples/train_embedded.py to create the embedded checkpoint"
    model = create_embedded_model()
    data = C.load_split("test")
    with torch.no_grad():
        logits = model(normalize_images(data.images[:500], embedded_input_spec()))
    accuracy = float((logits.argmax(dim=1).numpy() == data.labels[:500]).mean())
    assert accuracy >= 0.9, accuracy
