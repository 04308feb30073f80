"""What RNNViz costs a real training run: wall time, memory, per-recording-step breakdown.

Run: ``python tests/benchmarks/bench_overhead.py`` (all workloads, CPU) or ``--workload cpu-lstm --pairs 5``;
``--device cuda`` runs the same workloads on a GPU; ``--variant fast --variant fast-bg --variant fast-thread
--variant mpl-bg`` compares drawing on the training thread with drawing in the child process or on a worker
thread, and the two renderers; ``--against TREE`` compares the callback's own cost with this tree's code and
with another checkout's (e.g. ``git worktree add /tmp/before <commit>``), runs interleaved.

Each training run is a fresh subprocess (so peak RSS is its own). Runs with and without the callback are
interleaved in pairs and the median of the per-pair ratios is reported, so that the noise of a shared
machine hits both sides alike. Printed per workload and variant:

- ``overhead``: median wall-time ratio of ``trainer.fit`` with ``RNNViz()`` (default cadence) to without.
- ``thread``: 1 + everything the callback spent on the training thread (recording steps and epoch ends, from
  its ``rnnviz/overhead/*`` scalars, and the flushes after them) over the wall time without it. The drawing
  runs on that thread, so this is the overhead itself, measured from inside; unlike the wall-time ratio,
  other jobs on a shared machine hardly move it. (It leaves out the hooks' few microseconds inside the
  user's own forward.)
- ``thread ms/rec``: time the callback spent on the training thread per recording step, from its own
  ``rnnviz/overhead/*`` scalars, split into ``replay`` (exact dL/dh_t), ``render`` (pictures drawn on the
  training thread), ``write`` (PNG encoding, event file) and ``other`` (capture, reductions, statistics,
  histograms, hand-over to a drawing process).
- ``draw ms/fig``: what one figure costs the renderer of the variant, measured here on the same records.
- ``replay/fused``: replay of the recorded samples over the module's own fused forward+backward on the
  same full batch.
- ``peak RSS``: training process with / without; a drawing process's peak is reported on its own.
- ``fit ms``: what the callback's fit start and fit end cost (opening and closing its writers, the first
  steps' set-up), reported on its own.
- ``next step ms``: median loop time of the training step right after each recording step, with / without the
  callback: a cost the callback causes outside its own time (a thread pool left spinning, caches evicted)
  shows here and nowhere else.
- ``inside ms``: a recording step's loop time, less the callback's own time on it, less the same step's time
  without the callback (medians, first recording left out): what the callback adds inside the user's own
  forward and backward (capturing inputs, weights, upstream gradients), which its own timers cannot see.

A second table times the loop from outside the callback. A timer callback placed first, before ``RNNViz``,
stamps every batch start (after a device sync on CUDA); a step's loop time runs to the next batch start (the
last step's to the end of training), so it holds every hook, epoch end and flush in between.

- ``threads``: torch's intra-op threads in the training runs (``--threads N``; default: torch's own).
- ``recs``: recordings the callback wrote per run; ``dropped``: figures its drawing dropped.
- ``thread ms/rec``: the callback's own training-thread time per recording; ``off-thread ms/rec``: its time
  off the training thread per recording, from any ``rnnviz/overhead/*_ms`` scalar other than the
  training-thread ones (``n/a`` when it logs none); medians over the recordings after the first. On CUDA
  with the worker a line below the table adds ``device ms/rec``: each recording's span on the worker's
  stream, from the CUDA events the worker read (``rnnviz/overhead/device_ms``), never by waiting on the
  training thread.
- ``thread ms/run``: the callback's training-thread total for the whole run: recordings, epoch ends, the
  writes of their own cost scalars and the flushes after them (``fit_overhead_ms["flushes"]``), fit start
  and fit end.
- ``loop ms/rec``: per recording step r, the loop time above the run's median step over steps r..r+5, with the
  callback minus without on the same steps; median over the recordings (the first left out: one-off set-up;
  so is a recording whose steps reach the run's last one, whose loop time runs into the fit end, which
  ``fit ms`` and ``thread ms/run`` report), then over the pairs. What a recording costs the loop, whoever
  spends it.
- ``other steps``: median loop time of every step outside those windows, with / without, as a ratio and in ms:
  a uniform slowdown, which ``loop ms/rec`` subtracts with the median, shows here.
- ``+0`` ... ``+5`` (a third table): where ``loop ms/rec`` lands, step by step: the recorded step's loop time
  above its run's median, with minus without, then the same for each of the five steps after it; medians over
  the recordings ``loop ms/rec`` counts, of all pairs together. The capture and hand-off show at ``+0``; the
  recording's work beside training, while it lasts, in the steps after.
- ``off-CPU ms`` and ``waits`` (a fourth table, the same steps taken the same way): of a step's loop time,
  what the training thread spent off its CPU (loop time less its CPU time: waiting for the GIL, a lock, the
  device, or a core), and its voluntary context switches, each a wait that blocked (Linux's
  ``RUSAGE_THREAD``; 0 elsewhere). They tell a training thread kept waiting by the recording's work (the
  GIL the worker holds, on the CPU) from one whose own work takes longer while the recording's runs.
  On CUDA a step's time includes the timer's device sync, which may wait or spin: compare with/without.
- ``faults M``: minor page faults of the training process (millions), with / without. Both sides run with
  glibc's mmap threshold fixed at 32 MB (``--malloc default`` leaves glibc's dynamic threshold alone): with
  the dynamic one, the callback's first recording raises the threshold past the size of a step's
  activations, which then stop being mapped and faulted in afresh every step, and the rest of the run
  gets faster for a reason that is no cost or saving of ours (see ``FIXED_MALLOC``).
- ``DIY`` (cpu-lstm only): throughput of the do-it-yourself alternative (``nn.LSTMCell`` unrolled in Python
  with ``retain_grad()`` on every step, every step) relative to the fused model.
"""

