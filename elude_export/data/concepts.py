"""A procedural image dataset whose concepts are known, to measure disentanglement without humans.

Each 32x32 RGB scene holds one object. Its *concept* is the pair (shape, colour): 4 shapes x
4 colours = 16 concepts, `concept_id = shape * 4 + colour`. Texture, position, size,
background and a slight colour jitter vary as nuisances.

The 4 classes are each the union of 4 unrelated concepts, laid out as a Latin square over
(shape, colour) (see `LATIN_SQUARE`): every class holds every shape once and every colour
once, so neither shape alone nor colour alone predicts the class. A classifier must detect
the conjunction, and with fewer hidden units than concepts worth of capacity it reuses
units for several concepts — the polysemanticity that ELUDe is meant to split, here with
ground truth to check the split against.

Generation is pure numpy, vectorised over chunks of images, and deterministic given
`(n, seed)`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np

from elude_export.errors import DataError

IMAGE_SIZE = 32
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "cross")
COLOURS: tuple[str, ...] = ("red", "green", "blue", "yellow")
TEXTURES: tuple[str, ...] = ("solid", "stripes", "checker")
N_CONCEPTS: int = len(SHAPES) * len(COLOURS)
N_CLASSES: int = 4

# Rows: shape, columns: colour, entry: class. A Latin square that is not the cyclic
# (shape + colour) % 4, so the class is not a simple arithmetic function of the factors.
LATIN_SQUARE = np.array(
    [
        [0, 1, 2, 3],
        [1, 0, 3, 2],
        [2, 3, 1, 0],
        [3, 2, 0, 1],
    ],
    dtype=np.int64,
)
CLASS_OF_CONCEPT: np.ndarray = LATIN_SQUARE.reshape(-1).copy()

# Saturated, mutually distant base colours (RGB); the jitter below keeps them apart.
_COLOUR_RGB = np.array(
    [
        [225, 35, 35],  # red
        [35, 200, 50],  # green
        [45, 85, 235],  # blue
        [235, 215, 35],  # yellow
    ],
    dtype=np.float32,
)
_COLOUR_JITTER = 18.0  # +- per channel, uniform
_TEXTURE_DARK = 0.55  # brightness of the dark phase of stripes / checker
_SIZE_RANGE = (7.0, 12.0)  # half-extent of the object in pixels
_BACKGROUND_MAX = 60.0  # per-channel tint of the dark background
_NOISE_STD = 10.0
_CHUNK = 2048  # images generated at once: bounds memory at a few tens of MB


def concept_name(concept_id: int) -> str:
    """Human-readable name of a concept, e.g. `"red circle"`."""
    if not 0 <= int(concept_id) < N_CONCEPTS:
        raise DataError(f"concept id must be in [0, {N_CONCEPTS}), got {concept_id}")
    shape, colour = divmod(int(concept_id), len(COLOURS))
    return f"{COLOURS[colour]} {SHAPES[shape]}"


@dataclass
class ConceptSet:
    """Images with their class labels, concept ids and every generating factor.

    Sets returned by `load_split` are cached and shared: copy before modifying.
    """

    images: np.ndarray  # (n, 32, 32, 3) uint8
    labels: np.ndarray  # (n,) int64 class
    concepts: np.ndarray  # (n,) int64 in [0, N_CONCEPTS)
    factors: dict[str, np.ndarray] = field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.images.shape[0])


def _shape_masks(shape: np.ndarray, dx: np.ndarray, dy: np.ndarray, r: np.ndarray) -> np.ndarray:
    """Boolean object masks (m, H, W) for per-image shape ids, offsets from centre and size."""
    circle = dx**2 + dy**2 <= r**2
    square = np.maximum(np.abs(dx), np.abs(dy)) <= 0.85 * r
    # upward triangle: apex at -r, base at +0.8 r with half-width r
    height = 1.8 * r
    triangle = (dy >= -r) & (dy <= 0.8 * r) & (np.abs(dx) <= (dy + r) / height * r)
    arm = r / 3.0
    cross = ((np.abs(dx) <= arm) & (np.abs(dy) <= r)) | ((np.abs(dy) <= arm) & (np.abs(dx) <= r))
    masks = np.stack([circle, square, triangle, cross])  # (4, m, H, W)
    return masks[shape, np.arange(shape.shape[0])]


def _texture_gain(texture: np.ndarray, xs: np.ndarray, ys: np.ndarray, phase: np.ndarray) -> np.ndarray:
    """Brightness multiplier (m, H, W): texture changes brightness only, never the hue."""
    stripes = ((xs + ys + phase) // 3) % 2 == 0  # diagonal stripes, 3 px wide
    checker = ((xs + phase) // 3 + (ys + phase) // 3) % 2 == 0
    bright = np.stack([np.ones_like(stripes), stripes, checker])[texture, np.arange(texture.shape[0])]
    return np.where(bright, 1.0, _TEXTURE_DARK).astype(np.float32)


def _render(factors: dict[str, np.ndarray], rng: np.random.Generator) -> np.ndarray:
    """Draw one chunk of scenes from their factors; pixel noise comes from `rng`."""
    m = factors["shape"].shape[0]
    grid = np.arange(IMAGE_SIZE, dtype=np.float32)
    ys = np.broadcast_to(grid[None, :, None], (m, IMAGE_SIZE, IMAGE_SIZE))
    xs = np.broadcast_to(grid[None, None, :], (m, IMAGE_SIZE, IMAGE_SIZE))
    cx, cy, size = (factors[key].astype(np.float32)[:, None, None] for key in ("x", "y", "size"))
    mask = _shape_masks(factors["shape"], xs - cx, ys - cy, size)

    background = rng.uniform(0.0, _BACKGROUND_MAX, size=(m, 1, 1, 3)).astype(np.float32)
    image = background + rng.normal(0.0, _NOISE_STD, size=(m, IMAGE_SIZE, IMAGE_SIZE, 3)).astype(np.float32)

    rgb = _COLOUR_RGB[factors["colour"]] + rng.uniform(-_COLOUR_JITTER, _COLOUR_JITTER, size=(m, 3))
    phase = rng.integers(0, 6, size=m).astype(np.float32)[:, None, None]
    gain = _texture_gain(factors["texture"], xs, ys, phase)
    foreground = rgb[:, None, None, :].astype(np.float32) * gain[..., None]
    image = np.where(mask[..., None], foreground, image)
    return np.clip(np.rint(image), 0, 255).astype(np.uint8)


def _draw_factors(n: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Balanced concepts (counts differ by at most one) in random order, nuisances uniform."""
    concepts = rng.permutation(np.arange(n, dtype=np.int64) % N_CONCEPTS)
    size = rng.uniform(*_SIZE_RANGE, size=n)
    # keep the whole object inside the frame: centre at least `size` from each border
    low, high = size, IMAGE_SIZE - 1 - size
    return {
        "shape": concepts // len(COLOURS),
        "colour": concepts % len(COLOURS),
        "texture": rng.integers(0, len(TEXTURES), size=n).astype(np.int64),
        "x": low + rng.uniform(size=n) * (high - low),
        "y": low + rng.uniform(size=n) * (high - low),
        "size": size,
    }


