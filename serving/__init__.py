"""elude serving: a KServe v2 onnxruntime server for ELUDe exports, with feature monitoring.

Modules (import what you need; `serving.monitoring` needs neither FastAPI nor uvicorn):
- `config`: ServeConfig (CLI flags / ELUDE_SERVE_* variables)
- `runtime`: the onnxruntime sessions (one per instance), contract, request steering
- `steering`: sub-unit names -> `steer.<layer>` vectors (numpy only; for Triton clients too)
- `batching`: micro-batching queue with overload protection; `instances`: how many sessions run
  batches side by side, and their threads
- `drain`: bounded hand-off of tap outputs to the monitor's background thread
- `errors`: request errors with their HTTP status and metric cause
- `kserve`: v2 JSON + binary tensor wire format; `json_tensors`: big JSON arrays parsed apart,
  `json_process`: in a helper process;
  `jsoncodec`: strict, fast JSON (orjson when installed)
- `grpc_service`, `grpc_proto`: the v2 gRPC service (KServe's .proto, generated module)
- `stats`, `triton_config`: Triton's statistics and model configuration extensions
- `state`: the monitor's drift window saved to / restored from a file
- `images`, `explain`: the image endpoint's preprocessing and answer
- `monitoring`: Prometheus metrics and drift (also for Triton clients / sidecars)
- `middleware`, `connections`, `openapi`, `app`, `server`: the HTTP side (guards, timeouts)
Run: `elude serve model.onnx` or `python -m serving model.onnx`.
"""
