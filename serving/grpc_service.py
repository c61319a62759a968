"""The KServe v2 / Open Inference Protocol over gRPC (`inference.GRPCInferenceService`).

Runs as a `grpc.aio` server on the same event loop as the REST app and shares everything
with it: the micro-batching queue, steering, bearer auth (`authorization: Bearer ...`
metadata), request metrics, Triton-style statistics and the feature monitor. Tensors travel
as `raw_input_contents` / `raw_output_contents` (what `tritonclient.grpc` sends) or as typed
`contents`. Handlers are registered generically, so no generated `_pb2_grpc` module is needed.
"""

from __future__ import annotations

import hmac
import logging
import time
from typing import Any, Awaitable, Callable

import grpc
import numpy as np

from serving.errors import BadRequest, ServingError, Unauthorized
from serving.grpc_proto import grpc_predict_v2_pb2 as pb
from serving.kserve import InferRequest, check_inputs, parse_steer
from serving.runtime import V2_DTYPES, ModelRuntime, v2_datatype

log = logging.getLogger("elude.serving")
SERVICE = "inference.GRPCInferenceService"
STATUS_CODES = {400: grpc.StatusCode.INVALID_ARGUMENT, 401: grpc.StatusCode.UNAUTHENTICATED,
                404: grpc.StatusCode.NOT_FOUND, 408: grpc.StatusCode.DEADLINE_EXCEEDED,
                413: grpc.StatusCode.RESOURCE_EXHAUSTED, 415: grpc.StatusCode.INVALID_ARGUMENT,
                422: grpc.StatusCode.INVALID_ARGUMENT, 503: grpc.StatusCode.UNAVAILABLE}
# typed `contents` field per v2 datatype (FP16 has none: raw only)
CONTENT_FIELDS = {"FP32": "fp32_contents", "FP64": "fp64_contents", "INT64": "int64_contents",
                  "INT32": "int_contents", "INT8": "int_contents", "UINT8": "uint_contents", "BOOL": "bool_contents"}


def _parameter(value: pb.InferParameter) -> Any:
    kind = value.WhichOneof("parameter_choice")
    return getattr(value, kind) if kind else None


def _input_arrays(request: pb.ModelInferRequest, max_elements: int) -> list[tuple[str, np.ndarray]]:
    raw = list(request.raw_input_contents)
    if raw and len(raw) != len(request.inputs):
        raise BadRequest(f"{len(raw)} raw_input_contents for {len(request.inputs)} inputs")
    arrays = []
    for index, tensor in enumerate(request.inputs):
        if tensor.datatype not in V2_DTYPES:
            raise BadRequest(f"input '{tensor.name}': unsupported datatype {tensor.datatype!r} "
                             f"(known: {', '.join(V2_DTYPES)})")
        shape = list(tensor.shape)
        if any(d < 0 for d in shape):
            raise BadRequest(f"input '{tensor.name}': shape must be non-negative, got {shape}")
        count = int(np.prod(shape, dtype=np.int64))
        if count > max_elements:
            raise BadRequest(f"input '{tensor.name}': {count} elements exceed the limit of {max_elements}")
        dtype = V2_DTYPES[tensor.datatype]
        if raw:
            if len(raw[index]) != count * dtype.itemsize:
                raise BadRequest(f"input '{tensor.name}': {len(raw[index])} raw bytes for shape {shape} "
                                 f"{tensor.datatype} ({count * dtype.itemsize} expected)")
            array = np.frombuffer(raw[index], dtype=dtype)
        else:
            field = CONTENT_FIELDS.get(tensor.datatype)
            values = getattr(tensor.contents, field) if field else ()
            if len(values) != count:
                raise BadRequest(f"input '{tensor.name}': {len(values)} values in contents for shape {shape}")
            array = np.asarray(values, dtype=dtype)
        arrays.append((tensor.name, array.reshape(shape)))
    return arrays


def parse_grpc_request(request: pb.ModelInferRequest, runtime: ModelRuntime, max_images: int) -> InferRequest:
    """The same `InferRequest` the REST route builds, from a gRPC ModelInferRequest."""
    max_elements = max_images * int(np.prod(runtime.image_shape))
    images, steer_tensors = check_inputs(_input_arrays(request, max_elements), runtime, max_images)
    steer = request.parameters.get("steer")
    outputs = []
    for wanted in request.outputs:
        if wanted.name not in runtime.outputs:
            raise BadRequest(f"unknown output {wanted.name!r} (outputs: {', '.join(runtime.outputs)})")
        outputs.append((wanted.name, True))
    return InferRequest(id=request.id or None, images=images,
                        steer_named=parse_steer(_parameter(steer) if steer is not None else None),
                        steer_tensors=steer_tensors,
                        outputs=outputs or [(name, True) for name in runtime.outputs])


def encode_grpc_response(model_name: str, request: InferRequest, outputs) -> pb.ModelInferResponse:
    response = pb.ModelInferResponse(model_name=model_name, model_version="1", id=request.id or "")
    if request.steer_named or request.steer_tensors:
        response.parameters["steered"].bool_param = True
    for name, _ in request.outputs:
        array = np.ascontiguousarray(outputs[name])
        response.outputs.add(name=name, datatype=v2_datatype(array.dtype), shape=list(array.shape))
        response.raw_output_contents.append(array.tobytes())
    return response


