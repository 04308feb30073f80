"""Cost of the exact-gradient replay relative to the module's own fused forward+backward.

Run: ``python tests/benchmarks/bench_replay.py`` (add ``--device cuda`` on a GPU). Prints, per workload,
the median wall time of the module's own (fused) forward+backward and, for each backward ``--method`` of the
replay
(``loop`` and ``fused`` side by side unless given; ``auto`` is what the probe uses: ``fused`` on CUDA,
``loop`` elsewhere), the replay's time (a recording, i.e. the fused forward+backward with hooks and then
the replay, less the module's forward+backward) and the ratio replay / module. Everything is measured
interleaved in one process so machine noise hits all alike.

``--parts`` adds a second table: where the fused path's time goes, each part timed alone, interleaved
with the module's forward+backward and the whole fused replay, as shares of the module's time: the
extended pass (each layer's kernel forward and backward with the extra input whose gradient the
recurrence carries back; on the CPU oneDNN's backward also computes the weight gradients, which the
replay discards: it has no output mask, unlike cuDNN's), the gates recomputed from the weights (the same
products as the kernel's forward), and the rest (the cell states, the scans of the total gradients, the
exactness checks, the records, the hooks).
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time
from collections.abc import Callable, Iterator

import torch
from torch import nn

from lightning_rnnviz import Probe
from lightning_rnnviz.probe import replay

WORKLOADS = {
    # name: (module factory, batch, time, input)
    "lstm-2x128-T100-B32": (lambda: nn.LSTM(32, 128, num_layers=2, batch_first=True), 32, 100, 32),
    "gru-1x64-T64-B32": (lambda: nn.GRU(32, 64, batch_first=True), 32, 64, 32),
    "lstm-1x256-T1000-B16": (lambda: nn.LSTM(32, 256, batch_first=True), 16, 1000, 32),
}


@contextlib.contextmanager
def replay_method(method: str) -> Iterator[None]:
    """The probe replays with ``method="auto"``; inside this block ``"auto"`` stands for ``method``."""
    if method == "auto":
        yield
        return
    chosen = replay.auto_method
    replay.auto_method = lambda device: method
    try:
        yield
    finally:
        replay.auto_method = chosen


def fused_step(module: nn.Module, x: torch.Tensor) -> None:
    out, _ = module(x)
    out.pow(2).mean().backward()


def _workload(name: str, device: str) -> tuple[nn.RNNBase, torch.Tensor, torch.Generator]:
    """The workload's module and batch on ``device``, and the generator that drew the batch."""
    factory, batch, steps, features = WORKLOADS[name]
    gen = torch.Generator().manual_seed(0)
    return factory().to(device), torch.randn(batch, steps, features, generator=gen).to(device), gen


def _timed(fn: Callable[[], object], device: str) -> float:
    """Seconds ``fn`` takes, the device's queue drained before and after."""
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    sync()
    start = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - start


def bench(name: str, repeats: int, methods: list[str], device: str) -> dict[str, float]:
    module, x, _ = _workload(name, device)
    probe = Probe(module)

    def recorded() -> None:
        with probe.record():
            fused_step(module, x)

    fused_step(module, x)  # warm-up
    for method in methods:
        with replay_method(method):
            recorded()
    own: list[float] = []
    replays: dict[str, list[float]] = {m: [] for m in methods}
    for _ in range(repeats):
        own.append(_timed(lambda: fused_step(module, x), device))
        for method in methods:
            with replay_method(method):
                replays[method].append(_timed(recorded, device))
        module.zero_grad(set_to_none=True)
    f = statistics.median(own)
    row = {"module_ms": 1e3 * f}
    for method, times in replays.items():
        r = statistics.median(times) - f
        row[f"{method}_ms"], row[f"{method}_ratio"] = 1e3 * r, r / f
    return row


