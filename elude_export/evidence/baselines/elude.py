"""ELUDe's sub-units: the subject, read from the rewritten model's image taps.

The rewritten model runs in the shared forward (the shuffle control needs its routes too);
this family reads its taps and checks that its logits equal the original's bit for bit.
"""

from __future__ import annotations

from typing import Any

import torch

from elude_export.evidence.baselines.base import ELUDE, EvalSetup, LogitTally, SharedForward, SubunitBaseline
from elude_export.evidence.baselines.registry import register_baseline


@register_baseline
class EludeBaseline(SubunitBaseline):
    name = ELUDE
    color = "#dd8452"

    def __init__(self, setup: EvalSetup):
        super().__init__(setup)
        self.tally = LogitTally()

    def observe(self, forward: SharedForward) -> dict[str, torch.Tensor]:
        self.tally.update(forward.rewritten_logits, forward.logits, forward.labels)
        return dict(forward.taps)

    def accuracy(self, n_images: int) -> dict[str, Any]:
        return {"rewritten": self.tally.correct / n_images, "rewritten_logits_bitwise_equal": self.tally.identical,
                "rewritten_max_abs_logit_diff": self.tally.max_diff}

    @classmethod
    def accuracy_text(cls, accuracy: dict[str, Any]) -> str:
        return (f"  rewritten {accuracy['rewritten']:.4f}  "
                f"(logits bitwise equal: {'yes' if accuracy['rewritten_logits_bitwise_equal'] else 'NO'}, "
                f"max |diff| {accuracy['rewritten_max_abs_logit_diff']:.3g})")
