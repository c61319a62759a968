"""Parse and encode the big numeric `data` arrays of JSON inference requests in small pieces.

A batch-64 JSON request is megabytes of numbers; one `orjson.loads` of it holds the GIL for
tens of milliseconds, and every such call stalls the event loop (health probes included) for
its whole length, even on a worker thread. Here each `"data": [...]` array of plain numbers is
cut out of the body and parsed in pieces of `PIECE_BYTES` (about a millisecond each,
the GIL is free between them); the rest, now small, goes to the JSON parser with a
placeholder string per array. Anything unusual (strings, booleans, NaN tokens, odd escapes)
returns None and the caller parses the body as plain JSON, with its usual error messages.
Responses are built the same way round: JSON outputs are encoded piecewise and spliced in.
"""

from __future__ import annotations

import re
from typing import Iterator

import numpy as np

from serving import jsoncodec

DATA_KEY = b'"data"'
COLON_BRACKET = re.compile(rb"\s*:\s*\[")
PLACEHOLDER = "\x00elude-data:"
Split = tuple[bytes, list[np.ndarray]] | None  # what split_data_arrays returns
PIECE_BYTES = 256 * 1024
PIECE_VALUES = 32 * 1024  # about 300 KB of JSON text per encoded piece
NUMBER_CHARS = b"0123456789+-.eE,"
SPACE_AND_BRACKETS = b"[] \t\r\n"


def _closing_bracket(body: bytes, start: int) -> int | None:
    """Index of the `]` matching the `[` at `start` (numbers hold no brackets, so counting suffices)."""
    depth, position = 0, start
    while True:
        close = body.find(b"]", position)
        if close < 0:
            return None
        depth += body.count(b"[", position, close) - 1
        if depth == 0:
            return close
        position = close + 1


def _data_arrays(body: bytes) -> Iterator[tuple[int, int | None]]:
    """(`[`, matching `]`) of each `"data": [...]` (a plain `find`: a regex scan of megabytes is slow)."""
    key = body.find(DATA_KEY)
    while key >= 0:
        match = COLON_BRACKET.match(body, key + len(DATA_KEY))
        if match is not None and (key == 0 or body[key - 1:key] != b"\\"):
            start = match.end() - 1
            end = _closing_bracket(body, start)
            yield start, end
            if end is None:
                return
            key = body.find(DATA_KEY, end)
        else:
            key = body.find(DATA_KEY, key + 1)


def parse_numbers(text: bytes) -> np.ndarray | None:
    """Flat float64 values of a (nested) JSON array of numbers, or None if it is anything else."""
    values, begin = [], 0
    while begin < len(text):
        end = len(text) if len(text) - begin <= PIECE_BYTES else text.find(b",", begin + PIECE_BYTES)
        end = len(text) if end < 0 else end
        piece = text[begin:end].translate(None, SPACE_AND_BRACKETS)
        begin = end + 1
        if not piece:
            continue
        if piece.translate(None, NUMBER_CHARS) or piece.startswith(b",") or piece.endswith(b","):
            return None
        try:
            values.append(np.asarray(jsoncodec.loads(b"[" + piece + b"]"), dtype=np.float64))
        except (ValueError, TypeError):  # ",," or "1-2": not a JSON number list; the JSON parser will say why
            return None
    return np.concatenate(values) if values else np.empty(0)


def split_data_arrays(body: bytes) -> Split:
    """(JSON body with placeholders, the arrays) or None when the fast path does not apply."""
    pieces, arrays, position = [], [], 0
    for start, end in _data_arrays(body):
        if end is None:
            return None
        array = parse_numbers(body[start + 1:end])
        if array is None:
            return None
        pieces += [body[position:start], b'"\\u0000elude-data:%d"' % len(arrays)]
        arrays.append(array)
        position = end + 1
    if not arrays:
        return None
    pieces.append(body[position:])
    return b"".join(pieces), arrays


def restore_arrays(request: object, arrays: list[np.ndarray]) -> None:
    """Put the cut-out arrays back into `request["inputs"][*]["data"]`."""
    inputs = request.get("inputs") if isinstance(request, dict) else None
    for entry in inputs if isinstance(inputs, list) else ():
        data = entry.get("data") if isinstance(entry, dict) else None
        if isinstance(data, str) and data.startswith(PLACEHOLDER):
            index = data[len(PLACEHOLDER):]
            if index.isdigit() and int(index) < len(arrays):
                entry["data"] = arrays[int(index)]


def encode_numbers(array: np.ndarray) -> bytes:
    """`[v0,v1,...]` of a flat numeric array, encoded in pieces of `PIECE_VALUES` (GIL free between)."""
    flat = array.ravel()
    if flat.size == 0:
        return b"[]"
    pieces = [jsoncodec.dumps(flat[i:i + PIECE_VALUES])[1:-1] for i in range(0, flat.size, PIECE_VALUES)]
    return b"[" + b",".join(pieces) + b"]"


def dumps_with_arrays(value: object, arrays: list[np.ndarray]) -> bytes:
    """JSON of `value` whose placeholders (`placeholder(i)`) stand for `arrays[i]`, encoded piecewise."""
    text = jsoncodec.dumps(value)
    if not arrays:
        return text
    parts, position = [], 0
    for index, array in enumerate(arrays):
        marker = b'"\\u0000elude-data:%d"' % index
        at = text.index(marker, position)
        parts += [text[position:at], encode_numbers(array)]
        position = at + len(marker)
    parts.append(text[position:])
    return b"".join(parts)


def placeholder(index: int) -> str:
    return f"{PLACEHOLDER}{index}"
