"""One way to open an onnxruntime session, shared by `validate` and the server.

Torch-free (numpy/onnxruntime only): the server imports it. Both sides pick providers and
set up sessions alike, so what the server returns is what validation measured:
- `auto` takes CUDA when this onnxruntime build has it, `cuda` insists on it, `cpu` forbids it;
- CUDA runs with TF32 off (`use_tf32=0`): onnxruntime's default TF32 trades ~1e-3 relative
  error for speed, beyond the tolerances `validate` checks;
- onnxruntime falls back to CPU silently when CUDA libraries cannot load: a `cuda` request
  that ends up on CPU is an error, not a surprise in production.
Errors are raised as the caller's type (the server's `ModelLoadError`, validate's
`ValidationError`), `SessionError` by default.
"""

from __future__ import annotations

from pathlib import Path

import onnxruntime as ort

from elude_export.errors import EludeError

PROVIDERS = ("auto", "cuda", "cpu")
CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"


class SessionError(EludeError):
    """onnxruntime cannot open the model as asked (no such provider, unloadable file)."""


def choose_providers(provider: str, error: type[EludeError] = SessionError) -> list:
    """Execution providers to ask onnxruntime for, CUDA first (TF32 off) where it is wanted and present."""
    if provider not in PROVIDERS:
        raise error(f"unknown provider '{provider}' (use {', '.join(PROVIDERS)})")
    available = ort.get_available_providers()
    if provider == "cpu":
        return [CPU]
    if CUDA in available:
        return [(CUDA, {"use_tf32": "0"}), CPU]
    if provider == "cuda":
        raise error(f"provider 'cuda' requested but this onnxruntime has no {CUDA} (available: "
                    f"{', '.join(available)}); install onnxruntime-gpu (pip install 'elude-export[gpu]') "
                    "or use --provider cpu")
    return [CPU]


def session_options(threads: int = 0, inter_op_threads: int = 0,
                    allow_spinning: bool | None = None) -> ort.SessionOptions:
    """Errors-only logging (steer inputs with defaults warn by design); 0 threads = onnxruntime's choice.

    allow_spinning: False keeps idle intra-op threads from burning the cores a server's event
    loop needs between runs; None leaves onnxruntime's default.
    """
    options = ort.SessionOptions()
    options.log_severity_level = 3
    if threads:
        options.intra_op_num_threads = threads
    if inter_op_threads:
        options.inter_op_num_threads = inter_op_threads
    if allow_spinning is not None:
        options.add_session_config_entry("session.intra_op.allow_spinning", "1" if allow_spinning else "0")
    return options


def open_session(path: str | Path, provider: str = "auto", error: type[EludeError] = SessionError, *,
                 threads: int = 0, inter_op_threads: int = 0,
                 allow_spinning: bool | None = None) -> ort.InferenceSession:
    """A session on `path`; the provider that runs is `session.get_providers()[0]`."""
    options = session_options(threads, inter_op_threads, allow_spinning)
    providers = choose_providers(provider, error)
    try:
        session = ort.InferenceSession(str(path), sess_options=options, providers=providers)
    except Exception as exc:  # onnxruntime raises its own types for any unreadable or foreign file
        raise error(f"{path} is not a loadable ONNX model: {exc.__class__.__name__}: {exc}") from exc
    actual = session.get_providers()[0]
    if provider == "cuda" and actual != CUDA:
        raise error(f"provider 'cuda' requested but onnxruntime runs {path} on {actual} "
                    "(CUDA/cuDNN libraries missing or incompatible)")
    return session
