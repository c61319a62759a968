"""The KServe v2 (Open Inference Protocol) wire format, with Triton's binary tensor extension.

Request: a JSON header, optionally followed by raw tensor bytes; the header length is given
by `Inference-Header-Content-Length`, and each binary input says its size in
`parameters.binary_data_size`. Response: JSON, or JSON + raw bytes when outputs are asked for
in binary (`parameters.binary_data` per output, or `binary_data_output` for all).
Every malformed request is a `BadRequest` naming what is wrong.
"""

from __future__ import annotations

import zlib
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import numpy as np

from elude_export.export.contract import INPUT_NAME
from serving import jsoncodec
from serving.errors import BadRequest, PayloadTooLarge, UnsupportedMediaType
from serving.json_tensors import Split, dumps_with_arrays, placeholder, restore_arrays, split_data_arrays
from serving.runtime import V2_DTYPES, ModelRuntime, v2_datatype

HEADER_LENGTH = "Inference-Header-Content-Length"
SplitFn = Callable[[bytes], Split]
FAST_PATH_BYTES = 64 * 1024  # smaller JSON parses in well under a millisecond: no need to split it


@dataclass
class InferRequest:
    id: str | None
    images: np.ndarray
    steer_named: dict[str, float] = field(default_factory=dict)
    steer_tensors: dict[str, np.ndarray] = field(default_factory=dict)
    outputs: list[tuple[str, bool]] = field(default_factory=list)  # (name, binary)


def decode_content(body: bytes, encoding: str | None, limit: int) -> bytes:
    """Undo `Content-Encoding: gzip|deflate` (tritonclient's request compression), bounded by `limit`."""
    if not encoding or encoding.strip().lower() == "identity":
        return body
    encoding = encoding.strip().lower()
    if encoding not in ("gzip", "deflate"):
        raise UnsupportedMediaType(f"Content-Encoding '{encoding}' is not supported (gzip, deflate)")
    inflater = zlib.decompressobj(wbits=31 if encoding == "gzip" else 15)
    try:
        out = inflater.decompress(body, limit + 1)
    except zlib.error as exc:
        raise BadRequest(f"body is not valid {encoding} data: {exc}") from exc
    if len(out) > limit:
        raise PayloadTooLarge(f"decompressed body exceeds {limit} bytes")
    return out


def load_json(text: bytes, what: str = "request") -> Any:
    try:
        return jsoncodec.loads(text)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        hint = " (NaN and Infinity are not JSON numbers)" if b"NaN" in text or b"Infinity" in text else ""
        raise BadRequest(f"malformed JSON in the {what}: {exc}{hint}", cause="malformed_json") from exc


def _load_request(text: bytes, split_arrays: SplitFn) -> Any:
    """The request header; big numeric `data` arrays are parsed apart (see `serving.json_tensors`)."""
    split = split_arrays(text) if len(text) > FAST_PATH_BYTES else None
    if split is None:
        return load_json(text)
    skeleton, arrays = split
    try:
        request = load_json(skeleton)
    except BadRequest:  # the error is the body's, not the split's: let the plain parser name it
        return load_json(text)
    restore_arrays(request, arrays)
    return request


def header_size(body_size: int, header_length: str | None) -> int:
    """Bytes of the JSON header in a body: all of it, or what `Inference-Header-Content-Length` says."""
    if header_length is None:
        return body_size
    try:
        size = int(header_length)
    except ValueError:
        raise BadRequest(f"{HEADER_LENGTH} must be an integer, got {header_length!r}") from None
    if not 0 <= size <= body_size:
        raise BadRequest(f"{HEADER_LENGTH}={size} does not fit a body of {body_size} bytes")
    return size


def json_header_size(body_size: int, header_length: str | None) -> int:
    """`header_size`, or the whole body when the header length is bad (parsing then says why)."""
    try:
        return header_size(body_size, header_length)
    except BadRequest:
        return body_size


def _split(body: bytes, header_length: str | None, split_arrays: SplitFn) -> tuple[Any, bytes]:
    size = header_size(len(body), header_length)
    return _load_request(body[:size], split_arrays), body[size:]


