"""The ASGI app: KServe v2 routes, the image route, steering, monitoring endpoints.

`create_app(config)` builds everything from the `.onnx` file alone (no torch, no fitting
code). Every user error answers `{"error": "..."}` with a 4xx status; only a bug or a failed
run is a 500, and its traceback goes to the server log, never to the client.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Awaitable, Callable, TypeVar

from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException

from elude_export import __version__
from serving.batching import MicroBatcher
from serving.config import ServeConfig
from serving.drain import BackgroundDrain
from serving.errors import BadRequest, NotFound, ServingError, UnsupportedMediaType
from serving.explain import describe_images
from serving.images import ImageDecoder
from serving.json_process import JsonSplitter
from serving.kserve import (HEADER_LENGTH, InferRequest, decode_content, encode_infer_response, json_header_size,
                            parse_infer_request, parse_steer)
from serving.middleware import BearerAuth, BodyLimit, InFlightLimit, RequestMetrics
from serving.monitoring import FeatureMonitor, ServingMetrics
from serving.openapi import ERROR_RESPONSES, IMAGE_REQUEST, infer_paths
from serving.runtime import ModelRuntime, Steering, require_finite
from serving.state import StateSaver, restore_state
from serving.stats import ModelStats, RequestTiming
from serving.triton_config import model_config

log = logging.getLogger("elude.serving")
T = TypeVar("T")
SERVER_NAME = "elude-serve"
MODEL_VERSION = "1"
IMAGE_MEDIA_TYPES = {"image/png", "image/jpeg", "image/jpg", "application/octet-stream"}
# exactly what this server implements (Triton names for the Triton extensions)
EXTENSIONS = ["binary_tensor_data", "model_configuration", "statistics", "elude_steering", "elude_monitoring"]
# JSON bodies above this size are parsed and encoded on a worker thread, off the event loop
OFFLOAD_BYTES = 64 * 1024


@dataclass
class AppState:
    config: ServeConfig
    runtime: ModelRuntime
    batcher: MicroBatcher
    drain: BackgroundDrain
    registry: CollectorRegistry
    metrics: ServingMetrics
    monitor: FeatureMonitor
    stats: ModelStats
    decoder: ImageDecoder
    json_splitter: JsonSplitter  # the numbers of big JSON bodies are parsed in a helper process
    # one thread for JSON parsing/encoding: CPU-bound work holding the GIL, so more threads only
    # add contenders that the event loop must wait behind (health latency), never throughput
    json_thread: ThreadPoolExecutor = dataclasses.field(
        default_factory=lambda: ThreadPoolExecutor(1, thread_name_prefix="elude-json"))

    async def off_loop(self, fn: Callable[[], Any]) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self.json_thread, fn)

    @property
    def max_request_images(self) -> int:
        return max(64, self.config.max_batch)

    def check_model(self, name: str, version: str | None = None) -> None:
        if name != self.runtime.name:
            raise NotFound(f"unknown model '{name}' (this server serves '{self.runtime.name}')")
        if version not in (None, "", MODEL_VERSION):
            raise NotFound(f"unknown version '{version}' of model '{name}' (versions: {MODEL_VERSION})")

    def server_metadata(self) -> dict:
        return {"name": SERVER_NAME, "version": __version__, "extensions": list(EXTENSIONS)}

    def model_metadata(self) -> dict:
        runtime = self.runtime
        return {"name": runtime.name, "versions": [MODEL_VERSION], "platform": "onnxruntime_onnx",
                "inputs": [spec.to_v2() for spec in runtime.inputs.values()],
                "outputs": [spec.to_v2() for spec in runtime.outputs.values()]}

    async def handle(self, parse: Callable[[], Awaitable[InferRequest]],
                     encode: Callable[[InferRequest, dict], Awaitable[T]]) -> T:
        """parse -> steer -> queue and run -> check -> encode, timed as Triton's statistics (REST and gRPC)."""
        timing = RequestTiming()
        try:
            parsed = await parse()
            timing.compute_input = time.perf_counter() - timing.started
            steering = self.runtime.steering(parsed.steer_named, parsed.steer_tensors, len(parsed.images))
            outputs = await self.batcher.submit(parsed.images, steering, self.config.request_timeout_s, timing)
            require_finite(outputs, [name for name, _ in parsed.outputs])
            encode_started = time.perf_counter()
            result = await encode(parsed, outputs)
            timing.compute_output = time.perf_counter() - encode_started
        except Exception:
            self.stats.record_failure(timing)
            raise
        self.stats.record_success(timing, len(parsed.images))
        return result


