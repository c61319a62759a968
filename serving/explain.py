"""Per-image answer of the image endpoint: top classes and the most active sub-units by name.

Sub-units are ranked by their `max` tap value (the image activation METHOD.md uses), across
all layers; each comes with its layer, parent unit, sub index and whether it fires (value
above the parent unit's calibration threshold).
"""

from __future__ import annotations

from typing import Mapping

import numpy as np

from serving.runtime import ModelRuntime


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=-1, keepdims=True)
    exp = np.exp(shifted)
    return exp / exp.sum(axis=-1, keepdims=True)


def describe_images(outputs: Mapping[str, np.ndarray], runtime: ModelRuntime, top_k: int,
                    top_subunits: int) -> list[dict]:
    contract = runtime.contract
    n = next(iter(outputs.values())).shape[0]
    answers: list[dict] = [{} for _ in range(n)]
    if "logits" in outputs and top_k > 0:
        logits = outputs["logits"].reshape(n, -1).astype(np.float64)
        probabilities = softmax(logits)
        for i, answer in enumerate(answers):
            order = np.argsort(-probabilities[i], kind="stable")[:top_k]
            answer["classes"] = [{"index": int(c), "probability": float(probabilities[i, c]),
                                  "logit": float(logits[i, c])} for c in order]
    elif "embedding" in outputs:
        for answer in answers:
            answer["classes"] = []  # an embedding model has no classes; its sub-units still explain it

    columns: list[tuple[str, int]] = []  # (layer, column) for every max-tap column, in concatenation order
    blocks = []
    for layer, output in runtime.max_taps().items():
        values = outputs[output].reshape(n, -1)
        blocks.append(values)
        columns += [(layer, c) for c in range(values.shape[1])]
    if not blocks or top_subunits <= 0:
        for answer in answers:
            answer["subunits"] = []
        return answers
    values = np.concatenate(blocks, axis=1)
    for i, answer in enumerate(answers):
        k = min(top_subunits, values.shape[1])
        top = np.argpartition(-values[i], k - 1)[:k]
        top = top[np.argsort(-values[i, top], kind="stable")]
        listed = []
        for index in top:
            layer, column = columns[index]
            info = runtime.layer_by_path[layer]
            unit = int(info.unit[column])
            baseline = contract.baseline.get(layer)
            name = info.subunits[column]
            entry = {"name": name, "label": contract.label_text(name), "layer": layer, "unit": unit,
                     "sub": int(info.sub[column]), "activation": float(values[i, index])}
            if baseline is not None:
                entry["fires"] = bool(values[i, index] > baseline.threshold[unit])
            listed.append(entry)
        answer["subunits"] = listed
    return answers
