"""Cost of the exact-gradient replay relative to the module's own fused forward+backward.

Run: ``python tests/benchmarks/bench_replay.py``. Prints, per workload, the median wall time of the
fused forward+backward, of a recording (fused forward+backward with hooks, then the replay) and the
ratio replay / fused, measured interleaved in one process so machine noise hits both alike.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn

from lightning_rnnviz import Probe

WORKLOADS = {
    # name: (module factory, batch, time, input)
    "lstm-2x128-T100-B32": (lambda: nn.LSTM(32, 128, num_layers=2, batch_first=True), 32, 100, 32),
    "gru-1x64-T64-B32": (lambda: nn.GRU(32, 64, batch_first=True), 32, 64, 32),
    "lstm-1x256-T1000-B16": (lambda: nn.LSTM(32, 256, batch_first=True), 16, 1000, 32),
}


def fused_step(module: nn.Module, x: torch.Tensor) -> None:
    out, _ = module(x)
    out.pow(2).mean().backward()


def bench(name: str, repeats: int) -> dict[str, float]:
    factory, batch, steps, features = WORKLOADS[name]
    gen = torch.Generator().manual_seed(0)
    module = factory()
    x = torch.randn(batch, steps, features, generator=gen)
    probe = Probe(module)
    fused, recorded = [], []
    fused_step(module, x)  # warm-up
    for _ in range(repeats):
        t0 = time.perf_counter()
        fused_step(module, x)
        t1 = time.perf_counter()
        with probe.record():
            fused_step(module, x)
        t2 = time.perf_counter()
        fused.append(t1 - t0)
        recorded.append(t2 - t1)
        module.zero_grad(set_to_none=True)
    f, r = statistics.median(fused), statistics.median(recorded)
    return {"fused_ms": 1e3 * f, "recorded_ms": 1e3 * r, "replay_ms": 1e3 * (r - f), "ratio": (r - f) / f}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--only", choices=sorted(WORKLOADS))
    args = parser.parse_args(argv)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"{'workload':<24} {'fused fwd+bwd ms':>17} {'replay ms':>10} {'replay/fused':>13}")
    for name in [args.only] if args.only else WORKLOADS:
        row = bench(name, args.repeats if "T1000" not in name else max(3, args.repeats // 5))
        print(f"{name:<24} {row['fused_ms']:>17.1f} {row['replay_ms']:>10.1f} {row['ratio']:>12.2f}x")


if __name__ == "__main__":
    main()
