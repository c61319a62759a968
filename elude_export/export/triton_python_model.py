"""Triton python-backend model: runs the ELUDe `model.onnx` next to it with onnxruntime.

Copied into `<repo>/<name>/1/model.py` by `elude export --triton-repo DIR --triton-backend
python`. It imports neither torch nor elude_export: only numpy, onnxruntime and Triton's
`triton_python_backend_utils`. All requests Triton hands over in one `execute` call run as one
onnxruntime batch; a request that sends no `steer.<layer>` gets ones (no steering) for its
rows, one that sends a single row has it applied to all its images.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import triton_python_backend_utils as pb_utils  # provided by Triton's python backend

INPUT_NAME = "input"


def _array(tensor) -> np.ndarray:
    """A request tensor as an owned float32 array, through DLPack.

    Stubs built against numpy 1.x (pytriton's, Triton's own before numpy 2) misread numpy 2
    arrays through `as_numpy()` / `pb_utils.Tensor(name, array)` (wrong values, empty
    outputs); DLPack does not depend on numpy's C layout.
    """
    return np.from_dlpack(tensor).astype(np.float32, copy=True)


class TritonPythonModel:
    def initialize(self, args: dict) -> None:
        config = json.loads(args["model_config"])
        path = Path(args["model_repository"]) / args["model_version"] / "model.onnx"
        options = ort.SessionOptions()
        options.log_severity_level = 3  # steer initializers that are also inputs warn by design
        providers: list = ["CPUExecutionProvider"]
        if args.get("model_instance_kind") == "GPU" and "CUDAExecutionProvider" in ort.get_available_providers():
            # TF32 off, as elude_export.export.ort_session does (it cannot be imported here): served
            # outputs are the ones `elude validate` measured
            device = int(args.get("model_instance_device_id", 0))
            providers.insert(0, ("CUDAExecutionProvider", {"device_id": device, "use_tf32": "0"}))
        self.session = ort.InferenceSession(str(path), options, providers=providers)
        self.outputs = [output["name"] for output in config["output"]]
        self.steers = {init.name: int(init.shape[-1]) for init in self.session.get_overridable_initializers()
                       if init.name.startswith("steer.")}

    def execute(self, requests: list) -> list:
        images, counts = [], []
        for request in requests:
            images.append(_array(pb_utils.get_input_tensor_by_name(request, INPUT_NAME)))
            counts.append(len(images[-1]))
        feed = {INPUT_NAME: np.concatenate(images)}
        for name, size in self.steers.items():
            rows, given = [], False
            for request, count in zip(requests, counts):
                tensor = pb_utils.get_input_tensor_by_name(request, name)
                if tensor is None:
                    rows.append(np.ones((count, size), np.float32))
                    continue
                given = True
                value = _array(tensor).reshape(-1, size)
                rows.append(np.broadcast_to(value, (count, size)) if len(value) == 1 else value)
            if given:
                feed[name] = np.concatenate(rows)
        try:
            if any(name in feed and len(feed[name]) != len(feed[INPUT_NAME]) for name in self.steers):
                raise ValueError("a steer input must have one row, or one row per image")
            values = self.session.run(self.outputs, feed)
        except Exception as exc:  # report to the client instead of killing the model instance
            error = pb_utils.TritonError(f"{exc.__class__.__name__}: {exc}")
            return [pb_utils.InferenceResponse(output_tensors=[], error=error) for _ in requests]
        responses, start = [], 0
        for count in counts:
            # DLPack, not pb_utils.Tensor(name, array): see _array
            tensors = [pb_utils.Tensor.from_dlpack(name, np.ascontiguousarray(value[start:start + count]))
                       for name, value in zip(self.outputs, values)]
            responses.append(pb_utils.InferenceResponse(output_tensors=tensors))
            start += count
        return responses
