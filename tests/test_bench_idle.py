"""``tests/benchmarks/bench_idle.py`` runs and prints, per condition and hook, what the steps without a
recording cost between its stamps."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent / "benchmarks" / "bench_idle.py"
ROOT = SCRIPT.parents[2]


@pytest.mark.slow
def test_bench_idle_prints_every_condition_and_hook(tmp_path):
    command = [sys.executable, str(SCRIPT), "--rounds", "1", "--steps", "60", "--against", str(ROOT)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=900, check=True)
    out = done.stdout
    for name in ("nothing between", "a no-op callback", "RNNViz(), this tree", f"RNNViz(), {ROOT}"):
        # the median, one round's figure, six hooks
        assert re.search(rf"^{re.escape(name)} +\d+\.\d +\d+\.\d(\s+\d+\.\d){{6}}$", out, flags=re.M), out
    assert re.search(r"^RNNViz\(\), this tree: -?\d+\.\d us a step beyond a callback that does nothing "
                     r"\(-?\d+\.\d\d % of a 1 ms step", out, flags=re.M), out


def test_the_stamps_see_only_what_lies_between_them():
    """In one process: with nothing between the stamps, each hook's gap is Lightning's dispatch alone, far
    below a step; the steps near a recording are left out (here step 0 and the two after it: fast-step
    records every 50)."""
    sys.path.insert(0, str(SCRIPT.parent))
    try:
        import bench_idle
    finally:
        sys.path.remove(str(SCRIPT.parent))
    result = bench_idle.run_once("fast-step", "nothing", 20)
    assert result["package"] is None
    assert result["steps"] == 20 - 3  # step 0 and the two after it (log_every 50: no other recording)
    assert set(result["hooks_s"]) == set(bench_idle.HOOKS)
    assert 0 < result["step_s"] < 0.005
    assert result["step_s"] == pytest.approx(sum(result["hooks_s"].values()), rel=0.5)
