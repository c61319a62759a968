"""Numeric comparison of two outputs: the one yardstick for every equality claim.

Used for PyTorch-vs-rewrite checks and (in `validate`) PyTorch-vs-onnxruntime checks.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch


@dataclass
class Comparison:
    """How far `candidate` is from `reference`, element by element."""

    name: str
    shape: tuple[int, ...]
    max_abs: float
    max_rel: float
    equal_fraction: float  # share of bitwise-equal elements
    top1_agreement: float | None  # for (batch, classes) outputs
    atol: float
    rtol: float
    ok: bool  # |candidate - reference| <= atol + rtol * |reference| everywhere, same shape

    def as_dict(self) -> dict:
        return asdict(self)

    def line(self) -> str:
        mark = "✓" if self.ok else "✗"
        top1 = "" if self.top1_agreement is None else f"  top1 {self.top1_agreement:.4f}"
        return (f"{mark} {self.name:<32} {str(self.shape):<16} max|Δ| {self.max_abs:.3e}  "
                f"max rel {self.max_rel:.3e}  bitwise {self.equal_fraction:.4f}{top1}  "
                f"(atol {self.atol:g}, rtol {self.rtol:g})")


def _as_numpy(value: torch.Tensor | np.ndarray) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        return value.detach().float().cpu().numpy() if value.dtype == torch.bfloat16 else value.detach().cpu().numpy()
    return np.asarray(value)


def compare(name: str, reference: torch.Tensor | np.ndarray, candidate: torch.Tensor | np.ndarray,
            atol: float = 1e-5, rtol: float = 1e-4, classifier: bool = False) -> Comparison:
    """Compare element-wise; shapes must match exactly (a shape mismatch is never 'close')."""
    ref, cand = _as_numpy(reference), _as_numpy(candidate)
    if ref.shape != cand.shape:
        return Comparison(name, tuple(cand.shape), float("inf"), float("inf"), 0.0, None, atol, rtol, ok=False)
    ref64, cand64 = ref.astype(np.float64), cand.astype(np.float64)
    diff = np.abs(ref64 - cand64)
    scale = np.abs(ref64)
    rel = diff / np.maximum(scale, np.finfo(np.float32).tiny)
    rel[diff == 0] = 0.0
    top1 = None
    if classifier and ref.ndim == 2 and ref.shape[1] > 1:
        top1 = float((ref.argmax(1) == cand.argmax(1)).mean())
    within = bool(np.all(diff <= atol + rtol * scale)) and bool(np.isfinite(cand64).all() == np.isfinite(ref64).all())
    return Comparison(
        name, tuple(ref.shape), float(diff.max(initial=0.0)), float(rel.max(initial=0.0)),
        float((ref == cand).mean()) if ref.size else 1.0, top1, atol, rtol, ok=within,
    )
