"""Writing artifacts: atomically, with the usual permissions, and as valid JSON.

Every file or folder the tool produces (plan, ONNX model, validation and evaluation JSON,
HTML report, Triton repository) goes through here, so that a reader never sees half an
artifact and a file written through a temp file gets the mode `open()` would give it
(0666 / 0777 less the umask), not mkstemp's / mkdtemp's owner-only 0600 / 0700: a Triton
server or a colleague running as another user must be able to read it.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator

from elude_export.errors import EludeError


def _umask() -> int:
    current = os.umask(0)
    os.umask(current)
    return current


def usual_mode(directory: bool = False) -> int:
    """The mode a new file (or folder) gets from open() (or mkdir()) under the current umask."""
    return (0o777 if directory else 0o666) & ~_umask()


def check_output_path(path: Path, error: type[EludeError], example: str) -> None:
    """A target must be a file name in an existing folder: say so before any work is done."""
    if path.is_dir():
        raise error(f"output {path} is a directory; give a file name such as {example}")
    if not path.parent.exists():
        raise error(f"output directory {path.parent} does not exist")


def write_file_atomic(path: str | Path, write: Callable[[Path], None], error: type[EludeError] = EludeError) -> Path:
    """Call `write(temp_path)` on a temp file next to `path`, then rename it into place.

    A crash or an exception leaves either the old file or none, never a partial one.
    """
    path = Path(path)
    try:
        handle, temp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(handle)
    except OSError as exc:
        raise error(f"cannot write {path}: {exc.strerror}") from exc
    temp = Path(temp_name)
    try:
        write(temp)
        os.chmod(temp, usual_mode())
        os.replace(temp, path)
    except OSError as exc:
        raise error(f"cannot write {path}: {exc.strerror or exc}") from exc
    finally:
        temp.unlink(missing_ok=True)
    return path


def write_text_atomic(path: str | Path, text: str, error: type[EludeError] = EludeError) -> Path:
    return write_file_atomic(path, lambda temp: temp.write_text(text, encoding="utf-8"), error)


@contextlib.contextmanager
def atomic_directory(target: str | Path, error: type[EludeError] = EludeError) -> Iterator[Path]:
    """Yield an empty staging folder; on success it replaces `target` whole (an older one is removed after)."""
    target = Path(target)
    try:
        stage = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    except OSError as exc:
        raise error(f"cannot write {target}: {exc.strerror}") from exc
    try:
        yield stage
        for folder, _dirs, files in os.walk(stage):
            os.chmod(folder, usual_mode(directory=True))
            for name in files:
                os.chmod(Path(folder) / name, usual_mode())
        old = target.with_name(f".{target.name}.old")
        if target.exists():
            shutil.rmtree(old, ignore_errors=True)
            os.replace(target, old)
        os.replace(stage, target)
        shutil.rmtree(old, ignore_errors=True)
    except OSError as exc:
        raise error(f"cannot write {target}: {exc.strerror or exc}") from exc
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def json_safe(value: Any) -> Any:
    """JSON has no NaN or infinity: write them as null; numpy scalars and arrays become Python values."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    item = getattr(value, "item", None)  # numpy / torch scalars
    if callable(item) and getattr(value, "ndim", 1) == 0:
        return json_safe(item())
    tolist = getattr(value, "tolist", None)  # numpy arrays
    if callable(tolist):
        return json_safe(tolist())
    return value


def write_json_atomic(path: str | Path, value: Any, error: type[EludeError] = EludeError) -> Path:
    """Strict JSON (allow_nan=False after cleaning), written atomically."""
    return write_text_atomic(path, json.dumps(json_safe(value), indent=2, allow_nan=False) + "\n", error)
