"""The feature monitor's state on disk, so a restart keeps its drift window and counters.

One `.npz` file (numpy only, no pickle) written atomically: a JSON header (format, model
and plan fingerprints, per-layer shapes and counter totals) plus each layer's window blocks.
It is restored at start only when it belongs to the same plan and layer shapes; any other
file is refused with a warning, never half-applied.
"""

from __future__ import annotations

import asyncio
import json
import logging
from pathlib import Path

import numpy as np

from elude_export.artifacts import write_file_atomic
from elude_export.errors import EludeError
from serving.monitoring import FeatureMonitor, _Block

log = logging.getLogger("elude.serving")
FORMAT = "elude-serve-state/1"
FIELDS = ("fires", "bins", "act_sum")


def _counter_value(counter, labels: dict[str, str] | None = None) -> float:
    """A counter's current total, read through the public `collect()` API."""
    for family in counter.collect():
        for sample in family.samples:
            if sample.name.endswith("_total") and sample.labels == (labels or {}):
                return float(sample.value)
    return 0.0


def snapshot(monitor: FeatureMonitor) -> tuple[dict, dict[str, np.ndarray]]:
    """(JSON header, arrays) of the monitor, taken under its lock."""
    header = {"format": FORMAT, "model_fingerprint": monitor.contract.model_fingerprint,
              "plan_fingerprint": monitor.contract.plan_fingerprint,
              "images_total": _counter_value(monitor.images), "layers": {}}
    arrays: dict[str, np.ndarray] = {}
    with monitor._lock:
        for index, (path, state) in enumerate(monitor.layers.items()):
            window = state.window
            blocks = [*window.blocks, window.current]
            header["layers"][path] = {"index": index, "n_subunits": window.n_subunits, "n_bins": window.n_bins,
                                      "block_n": [b.n for b in blocks],
                                      "fires_total": _counter_value(monitor.fires, {"layer": path})}
            for name in FIELDS:
                arrays[f"{index}.{name}"] = np.stack([getattr(b, name) for b in blocks])
    return header, arrays


def save_state(path: str | Path, monitor: FeatureMonitor) -> Path:
    header, arrays = snapshot(monitor)

    def write(temp: Path) -> None:
        with open(temp, "wb") as handle:
            np.savez_compressed(handle, header=np.array(json.dumps(header)), **arrays)

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    return write_file_atomic(path, write, EludeError)


def restore_state(path: str | Path, monitor: FeatureMonitor) -> bool:
    """Load a saved state into a fresh monitor; False (with a warning) when it is absent or foreign."""
    path = Path(path)
    if not path.is_file():
        return False
    try:
        with np.load(path, allow_pickle=False) as data:
            header = json.loads(str(data["header"]))
            arrays = {key: data[key] for key in data.files if key != "header"}
    except (OSError, ValueError, KeyError, json.JSONDecodeError) as exc:
        log.warning("state file %s is unreadable, starting with an empty drift window: %s", path, exc)
        return False
    problem = _mismatch(header, monitor)
    if problem:
        log.warning("state file %s refused (%s); starting with an empty drift window", path, problem)
        return False
    with monitor._lock:
        for layer, saved in header["layers"].items():
            window = monitor.layers[layer].window
            stacked = {name: arrays[f"{saved['index']}.{name}"] for name in FIELDS}
            window.restore([_Block.from_bins(n, *(stacked[name][i].copy() for name in FIELDS))
                            for i, n in enumerate(saved["block_n"])])
    monitor.images.inc(header["images_total"])
    for layer, saved in header["layers"].items():
        monitor.fires.labels(layer=layer).inc(saved["fires_total"])
    log.info("restored the drift window from %s (%d images seen before)", path, header["images_total"])
    return True


def _mismatch(header: dict, monitor: FeatureMonitor) -> str | None:
    if header.get("format") != FORMAT:
        return f"format {header.get('format')!r}, expected {FORMAT!r}"
    if header.get("plan_fingerprint") != monitor.contract.plan_fingerprint:
        return (f"it belongs to plan {header.get('plan_fingerprint')}, this model's plan is "
                f"{monitor.contract.plan_fingerprint}")
    layers = header.get("layers", {})
    if set(layers) != set(monitor.layers):
        return "its monitored layers differ from this model's"
    for layer, saved in layers.items():
        window = monitor.layers[layer].window
        if (saved["n_subunits"], saved["n_bins"]) != (window.n_subunits, window.n_bins):
            return f"layer {layer} has another shape"
    return None


class StateSaver:
    """Saves the monitor every `interval_s` (off the event loop) and once more at shutdown."""

    def __init__(self, path: str | Path, monitor: FeatureMonitor, interval_s: float):
        self.path, self.monitor, self.interval_s = Path(path), monitor, interval_s
        self._task: asyncio.Task | None = None

    def save(self) -> None:
        try:
            save_state(self.path, self.monitor)
        except (OSError, EludeError) as exc:  # a full disk must not stop inference; it is logged
            log.error("could not save the monitor state to %s: %s", self.path, exc)

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            await asyncio.to_thread(self.save)

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._loop(), name="elude-state")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        self.save()