def _object(value: Any, what: str) -> dict:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise BadRequest(f"{what} must be a JSON object")
    return value


def _bool(value: Any, what: str) -> bool:
    if not isinstance(value, bool):
        raise BadRequest(f"{what} must be true or false, got {value!r}")
    return value


def parse_steer(value: Any) -> dict[str, float]:
    """`{"steer": {...}}` or the same object as a JSON string (for clients with scalar parameters)."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return {}
    if isinstance(value, str):
        value = load_json(value.encode(), "steer parameter")
    if not isinstance(value, dict):
        raise BadRequest('steer must map sub-unit names to scales, e.g. {"blocks.3.mlp/0042.1": 0.0}')
    return value


def _tensor(entry: Any, index: int, binary: memoryview, offset: int, max_elements: int) -> tuple[str, np.ndarray, int]:
    """One request input -> (name, array, new binary offset)."""
    if not isinstance(entry, dict):
        raise BadRequest(f"inputs[{index}] must be an object")
    name, datatype, shape = entry.get("name"), entry.get("datatype"), entry.get("shape")
    if not isinstance(name, str):
        raise BadRequest(f"inputs[{index}].name must be a string")
    if not isinstance(datatype, str) or datatype not in V2_DTYPES:
        raise BadRequest(f"input '{name}': unsupported datatype {datatype!r} (known: {', '.join(V2_DTYPES)})")
    if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0
                                              for d in shape):
        raise BadRequest(f"input '{name}': shape must be a list of non-negative integers, got {shape!r}")
    count = 1
    for dim in shape:
        count *= dim
    if count > max_elements:
        raise PayloadTooLarge(f"input '{name}': {count} elements exceed the limit of {max_elements}")
    dtype = V2_DTYPES[datatype]
    parameters = _object(entry.get("parameters"), f"input '{name}' parameters")
    size = parameters.get("binary_data_size")
    if size is not None:
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise BadRequest(f"input '{name}': binary_data_size must be a non-negative integer")
        if size != count * dtype.itemsize:
            raise BadRequest(f"input '{name}': binary_data_size {size} != {count} x {dtype.itemsize} bytes "
                             f"for shape {shape} {datatype}")
        if offset + size > len(binary):
            raise BadRequest(f"input '{name}': binary data ends after {len(binary) - offset} of {size} bytes")
        array = np.frombuffer(binary[offset:offset + size], dtype=dtype).reshape(shape)
        return name, array, offset + size
    if "data" not in entry:
        raise BadRequest(f"input '{name}' has neither 'data' nor parameters.binary_data_size")
    try:
        array = np.asarray(entry["data"], dtype=dtype)
    except (ValueError, TypeError, OverflowError) as exc:
        raise BadRequest(f"input '{name}': data is not a (nested) list of {datatype} numbers: {exc}") from exc
    if array.size != count:
        raise BadRequest(f"input '{name}': {array.size} values given for shape {shape} ({count} expected)")
    return name, array.reshape(shape), offset


def parse_infer_request(body: bytes, header_length: str | None, runtime: ModelRuntime,
                        max_images: int, split_arrays: SplitFn = split_data_arrays) -> InferRequest:
    """Validate a v2 inference request against the served model.

    `split_arrays` parses the big `data` arrays (`serving.json_process.JsonSplitter.split` runs it
    in a helper process).
    """
    request, binary = _split(body, header_length, split_arrays)
    request = _object(request, "the inference request")
    inputs = request.get("inputs")
    if not isinstance(inputs, list) or not inputs:
        raise BadRequest("'inputs' must be a non-empty list of tensors")
    request_id = request.get("id")
    if request_id is not None and not isinstance(request_id, str):
        raise BadRequest("'id' must be a string")
    parameters = _object(request.get("parameters"), "parameters")
    max_elements = max_images * math.prod(runtime.image_shape)
    view = memoryview(binary)
    offset = 0
    tensors: list[tuple[str, np.ndarray]] = []
    for index, entry in enumerate(inputs):
        name, array, offset = _tensor(entry, index, view, offset, max_elements)
        tensors.append((name, array))
    if offset != len(binary):
        raise BadRequest(f"{len(binary) - offset} trailing bytes after the binary inputs")
    images, steer_tensors = check_inputs(tensors, runtime, max_images)
    return InferRequest(
        id=request_id,
        images=images,
        steer_named=parse_steer(parameters.get("steer")),
        steer_tensors=steer_tensors,
        outputs=_requested_outputs(request.get("outputs"), parameters, runtime),
    )


def check_inputs(tensors: list[tuple[str, np.ndarray]], runtime: ModelRuntime,
                 max_images: int) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """(images, steer tensors) of a request's named input arrays, checked against the model (REST and gRPC)."""
    found: dict[str, np.ndarray] = {}
    for name, array in tensors:
        if name in found:
            raise BadRequest(f"input '{name}' given twice")
        if name != INPUT_NAME and name not in runtime.steer_inputs.values():
            raise BadRequest(f"unknown input '{name}' (inputs: {', '.join(runtime.inputs)})")
        expected = runtime.inputs[name]
        if array.dtype != expected.dtype:
            raise BadRequest(f"input '{name}' must be {expected.datatype}, got {v2_datatype(array.dtype)}")
        found[name] = array
    if INPUT_NAME not in found:
        raise BadRequest(f"missing input '{INPUT_NAME}'")
    images = found.pop(INPUT_NAME)
    channels, height, width = runtime.image_shape
    if images.ndim != 4 or tuple(images.shape[1:]) != (channels, height, width) or images.shape[0] < 1:
        raise BadRequest(f"input '{INPUT_NAME}' must have shape [batch, {channels}, {height}, {width}] with "
                         f"batch >= 1, got {list(images.shape)}")
    if images.shape[0] > max_images:
        raise PayloadTooLarge(f"{images.shape[0]} images in one request; at most {max_images}")
    if not np.isfinite(images).all():
        raise BadRequest(f"input '{INPUT_NAME}' contains NaN or infinite values")
    return np.ascontiguousarray(images), found


