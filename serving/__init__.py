"""elude serving: a KServe v2 onnxruntime server for ELUDe exports, with feature monitoring.

Modules (import what you need; `serving.monitoring` needs neither FastAPI nor uvicorn):
- `config`: ServeConfig (CLI flags / ELUDE_SERVE_* variables)
- `runtime`: the onnxruntime session, contract, request steering
- `steering`: sub-unit names -> `steer.<layer>` vectors (numpy only; for Triton clients too)
- `batching`: micro-batching queue with overload protection
- `drain`: bounded hand-off of tap outputs to the monitor's background thread
- `errors`: request errors with their HTTP status and metric cause
- `kserve`: v2 JSON + binary tensor wire format
- `images`, `explain`: the image endpoint's preprocessing and answer
- `monitoring`: Prometheus metrics and drift (also for Triton clients / sidecars)
- `middleware`, `openapi`, `app`, `server`: the HTTP side
Run: `elude serve model.onnx` or `python -m serving model.onnx`.
"""
