"""Models in: loading (timm, checkpoints, the embedded default), their input spec, the weights
fingerprint, and streaming an image source to the model's device as normalised batches."""
