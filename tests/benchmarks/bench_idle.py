"""What the callback costs the training steps it does not record, seen from outside it.

Run: ``python tests/benchmarks/bench_idle.py`` (fast-step, 3 rounds) or ``--workload cpu-lstm --rounds 5``;
``--device cuda`` trains on a GPU; ``--against TREE`` adds the callback of another checkout (e.g. ``git
worktree add /tmp/before <commit>``), run the same way in the same rounds.

On most steps the callback records nothing, but Lightning still calls it at every hook of the step (six
of them: the batch's start and end, before and after the backward, before the optimizer step and before
``zero_grad``), and reads its ``state_key`` each time to name the hook for its profiler. Two stamp
callbacks, placed right before and right after the callback under test, note the time at each of those
hooks; what lies between them is the callback's whole cost at that hook, Lightning's dispatch included.
The same is measured with nothing between the stamps and with a callback whose hooks do nothing (what
any callback costs), so the figures need no timer inside the callback.

Each condition is a fresh process training the ``bench_overhead.py`` workload with one intra-op thread;
the conditions run in turn in every round. Steps with a recording and the two after it (where the worker's
results are delivered and the loggers flushed) are left out. Printed: per condition the median over the
rounds of each run's median per step, in microseconds, each round's figure, and per hook; then what the
callback adds to a step beyond a callback that does nothing, and that as a share of a 1, 3 and 10 ms step
(a recurrent model's step on a GPU). The hooks run on the CPU whatever the device: a training thread
that waits on the GPU is free for them, one that feeds it is not.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

HOOKS = ("on_train_batch_start", "on_before_backward", "on_after_backward", "on_before_optimizer_step",
         "on_before_zero_grad", "on_train_batch_end")
SHORT = ("batch start", "before bwd", "after bwd", "before opt", "before zero", "batch end")
HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from bench_overhead import WORKLOADS, _build, with_package  # noqa: E402


def run_once(workload: str, condition: str, steps: int, device: str = "cpu") -> dict:
    """One training run in this process with ``condition`` between the stamps: ``"nothing"``, ``"noop"``
    or ``"rnnviz"``; the per-step and per-hook medians in seconds over the steps without a recording."""
    import warnings

    warnings.filterwarnings("ignore")
    import pytorch_lightning as pl
    import torch
    from pytorch_lightning.loggers import TensorBoardLogger

    torch.set_num_threads(1)
    torch.manual_seed(0)
    stamps: list[tuple[str, str, float]] = []

    class Stamp(pl.Callback):
        def __init__(self, side: str) -> None:
            self.side = side

        @property
        def state_key(self) -> str:
            return f"Stamp{self.side}"

    class Noop(pl.Callback):
        pass

    for hook in HOOKS:
        def stamp(self, *args, _hook=hook, **kwargs):
            stamps.append((_hook, self.side, time.perf_counter()))

        setattr(Stamp, hook, stamp)
        setattr(Noop, hook, lambda self, *args, **kwargs: None)
    middle: list[pl.Callback] = []
    package = None
    if condition == "noop":
        middle = [Noop()]
    elif condition == "rnnviz":
        import lightning_rnnviz

        package = os.path.dirname(os.path.abspath(lightning_rnnviz.__file__))
        middle = [lightning_rnnviz.RNNViz()]
    before, after = Stamp("a"), Stamp("b")
    cfg = dict(WORKLOADS[workload], steps=steps)
    model_cls, loader = _build(cfg)
    with tempfile.TemporaryDirectory() as out:
        trainer = pl.Trainer(
            accelerator="gpu" if device == "cuda" else "cpu", devices=1, max_steps=steps,
            log_every_n_steps=cfg["log_every"],
            logger=TensorBoardLogger(out), callbacks=[before, *middle, after],
            enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
            num_sanity_val_steps=0,
        )
        callbacks = trainer.callbacks
        assert callbacks[callbacks.index(before) + 1:callbacks.index(after)] == middle, callbacks
        trainer.fit(model_cls(), loader)
    per_hook: dict[str, list[float]] = {hook: [] for hook in HOOKS}
    per_step: list[float] = []
    opened: dict[str, float] = {}
    for hook, side, at in stamps:
        if side == "a":
            if hook == "on_train_batch_start":
                per_step.append(0.0)
            opened[hook] = at
        else:
            per_hook[hook].append((len(per_step) - 1, at - opened[hook]))
            per_step[-1] += at - opened[hook]
    recorded = {0} | {s for s in range(steps) if (s + 1) % cfg["log_every"] == 0}
    quiet = {s for s in range(len(per_step)) if not {s, s - 1, s - 2} & recorded}
    return {
        "step_s": statistics.median(per_step[s] for s in quiet),
        "hooks_s": {hook: statistics.median(v for s, v in values if s in quiet)
                    for hook, values in per_hook.items()},
        "steps": len(quiet),
        "package": package,
    }


def _in_process(workload: str, condition: str, steps: int, device: str, tree: str | None) -> dict:
    """``run_once`` in a fresh interpreter, with the package of ``tree`` first on its path when given."""
    env = with_package(dict(os.environ), None if tree is None else os.path.abspath(tree))
    out = subprocess.run(
        [sys.executable, os.path.abspath(__file__), "--one", condition, "--workload", workload, "--steps",
         str(steps), "--device", device], env=env, check=True, capture_output=True, text=True,
    ).stdout
    result = json.loads(out.strip().splitlines()[-1])
    if tree is not None and not result["package"].startswith(os.path.join(os.path.abspath(tree), "")):
        raise SystemExit(f"lightning_rnnviz came from {result['package']}, not from {tree}")
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workload", default="fast-step", choices=["fast-step", "cpu-lstm"])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--against", metavar="TREE", help="also RNNViz() of this checkout's package")
    parser.add_argument("--one", choices=["nothing", "noop", "rnnviz"], help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.one:
        print(json.dumps(run_once(args.workload, args.one, args.steps, args.device)))
        return
    conditions = {"nothing between": ("nothing", None), "a no-op callback": ("noop", None),
                  "RNNViz(), this tree": ("rnnviz", None)}
    if args.against:
        conditions[f"RNNViz(), {args.against}"] = ("rnnviz", args.against)
    results: dict[str, list[dict]] = {name: [] for name in conditions}
    for _ in range(args.rounds):
        for name, (condition, tree) in conditions.items():
            results[name].append(_in_process(args.workload, condition, args.steps, args.device, tree))
    steps = min(r["steps"] for rs in results.values() for r in rs)
    print(f"bench_idle: {args.workload} on {args.device}, {args.steps} steps ({steps} without a recording "
          f"near), {args.rounds} rounds, one intra-op thread: microseconds per step between the stamps")
    print(f"{'':24} {'us/step':>8}  {'rounds':<22}" + "".join(f"{s:>12}" for s in SHORT))
    medians = {}
    for name, rs in results.items():
        medians[name] = statistics.median(1e6 * r["step_s"] for r in rs)
        rounds = " ".join(f"{1e6 * r['step_s']:.1f}" for r in rs)
        hooks = "".join(f"{statistics.median(1e6 * r['hooks_s'][h] for r in rs):>12.1f}" for h in HOOKS)
        print(f"{name:<24} {medians[name]:>8.1f}  {rounds:<22}{hooks}")
    base = medians["a no-op callback"]
    for name in conditions:
        if name.startswith("RNNViz"):
            extra = medians[name] - base
            shares = ", ".join(f"{extra / (10 * ms):.2f} % of a {ms} ms step" for ms in (1, 3, 10))
            print(f"{name}: {extra:.1f} us a step beyond a callback that does nothing ({shares})")


if __name__ == "__main__":
    main()
