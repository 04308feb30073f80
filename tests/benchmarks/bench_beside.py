"""What the recording work beside training costs the training thread, by where it runs.

Run: ``python tests/benchmarks/bench_beside.py --workload fast-step --rounds 8`` (``cpu-lstm`` too).

The benchmark model of ``bench_overhead.py`` trains on this thread with one intra-op thread (a core spare,
as on a GPU host), while the work of one real recording of it (the replay, the reductions and, where said,
the drawing and PNG encoding of its pictures) runs again and again beside it:

- ``alone``: nothing beside training.
- ``thread, painting``: all of it on a thread of this process (the recording worker before the drawing
  process).
- ``thread, no painting``: the replay and reductions on a thread, no pictures.
- ``thread, drawing process``: the recording worker as it runs: the replay and reductions on a thread,
  each picture drawn and encoded by the drawing process (``lightning_rnnviz.pipeline.drawing``) while
  that thread waits on the pipe.
- ``process``: all of it in a forked process (no GIL shared with training).

Printed: the median training step in ms per condition (each round times 60 steps per condition, in turn),
and each round's median. The work runs without pause, so the figures are the slowdown of a step while a
recording is being finished, the worst case; a recording takes tens of milliseconds.
"""

from __future__ import annotations

import argparse
import functools
import multiprocessing
import os
import statistics
import sys
import threading
import time
import warnings

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_overhead import WORKLOADS  # noqa: E402

from lightning_rnnviz.pipeline.drawing import DrawingProcess  # noqa: E402
from lightning_rnnviz.pipeline.worker import Delivery, one_thread  # noqa: E402
from lightning_rnnviz.probe import Probe  # noqa: E402
from lightning_rnnviz.render.report import Guard, Reporter  # noqa: E402


class _Undrawn(Delivery):
    """A delivery that keeps each picture's job undrawn (the worker's part when a process draws)."""

    def picture(self, job) -> None:
        self.items.append(("job", (job,)))


def _model(cfg: dict) -> tuple[nn.ModuleDict, torch.Tensor, torch.Tensor]:
    h = cfg["hidden"]
    if cfg["model"] == "gru_mha":
        parts = {"rnn": nn.GRU(cfg["features"], h, batch_first=True), "attn": nn.MultiheadAttention(h, 4, batch_first=True)}
    else:
        parts = {"rnn": nn.LSTM(cfg["features"], h, num_layers=2 if cfg["model"] == "lstm2" else 1, batch_first=True)}
    model = nn.ModuleDict({**parts, "head": nn.Linear(h, 1)})
    x = torch.randn(cfg["batch"], cfg["time"], cfg["features"])
    return model, x, x[:, :, 0].mean(1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workload", choices=["cpu-lstm", "fast-step"], default="fast-step")
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--steps", type=int, default=60, help="timed steps per condition and round")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model, x, y = _model(WORKLOADS[args.workload])
    optimizer = torch.optim.Adam(model.parameters(), 1e-3)

    def loss() -> torch.Tensor:
        out, _ = model["rnn"](x)
        if "attn" in model:
            out, _ = model["attn"](out, out, out, need_weights=False)
        return nn.functional.mse_loss(model["head"](out[:, -1]).squeeze(-1), y)

    def step() -> None:
        optimizer.zero_grad()
        loss().backward()
        optimizer.step()

    probe = Probe(model, on_device=True)
    with probe.capture(max_samples=16) as capture:
        loss().backward()
    capture.hand_off()
    reporter = Reporter(("hidden", "gates", "grad_norm", "attention"), set(probe.targets), Guard("bench"))

    drawing = DrawingProcess()
    while not drawing.ready:  # about a second: an interpreter, numpy, Pillow
        time.sleep(0.05)
    deliveries = {"painting": lambda: Delivery(50), "no painting": lambda: _Undrawn(50),
                  "drawing process": lambda: Delivery(50, drawer=drawing.draw)}

    def recording(pictures: str) -> None:
        with one_thread():
            finished = capture.finish(None)
            reporter.report(finished, deliveries[pictures](), 50, prefix="rnnviz", training=True)

    for pictures in deliveries:
        recording(pictures)  # first use: imports, caches
        started = time.perf_counter()
        recording(pictures)
        print(f"one recording's work, {pictures}: {1e3 * (time.perf_counter() - started):.1f} ms")

    def timed() -> float:
        times = []
        for _ in range(args.steps):
            started = time.perf_counter()
            step()
            times.append(time.perf_counter() - started)
        return 1e3 * statistics.median(times)

    def beside_thread(pictures: str) -> float:
        stop = threading.Event()

        def loop() -> None:
            while not stop.is_set():
                recording(pictures)

        thread = threading.Thread(target=loop, daemon=True)
        thread.start()
        time.sleep(0.2)
        try:
            return timed()
        finally:
            stop.set()
            thread.join()

    def beside_process() -> float:
        def loop() -> None:
            while True:
                recording("painting")

        child = multiprocessing.get_context("fork").Process(target=loop, daemon=True)
        child.start()
        time.sleep(0.5)
        try:
            return timed()
        finally:
            child.kill()
            child.join()

    for _ in range(10):
        step()
    conditions = {"alone": timed, **{f"thread, {pictures}": functools.partial(beside_thread, pictures)
                                     for pictures in deliveries}, "process": beside_process}
    results: dict[str, list[float]] = {name: [] for name in conditions}
    try:
        for _ in range(args.rounds):
            for name, run in conditions.items():
                results[name].append(run())
    finally:
        drawing.close()
    print(f"{args.workload}: median training step (ms) with the recording work beside it, {args.rounds} rounds")
    for name, values in results.items():
        print(f"  {name:24s} {statistics.median(values):7.2f}   rounds: {' '.join(f'{v:.1f}' for v in values)}")


if __name__ == "__main__":
    main()
