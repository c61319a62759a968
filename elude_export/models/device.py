"""Where a stage runs: `auto` picks CUDA when torch sees a GPU."""

from __future__ import annotations

import torch

from elude_export.errors import DataError

DEVICES = ("auto", "cpu", "cuda")


def resolve_device(device: str) -> torch.device:
    if device not in DEVICES:
        raise DataError(f"unknown device '{device}' (use auto, cpu or cuda)")
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise DataError("--device cuda requested but no CUDA device is available")
    return torch.device(device)
