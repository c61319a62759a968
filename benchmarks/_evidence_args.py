"""Options the evidence benchmarks share (run from `python benchmarks/<script>.py`)."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_run_arguments(parser: argparse.ArgumentParser, batch_size: int) -> None:
    """--top-n, --batch-size, --device, --threads, --json-out."""
    parser.add_argument("--top-n", type=int, default=20, help="top images a label / a share is computed from")
    parser.add_argument("--batch-size", type=int, default=batch_size)
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json-out", type=Path, default=None)
