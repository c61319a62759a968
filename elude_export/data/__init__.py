"""The embedded default: a concept dataset with known ground truth and the ViT trained on it.

`embedded_vit.safetensors` / `embedded_vit.json` (the checkpoint and its model card) are
produced by `examples/train_embedded.py`; `elude_export.models` loads them.
"""

from elude_export.data.concepts import (
    CLASS_OF_CONCEPT,
    COLOURS,
    N_CLASSES,
    N_CONCEPTS,
    SHAPES,
    SPLITS,
    TEXTURES,
    ConceptSet,
    concept_name,
    generate_concepts,
    load_split,
)

__all__ = [
    "CLASS_OF_CONCEPT",
    "COLOURS",
    "N_CLASSES",
    "N_CONCEPTS",
    "SHAPES",
    "SPLITS",
    "TEXTURES",
    "ConceptSet",
    "concept_name",
    "generate_concepts",
    "load_split",
]
