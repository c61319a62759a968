"""Models in: loading (timm, checkpoints, the embedded default), their input spec, the weights
fingerprint, the device, and streaming an image source to the model as normalised batches."""

from elude_export.models.batches import model_batches, normalize_images
from elude_export.models.device import DEVICES, resolve_device
from elude_export.models.fingerprint import fingerprint_model
from elude_export.models.loading import (
    EMBEDDED_ARCH,
    EMBEDDED_DIGITS_MODEL,
    EMBEDDED_DIGITS_WEIGHTS,
    EMBEDDED_MEAN,
    EMBEDDED_MODEL,
    EMBEDDED_STD,
    EMBEDDED_WEIGHTS,
    LoadedModel,
    create_embedded_model,
    embedded_input_spec,
    load_checkpoint_into,
    load_model,
    read_checkpoint,
)
from elude_export.models.spec import InputSpec

__all__ = [
    "DEVICES", "EMBEDDED_ARCH", "EMBEDDED_DIGITS_MODEL", "EMBEDDED_DIGITS_WEIGHTS", "EMBEDDED_MEAN",
    "EMBEDDED_MODEL", "EMBEDDED_STD", "EMBEDDED_WEIGHTS", "InputSpec", "LoadedModel", "create_embedded_model",
    "embedded_input_spec", "fingerprint_model", "load_checkpoint_into", "load_model", "model_batches",
    "normalize_images", "read_checkpoint", "resolve_device",
]