def parts(name: str, repeats: int, device: str) -> dict[str, float]:
    """The fused path's parts timed alone against the module's forward+backward and the whole fused
    replay (see the module's docstring); milliseconds, medians of ``repeats`` interleaved rounds."""
    module, x, gen = _workload(name, device)
    batch, steps = x.shape[:2]
    mode, dirs = module.mode, 2 if module.bidirectional else 1
    flat = {n: p.detach() for n, p in module.named_parameters()}
    weights = [[replay.LayerWeights.from_flat(flat, layer, d) for d in range(dirs)]
               for layer in range(module.num_layers)]
    h0 = torch.zeros(dirs, batch, module.hidden_size, device=device)
    c0 = h0 if mode == "LSTM" else None
    layer_in, states = [x.transpose(0, 1).contiguous()], []
    with torch.no_grad():
        for layer_weights in weights:
            states.append(replay._layer_forward(mode, layer_weights, layer_in[-1], h0, c0, None, None))
            layer_in.append(torch.cat(states[-1], dim=-1))
    upstream = torch.randn(steps, batch, dirs * module.hidden_size, generator=gen).to(device)

    @contextlib.contextmanager
    def as_the_replay() -> Iterator[None]:
        """What `replay_rnn` runs its fused path under: TF32 off, subnormals flushed on the CPU."""
        with replay.tf32_off(), replay.subnormals_flushed(torch.device(device)):
            yield

    def extended() -> None:
        with as_the_replay():
            for layer, layer_weights in enumerate(weights):
                layer_pass = replay._Extended(mode, layer_weights, layer_in[layer], h0, c0, None)
                layer_pass.backward(upstream, None, None)

    def gates() -> None:
        with torch.no_grad(), as_the_replay():
            for layer, layer_weights in enumerate(weights):
                for d, w in enumerate(layer_weights):
                    previous = replay._previous(states[layer][d], h0[d], d, None)
                    replay.cell_gates(mode, layer_in[layer], previous, w)

    probe = Probe(module)

    def recorded() -> None:
        with replay_method("fused"), probe.record():
            fused_step(module, x)

    timings: dict[str, list[float]] = {"module": [], "recorded": [], "extended": [], "gates": []}
    work = {"module": lambda: fused_step(module, x), "recorded": recorded, "extended": extended,
            "gates": gates}
    for fn in work.values():
        fn()  # warm-up
    for _ in range(repeats):
        for key, fn in work.items():
            timings[key].append(_timed(fn, device))
        module.zero_grad(set_to_none=True)
    row = {key: 1e3 * statistics.median(times) for key, times in timings.items()}
    row["replay"] = row.pop("recorded") - row["module"]
    row["rest"] = row["replay"] - row["extended"] - row["gates"]
    return row


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--only", choices=sorted(WORKLOADS))
    parser.add_argument("--method", action="append", choices=replay.METHODS,
                        help="a backward of the replay to time; repeat for several (default: loop and fused)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--parts", action="store_true",
                        help="also time the fused path's parts alone: extended pass, gates, the rest")
    args = parser.parse_args(argv)
    methods = list(dict.fromkeys(args.method or ["loop", "fused"]))
    where = torch.cuda.get_device_name() if args.device == "cuda" else f"{torch.get_num_threads()} threads"
    resolved = {m: replay.auto_method(torch.device(args.device)) if m == "auto" else m for m in methods}
    print(f"torch {torch.__version__}, {args.device} ({where}); methods: "
          + ", ".join(f"{m} (= {resolved[m]})" if m == "auto" else m for m in methods))
    header = f"{'workload':<24} {'module fwd+bwd ms':>18}"
    for method in methods:
        header += f" {method + ' replay ms':>18} {method + '/module':>13}"
    print(header)
    for name in [args.only] if args.only else WORKLOADS:
        repeats = args.repeats if "T1000" not in name else max(3, args.repeats // 5)
        row = bench(name, repeats, methods, args.device)
        line = f"{name:<24} {row['module_ms']:>18.1f}"
        for method in methods:
            line += f" {row[method + '_ms']:>18.1f} {row[method + '_ratio']:>12.2f}x"
        print(line, flush=True)
    if args.parts:
        print()
        print(f"{'fused path, / module':<24} {'module fwd+bwd ms':>18} {'replay':>8} {'extended':>9}"
              f" {'gates':>7} {'rest':>7}")
        for name in [args.only] if args.only else WORKLOADS:
            repeats = args.repeats if "T1000" not in name else max(3, args.repeats // 5)
            row = parts(name, repeats, args.device)
            line = f"{name:<24} {row['module']:>18.1f}"
            for key, width in (("replay", 8), ("extended", 9), ("gates", 7), ("rest", 7)):
                line += f" {row[key] / row['module']:>{width - 1}.2f}x"
            print(line, flush=True)


if __name__ == "__main__":
    main()