def generate_concepts(n: int, seed: int) -> ConceptSet:
    """Generate `n` scenes, deterministically for a given `(n, seed)`."""
    if n < 0:
        raise DataError(f"number of images must be >= 0, got {n}")
    rng = np.random.default_rng(seed)
    factors = _draw_factors(n, rng)
    images = np.empty((n, IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)
    for start in range(0, n, _CHUNK):
        chunk = {key: value[start : start + _CHUNK] for key, value in factors.items()}
        images[start : start + _CHUNK] = _render(chunk, rng)
    concepts = factors["shape"] * len(COLOURS) + factors["colour"]
    return ConceptSet(images=images, labels=CLASS_OF_CONCEPT[concepts], concepts=concepts, factors=factors)


# name -> (n, seed). Distinct seeds keep the splits independent draws.
SPLITS: dict[str, tuple[int, int]] = {
    "train": (20000, 0),
    "calib": (2000, 1),
    "test": (2000, 2),
}


@lru_cache(maxsize=None)
def _cached_split(name: str) -> ConceptSet:
    n, seed = SPLITS[name]
    return generate_concepts(n, seed)


def object_masks(data: ConceptSet) -> np.ndarray:
    """(n, 32, 32) bool: where each scene's object was drawn, from its stored factors.

    The same `_shape_masks` call that `_render` uses, so the mask is exactly the pixels the
    object covers (texture only changes brightness inside it); token-level evidence measures
    whether a column's activations fall on the object against this ground truth.
    """
    grid = np.arange(IMAGE_SIZE, dtype=np.float32)
    masks = np.empty((len(data), IMAGE_SIZE, IMAGE_SIZE), dtype=bool)
    for start in range(0, len(data), _CHUNK):
        part = slice(start, start + _CHUNK)
        m = data.factors["shape"][part].shape[0]
        ys = np.broadcast_to(grid[None, :, None], (m, IMAGE_SIZE, IMAGE_SIZE))
        xs = np.broadcast_to(grid[None, None, :], (m, IMAGE_SIZE, IMAGE_SIZE))
        cx, cy, size = (data.factors[key][part].astype(np.float32)[:, None, None] for key in ("x", "y", "size"))
        masks[part] = _shape_masks(data.factors["shape"][part], xs - cx, ys - cy, size)
    return masks


def concept_factors(concepts: np.ndarray) -> dict[str, np.ndarray]:
    """Concept ids -> their factors {"shape", "colour"} (`concept_id = shape * 4 + colour`)."""
    concepts = np.asarray(concepts, dtype=np.int64)
    return {"shape": concepts // len(COLOURS), "colour": concepts % len(COLOURS)}


def load_split(name: str) -> ConceptSet:
    """One of the named splits (`SPLITS`), generated once per process and cached."""
    if name not in SPLITS:
        raise DataError(f"unknown concept split '{name}'; valid names: {', '.join(SPLITS)}")
    return _cached_split(name)
