"""bench_fit_vs_sae: a tiny run prints its table; a level the SAE did not reach is a bound, never a ratio."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest

from elude_export.evidence.baselines.sae_model import SAEHistory

pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = Path(__file__).resolve().parents[1]


def load_bench() -> ModuleType:
    spec = importlib.util.spec_from_file_location("bench_fit_vs_sae", ROOT / "benchmarks" / "bench_fit_vs_sae.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve their module by name
    spec.loader.exec_module(module)
    return module


def history(fvus: list[float], seconds_per_check: float = 10.0, check_every: int = 5) -> SAEHistory:
    out = SAEHistory(steps=check_every * len(fvus), seconds=seconds_per_check * len(fvus))
    out.fvu = [(check_every * (i + 1), value) for i, value in enumerate(fvus)]
    out.elapsed = [seconds_per_check * (i + 1) for i in range(len(fvus))]
    out.reached_target = fvus[-1] <= 0.05
    return out


def test_reached_levels_are_ratios_with_check_cost_excluded() -> None:
    bench = load_bench()
    rows = bench.level_rows(history([0.3, 0.15, 0.08, 0.04]), [0.2, 0.1, 0.05, 0.02], 0.05, fit_seconds=2.0,
                            seconds_per_check=1.0)
    by_level = {row.level: row for row in rows}
    assert by_level[0.2].status == "reached" and by_level[0.2].steps == 10
    assert by_level[0.2].seconds == pytest.approx(20.0 - 2 * 1.0)  # two checks' cost taken off
    assert by_level[0.05].ratio == pytest.approx((40.0 - 4.0) / 2.0)
    assert by_level[0.02].status == "beyond target"
    table = "\n".join(bench.format_rows(rows, history([0.3, 0.15, 0.08, 0.04])))
    assert "| <= 0.05 | 20 | 36.0 | 18.0x |" in table
    assert "not trained for" in table
    assert "= 18.0x (target >= 20x: not met)" in bench.verdict(rows, 0.05)


def test_a_budget_cut_short_prints_a_bound_not_a_ratio() -> None:
    bench = load_bench()
    cut = history([0.3, 0.15, 0.08])  # budget ran out before 0.05
    rows = bench.level_rows(cut, [0.2, 0.1, 0.05, 0.02], 0.05, fit_seconds=1.0, seconds_per_check=0.0)
    row = next(r for r in rows if r.level == 0.05)
    assert row.status == "bound" and row.seconds == pytest.approx(30.0)
    line = next(line for line in bench.format_rows(rows, cut) if line.startswith("| <= 0.05 "))
    assert ">= 30.0" in line and ">= 30.0x (bound" in line
    assert "| 30.0x |" not in line
    headline = bench.verdict(rows, 0.05)
    assert ">= 30.0x: a bound" in headline and "cut short" in headline and "target >= 20x: met" in headline
    assert "undecided" in bench.verdict(bench.level_rows(cut, [0.05], 0.05, 10.0, 0.0), 0.05)


def test_tiny_run_on_the_embedded_model_prints_the_table(capsys: pytest.CaptureFixture[str]) -> None:
    bench = load_bench()
    code = bench.main(["--model", "embedded", "--layer", "blocks.1.mlp", "--images", "48", "--batch-size", "16",
                       "--device", "cpu", "--k-max", "2", "--top-m", "16", "--sae-tokens", "2000",
                       "--sae-batch", "128", "--sae-check-every", "2", "--sae-max-seconds", "3",
                       "--target-fvu", "0.05"])
    out = capsys.readouterr().out
    assert code == 0
    assert "| SAE held-out FVU level | SAE steps | SAE seconds | SAE / ELUDe router fit |" in out
    assert all(f"| <= {level} |" in out for level in (0.2, 0.1, 0.05, 0.02))
    assert "ELUDe router fit" in out and "SAE budget: until held-out FVU <= 0.05 or 3s" in out
    assert "SAE time to FVU <= 0.05 / ELUDe router fit" in out
    assert "load average" in out
