"""``tests/benchmarks/gpu_card.sh``, the one prepared run for a lent GPU machine, rehearsed on the CPU: a GPU
is lent to few sessions, for minutes, so the script must work the first time it meets one."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent / "benchmarks" / "gpu_card.sh"


def _run(tmp_path: Path, python: str, timeout: float) -> subprocess.CompletedProcess:
    env = {**os.environ, "OUT": str(tmp_path), "GPU_CARD_DRY": "1", "PYTHON": python}
    return subprocess.run(["bash", str(SCRIPT)], env=env, capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow
def test_the_gpu_card_script_runs_every_part_and_keeps_their_logs(tmp_path):
    done = _run(tmp_path, sys.executable, timeout=2400)  # the rehearsal's limits (4 x 9 min) stop it first
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    parts = (tmp_path / "parts.txt").read_text().splitlines()
    assert [p.split()[0] for p in parts] == ["check_cuda", "bench_replay", "bench_overhead", "bench_idle"]
    assert all(" rc=0 " in p for p in parts), parts
    assert "torch " in (tmp_path / "card.txt").read_text()
    checks = (tmp_path / "check_cuda.log").read_text()
    assert len(re.findall(r"^PASS ", checks, flags=re.M)) == 6 and "FAIL" not in checks, checks[-3000:]
    replay = (tmp_path / "bench_replay.log").read_text()
    # the replay against the module, then the fused path's parts
    assert len(re.findall(r"^gru-1x64-T64-B32\s+\d", replay, flags=re.M)) == 2, replay
    assert re.search(r"^gru-1x64-T64-B32\s+\d+\.\d(\s+-?\d+\.\d+x){4}$", replay, flags=re.M), replay
    overhead = (tmp_path / "bench_overhead.log").read_text()
    assert re.search(r"^fast-step\s+fast\s+\d+\.\d+x", overhead, flags=re.M), overhead[-3000:]
    for measure in ("off-CPU ms", "waits"):  # the training thread's waits, step by step
        row = rf"^fast-step\s+fast\s+{measure}(\s+(-?\d+\.\d|n/a)){{6}}$"
        assert re.search(row, overhead, flags=re.M), measure
    idle = (tmp_path / "bench_idle.log").read_text()  # the hooks on the steps without a recording
    assert re.search(r"^RNNViz\(\), this tree: -?\d+\.\d us a step beyond", idle, flags=re.M), idle[-3000:]


def test_the_gpu_card_script_fails_when_a_part_fails(tmp_path):
    done = _run(tmp_path, "false", timeout=60)  # every part's interpreter exits 1 at once
    assert done.returncode != 0
    parts = (tmp_path / "parts.txt").read_text().splitlines()
    assert len(parts) == 4 and all(" rc=1 " in p for p in parts), parts
