"""Parse the big numeric arrays of JSON request bodies in a helper process.

Parsing a batch-64 JSON request holds the GIL for ~20 ms of CPU even in small pieces on a
worker thread, and every piece makes the event loop wait for the GIL on each of its system
calls: health probes then took ~3 ms at the median instead of ~1 ms. In a helper process the
parse holds another interpreter's GIL; the server only copies the body out and the arrays back.

The helper is `python -m serving.json_process` on a pipe (not `multiprocessing`, whose spawn
re-imports the server's `__main__` script in the child and fails when there is none, as
under `python -`). It starts with the first big body, imports numpy and orjson (never
onnxruntime), and is restarted if it dies; meanwhile, and for good after
`MAX_FAILED_STARTS` helpers in a row die, the server parses on its own thread: a lost helper
costs speed, never a request.

Wire format, both ways: a u64 count of blobs, then each blob as a u64 length and its bytes.
Request: [body]. Reply: [b""] when the fast path does not apply (the caller parses the body as
plain JSON), else [skeleton, array 0 as float64 bytes, array 1, ...].
"""

from __future__ import annotations

import logging
import os
import signal
import struct
import subprocess
import sys
import threading
from typing import BinaryIO

import numpy as np

from serving.json_tensors import Split, split_data_arrays

log = logging.getLogger("elude.serving")
MAX_FAILED_STARTS = 3
_U64 = struct.Struct("<Q")


def write_blobs(stream: BinaryIO, blobs: list[bytes]) -> None:
    stream.write(_U64.pack(len(blobs)))
    for blob in blobs:
        stream.write(_U64.pack(len(blob)))
        stream.write(blob)
    stream.flush()


def read_blobs(stream: BinaryIO) -> list[bytes] | None:
    """The blobs of one message; None at a clean end of stream."""
    head = stream.read(_U64.size)
    if not head:
        return None
    blobs = []
    for _ in range(_exact_u64(head)):
        size = _exact_u64(stream.read(_U64.size))
        blob = stream.read(size)
        if len(blob) != size:
            raise EOFError("the stream ended inside a message")
        blobs.append(blob)
    return blobs


def _exact_u64(raw: bytes) -> int:
    if len(raw) != _U64.size:
        raise EOFError("the stream ended inside a message")
    return _U64.unpack(raw)[0]


def encode_split(split: Split) -> list[bytes]:
    if split is None:
        return [b""]
    skeleton, arrays = split
    return [skeleton, *(np.ascontiguousarray(array, np.float64).tobytes() for array in arrays)]


def decode_split(blobs: list[bytes]) -> Split:
    if blobs == [b""]:
        return None
    skeleton, *arrays = blobs
    return skeleton, [np.frombuffer(raw, np.float64) for raw in arrays]


class JsonSplitter:
    """`split(body)` = `serving.json_tensors.split_data_arrays(body)`, run in a helper process (`workers` 0: here)."""

    def __init__(self, workers: int = 1, command: list[str] | None = None):
        self.workers = workers  # 0 or 1: one helper keeps up with one JSON thread
        self.command = command or [sys.executable, "-m", "serving.json_process"]
        self._process: subprocess.Popen | None = None
        self._lock = threading.Lock()
        self._failed_starts = 0
        self._closed = False

    def split(self, body: bytes) -> Split:
        with self._lock:
            process = self._helper()
            if process is None:
                return split_data_arrays(body)
            try:
                write_blobs(process.stdin, [body])
                blobs = read_blobs(process.stdout)
                if blobs is None:
                    raise EOFError("the helper closed its output")
            except (OSError, EOFError, ValueError) as exc:  # it died (killed, out of memory): parse here
                self._lost(process, exc)
                return split_data_arrays(body)
            self._failed_starts = 0
            return decode_split(blobs)

    def helper_pid(self) -> int | None:
        """Process id of the running helper, starting it if needed (tests, diagnostics); None: parsing here."""
        with self._lock:
            process = self._helper()
            return None if process is None else process.pid

    def _helper(self) -> subprocess.Popen | None:
        if not self.workers or self._closed or self._failed_starts >= MAX_FAILED_STARTS:
            return None
        if self._process is not None and self._process.poll() is not None:
            _end(self._process)  # it died while idle: close its pipes before starting the next one
            self._process = None
        if self._process is None:
            env = {**os.environ, "PYTHONPATH": os.pathsep.join(path for path in sys.path if path)}
            self._process = subprocess.Popen(self.command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env)
        return self._process

    def _lost(self, process: subprocess.Popen, exc: Exception) -> None:
        self._failed_starts += 1
        _end(process)
        self._process = None
        if self._failed_starts >= MAX_FAILED_STARTS:
            log.error("JSON helper process died %d times in a row (%s); parsing on the server thread from now on",
                      self._failed_starts, exc)
        else:
            log.warning("JSON helper process died (%s); parsing on the server thread and restarting it", exc)

    def close(self) -> None:
        with self._lock:
            self._closed = True
            process, self._process = self._process, None
        if process is not None:
            _end(process)


def _end(process: subprocess.Popen, timeout_s: float = 5.0) -> None:
    """Close its input (it exits at the end of its stream), then wait; kill it if it does not go."""
    for stream in (process.stdin, process.stdout):
        try:
            stream.close()
        except OSError:
            pass  # a pipe already broken by the helper's death; nothing left to flush
    try:
        process.wait(timeout_s)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout_s)


def serve_pipe(requests: BinaryIO, replies: BinaryIO) -> None:
    """The helper's loop: split every body read from `requests` until the stream ends."""
    while (blobs := read_blobs(requests)) is not None:
        write_blobs(replies, encode_split(split_data_arrays(blobs[0])))


if __name__ == "__main__":
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C goes to the server, which then closes the pipe
    serve_pipe(sys.stdin.buffer, sys.stdout.buffer)
