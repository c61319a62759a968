"""The onnxruntime session of one ELUDe export, its contract, and steering by sub-unit name.

Works from the `.onnx` file alone (numpy, onnxruntime and the torch-free contract): what the
graph exposes (inputs, outputs, taps, steer inputs) is read from the session and checked
against the metadata, so a wrong or foreign file fails at start-up, not on the first request.
"""

from __future__ import annotations

import functools
import itertools
import logging
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping

import numpy as np

from elude_export.errors import ModelLoadError
from elude_export.export.contract import INPUT_NAME, OnnxContract
from elude_export.export.ort_session import CPU, choose_providers, open_session
from serving.errors import BadRequest, NonFiniteOutput
from serving.instances import plan_instances
from serving.priority import call_lowered
from serving.steering import InvalidSteering, UnknownSubunit, steer_vectors

log = logging.getLogger("elude.serving")

# onnxruntime element type -> (numpy dtype, KServe v2 datatype)
ORT_TYPES: dict[str, tuple[np.dtype, str]] = {
    "tensor(float)": (np.dtype(np.float32), "FP32"),
    "tensor(float16)": (np.dtype(np.float16), "FP16"),
    "tensor(double)": (np.dtype(np.float64), "FP64"),
    "tensor(int64)": (np.dtype(np.int64), "INT64"),
    "tensor(int32)": (np.dtype(np.int32), "INT32"),
    "tensor(int8)": (np.dtype(np.int8), "INT8"),
    "tensor(uint8)": (np.dtype(np.uint8), "UINT8"),
    "tensor(bool)": (np.dtype(np.bool_), "BOOL"),
}
V2_DTYPES: dict[str, np.dtype] = {v2: np_type for np_type, v2 in ORT_TYPES.values()}


def v2_datatype(dtype: np.dtype) -> str:
    for np_type, v2 in ORT_TYPES.values():
        if np_type == dtype:
            return v2
    raise TypeError(f"no KServe v2 datatype for {dtype}")


@dataclass(frozen=True)
class TensorSpec:
    """A graph input/output as the v2 metadata describes it (-1 for a free dimension)."""

    name: str
    datatype: str
    shape: tuple[int, ...]
    dtype: np.dtype = field(compare=False)

    def to_v2(self) -> dict:
        return {"name": self.name, "datatype": self.datatype, "shape": list(self.shape)}


@dataclass(frozen=True)
class Steering:
    """Scales for some sub-units, as the `steer.<layer>` feeds; `key` groups equal steerings."""

    key: tuple = ()
    feeds: Mapping[str, np.ndarray] = field(default_factory=dict, compare=False)
    named: Mapping[str, float] = field(default_factory=dict, compare=False)

    @property
    def active(self) -> bool:
        return bool(self.key)


NO_STEERING = Steering()


def require_finite(outputs: Mapping[str, np.ndarray], names: list[str] | None = None) -> None:
    """Finite inputs can still overflow inside the model (3e38 inputs, huge steer scales): a 422, never NaN."""
    for name in names if names is not None else list(outputs):
        array = outputs[name]
        if array.dtype.kind == "f" and not np.isfinite(array).all():
            raise NonFiniteOutput(f"the model produced NaN or infinite values in '{name}' for this request "
                                  f"(inputs or steer scales too large for float32 arithmetic)")


def _spec(node) -> TensorSpec:
    if node.type not in ORT_TYPES:
        raise ModelLoadError(f"graph tensor '{node.name}' has unsupported type {node.type}")
    dtype, datatype = ORT_TYPES[node.type]
    shape = tuple(d if isinstance(d, int) and d >= 0 else -1 for d in node.shape)
    return TensorSpec(node.name, datatype, shape, dtype)


