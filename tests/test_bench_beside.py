"""``tests/benchmarks/bench_beside.py`` runs and prints a step time for each place the recording work can run."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent / "benchmarks" / "bench_beside.py"


@pytest.mark.slow
def test_bench_beside_prints_every_condition():
    done = subprocess.run([sys.executable, str(SCRIPT), "--workload", "fast-step", "--rounds", "1", "--steps", "3"],
                          capture_output=True, text=True, timeout=600, check=True)
    for name in ("alone", "thread, painting", "thread, no painting", "thread, drawing process", "process"):
        assert re.search(rf"^  {re.escape(name)} +\d+\.\d\d   rounds: \d", done.stdout, flags=re.M), done.stdout
    for pictures in ("painting", "no painting", "drawing process"):
        assert re.search(rf"one recording's work, {pictures}: \d+\.\d ms", done.stdout), done.stdout
