"""The model configuration as Triton's `model_configuration` extension returns it (JSON form).

Tooling written for Triton (perf_analyzer, `get_model_config`) reads shapes and types from it.
`max_batch_size` is 0 because the steer inputs are not batched: `dims` are the full shapes,
-1 marking the free batch dimension; the server's own micro-batching is described under
`dynamic_batching` and `parameters`.
"""

from __future__ import annotations

from serving.config import ServeConfig
from serving.runtime import ModelRuntime, TensorSpec

TRITON_TYPES = {"FP32": "TYPE_FP32", "FP16": "TYPE_FP16", "FP64": "TYPE_FP64", "INT64": "TYPE_INT64",
                "INT32": "TYPE_INT32", "INT8": "TYPE_INT8", "UINT8": "TYPE_UINT8", "BOOL": "TYPE_BOOL"}


def _tensor(spec: TensorSpec, **extra) -> dict:
    return {"name": spec.name, "data_type": TRITON_TYPES[spec.datatype], "dims": list(spec.shape), **extra}


def model_config(runtime: ModelRuntime, config: ServeConfig) -> dict:
    steer = set(runtime.steer_inputs.values())
    kind = "KIND_GPU" if runtime.provider.startswith("CUDA") else "KIND_CPU"
    return {
        "name": runtime.name,
        "platform": "onnxruntime_onnx",
        "backend": "onnxruntime",
        "version_policy": {"latest": {"num_versions": 1}},
        "max_batch_size": 0,
        "input": [_tensor(spec, format="FORMAT_NONE", optional=spec.name in steer)
                  for spec in runtime.inputs.values()],
        "output": [_tensor(spec) for spec in runtime.outputs.values()],
        "instance_group": [{"name": runtime.name, "kind": kind, "count": runtime.plan.instances}],
        "dynamic_batching": {"preferred_batch_size": [config.max_batch],
                             "max_queue_delay_microseconds": int(config.batch_timeout_ms * 1000)},
        "default_model_filename": runtime.path.name,
        "parameters": {"elude_max_batch": {"string_value": str(config.max_batch)},
                       "elude_queue_size": {"string_value": str(config.queue_size)},
                       "elude_plan_fingerprint": {"string_value": runtime.contract.plan_fingerprint}},
    }