def build_state(config: ServeConfig, runtime: ModelRuntime | None = None) -> AppState:
    runtime = runtime or ModelRuntime(config.model_path, config.provider, config.threads, name=config.model_name,
                                      nice=config.inference_nice, instances=config.instances)
    registry = CollectorRegistry()
    metrics = ServingMetrics(registry)
    contract = runtime.contract
    metrics.info.labels(model=runtime.name, model_fingerprint=contract.model_fingerprint,
                        plan_fingerprint=contract.plan_fingerprint, provider=runtime.provider).set(1)
    monitor = FeatureMonitor(contract, registry, window=config.drift_window, top_n=config.monitor_top_n)
    taps = list(monitor.tap_of.values())
    drain: BackgroundDrain[dict] = BackgroundDrain(monitor.observe_many, name="elude-monitor")

    stats = ModelStats(runtime.name, MODEL_VERSION)

    def record(outputs, n_images: int, seconds: float, steering: Steering) -> None:
        metrics.observe_batch(n_images, seconds, steering.active)
        stats.record_execution(n_images, seconds)
        if not steering.active:  # steered traffic is an experiment, not the production distribution
            drain.offer({name: outputs[name] for name in taps})

    batcher = MicroBatcher(runtime.runners(), config.max_batch, config.batch_timeout_ms / 1000.0, config.queue_size,
                           observers=[record], run_nice=runtime.nice)
    metrics.queue_depth.set_function(lambda: batcher.depth)
    metrics.dropped.set_function(lambda: drain.dropped)
    decoder = ImageDecoder(contract.input, config.max_image_pixels, config.max_request_pixels, config.decode_slots)
    if config.state_file:
        restore_state(config.state_file, monitor)
    return AppState(config, runtime, batcher, drain, registry, metrics, monitor, stats, decoder,
                    JsonSplitter(config.json_workers))


def create_app(config: ServeConfig, runtime: ModelRuntime | None = None) -> FastAPI:
    state = build_state(config, runtime)

    @contextlib.asynccontextmanager
    async def lifespan(_app: FastAPI):
        state.drain.start()
        await state.batcher.start()
        saver = StateSaver(config.state_file, state.monitor, config.state_interval_s) if config.state_file else None
        grpc_server = None
        try:
            if config.grpc_port:
                from serving.grpc_service import start_grpc_server  # grpcio only when gRPC is asked for

                grpc_server = await start_grpc_server(state, config.host, config.grpc_port)
            if saver is not None:
                saver.start()
            log.info("serving '%s' on %s (max_batch %d, queue %d)", state.runtime.name, state.runtime.provider,
                     config.max_batch, config.queue_size)
            yield
        finally:
            if grpc_server is not None:
                await grpc_server.stop(grace=min(5.0, config.shutdown_timeout_s))
            await state.batcher.stop()
            state.drain.stop()
            state.json_thread.shutdown(wait=False, cancel_futures=True)
            await asyncio.to_thread(state.json_splitter.close)
            if saver is not None:
                await saver.stop()  # after the drain: the last observed batches are saved too

    app = FastAPI(title="ELUDe inference server", version=__version__, lifespan=lifespan,
                  description="KServe v2 inference with per-sub-unit taps, steering and drift monitoring.")
    app.state.elude = state
    _install_error_handlers(app, state.metrics)
    _add_protocol_routes(app, state)
    _add_elude_routes(app, state)
    # added last = outermost: metrics see every answer, auth runs before the body is read
    app.add_middleware(BodyLimit, max_bytes=config.max_body_bytes, metrics=state.metrics,
                       timeout_s=config.body_timeout_s)
    app.add_middleware(BearerAuth, token=config.auth_token, metrics=state.metrics)
    app.add_middleware(InFlightLimit, limit=config.in_flight_limit, metrics=state.metrics)
    app.add_middleware(RequestMetrics, metrics=state.metrics, routes=app.router.routes)
    return app


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


