"""What a checkpoint at each epoch end waits for the recording worker.

Run: ``python tests/benchmarks/bench_checkpoint.py`` (``--workload``, ``--steps``, ``--threads``; add
``--device cuda`` on a GPU). Fits one ``bench_overhead.py`` workload with Lightning's default
``ModelCheckpoint`` (which saves at every training epoch's end and asks each callback for its
``state_dict``) and ``RNNViz()`` with the recording worker (one intra-op thread by default, so a core is
free for it), and prints the training thread's time inside ``RNNViz.state_dict`` per call: the wait for
the worker to settle what a checkpoint saves (the epoch's recordings and its curves, findings and summary).
Epochs with a recording show the wait; the others cost about 0.1 ms.
"""

from __future__ import annotations

import argparse
import tempfile
import time
import warnings

from bench_overhead import WORKLOADS, _build


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workload", choices=sorted(WORKLOADS), default="cpu-lstm")
    parser.add_argument("--steps", type=int, default=120)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore")
    import pytorch_lightning as pl
    import torch
    from pytorch_lightning.loggers import TensorBoardLogger

    from lightning_rnnviz import RNNViz

    torch.set_num_threads(args.threads)
    waits: list[float] = []
    saving = RNNViz.state_dict

    def timed(self: RNNViz) -> dict:
        started = time.perf_counter()
        try:
            return saving(self)
        finally:
            waits.append(1e3 * (time.perf_counter() - started))

    RNNViz.state_dict = timed  # type: ignore[method-assign]
    cfg = {**WORKLOADS[args.workload], "steps": args.steps}
    torch.manual_seed(0)
    model_cls, loader = _build(cfg)
    with tempfile.TemporaryDirectory() as out:
        monitor = RNNViz()
        trainer = pl.Trainer(
            accelerator="gpu" if args.device == "cuda" else "cpu", devices=1, max_steps=cfg["steps"],
            log_every_n_steps=cfg["log_every"], default_root_dir=out, logger=TensorBoardLogger(out),
            callbacks=[monitor], enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
        )
        started = time.perf_counter()
        trainer.fit(model_cls(), loader)
        wall = time.perf_counter() - started
    print(f"torch {torch.__version__}, {args.device}, {torch.get_num_threads()} intra-op thread(s); "
          f"{args.workload}, {cfg['steps']} steps, RNNViz placement: {monitor.placement}")
    print(f"state_dict calls: {len(waits)}; ms each: {', '.join(f'{w:.1f}' for w in waits)}")
    print(f"in all {sum(waits):.0f} ms of a {1e3 * wall:.0f} ms fit")


if __name__ == "__main__":
    main()
