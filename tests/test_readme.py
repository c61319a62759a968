"""The README's contract: its quick start is what CI runs, and every snippet runs as printed.

- the first quick-start command installs exactly what `.ci/run` installs and runs `elude demo`
  (run by tests/test_demo.py); the second is exactly `.ci/run`'s test command;
- every ```python block runs in a fresh interpreter in an empty folder;
- every other ```bash block runs with `bash -euo pipefail` in one shared empty folder, in
  order (later blocks may use files earlier ones wrote).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
BLOCKS = re.findall(r"```(\w+)\n(.*?)```", README, flags=re.S)
QUICK_START = [code for lang, code in BLOCKS if lang == "bash"][:2]
RUNNABLE_BASH = [code for lang, code in BLOCKS if lang == "bash"][2:]
PYTHON = [code for lang, code in BLOCKS if lang == "python"]


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHONPATH"] = f"{ROOT}{os.pathsep}{env.get('PYTHONPATH', '')}"
    return env


def test_quick_start_is_what_ci_runs() -> None:
    ci = (ROOT / ".ci" / "run").read_text()
    install, tests = (block.strip() for block in QUICK_START)
    test_command = tests.split("&&")[-1].strip()
    assert ci.rstrip().splitlines()[-1].strip() == test_command, "`.ci/run` must end with the README's test command"
    pip = re.search(r"pip install ([^&]+)", install)
    assert pip and f"pip install -q {pip.group(1).strip()}" in ci, "README installs what .ci/run installs"
    assert install.rstrip().endswith("elude demo")


def test_readme_has_runnable_snippets() -> None:
    assert PYTHON and RUNNABLE_BASH


@pytest.mark.parametrize("code", PYTHON, ids=[f"python-{i}" for i in range(len(PYTHON))])
def test_python_snippet_runs_as_printed(code: str, tmp_path: Path) -> None:
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=_env(), capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]


def test_bash_snippets_run_as_printed(tmp_path: Path) -> None:
    for code in RUNNABLE_BASH:
        result = subprocess.run(["bash", "-euo", "pipefail", "-c", code], cwd=tmp_path, env=_env(),
                                capture_output=True, text=True, timeout=900)
        assert result.returncode == 0, f"{code}\n{result.stdout[-2000:]}\n{result.stderr[-3000:]}"