from __future__ import annotations

import argparse
import inspect
import itertools
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

WORKLOADS = {
    # name: dict(model, input, hidden, time, batch, steps, log_every)
    "cpu-lstm": dict(model="lstm2", features=32, hidden=128, time=100, batch=32, steps=200, log_every=50),
    "fast-step": dict(model="gru_mha", features=32, hidden=64, time=64, batch=32, steps=400, log_every=50),
    "long-seq": dict(model="lstm1", features=32, hidden=256, time=1000, batch=16, steps=30, log_every=10),
}


def _build(cfg: dict):
    import pytorch_lightning as pl
    import torch
    from torch import nn

    class Model(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            kind, h = cfg["model"], cfg["hidden"]
            if kind == "gru_mha":
                self.rnn = nn.GRU(cfg["features"], h, batch_first=True)
                self.attn = nn.MultiheadAttention(h, 4, batch_first=True)
            else:
                self.rnn = nn.LSTM(cfg["features"], h, num_layers=2 if kind == "lstm2" else 1, batch_first=True)
                self.attn = None
            self.head = nn.Linear(h, 1)

        def forward(self, x):
            out, _ = self.rnn(x)
            if self.attn is not None:
                out, _ = self.attn(out, out, out, need_weights=False)
            return self.head(out[:, -1]).squeeze(-1)

        def training_step(self, batch, batch_idx):
            x, y = batch
            loss = nn.functional.mse_loss(self(x), y)
            self.log("train_loss", loss)
            return loss

        def configure_optimizers(self):
            return torch.optim.Adam(self.parameters(), lr=1e-3)

    gen = torch.Generator().manual_seed(0)
    n = cfg["batch"] * 8
    x = torch.randn(n, cfg["time"], cfg["features"], generator=gen)
    y = x[:, :, 0].mean(1)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=cfg["batch"])
    return Model, loader


VARIANTS = {
    # name: RNNViz keyword arguments
    "fast": {},  # the default: the recording worker where a core is free of the training, else inline
    "fast-inline": {"background": False},  # the whole recording on the training thread
    "fast-bg": {"background": True},  # the same pictures drawn by the child process
    "fast-thread": {"background": "thread"},  # the recording worker, wherever it runs
    "mpl-bg": {"renderer": "matplotlib"},  # matplotlib figures, drawn by the child process
    "fast-k8": {"max_samples": 8},  # the default, replaying 8 sequences instead of 16
    "fast-late": {"log_first_step": False},  # the default without the recording of the very first step
    "fast-lean": {"max_samples": 8, "log_first_step": False},  # both changes to the defaults at once
    "fast-nohist": {"histograms": False},  # the default without the activation histograms
    "fast-least": {"max_samples": 8, "log_first_step": False, "histograms": False},  # all three
}


# the callback's ``rnnviz/overhead/*`` scalars of a recording (with the worker, replay_ms and render_ms are its)
THREAD_TAGS = ("train_thread_ms", "replay_ms", "render_ms", "write_ms", "epoch_end_ms")
AFTER = 5  # steps after a recording step that `loop ms/rec` charges to it


