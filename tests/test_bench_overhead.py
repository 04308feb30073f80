"""The outside timer's arithmetic in ``tests/benchmarks/bench_overhead.py`` (``loop ms/rec``, ``other
steps`` and where the loop time lands, step by step), on made-up runs whose answers are known; the script
itself runs in ``tests/test_gpu_card.py``."""

from __future__ import annotations

import importlib.util
import math
import resource
import time
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent / "benchmarks" / "bench_overhead.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_overhead_under_test", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _run(steps: int, base: float, extra: dict[int, float], recorded: list[int]) -> dict:
    loop = [base] * steps
    for step, ms in extra.items():
        loop[step] += ms
    return {"loop_ms": loop, "recorded_steps": recorded}


def test_each_recordings_cost_is_charged_to_the_steps_where_it_lands(bench):
    assert bench.AFTER == 5
    recorded = [0, 20, 40, 60, 80]
    # each recording after the first: 0.5 ms on its own step, 3 and 2 on the next two, 1 on the fifth after it
    cost = {0: 0.5, 1: 3.0, 2: 2.0, 5: 1.0}
    extra = {r + k: ms for r in recorded[1:] for k, ms in cost.items()}
    extra.update({0: 50.0, 1: 7.0})  # the first recording's set-up: left out
    extra[97] = 4.0  # the last step runs into the fit end; so does the window of a recording reaching it
    with_cb = _run(100, 10.0, extra, recorded + [95])
    without = _run(100, 9.0, {30: 1.5}, recorded + [95])  # a slow step outside every window moves nothing

    per_rec, other_with, other_without = bench.outside_figures(with_cb, without)
    assert per_rec == pytest.approx(6.5)  # each of the recordings 20, 40, 60 and 80
    assert (other_with, other_without) == (10.0, 9.0)  # the medians of the steps outside every window

    steps = bench.by_step(with_cb, without)
    assert len(steps) == bench.AFTER + 1
    assert all(len(values) == 4 for values in steps)  # recordings 20, 40, 60, 80; not 0, not 95
    assert [values[0] for values in steps] == pytest.approx([0.5, 3.0, 2.0, 0.0, 0.0, 1.0])
    sums = [sum(values[i] for values in steps) for i in range(4)]
    assert sums == pytest.approx([6.5] * 4)  # a window's steps add up to its `loop ms/rec` value


def test_a_slow_step_without_the_callback_in_a_window_lowers_that_recordings_figure(bench):
    recorded = [0, 20, 40]
    with_cb = _run(60, 10.0, {21: 3.0, 41: 3.0}, recorded)
    without = _run(60, 10.0, {42: 2.0}, recorded)
    steps = bench.by_step(with_cb, without)
    assert steps[1] == pytest.approx([3.0, 3.0]) and steps[2] == pytest.approx([0.0, -2.0])
    per_rec, _, _ = bench.outside_figures(with_cb, without)
    assert per_rec == pytest.approx(2.0)  # the median of 3 and 1


def test_a_run_too_short_for_any_window_gives_no_figure(bench):
    with_cb = _run(8, 10.0, {}, [0, 4])
    without = _run(8, 10.0, {}, [0, 4])
    assert bench.by_step(with_cb, without) == [[] for _ in range(bench.AFTER + 1)]
    assert math.isnan(bench.outside_figures(with_cb, without)[0])


def test_waiting_is_taken_step_by_step_like_the_loop_time(bench):
    recorded = [0, 20, 40]
    with_cb = _run(60, 10.0, {21: 3.0, 41: 3.0}, recorded)
    without = _run(60, 10.0, {}, recorded)
    # the thread's CPU time: all of each step but one millisecond of the slow steps after a recording
    with_cb["cpu_ms"] = [ms - (1.0 if step in (21, 41) else 0.0)
                         for step, ms in enumerate(with_cb["loop_ms"])]
    without["cpu_ms"] = list(without["loop_ms"])
    with_cb["waits"] = [5 if step in (21, 41) else 0 for step in range(60)]
    without["waits"] = [0] * 60
    timed_with, timed_without = bench.off_cpu(with_cb), bench.off_cpu(without)
    assert timed_with["loop_ms"] == with_cb["loop_ms"]  # the run's other series kept
    off = bench.by_step(timed_with, timed_without, "off_cpu_ms")
    assert off[1] == pytest.approx([1.0, 1.0]) and all(v == pytest.approx(0.0) for v in off[0] + off[2])
    assert bench.by_step(timed_with, timed_without, "waits")[1] == [5, 5]
    assert bench.by_step(timed_with, timed_without)[1] == pytest.approx([3.0, 3.0])  # the loop time as before


def test_the_timer_reads_the_threads_own_cpu_time_and_waits(bench):
    cpu, waits = bench._thread_usage()
    busy_until = time.thread_time() + 0.02
    while time.thread_time() < busy_until:
        pass
    time.sleep(0.05)  # a wait off the CPU
    cpu_after, waits_after = bench._thread_usage()
    assert 0.02 <= cpu_after - cpu < 0.05  # the sleep is not the thread's CPU time
    assert waits_after >= waits + (1 if hasattr(resource, "RUSAGE_THREAD") else 0)
