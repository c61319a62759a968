"""Run the app under uvicorn: in the foreground (CLI) or on a background thread (tests, benchmarks)."""

from __future__ import annotations

import socket
import sys
import threading
import time

import uvicorn
from fastapi import FastAPI

from elude_export.errors import EludeError
from serving.app import create_app
from serving.config import ServeConfig
from serving.connections import header_timeout_protocol
from serving.priority import SWITCH_INTERVAL_S


def uvicorn_config(app: FastAPI, config: ServeConfig, **overrides) -> uvicorn.Config:
    # no `limit_concurrency`: uvicorn counts idle connections against it and answers plain-text
    # 503 on every route, health included; `InFlightLimit` bounds requests instead (JSON 503),
    # and idle or slow connections are closed by the header / keep-alive / body timeouts
    options = dict(host=config.host, port=config.port, log_level=config.log_level, access_log=False,
                   http=header_timeout_protocol(config.header_timeout_s), loop="asyncio",
                   timeout_keep_alive=config.keep_alive_s, server_header=False,
                   timeout_graceful_shutdown=max(1, round(config.shutdown_timeout_s)), backlog=2048)
    options.update(overrides)
    return uvicorn.Config(app, **options)


def serve(config: ServeConfig) -> None:
    """Blocking: load the model, serve until SIGINT/SIGTERM."""
    check_bindable(config.host, config.port)
    sys.setswitchinterval(SWITCH_INTERVAL_S)  # this process is the server: the loop waits less for the GIL
    app = create_app(config)
    uvicorn.Server(uvicorn_config(app, config)).run()


def check_bindable(host: str, port: int) -> None:
    """A taken port or unknown host is the user's to fix: one clear error before loading the model."""
    try:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        with socket.socket(family, socket.SOCK_STREAM) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
            sock.bind((host, port))
    except OSError as exc:
        raise EludeError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from exc


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


class BackgroundServer:
    """`with BackgroundServer(app, config) as url:` — uvicorn on a thread, always shut down."""

    def __init__(self, app: FastAPI, config: ServeConfig, start_timeout_s: float = 30.0):
        port = config.port or free_port(config.host)
        self.url = f"http://{config.host}:{port}"
        self.server = uvicorn.Server(uvicorn_config(app, config, port=port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, name="elude-uvicorn", daemon=True)
        self.start_timeout_s = start_timeout_s

    def __enter__(self) -> str:
        self.thread.start()
        deadline = time.monotonic() + self.start_timeout_s
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"server did not start on {self.url}")
            time.sleep(0.02)
        return self.url

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=15.0)

    def __exit__(self, *_exc) -> None:
        self.stop()