def _requested_outputs(value: Any, parameters: dict, runtime: ModelRuntime) -> list[tuple[str, bool]]:
    binary_default = _bool(parameters.get("binary_data_output", False), "parameters.binary_data_output")
    if value is None:
        return [(name, binary_default) for name in runtime.outputs]
    if not isinstance(value, list):
        raise BadRequest("'outputs' must be a list")
    wanted: list[tuple[str, bool]] = []
    for index, entry in enumerate(value):
        entry = _object(entry, f"outputs[{index}]")
        name = entry.get("name")
        if not isinstance(name, str) or name not in runtime.outputs:
            raise BadRequest(f"unknown output {name!r} (outputs: {', '.join(runtime.outputs)})")
        options = _object(entry.get("parameters"), f"output '{name}' parameters")
        if options.get("classification"):
            raise BadRequest("the classification extension is not supported; use /v1/models/{name}/image")
        wanted.append((name, _bool(options.get("binary_data", binary_default), f"output '{name}' binary_data")))
    return wanted


def encode_infer_response(model_name: str, request: InferRequest,
                          outputs: Mapping[str, np.ndarray]) -> tuple[bytes, dict[str, str], str]:
    """(body, extra headers, media type) of the v2 response."""
    entries, blobs, arrays = [], [], []
    for name, binary in request.outputs:
        array = np.ascontiguousarray(outputs[name])
        entry: dict[str, Any] = {"name": name, "datatype": v2_datatype(array.dtype), "shape": list(array.shape)}
        if binary:
            raw = array.tobytes()
            entry["parameters"] = {"binary_data_size": len(raw)}
            blobs.append(raw)
        else:
            entry["data"] = placeholder(len(arrays))  # encoded piecewise (NaN refused) by dumps_with_arrays
            arrays.append(array)
        entries.append(entry)
    response: dict[str, Any] = {"model_name": model_name, "model_version": "1", "outputs": entries}
    if request.id is not None:
        response["id"] = request.id
    if request.steer_named or request.steer_tensors:
        response["parameters"] = {"steered": True}
    header = dumps_with_arrays(response, arrays)
    if not blobs:
        return header, {}, "application/json"
    return b"".join([header, *blobs]), {HEADER_LENGTH: str(len(header))}, "application/octet-stream"