def _install_error_handlers(app: FastAPI, metrics: ServingMetrics) -> None:
    @app.exception_handler(ServingError)
    async def serving_error(_request: Request, exc: ServingError) -> JSONResponse:
        metrics.errors.labels(cause=exc.cause).inc()
        return _error(exc.status, exc.message, exc.headers)

    @app.exception_handler(RequestValidationError)
    async def validation_error(_request: Request, exc: RequestValidationError) -> JSONResponse:
        metrics.errors.labels(cause="bad_request").inc()
        details = "; ".join(f"{'.'.join(str(p) for p in e.get('loc', ()))}: {e.get('msg')}" for e in exc.errors())
        return _error(400, f"invalid request: {details}")

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_request: Request, exc: StarletteHTTPException) -> JSONResponse:
        metrics.errors.labels(cause={404: "not_found", 405: "method_not_allowed"}.get(exc.status_code,
                                                                                      "bad_request")).inc()
        return _error(exc.status_code, str(exc.detail), getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def internal_error(_request: Request, exc: Exception) -> JSONResponse:
        metrics.errors.labels(cause="internal").inc()
        log.error("internal error", exc_info=exc)
        return _error(500, "internal server error (see the server log)")


def _add_protocol_routes(app: FastAPI, state: AppState) -> None:
    runtime = state.runtime
    v2 = {"tags": ["KServe v2"]}

    @app.get("/v2/health/live", **v2)
    async def live() -> dict:
        return {"live": True}

    @app.get("/v2/health/ready", **v2, responses={503: ERROR_RESPONSES[503]})
    async def ready() -> Any:
        if not state.batcher.running:
            return _error(503, "not ready")
        return {"ready": True}

    @app.get("/v2", **v2)
    async def server_metadata() -> dict:
        return state.server_metadata()

    async def model_metadata(model_name: str, version: str | None = None) -> dict:
        state.check_model(model_name, version)
        return {**state.model_metadata(), "elude": runtime.describe()}

    async def model_configuration(model_name: str, version: str | None = None) -> dict:
        """Triton's model configuration extension (what `tritonclient` `get_model_config` reads)."""
        state.check_model(model_name, version)
        return model_config(runtime, state.config)

    async def model_statistics(model_name: str, version: str | None = None) -> dict:
        """Triton's statistics extension: per-model counts and cumulative nanoseconds."""
        state.check_model(model_name, version)
        return {"model_stats": [state.stats.snapshot()]}

    @app.get("/v2/models/stats", **v2)
    async def all_statistics() -> dict:
        return {"model_stats": [state.stats.snapshot()]}

    async def model_ready(model_name: str, version: str | None = None) -> Any:
        state.check_model(model_name, version)
        if not state.batcher.running:
            return _error(503, "model not ready")
        return {"name": runtime.name, "ready": True}

    async def infer(request: Request) -> Response:
        # a plain Starlette route: the hot path skips FastAPI's parameter machinery (its OpenAPI
        # entry is added by `_document_infer_routes`)
        async def parse() -> InferRequest:
            state.check_model(request.path_params["model_name"], request.path_params.get("version"))
            raw = await request.body()
            encoding, header_length = request.headers.get("content-encoding"), request.headers.get(HEADER_LENGTH)

            def decode_and_parse() -> InferRequest:
                body = decode_content(raw, encoding, state.config.max_body_bytes)
                return parse_infer_request(body, header_length, runtime, state.max_request_images,
                                           state.json_splitter.split)

            # big JSON must not stall the loop; binary tensors after a small JSON header are cheap here
            big = encoding is not None or json_header_size(len(raw), header_length) > OFFLOAD_BYTES
            return await state.off_loop(decode_and_parse) if big else decode_and_parse()

        async def encode(parsed: InferRequest, outputs: dict) -> Response:
            json_values = sum(outputs[name].size for name, binary in parsed.outputs if not binary)
            write = functools.partial(encode_infer_response, runtime.name, parsed, outputs)
            # about OFFLOAD_BYTES of JSON text or more: encode off the loop
            content, headers, media_type = await state.off_loop(write) if json_values > OFFLOAD_BYTES // 8 \
                else write()
            return Response(content, headers=headers, media_type=media_type)

        return await state.handle(parse, encode)

    errors = {code: ERROR_RESPONSES[code] for code in (400, 401, 404, 413, 503)}
    for prefix in ("/v2/models/{model_name}", "/v2/models/{model_name}/versions/{version}"):
        app.add_api_route(prefix, model_metadata, methods=["GET"], responses=errors, **v2)
        app.add_api_route(prefix + "/ready", model_ready, methods=["GET"], responses=errors, **v2)
        app.add_api_route(prefix + "/config", model_configuration, methods=["GET"], responses=errors, **v2)
        app.add_api_route(prefix + "/stats", model_statistics, methods=["GET"], responses=errors, **v2)
        app.add_route(prefix + "/infer", infer, methods=["POST"], include_in_schema=False)
    _document_infer_routes(app)


def _document_infer_routes(app: FastAPI) -> None:
    """Add the raw infer routes to the generated OpenAPI (for /docs and schema fuzzing)."""
    generate = app.openapi

    def openapi() -> dict:
        if app.openapi_schema is None:
            schema = generate()
            schema["paths"].update(infer_paths())
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


def _int_field(value: Any, name: str, default: int) -> int:
    if value is None:
        return default
    try:
        number = int(value)
    except (TypeError, ValueError):
        raise BadRequest(f"{name} must be an integer, got {value!r}") from None
    if not 0 <= number <= 1000:
        raise BadRequest(f"{name} must be in 0..1000, got {number}")
    return number


async def _image_payloads(request: Request, state: AppState) -> tuple[list[tuple[str, bytes]], dict[str, Any]]:
    """(filename, bytes) of each uploaded image, and the form fields (multipart) or {}."""
    media_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if media_type == "multipart/form-data":
        try:
            form = await request.form(max_files=state.max_request_images, max_fields=16, max_part_size=64 * 1024)
        except StarletteHTTPException as exc:
            raise BadRequest(f"malformed multipart body: {exc.detail}") from exc
        except (ValueError, KeyError, UnicodeDecodeError) as exc:  # python-multipart on broken framing
            raise BadRequest(f"malformed multipart body: {exc}") from exc
        payloads, fields = [], {}
        for key, value in form.multi_items():
            if isinstance(value, UploadFile):
                payloads.append((value.filename or key, await value.read()))
            else:
                fields[key] = value
        await form.close()
        return payloads, fields
    if media_type in IMAGE_MEDIA_TYPES:
        return [("body", await request.body())], {}
    raise UnsupportedMediaType(f"send a PNG/JPEG as multipart/form-data (field 'file') or as the raw body "
                               f"(Content-Type image/png or image/jpeg), not {media_type or 'no Content-Type'}")


def _add_elude_routes(app: FastAPI, state: AppState) -> None:
    runtime = state.runtime
    errors = {code: ERROR_RESPONSES[code] for code in (400, 401, 404, 413, 415, 503)}

    @app.post("/v1/models/{model_name}/image", tags=["ELUDe"], responses=errors,
              openapi_extra={"requestBody": IMAGE_REQUEST})
    async def classify_image(
        model_name: str, request: Request,
        top_k: int = Query(5, ge=0, le=1000, description="Classes to return per image."),
        top_subunits: int = Query(10, ge=0, le=1000, description="Most active sub-units to return per image."),
        steer: str | None = Query(None, description='JSON object {"sub-unit name": scale}.'),
    ) -> dict:
        """Classify uploaded images and name their most active sub-units."""
        state.check_model(model_name)
        payloads, fields = await _image_payloads(request, state)
        if not payloads:
            raise BadRequest("no image in the request (send it as multipart field 'file' or as the raw body)")
        if len(payloads) > state.max_request_images:
            raise BadRequest(f"{len(payloads)} images in one request; at most {state.max_request_images}")
        top_k = _int_field(fields.get("top_k"), "top_k", top_k)
        top_subunits = _int_field(fields.get("top_subunits"), "top_subunits", top_subunits)
        steering = runtime.steering(parse_steer(fields.get("steer", steer)))
        batch = await run_in_threadpool(state.decoder, payloads)
        outputs = await state.batcher.submit(batch, steering, state.config.request_timeout_s)
        require_finite(outputs)
        answers = describe_images(outputs, runtime, top_k, top_subunits)
        for (name, _), answer in zip(payloads, answers):
            answer["filename"] = name
        return {"model_name": runtime.name, "steered": steering.active, "predictions": answers}

    @app.get("/v1/models/{model_name}/subunits", tags=["ELUDe"], responses=errors)
    async def list_subunits(model_name: str, layer: str | None = None, offset: int = Query(0, ge=0),
                            limit: int = Query(1000, ge=1, le=100000)) -> dict:
        """Sub-unit names (what steering and the taps' columns refer to)."""
        state.check_model(model_name)
        layers = runtime.contract.layers
        if layer is not None:
            if layer not in runtime.layer_by_path:
                raise NotFound(f"unknown layer '{layer}' (layers: {', '.join(runtime.layer_by_path)})")
            layers = [runtime.layer_by_path[layer]]
        rows = []
        for info in layers:
            baseline = runtime.contract.baseline.get(info.path)
            for column, name in enumerate(info.subunits):
                row = {"name": name, "layer": info.path, "column": column, "unit": int(info.unit[column]),
                       "sub": int(info.sub[column]), "steerable": info.path in runtime.steer_inputs,
                       "label": runtime.contract.label_text(name)}
                if baseline is not None:
                    row["baseline_fire_rate"] = float(baseline.fire_rate[column])
                rows.append(row)
        return {"total": len(rows), "offset": offset, "subunits": rows[offset:offset + limit]}

    @app.get("/v1/monitoring/drift", tags=["monitoring"], responses=errors)
    async def drift(top: int = Query(10, ge=1, le=1000), layer: str | None = None) -> dict:
        """Top drifting sub-units over the sliding window, against the calibration baseline."""
        if layer is not None and layer not in state.monitor.layers:
            raise NotFound(f"layer '{layer}' is not monitored (monitored: {', '.join(state.monitor.layers)})")
        report = await run_in_threadpool(state.monitor.drift, top, layer)
        return {"model_name": runtime.name, **report}

    @app.get("/metrics", tags=["monitoring"], response_class=Response)
    async def metrics() -> Response:
        """Prometheus exposition of the server's and the feature monitor's metrics."""
        return Response(await run_in_threadpool(generate_latest, state.registry), media_type=CONTENT_TYPE_LATEST)