def run_once(workload: str, with_callback: bool, out_dir: str, device: str = "cpu", variant: str = "fast",
             threads: int | None = None) -> dict:
    """One training run in this process; returns wall time, peak RSS, every step's loop time and the
    callback's overhead scalars."""
    import warnings

    warnings.filterwarnings("ignore")
    import pytorch_lightning as pl
    import torch
    from pytorch_lightning.loggers import TensorBoardLogger

    from lightning_rnnviz import RNNViz

    if threads is not None:
        torch.set_num_threads(threads)
    cfg = WORKLOADS[workload]
    torch.manual_seed(0)
    model_cls, loader = _build(cfg)
    model = model_cls()
    log_every = cfg["log_every"]
    first = {0} if VARIANTS[variant].get("log_first_step", True) else set()
    recorded = first | {s for s in range(cfg["steps"]) if (s + 1) % log_every == 0}
    timer = _StepTimer(device)
    # the timer first, RNNViz last; scalars="all" writes the `rnnviz/overhead/*` scalars read below (a tree
    # from before that option, compared with --against, writes them anyway)
    every = {"scalars": "all"} if "scalars" in inspect.signature(RNNViz).parameters else {}
    callbacks = [timer] + ([RNNViz(**{**every, **VARIANTS[variant]})] if with_callback else [])
    # RUSAGE_CHILDREN would count any child; the drawing process reports its own peak.
    logger = TensorBoardLogger(out_dir, name=workload)
    trainer = pl.Trainer(
        accelerator="gpu" if device == "cuda" else "cpu", devices=1,
        max_steps=cfg["steps"], log_every_n_steps=cfg["log_every"], logger=logger, callbacks=callbacks,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    assert trainer.callbacks.index(timer) == min(trainer.callbacks.index(c) for c in callbacks), trainer.callbacks
    started = time.perf_counter()
    trainer.fit(model, loader)
    wall = time.perf_counter() - started
    loop_ms = timer.loop_ms()
    after = [ms for step, ms in enumerate(loop_ms) if step - 1 in recorded]  # the step right after one
    on_recorded = [ms for step, ms in enumerate(loop_ms) if step in recorded and step > 0]  # 0: warm-up
    result = {
        "wall_s": wall,
        "rss_mb": _peak_rss_kb() / 1024,
        "child_rss_mb": (callbacks[-1].drawer_peak_rss_mb or 0.0) if with_callback else 0.0,
        "after_ms": statistics.median(after[1:]) if len(after) > 1 else float("nan"),  # the first is a warm-up
        "recorded_ms": statistics.median(on_recorded) if on_recorded else float("nan"),
        "loop_ms": loop_ms,
        "cpu_ms": timer.cpu_ms(),
        "waits": timer.waits(),
        "recorded_steps": sorted(recorded),  # what the callback's cadence should record; with it: what it did
        "threads": torch.get_num_threads(),
        "fit_start_ms": callbacks[-1].fit_overhead_ms.get("start", 0.0) if with_callback else 0.0,
        "fit_end_ms": callbacks[-1].fit_overhead_ms.get("end", 0.0) if with_callback else 0.0,
        # the overhead scalars' own writes and the flushes after recordings (a tree from before 2026-12-08
        # does not count them)
        "flushes_ms": callbacks[-1].fit_overhead_ms.get("flushes", 0.0) if with_callback else 0.0,
        "minor_faults": resource.getrusage(resource.RUSAGE_SELF).ru_minflt,
    }
    if with_callback:
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

        from lightning_rnnviz.sinks import run_dir

        acc = EventAccumulator(run_dir(logger.log_dir), size_guidance={"scalars": 0})
        acc.Reload()
        tags = [t for t in acc.Tags()["scalars"] if t.startswith("rnnviz/overhead/")]
        for key in THREAD_TAGS + ("dropped_figures",):
            tag = f"rnnviz/overhead/{key}"
            result[key] = [e.value for e in acc.Scalars(tag)] if tag in tags else []
        if "rnnviz/overhead/train_thread_ms" in tags:
            result["recorded_steps"] = sorted({e.step for e in acc.Scalars("rnnviz/overhead/train_thread_ms")})
        # time off the training thread (the recording worker's), per recording step; with the worker its
        # replay_ms and render_ms are parts of it, not of train_thread_ms
        offthread: dict[int, float] = {}
        result["offthread_tags"] = [t for t in tags if t == "rnnviz/overhead/offthread_ms"]
        for tag in result["offthread_tags"]:
            for e in acc.Scalars(tag):
                offthread[e.step] = offthread.get(e.step, 0.0) + e.value
        result["offthread_ms"] = [offthread[s] for s in sorted(offthread)]
        # on CUDA with the worker: each recording's span on the worker's stream, from CUDA events it read
        span = "rnnviz/overhead/device_ms"
        result["device_ms"] = [e.value for e in acc.Scalars(span)] if span in tags else []
        # everything the callback spent on the training thread in this run, recordings and epoch ends (and
        # what their scalars cannot hold: their own writes, the flushes after them)
        result["thread_total_s"] = (sum(result["train_thread_ms"]) + sum(result["epoch_end_ms"])
                                    + result["flushes_ms"]) / 1e3
        # ... and its fit start and fit end too
        result["run_thread_ms"] = 1e3 * result["thread_total_s"] + result["fit_start_ms"] + result["fit_end_ms"]
    return result


def _measured(with_cb: dict, without: dict) -> tuple[list[int], int]:
    """The recordings whose steps ``loop ms/rec`` charges, and how many steps both runs timed. The first
    recording is left out (one-off set-up), and so is one whose window reaches the last step: that step's loop
    time runs into the fit end (the last recordings drained, every writer closed: `fit ms`)."""
    n = min(len(with_cb["loop_ms"]), len(without["loop_ms"]))
    return [r for r in with_cb["recorded_steps"][1:] if r + AFTER < n - 1], n


def outside_figures(with_cb: dict, without: dict) -> tuple[float, float, float]:
    """``loop ms/rec`` and ``other steps`` (with, without) of one pair, from the runs' loop times."""
    recs = with_cb["recorded_steps"]
    _, n = _measured(with_cb, without)
    per_rec = [sum(window) for window in zip(*by_step(with_cb, without))]  # each recording's window, summed
    near = {s for r in recs for s in range(r, r + AFTER + 1)}
    other = [s for s in range(n) if s not in near]
    nan = float("nan")
    return (statistics.median(per_rec) if per_rec else nan,
            statistics.median(with_cb["loop_ms"][s] for s in other) if other else nan,
            statistics.median(without["loop_ms"][s] for s in other) if other else nan)


def by_step(with_cb: dict, without: dict, key: str = "loop_ms") -> list[list[float]]:
    """Where ``loop ms/rec`` lands: for each step of the window (the recorded step, then each of the
    :data:`AFTER` after it), that step's loop time above its run's median, with minus without, one value per
    recording ``loop ms/rec`` counts (:func:`outside_figures` sums each recording's window). ``key``: another
    per-step series of the runs, taken the same way (``off_cpu_ms``, ``waits``: see :func:`off_cpu`)."""
    measured, _ = _measured(with_cb, without)
    base_with, base_without = statistics.median(with_cb[key]), statistics.median(without[key])
    return [[(with_cb[key][r + k] - base_with) - (without[key][r + k] - base_without)
             for r in measured] for k in range(AFTER + 1)]


def off_cpu(run: dict) -> dict:
    """``run`` with one more per-step series: ``off_cpu_ms``, the step's loop time less the training thread's
    CPU time in it (``cpu_ms``, from the timer's stamps): what it spent waiting, for the GIL, a lock, the
    device, or a core the scheduler gave to someone else. (The run's ``waits`` counts the thread's voluntary
    context switches in each step, each a wait that blocked: the GIL taken by another thread is one.)"""
    return {**run, "off_cpu_ms": [loop - cpu for loop, cpu in zip(run["loop_ms"], run["cpu_ms"])]}


class _StepTimer:
    """Stamps every batch start, and the end of training; placed before every other callback, so that a
    step's loop time (batch start to the next batch start) holds all of their hooks."""

    def __new__(cls, device: str):
        import pytorch_lightning as pl

        class Timer(pl.Callback):
            def __init__(self) -> None:
                self.starts: list[float] = []
                self.ended = float("nan")
                # the training thread's CPU time and voluntary context switches at the same stamps
                self.thread: list[tuple[float, int]] = []

            def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
                _sync(device)
                self.starts.append(time.perf_counter())
                self.thread.append(_thread_usage())

            def on_train_end(self, trainer, pl_module):  # after the last step's batch end and epoch end
                _sync(device)
                self.ended = time.perf_counter()
                self.thread.append(_thread_usage())

            def loop_ms(self) -> list[float]:
                stamps = self.starts + [self.ended]
                return [1e3 * (b - a) for a, b in itertools.pairwise(stamps)]

            def cpu_ms(self) -> list[float]:
                return [1e3 * (b[0] - a[0]) for a, b in itertools.pairwise(self.thread)]

            def waits(self) -> list[int]:
                return [b[1] - a[1] for a, b in itertools.pairwise(self.thread)]

        return Timer()


def _window_cells(per_step: list[list[float]]) -> str:
    """One row's cells for the steps of a window (:func:`by_step`'s values over the pairs): each step's
    median, ``n/a`` where no recording was counted."""
    return " ".join(f"{statistics.median(values):>6.1f}" if values else f"{'n/a':>6}" for values in per_step)


def _thread_usage() -> tuple[float, int]:
    """The calling thread's CPU seconds and voluntary context switches (0 where the system counts none per
    thread: ``RUSAGE_THREAD`` is Linux's)."""
    who = getattr(resource, "RUSAGE_THREAD", None)
    return time.thread_time(), (resource.getrusage(who).ru_nvcsw if who is not None else 0)


def _peak_rss_kb() -> int:
    """Peak RSS of this process (``VmHWM``: ``ru_maxrss`` would count the parent's at fork time)."""
    try:
        from lightning_rnnviz.pipeline.drawing import _peak_rss_kb as peak
    except ImportError:  # a tree from before the pipeline package (--against)
        from lightning_rnnviz.sinks.background import _peak_rss_kb as peak

    return peak() or 0


# glibc's malloc serves a block above its mmap threshold (128 kB at start) with a fresh mmap, and raises
# the threshold to the size of each such block freed (up to 32 MB). A training step's activations are such
# blocks; without the callback they keep coming back as new mappings, and each first touch of a page
# faults (2.1-2.6 million minor faults in a cpu-lstm run here). The callback's first recording frees a
# larger block, which raises the threshold past them: from then on they come from the heap, and the
# user's steps ran about 30 % faster (0.13 million faults). That is glibc's doing, not a cost or a saving
# of ours, so by default both sides of a pair start from the raised threshold; `--malloc default` shows it.
FIXED_MALLOC = {"MALLOC_MMAP_THRESHOLD_": str(32 << 20), "MALLOC_TRIM_THRESHOLD_": str(64 << 20)}


def with_package(env: dict[str, str], package_root: str | None) -> dict[str, str]:
    """``env`` with ``package_root`` (another checkout or worktree) first on ``PYTHONPATH``, so that a child
    process imports that tree's ``lightning_rnnviz`` instead of the installed one."""
    if package_root is None:
        return env
    return {**env, "PYTHONPATH": os.pathsep.join(p for p in (package_root, env.get("PYTHONPATH")) if p)}


def _subprocess_run(workload: str, with_callback: bool, out_dir: str, device: str, variant: str,
                    malloc: str = "fixed", package_root: str | None = None, threads: int | None = None) -> dict:
    """One run in a fresh process; ``package_root``: import ``lightning_rnnviz`` from that source tree
    (another checkout or worktree) instead of the installed one."""
    cmd = [sys.executable, __file__, "--child", workload, "--out", out_dir, "--device", device, "--variant", variant,
           "--steps", str(WORKLOADS[workload]["steps"])]
    if with_callback:
        cmd.append("--with-callback")
    if threads is not None:
        cmd += ["--threads", str(threads)]
    env = with_package({**os.environ, **FIXED_MALLOC} if malloc == "fixed" else dict(os.environ), package_root)
    if package_root is not None:
        cmd.append("--expect-package-root=" + package_root)
    done = subprocess.run(cmd, capture_output=True, text=True, check=True, env=env)
    return json.loads(done.stdout.strip().splitlines()[-1])


def compare_trees(workloads: list[str], other: str, runs: int, device: str, malloc: str,
                  threads: int | None = None) -> None:
    """The callback's own cost with this tree's ``lightning_rnnviz`` and with ``other``'s, runs with the
    callback interleaved (one of each per round, the order alternating), so that two versions are
    measured side by side on the same machine at the same time."""
    here = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    sides = {"other": os.path.abspath(other), "this": here}
    print(f"this tree: {here}\nother tree: {sides['other']}\n")
    print(f"{'workload':<10} {'tree':<6} {'callback ms/run':>16} {'ms/rec':>7} {'first':>6} {'replay':>7} {'render':>7} "
          f"{'write':>6} {'epoch end':>10} {'wall s':>7}")
    for workload in workloads:
        results: dict[str, list[dict]] = {"other": [], "this": []}
        with tempfile.TemporaryDirectory() as out:
            for round_ in range(runs):
                for side in (("other", "this") if round_ % 2 == 0 else ("this", "other")):
                    results[side].append(_subprocess_run(workload, True, out, device, "fast", malloc, sides[side],
                                                         threads))
        for side in ("other", "this"):
            rs = results[side]

            def middle(key: str, rs: list[dict] = rs) -> float:
                return statistics.median(statistics.median(r[key][1:] or r[key]) for r in rs)

            totals = [1e3 * r["thread_total_s"] for r in rs]
            print(f"{workload:<10} {side:<6} {min(totals):>7.0f}-{max(totals):<8.0f} {middle('train_thread_ms'):>7.1f} "
                  f"{statistics.median(r['train_thread_ms'][0] for r in rs):>6.1f} {middle('replay_ms'):>7.1f} "
                  f"{middle('render_ms'):>7.1f} {middle('write_ms'):>6.1f} "
                  f"{statistics.median(statistics.median(r['epoch_end_ms'] or [0.0]) for r in rs):>10.1f} "
                  f"{statistics.median(r['wall_s'] for r in rs):>7.2f}")
    print("(callback ms/run: the callback's own time on the training thread over each run, recordings and epoch "
          "ends, lowest-highest; ms/rec, replay, render, write: medians per recording step after the first; "
          "first: the first recording step; epoch end: median of the epoch ends that drew)")


def _sync(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def draw_costs(workload: str, renderer: str) -> dict:
    """Milliseconds to draw each figure kind once from a real recording of the workload's model."""
    import torch

    from lightning_rnnviz import Probe, render
    from lightning_rnnviz.render.jobs import Job, draw

    cfg = WORKLOADS[workload]
    torch.manual_seed(0)
    model_cls, loader = _build(cfg)
    model = model_cls()
    x, y = next(iter(loader))
    with Probe(model).record(max_samples=16) as rec:
        torch.nn.functional.mse_loss(model(x), y).backward()
    costs = {}
    r = rec["rnn"]
    jobs = {
        "hidden": render.reduce_hidden(r), "gates": render.reduce_gates(r), "grad_norm": render.reduce_grad_norm(r),
    }
    if "attn" in rec:
        jobs["attention"] = render.reduce_attention(rec["attn"])
    for kind, payload in jobs.items():
        if payload is None:
            continue
        draw(Job(kind, payload, f"rnnviz/{kind}/x", 0, renderer))  # fonts and colour tables load once
        started = time.perf_counter()
        draw(Job(kind, payload, f"rnnviz/{kind}/x", 0, renderer))
        costs[kind] = 1e3 * (time.perf_counter() - started)
    return costs


def replay_ratio(workload: str, device: str = "cpu", repeats: int = 5) -> float:
    """Replay of the default 16 recorded samples over the module's fused forward+backward (full batch)."""
    import torch

    from lightning_rnnviz import Probe

    cfg = WORKLOADS[workload]
    torch.manual_seed(0)
    model_cls, loader = _build(cfg)
    rnn = model_cls().rnn.to(device)
    x = next(iter(loader))[0].to(device)
    probe = Probe(rnn)
    fused, recorded = [], []
    for _ in range(repeats + 1):
        _sync(device)
        t0 = time.perf_counter()
        rnn(x)[0].pow(2).mean().backward()
        _sync(device)
        t1 = time.perf_counter()
        with probe.record(max_samples=16):
            rnn(x)[0].pow(2).mean().backward()
        _sync(device)
        t2 = time.perf_counter()
        fused.append(t1 - t0)
        recorded.append(t2 - t1)
    f, r = statistics.median(fused[1:]), statistics.median(recorded[1:])
    return (r - f) / f


def diy_ratio(device: str = "cpu", steps: int = 20) -> float:
    """Training throughput of the DIY method over the fused LSTM, cpu-lstm sizes (no callback on either)."""
    import torch
    from torch import nn

    cfg = WORKLOADS["cpu-lstm"]
    torch.manual_seed(0)
    x = torch.randn(cfg["batch"], cfg["time"], cfg["features"], device=device)
    y = torch.randn(cfg["batch"], device=device)
    cells = nn.ModuleList([nn.LSTMCell(cfg["features"], cfg["hidden"]), nn.LSTMCell(cfg["hidden"], cfg["hidden"])])
    head = nn.Linear(cfg["hidden"], 1)
    fused = nn.LSTM(cfg["features"], cfg["hidden"], 2, batch_first=True)
    cells, head, fused = cells.to(device), head.to(device), fused.to(device)

    def diy_step() -> None:
        inp = x.transpose(0, 1)
        states = []
        for cell in cells:
            h = c = torch.zeros(cfg["batch"], cfg["hidden"], device=device)
            outs = []
            for t in range(cfg["time"]):
                h, c = cell(inp[t], (h, c))
                h.retain_grad()
                states.append(h)
                outs.append(h)
            inp = torch.stack(outs)
        nn.functional.mse_loss(head(inp[-1]).squeeze(-1), y).backward()
        torch.stack([s.grad.norm(dim=-1).mean() for s in states]).cpu()  # what the user would then plot

    def fused_step() -> None:
        out, _ = fused(x)
        nn.functional.mse_loss(head(out[:, -1]).squeeze(-1), y).backward()

    def rate(fn) -> float:
        fn()
        _sync(device)
        started = time.perf_counter()
        for _ in range(steps):
            fn()
        _sync(device)
        return steps / (time.perf_counter() - started)

    return rate(diy_step) / rate(fused_step)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workload", choices=sorted(WORKLOADS), action="append")
    parser.add_argument("--variant", choices=sorted(VARIANTS), action="append",
                        help="RNNViz configuration(s) to compare (default: fast, the default RNNViz())")
    parser.add_argument("--pairs", type=int, default=3,
                        help="interleaved pairs of runs, without and with the callback, per workload (default: 3)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--malloc", choices=("fixed", "default"), default="fixed",
                        help="fixed: both sides with glibc's mmap threshold at 32 MB (what the callback's first "
                             "recording leaves it at); default: glibc's own dynamic threshold")
    parser.add_argument("--against", metavar="TREE",
                        help="compare the callback's own cost with this tree's lightning_rnnviz and with TREE's "
                             "(another checkout or `git worktree` of the project), runs interleaved")
    parser.add_argument("--runs", type=int, default=3, help="with --against: runs of each tree per workload")
    parser.add_argument("--steps", type=int, help="training steps of each run, in place of the workload's own "
                                                   "(fewer recordings; for a quick look or a rehearsal)")
    parser.add_argument("--threads", type=int, metavar="N",
                        help="torch.set_num_threads(N) in every training run, both sides alike, and in the "
                             "measurements made here (default: torch's own)")
    parser.add_argument("--expect-package-root", help=argparse.SUPPRESS)
    parser.add_argument("--child", choices=sorted(WORKLOADS), help=argparse.SUPPRESS)
    parser.add_argument("--with-callback", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    variants = args.variant or ["fast"]
    if args.threads is not None and args.threads < 1:
        parser.error("--threads must be at least 1")
    if args.steps is not None:
        if args.steps < 1:
            parser.error("--steps must be at least 1")
        for name in WORKLOADS:
            WORKLOADS[name] = dict(WORKLOADS[name], steps=args.steps)
    if args.child:
        if args.expect_package_root:
            import lightning_rnnviz

            where = os.path.abspath(lightning_rnnviz.__file__)
            if not where.startswith(os.path.join(os.path.abspath(args.expect_package_root), "")):
                raise SystemExit(f"lightning_rnnviz came from {where}, not from {args.expect_package_root}")
        print(json.dumps(run_once(args.child, args.with_callback, args.out, args.device, variants[0], args.threads)))
        return
    if args.against:
        compare_trees(args.workload or list(WORKLOADS), args.against, args.runs, args.device, args.malloc,
                      args.threads)
        return

    import torch

    default_threads = torch.get_num_threads()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    where = torch.cuda.get_device_name() if args.device == "cuda" else "CPU"
    print(f"torch {torch.__version__}, {os.cpu_count()} CPUs, {torch.get_num_threads()} threads, device: {where}, "
          f"malloc: {args.malloc}" + (f" ({' '.join(f'{k}={v}' for k, v in FIXED_MALLOC.items())})"
                                      if args.malloc == "fixed" else ""))
    header = (f"{'workload':<10} {'variant':<8} {'overhead':>9} {'thread':>7} {'thread ms/rec':>14} {'replay':>7} {'render':>7} "
              f"{'write':>6} {'other':>6} {'draw ms/fig':>12} {'replay/fused':>13} {'peak RSS':>9} "
              f"{'drawer MB':>10} {'dropped':>8} {'fit ms':>9} {'next step ms':>13} "
              f"{'faults M':>13} {'inside ms':>10}")
    loop_header = (f"{'workload':<10} {'variant':<8} {'threads':>7} {'recs':>5} {'dropped':>8} {'thread ms/rec':>14} "
                   f"{'off-thread ms/rec':>18} {'thread ms/run':>14} {'loop ms/rec':>12} {'other steps':>21}")
    window = " ".join(f"{f'+{k}':>6}" for k in range(AFTER + 1))
    step_header = f"{'workload':<10} {'variant':<8} {window}"
    wait_header = f"{'workload':<10} {'variant':<8} {'':<11} {window}"
    rows, loop_rows, step_rows, wait_rows = [], [], [], []
    threads = (f"{args.threads} (--threads)" if args.threads is not None
               else f"torch's default ({default_threads} here)")
    for workload in args.workload or list(WORKLOADS):
        cfg = WORKLOADS[workload]
        print(f"\n{workload}: {cfg['steps']} steps, batch {cfg['batch']}, recording every {cfg['log_every']}; "
              f"intra-op threads per training run: {threads}", flush=True)
        fused = replay_ratio(workload, args.device)
        for variant in variants:
            ratios, accounted, rss, child, dropped = [], [], [], [], 0.0
            fit_ms, next_with, next_without, plain_with, plain_without = [], [], [], [], []
            loop_per_rec, run_thread_ms, thread_per_rec, offthread, recs = [], [], [], [], []
            device: list[float] = []  # the recordings' spans on the worker's CUDA stream
            per_step: list[list[float]] = [[] for _ in range(AFTER + 1)]  # `by_step`, over the pairs
            # the same, of the training thread's time off its CPU and of its voluntary context switches
            waiting: dict[str, list[list[float]]] = {key: [[] for _ in range(AFTER + 1)]
                                                     for key in ("off_cpu_ms", "waits")}
            used_threads: set[int] = set()
            offthread_tags: set[str] = set()
            faults: dict[bool, list[int]] = {True: [], False: []}
            inside: list[float] = []  # recording step's time beyond the callback's own, over the same step without
            parts: dict[str, list[float]] = {k: [] for k in ("train_thread_ms", "replay_ms", "render_ms", "write_ms")}
            with tempfile.TemporaryDirectory() as out:
                for pair in range(args.pairs):
                    order = (False, True) if pair % 2 == 0 else (True, False)
                    results = {flag: _subprocess_run(workload, flag, out, args.device, variant, args.malloc,
                                                     threads=args.threads)
                               for flag in order}
                    ratios.append(results[True]["wall_s"] / results[False]["wall_s"])
                    accounted.append(1 + results[True]["thread_total_s"] / results[False]["wall_s"])
                    rss.append(results[True]["rss_mb"] / results[False]["rss_mb"])
                    for key, values in parts.items():
                        values += results[True][key]
                    child.append(results[True]["child_rss_mb"])
                    fit_ms.append(results[True]["fit_start_ms"] + results[True]["fit_end_ms"])
                    next_with.append(results[True]["after_ms"])
                    next_without.append(results[False]["after_ms"])
                    per_rec, other_with, other_without = outside_figures(results[True], results[False])
                    loop_per_rec.append(per_rec)
                    for values, more in zip(per_step, by_step(results[True], results[False])):
                        values += more
                    timed = {flag: off_cpu(results[flag]) for flag in (True, False)}
                    for key, series in waiting.items():
                        for values, more in zip(series, by_step(timed[True], timed[False], key)):
                            values += more
                    plain_with.append(other_with)
                    plain_without.append(other_without)
                    run_thread_ms.append(results[True]["run_thread_ms"])
                    thread_per_rec += results[True]["train_thread_ms"][1:]  # as loop ms/rec: the first left out
                    offthread += results[True]["offthread_ms"][1:]
                    device += results[True].get("device_ms", [])[1:]
                    offthread_tags.update(results[True]["offthread_tags"])
                    recs.append(len(results[True]["train_thread_ms"]))
                    used_threads.update(results[flag]["threads"] for flag in order)
                    for flag in (True, False):
                        faults[flag].append(results[flag]["minor_faults"])
                    own = statistics.median(results[True]["train_thread_ms"][1:] or [float("nan")])
                    inside.append(results[True]["recorded_ms"] - own - results[False]["recorded_ms"])
                    dropped = max(dropped, max(results[True]["dropped_figures"], default=0.0))
                    print(f"  {workload} {variant} pair {pair}: without {results[False]['wall_s']:.2f} s, "
                          f"with {results[True]['wall_s']:.2f} s, loop ms/rec {per_rec:.1f}", flush=True)
            median = {key: statistics.median(values) for key, values in parts.items()}
            other = median["train_thread_ms"] - median["write_ms"]
            if not offthread:  # replay and pictures on the training thread: parts of its time
                other -= median["replay_ms"] + median["render_ms"]
            draws = draw_costs(workload, "matplotlib" if variant.startswith("mpl") else "fast")
            row = (f"{workload:<10} {variant:<8} {statistics.median(ratios):>8.3f}x "
                   f"{statistics.median(accounted):>6.3f}x {median['train_thread_ms']:>14.0f} "
                   f"{median['replay_ms']:>7.0f} {median['render_ms']:>7.0f} {median['write_ms']:>6.0f} "
                   f"{other:>6.0f} {statistics.mean(draws.values()):>12.0f} {fused:>12.2f}x "
                   f"{statistics.median(rss):>8.3f}x {max(child):>10.0f} {dropped:>8.0f} "
                   f"{statistics.median(fit_ms):>9.0f} "
                   f"{statistics.median(next_with):>6.1f}/{statistics.median(next_without):<6.1f} "
                   f"{statistics.median(faults[True]) / 1e6:>6.2f}/{statistics.median(faults[False]) / 1e6:<6.2f} "
                   f"{statistics.median(inside):>10.1f}")
            plain = (statistics.median(plain_with), statistics.median(plain_without))
            loop_row = (f"{workload:<10} {variant:<8} {'/'.join(map(str, sorted(used_threads))):>7} "
                        f"{'-'.join(map(str, sorted({min(recs), max(recs)}))):>5} {dropped:>8.0f} "
                        f"{statistics.median(thread_per_rec or [float('nan')]):>14.1f} "
                        f"{f'{statistics.median(offthread):.1f}' if offthread else 'n/a':>18} "
                        f"{statistics.median(run_thread_ms):>14.0f} {statistics.median(loop_per_rec):>12.1f} "
                        f"{plain[0] / plain[1]:>6.3f}x {plain[0]:>6.2f}/{plain[1]:.2f}")
            step_row = f"{workload:<10} {variant:<8} {_window_cells(per_step)}"
            wait_row = "\n".join(f"{workload:<10} {variant:<8} {label:<11} {_window_cells(waiting[key])}"
                                  for key, label in (("off_cpu_ms", "off-CPU ms"), ("waits", "waits")))
            rows.append(row)
            loop_rows.append(loop_row)
            step_rows.append(step_row)
            wait_rows.append(wait_row)
            print(header, row, "", loop_header, loop_row, "", step_header, step_row, "", wait_header,
                  wait_row, sep="\n", flush=True)
            if offthread_tags:
                print(f"(off-thread ms/rec from {', '.join(sorted(offthread_tags))})")
            if device:
                print(f"(device ms/rec: {statistics.median(device):.1f}, median over {len(device)} "
                      "recordings of each recording's span on the worker's CUDA stream, from CUDA events the "
                      "worker read: rnnviz/overhead/device_ms)")
    print("\n" + header)
    print("\n".join(rows))
    print("(overhead: median wall-time ratio of the pairs; thread: 1 + the callback's own time on the training "
          "thread over the run without it, recordings and epoch ends, which the machine's noise does not move)")
    print("(ms per recording step, medians: replay = exact dL/dh_t; render = pictures drawn; write = PNG encoding "
          "and event file; other = capture hooks, reductions, statistics, histograms, hand-over. With the recording "
          "worker (placement 'thread'), replay and render are the worker's and other is the training thread's "
          "capture and hand-off)")
    print("(fit ms = the callback's fit start + fit end; next step ms = median loop time of the training steps right "
          "after a recording, with / without the callback; faults M = millions of minor page faults of the training "
          "process, with / without; inside ms = a recording step's loop time beyond the callback's own, minus the "
          "same step without it: capture in the user's forward and backward, and the record's other costs inside "
          "the step)")
    print("\n" + loop_header)
    print("\n".join(loop_rows))
    print("(from outside the callback: a timer placed first stamps every batch start; a step's loop time runs to the "
          "next batch start. recs = recordings written per run; thread ms/rec = the callback's own training-thread "
          "time per recording and off-thread ms/rec its time off that thread (n/a: it logs none), medians over the "
          "recordings after the first; thread ms/run = its training-thread total, recordings, epoch ends, fit start "
          f"and end; loop ms/rec = per recording, the loop time above the run's median over the recorded step and the "
          f"{AFTER} after it, with minus without on the same steps, median over recordings after the first (and "
          "before the fit end's steps), then over the pairs; other steps = median loop time of all other steps, with / without, ratio and ms)")
    print("\n" + step_header)
    print("\n".join(step_rows))
    print("(where loop ms/rec lands: +0 = the recorded step, +k = the k-th step after it; each that step's "
          "loop time above its run's median, with minus without, median over the recordings loop ms/rec "
          "counts, of all pairs together; the medians need not add up to loop ms/rec)")
    print("\n" + wait_header)
    print("\n".join(wait_rows))
    print("(the training thread on the same steps, taken the same way: off-CPU ms = a step's loop time less "
          "the thread's CPU time in it: waiting for the GIL, a lock or the device, or for a core the "
          "scheduler gave to another; waits = its voluntary context switches, each a wait that blocked "
          "(Linux counts them per thread; 0 elsewhere). The rest of a step's extra loop time is the thread's "
          "own CPU time: its share of the recording's work, or the same work run slower beside another)")
    if not args.workload or "cpu-lstm" in args.workload:
        print(f"\nDIY (LSTMCell unrolled, retain_grad every step) throughput / fused LSTM: "
              f"{diy_ratio(args.device):.2f}x")


if __name__ == "__main__":
    main()