class GrpcService:
    """The six v2 RPCs over an `AppState` (see `serving.app`)."""

    def __init__(self, state):
        self.state = state
        token = state.config.auth_token
        self.expected = f"Bearer {token}".encode() if token else None

    def _check_auth(self, context: grpc.aio.ServicerContext) -> None:
        if self.expected is None:
            return
        given = dict(context.invocation_metadata() or ()).get("authorization", "")
        if not hmac.compare_digest(given.encode() if isinstance(given, str) else given, self.expected):
            raise Unauthorized()

    def _wrap(self, method: str, handler: Callable[[Any], Awaitable[Any]],
              open_method: bool = False) -> Callable:
        metrics = self.state.metrics
        route = f"grpc:{method}"

        async def call(request, context: grpc.aio.ServicerContext):
            started = time.perf_counter()
            code = "OK"
            try:
                if not open_method:
                    self._check_auth(context)
                return await handler(request)
            except ServingError as exc:
                code = STATUS_CODES.get(exc.status, grpc.StatusCode.INTERNAL).name
                metrics.errors.labels(cause=exc.cause).inc()
                await context.abort(STATUS_CODES.get(exc.status, grpc.StatusCode.INTERNAL), exc.message)
            except grpc.aio.AbortError:
                raise
            except Exception:  # a bug: logged with its traceback, the client gets INTERNAL only
                code = "INTERNAL"
                metrics.errors.labels(cause="internal").inc()
                log.exception("internal error in %s", route)
                await context.abort(grpc.StatusCode.INTERNAL, "internal server error (see the server log)")
            finally:
                metrics.requests.labels(route=route, code=code).inc()
                metrics.latency.labels(route=route).observe(time.perf_counter() - started)

        return call

    # the RPCs ----------------------------------------------------------------------------
    async def server_live(self, _request) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=True)

    async def server_ready(self, _request) -> pb.ServerReadyResponse:
        return pb.ServerReadyResponse(ready=self.state.batcher.running)

    async def model_ready(self, request) -> pb.ModelReadyResponse:
        self.state.check_model(request.name, request.version)
        return pb.ModelReadyResponse(ready=self.state.batcher.running)

    async def server_metadata(self, _request) -> pb.ServerMetadataResponse:
        meta = self.state.server_metadata()
        return pb.ServerMetadataResponse(name=meta["name"], version=meta["version"], extensions=meta["extensions"])

    async def model_metadata(self, request) -> pb.ModelMetadataResponse:
        self.state.check_model(request.name, request.version)
        meta = self.state.model_metadata()
        tensor = pb.ModelMetadataResponse.TensorMetadata
        return pb.ModelMetadataResponse(name=meta["name"], versions=meta["versions"], platform=meta["platform"],
                                        inputs=[tensor(**t) for t in meta["inputs"]],
                                        outputs=[tensor(**t) for t in meta["outputs"]])

    async def model_infer(self, request) -> pb.ModelInferResponse:
        state = self.state

        async def parse() -> InferRequest:
            state.check_model(request.model_name, request.model_version)
            return parse_grpc_request(request, state.runtime, state.max_request_images)

        async def encode(parsed: InferRequest, outputs: dict) -> pb.ModelInferResponse:
            return encode_grpc_response(state.runtime.name, parsed, outputs)

        return await state.handle(parse, encode)

    def handler(self) -> grpc.GenericRpcHandler:
        methods = {  # name: (handler, request type, response type, open without a token)
            "ServerLive": (self.server_live, pb.ServerLiveRequest, True),
            "ServerReady": (self.server_ready, pb.ServerReadyRequest, True),
            "ModelReady": (self.model_ready, pb.ModelReadyRequest, False),
            "ServerMetadata": (self.server_metadata, pb.ServerMetadataRequest, False),
            "ModelMetadata": (self.model_metadata, pb.ModelMetadataRequest, False),
            "ModelInfer": (self.model_infer, pb.ModelInferRequest, False),
        }
        return grpc.method_handlers_generic_handler(SERVICE, {
            name: grpc.unary_unary_rpc_method_handler(self._wrap(name, fn, open_method),
                                                      request_deserializer=request_type.FromString,
                                                      response_serializer=lambda message: message.SerializeToString())
            for name, (fn, request_type, open_method) in methods.items()})


async def start_grpc_server(state, host: str, port: int) -> grpc.aio.Server:
    """Start serving on `host:port` (on the running loop); the caller stops it at shutdown."""
    limit = state.config.max_body_bytes
    server = grpc.aio.server(options=[("grpc.max_receive_message_length", limit),
                                      ("grpc.max_send_message_length", max(limit, 64 * 1024 * 1024))],
                             maximum_concurrent_rpcs=state.config.in_flight_limit)
    server.add_generic_rpc_handlers((GrpcService(state).handler(),))
    address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    if server.add_insecure_port(address) == 0:
        raise OSError(f"cannot listen for gRPC on {address}")
    await server.start()
    log.info("gRPC (KServe v2) on %s", address)
    return server