class ModelRuntime:
    """The sessions of one model (one per instance); `run` is thread-safe (onnxruntime sessions are).

    `instances` 1 opens one session (library use, tests); 0 lets `serving.instances` decide, as
    `elude serve` does by default. `threads` is per instance.
    """

    def __init__(self, model_path: str | Path, provider: str = "auto", threads: int = 0,
                 allow_spinning: bool = False, name: str | None = None, nice: int = 0, instances: int = 1):
        path = Path(model_path)
        if not path.is_file():
            raise ModelLoadError(f"ONNX model not found: {path}")
        # the session validate measured (CUDA without TF32); one inter-op thread and, by default,
        # no spinning: idle intra-op threads would burn the cores the HTTP event loop needs; its
        # pool threads are created `nice` below this thread (`run` should be called at it too).
        # One session per instance (serving.instances), so concurrent runs never share a pool.
        self.nice = nice
        on_cuda = choose_providers(provider, ModelLoadError)[0] != CPU
        self.plan = plan_instances(instances, threads, on_cuda)
        self.sessions = [call_lowered(lambda: open_session(path, provider, ModelLoadError, threads=self.plan.threads,
                                                           inter_op_threads=1, allow_spinning=allow_spinning), nice)
                         for _ in range(self.plan.instances)]
        self.session = self.sessions[0]
        try:
            self.contract = OnnxContract.from_metadata_props(dict(self.session.get_modelmeta().custom_metadata_map))
        except ValueError as exc:
            raise ModelLoadError(f"{path}: {exc}") from exc
        self.path = path
        self.name = name or self.contract.model_name
        self.providers = list(self.session.get_providers())
        self.provider = self.providers[0]
        # steer inputs backed by initializers (ones) are "overridable initializers", not inputs, to ORT
        graph_inputs = [*self.session.get_inputs(), *self.session.get_overridable_initializers()]
        self.inputs = {node.name: _spec(node) for node in graph_inputs}
        self.outputs = {node.name: _spec(node) for node in self.session.get_outputs()}
        self._check_graph()
        self.input = self.inputs[INPUT_NAME]
        self.subunits = self.contract.subunit_index()
        self.layer_by_path = {info.path: info for info in self.contract.layers}
        self.steer_inputs = {info.path: info.steer_input for info in self.contract.layers
                             if info.steer_input and info.steer_input in self.inputs}
        self._steer_cache: OrderedDict[tuple, Steering] = OrderedDict()
        self._unique = itertools.count()
        log.info("loaded %s (%s) on %s, %s: %d layer(s), %d sub-units", path, self.name, self.provider,
                 self.plan.describe(), len(self.contract.layers), len(self.subunits))

    def _check_graph(self) -> None:
        if INPUT_NAME not in self.inputs:
            raise ModelLoadError(f"{self.path}: the graph has no input '{INPUT_NAME}' (inputs: {list(self.inputs)})")
        missing = [tap.output for tap in self.contract.taps if tap.output not in self.outputs]
        missing += [name for name in self.contract.outputs if name not in self.outputs]
        if missing:
            raise ModelLoadError(f"{self.path}: metadata names outputs the graph lacks: {', '.join(missing)}")
        shape = self.inputs[INPUT_NAME].shape
        spec = self.contract.input
        if len(shape) != 4 or any(d not in (-1, want) for d, want in
                                  zip(shape[1:], (spec["channels"], spec["height"], spec["width"]))):
            raise ModelLoadError(f"{self.path}: input shape {shape} disagrees with the preprocessing spec {spec}")

    @property
    def image_shape(self) -> tuple[int, int, int]:
        spec = self.contract.input
        return int(spec["channels"]), int(spec["height"]), int(spec["width"])

    def max_taps(self) -> dict[str, str]:
        """layer path -> its `max` tap output (what firing, drift and /image rankings use)."""
        return {tap.layer: tap.output for tap in self.contract.taps if tap.pooling == "max"}

    def steering(self, named: Mapping[str, object] | None = None,
                 tensors: Mapping[str, np.ndarray] | None = None, n_images: int | None = None) -> Steering:
        """Validate a request's steering (names and/or steer tensors); any mistake is a 400.

        Steer tensors may be one vector, or - for a `per_image` export, as Triton clients send
        them - one row per image; rows that differ make a steering that is never batched
        with other requests.
        """
        if not named and not tensors:
            return NO_STEERING
        start: dict[str, np.ndarray] = {}
        rows: dict[str, np.ndarray] = {}
        layer_of_input = {name: layer for layer, name in self.steer_inputs.items()}
        for input_name, array in (tensors or {}).items():
            layer = layer_of_input.get(input_name)
            if layer is None:
                raise BadRequest(f"'{input_name}' is not a steer input of this model", cause="unknown_subunit")
            n_subunits = self.layer_by_path[layer].n_subunits
            if not np.isfinite(array).all():
                raise BadRequest(f"steer input '{input_name}' has non-finite values")
            if array.ndim == 2 and array.shape[1] == n_subunits and len(array) > 1:
                if np.all(array == array[0]):
                    array = array[:1]  # equal rows: one steering for the whole request
                elif len(self.inputs[input_name].shape) == 2 and len(array) == n_images:
                    rows[layer] = np.array(array, dtype=np.float32)
                    continue
                else:
                    raise BadRequest(f"steer input '{input_name}': {len(array)} different rows need a per-image "
                                     f"steer export and one row per image ({n_images})")
            if array.shape not in ((n_subunits,), (1, n_subunits)):
                raise BadRequest(f"steer input '{input_name}' must have shape [{n_subunits}] (or one row per "
                                 f"image), got {list(array.shape)}")
            start[layer] = array
        try:
            vectors = steer_vectors(self.contract, named or {}, self.steer_inputs, start, self.subunits)
        except UnknownSubunit as exc:
            raise BadRequest(str(exc), cause="unknown_subunit") from exc
        except InvalidSteering as exc:
            raise BadRequest(str(exc)) from exc
        described = {k: float(v) for k, v in (named or {}).items()}
        if rows:
            feeds = {self.steer_inputs[layer]: self._feed_shape(layer, v) for layer, v in vectors.items()}
            for layer, array in rows.items():  # named scales apply to every row
                feeds[self.steer_inputs[layer]] = array * vectors.get(layer, np.float32(1.0))
            return Steering(("per-image", next(self._unique)), feeds, described)
        key = tuple(sorted((layer, v.tobytes()) for layer, v in vectors.items()))
        if not key:
            return NO_STEERING
        cached = self._steer_cache.get(key)
        if cached is not None:
            self._steer_cache.move_to_end(key)
            return cached
        steering = Steering(key, {self.steer_inputs[layer]: self._feed_shape(layer, v) for layer, v in vectors.items()},
                            described)
        self._steer_cache[key] = steering
        if len(self._steer_cache) > 256:  # distinct steerings are few in practice; bound them anyway
            self._steer_cache.popitem(last=False)
        return steering

    def _feed_shape(self, layer: str, vector: np.ndarray) -> np.ndarray:
        # a `per_image` export takes (steer_batch, S): one row broadcasts over the batch
        rank = len(self.inputs[self.steer_inputs[layer]].shape)
        return vector.reshape(1, -1) if rank == 2 else vector

    def run(self, images: np.ndarray, steering: Steering = NO_STEERING, instance: int = 0) -> dict[str, np.ndarray]:
        """All graph outputs for a batch on one instance; without steering the steer inputs keep their ones."""
        feeds = {INPUT_NAME: images, **steering.feeds}
        values = self.sessions[instance].run(None, feeds)
        return dict(zip(self.outputs, values))

    def runners(self) -> list[Callable[[np.ndarray, Steering], dict[str, np.ndarray]]]:
        """One run function per instance, for `serving.batching.MicroBatcher`."""
        return [functools.partial(self.run, instance=k) for k in range(len(self.sessions))]

    def describe(self) -> dict:
        """The `elude` block of the model metadata: what a client needs to read taps and steer."""
        contract = self.contract
        return {
            "model_name": contract.model_name,
            "model_fingerprint": contract.model_fingerprint,
            "plan_fingerprint": contract.plan_fingerprint,
            "router": contract.router,
            "provider": self.provider,
            "providers": self.providers,
            "instances": self.plan.instances,
            "threads_per_instance": self.plan.threads,
            "preprocessing": contract.input,
            "original_outputs": contract.outputs,
            "taps": [vars(tap) for tap in contract.taps],
            "layers": [{"path": info.path, "n_units": info.n_units, "n_subunits": info.n_subunits,
                        "steer_input": self.steer_inputs.get(info.path)} for info in contract.layers],
            "n_subunits": len(self.subunits),
        }
