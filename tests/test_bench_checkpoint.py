"""``tests/benchmarks/bench_checkpoint.py`` runs and prints the training thread's time in ``RNNViz.state_dict`` at
each of Lightning's epoch-end checkpoints."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent / "benchmarks" / "bench_checkpoint.py"


@pytest.mark.slow
def test_bench_checkpoint_prints_a_wait_per_checkpoint():
    done = subprocess.run([sys.executable, str(SCRIPT), "--steps", "24"], capture_output=True, text=True,
                          timeout=600, check=True)
    assert "RNNViz placement: thread" in done.stdout, done.stdout
    calls = re.search(r"^state_dict calls: (\d+); ms each: ([\d., ]+)$", done.stdout, flags=re.M)
    assert calls, done.stdout
    assert int(calls.group(1)) == 3 == len(calls.group(2).split(","))  # 24 steps: 3 epochs of 8 batches
    assert re.search(r"^in all \d+ ms of a \d+ ms fit$", done.stdout, flags=re.M), done.stdout
