"""What only a GPU shows: the probe on cuDNN kernels, fp16 autocast with a GradScaler, a 16-mixed Trainer.

Run on a machine with CUDA: ``python tests/benchmarks/check_cuda.py`` (about a minute). Prints one line per
check and exits non-zero when one fails; the timings on CUDA come from ``bench_overhead.py --device cuda`` and
``bench_replay.py --device cuda`` (the replay's two backward methods side by side).

1. cuDNN: the grid of fused-RNN configurations of ``tests/probe/test_exact_rnn.py`` (RNN tanh/relu, LSTM,
   projected LSTM, GRU; 1-3 layers; bidirectional; packed; given ``hx``; four losses) recorded on CUDA
   and compared with the float64 step-by-step reference on the CPU. TF32 is switched off for this
   check so that a difference means a replay error, not TF32 rounding (cuDNN uses TF32 by default). On
   CUDA the probe's replay takes the fused-kernel backward (``method="auto"``).
2. fused vs loop: ``replay_rnn``'s two backward methods on CUDA, float32 and float64, over the same grid with
   and without inter-layer dropout masks: the same gradients (float64 to ``rtol`` 1e-10), the user's TF32
   settings (both on here) and the CPU and CUDA random streams as they were, nothing left on the device
   after a replay, and the peak device memory of each method at a realistic size.
3. fp16: a 2-layer LSTM under ``torch.autocast(float16)`` with ``GradScaler``; the recorded ``dL/dh_t``
   (``grad_scale=scaler.get_scale()``) against the float32 run of the same batch.
4. Lightning ``precision="16-mixed"`` on the GPU with ``RNNViz(every_n_steps=1)``: images and finite
   gradient-norm scalars on every step, unscaled (the same order as a float32 run); with the recording
   worker, each recording's span on its CUDA stream (``rnnviz/overhead/device_ms``, CUDA events read by
   the worker) logged, finite and positive (and no such scalar off CUDA).
5. Reductions on the device: a seq2seq model (packed bidirectional LSTM, GRU cell, attention) recorded on
   CUDA with ``Probe(on_device=True)``, as the callbacks record, and reported: every picture payload,
   statistic, histogram and summary the same as from the record copied to the CPU (to 1e-4 relative:
   the GPU sums in another order), and the time of recording + reporting both ways.
"""

from __future__ import annotations

import contextlib
import copy
import sys
import tempfile
import time
import warnings
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from lightning_rnnviz import Probe
from lightning_rnnviz.probe import replay
from lightning_rnnviz.probe.records import Recording
from lightning_rnnviz.probe.replay import replay_rnn, tf32_off
from tests.helpers.cases import KINDS, STRUCTURES, RNNConfig, build_rnn, loss_for, make_inputs, run_rnn
from tests.helpers.reference import reference_rnn
from tests.probe.test_fused_backward import _replay_args
from tests.render import test_on_device as on_device

FAILURES: list[str] = []
DEVICE = "cuda"  # `--dry-run` runs every check on the CPU, to test this script without a GPU


def report(name: str, ok: bool, detail: str) -> None:
    print(f"{'PASS' if ok else 'FAIL'}  {name}: {detail}", flush=True)
    if not ok:
        FAILURES.append(name)


def _max_rel(actual: torch.Tensor, expected: torch.Tensor) -> float:
    actual, expected = actual.double().cpu(), expected.double().cpu()
    scale = expected.abs().max().clamp_min(1e-12)
    return float((actual - expected).abs().max() / scale)


def check_cudnn() -> None:
    structures = STRUCTURES
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    worst = {"hidden": 0.0, "gates": 0.0, "hidden_grad": 0.0, "cell_grad": 0.0}
    for kind in KINDS:
        for layers, bi, bf, bias, packed, hx, loss in structures:
            cfg = RNNConfig(kind=kind, num_layers=layers, bidirectional=bi, batch_first=bf, bias=bias,
                            packed=packed, given_hx=hx, loss=loss, batch=4, time=9, input_size=5, hidden_size=7)
            module = build_rnn(cfg)
            inp = make_inputs(cfg, module)
            loss_fn = loss_for(cfg, module, inp)
            reference_module = copy.deepcopy(module)
            module = module.to(DEVICE)
            gpu = copy.copy(inp)
            gpu.x = inp.x.to(DEVICE)
            gpu.h0 = inp.h0.to(DEVICE) if inp.h0 is not None else None
            gpu.c0 = inp.c0.to(DEVICE) if inp.c0 is not None else None
            with Probe(module).record() as rec:
                out, h_n, c_n = run_rnn(module, gpu, packed)
                loss_fn(out.cpu(), h_n.cpu(), c_n.cpu() if c_n is not None else None).backward()
            ref = reference_rnn(reference_module, inp.x, inp.lengths, inp.h0, inp.c0)
            loss_fn(ref.output, ref.h_n, ref.c_n).backward()
            r = rec[""]
            errors = {
                "hidden": _max_rel(r.hidden, ref.hidden()),
                "hidden_grad": _max_rel(r.hidden_grad, ref.hidden_grad()),
                "gates": max((_max_rel(r.gates[g], v) for g, v in ref.gates().items()), default=0.0),
            }
            if r.cell_grad is not None:
                errors["cell_grad"] = _max_rel(r.cell_grad, ref.cell_grad())
            for key, value in errors.items():
                worst[key] = max(worst[key], value)
            if max(errors.values()) > 1e-4:
                report(f"cuDNN {cfg.describe()}", False, ", ".join(f"{k} {v:.1e}" for k, v in errors.items()))
    detail = ", ".join(f"{k} {v:.1e}" for k, v in worst.items())
    report(f"cuDNN grid ({len(KINDS) * len(structures)} configurations) vs float64 reference", max(worst.values()) <= 1e-4,
           f"largest error relative to each quantity's largest value: {detail}")
    torch.backends.cudnn.allow_tf32 = True


def _rng_states() -> list[torch.Tensor]:
    return [torch.get_rng_state()] + ([torch.cuda.get_rng_state()] if DEVICE == "cuda" else [])


def check_fused_vs_loop() -> None:
    cudnn, matmul = torch.backends.cudnn, torch.backends.cuda.matmul
    user = (cudnn.allow_tf32, matmul.allow_tf32)
    cudnn.allow_tf32 = matmul.allow_tf32 = True  # TF32 everywhere: the fused path must not use it
    # on CUDA the probe's own choice; in the dry run named, since "auto" is the loop on the CPU
    method = "auto" if DEVICE == "cuda" else "fused"
    try:
        if DEVICE == "cuda":
            chosen = replay.auto_method(torch.device(DEVICE))
            report("method='auto' on CUDA", chosen == "fused", f"picks {chosen!r}")
        for dtype, tol in ((torch.float64, 1e-10), (torch.float32, 1e-4)):
            worst, kept, count = 0.0, [], 0
            for kind in KINDS:
                for layers, bi, bf, bias, packed, hx, loss in STRUCTURES:
                    for dropout in (False, True) if layers > 1 else (False,):
                        cfg = RNNConfig(kind=kind, num_layers=layers, bidirectional=bi, batch_first=bf,
                                        bias=bias, packed=packed, given_hx=hx, batch=4, time=9, input_size=5,
                                        hidden_size=7)
                        args = _replay_args(cfg, loss, dtype=dtype, dropout=dropout, device=DEVICE)
                        rng = _rng_states()
                        fused = replay_rnn(**args, method=method)
                        flags = (cudnn.allow_tf32, matmul.allow_tf32)
                        if flags != (True, True):
                            kept.append(f"TF32 settings {flags} after {cfg.describe()}")
                        if not all(torch.equal(a, b) for a, b in zip(rng, _rng_states())):
                            kept.append(f"random stream moved by {cfg.describe()}")
                        with tf32_off():
                            loop = replay_rnn(**args, method="loop")
                        error = max(_max_rel(getattr(fused, k), getattr(loop, k))
                                    for k in ("hidden_grad", "cell_grad") if getattr(loop, k) is not None)
                        worst = max(worst, error)
                        count += 1
                        if error > tol:
                            report(f"fused vs loop {dtype} {cfg.describe()} dropout={dropout}", False,
                                   f"largest relative error {error:.1e}")
            report(f"fused vs loop backward, {dtype}, {count} configurations", worst <= tol and not kept,
                   f"largest error relative to each gradient's largest value {worst:.1e} (limit {tol:.0e})"
                   + (f"; {kept[:3]}" if kept else "; TF32 settings and random streams as they were"))
        if DEVICE == "cuda":
            _check_device_memory(method)
    finally:
        cudnn.allow_tf32, matmul.allow_tf32 = user


def _check_device_memory(method: str) -> None:
    """Nothing of a replay left on the device once its result is dropped; the peak of each method."""
    cfg = RNNConfig(kind="LSTM", num_layers=2, bidirectional=True, packed=True, given_hx=True, batch=32,
                    time=100, input_size=32, hidden_size=128)
    args = _replay_args(cfg, "mixed", dtype=torch.float32, dropout=True, device=DEVICE)
    peaks, left = {}, {}
    for name in (method, "loop"):
        replay_rnn(**args, method=name)  # workspaces that cuBLAS and cuDNN keep after their first call
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        result = replay_rnn(**args, method=name)
        held = torch.cuda.memory_allocated() - base
        del result
        torch.cuda.synchronize()
        left[name] = torch.cuda.memory_allocated() - base
        peaks[name] = (torch.cuda.max_memory_allocated() - base, held)
    mib = 2.0**20
    detail = ", ".join(f"{k}: peak {peak / mib:.1f} MiB, result {held / mib:.1f} MiB, {left[k]} bytes "
                       "left after" for k, (peak, held) in peaks.items())
    report("device memory of a replay (LSTM 2x128 bidirectional, T=100, B=32)",
           all(v == 0 for v in left.values()), detail)


def check_fp16_grad_scaler() -> None:
    torch.manual_seed(0)
    lstm = torch.nn.LSTM(32, 128, 2, batch_first=True).to(DEVICE)
    head = torch.nn.Linear(128, 1).to(DEVICE)
    x = torch.randn(32, 100, 32, device=DEVICE)
    y = torch.randn(32, device=DEVICE)
    probe = Probe(lstm)
    with probe.record(max_samples=16) as full:
        torch.nn.functional.mse_loss(head(lstm(x)[0][:, -1]).squeeze(-1), y).backward()
    lstm.zero_grad(set_to_none=True)
    scaler = torch.amp.GradScaler(DEVICE, init_scale=2.0**14)
    with probe.record(max_samples=16, grad_scale=scaler.get_scale()) as half:
        # (the dry run has no autocast: oneDNN's CPU LSTM refuses reduced precision)
        with torch.autocast(DEVICE, dtype=torch.float16) if DEVICE == "cuda" else contextlib.nullcontext():
            loss = torch.nn.functional.mse_loss(head(lstm(x)[0][:, -1]).squeeze(-1).float(), y)
        scaler.scale(loss).backward()
    reference, recorded = full[""].grad_norm, half[""].grad_norm
    error = _max_rel(recorded, reference)
    scale_ratio = float(recorded.abs().max() / reference.abs().max())
    report("fp16 autocast + GradScaler(2^14), dL/dh_t norms vs float32", error < 0.05 and 0.9 < scale_ratio < 1.1,
           f"largest relative error {error:.1e}; recorded/float32 magnitude {scale_ratio:.3f} "
           f"(1.000 = unscaled, {2.0**14:.0f} = scale left in)")


def check_lightning_16_mixed() -> None:
    import pytorch_lightning as pl
    from pytorch_lightning.loggers import TensorBoardLogger
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from lightning_rnnviz import RNNViz
    from lightning_rnnviz.sinks import run_dir

    class Model(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.rnn = torch.nn.LSTM(16, 64, 2, batch_first=True)
            self.attn = torch.nn.MultiheadAttention(64, 4, batch_first=True)
            self.head = torch.nn.Linear(64, 1)

        def training_step(self, batch, batch_idx):
            x, y = batch
            out, _ = self.rnn(x)
            out, _ = self.attn(out, out, out)
            loss = torch.nn.functional.mse_loss(self.head(out[:, -1]).squeeze(-1).float(), y)
            self.log("train_loss", loss)
            return loss

        def configure_optimizers(self):
            return torch.optim.Adam(self.parameters(), lr=1e-3)

    results = {}
    for precision in ("32-true", "16-mixed"):
        torch.manual_seed(0)
        x = torch.randn(64, 50, 16)
        loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, x[:, :, 0].mean(1)), batch_size=16)
        with tempfile.TemporaryDirectory() as out, warnings.catch_warnings():
            warnings.simplefilter("ignore")
            logger = TensorBoardLogger(out, name="run")
            trainer = pl.Trainer(accelerator="gpu" if DEVICE == "cuda" else "cpu", devices=1,
                                 precision=precision if DEVICE == "cuda" else "32-true", max_steps=4, logger=logger,
                                 callbacks=[callback := RNNViz(every_n_steps=1, strict=True, scalars="all")],
                                 enable_progress_bar=False,
                                 enable_checkpointing=False, enable_model_summary=False, log_every_n_steps=1)
            torch.manual_seed(0)
            trainer.fit(Model(), loader)
            acc = EventAccumulator(run_dir(logger.log_dir), size_guidance={"images": 0, "scalars": 0})
            acc.Reload()
            tags = acc.Tags()
            first = [e.value for e in acc.Scalars("rnnviz/grad_norm/rnn/last_norm/layer1")]
            spans = ([e.value for e in acc.Scalars("rnnviz/overhead/device_ms")]
                     if "rnnviz/overhead/device_ms" in tags["scalars"] else [])
            results[precision] = (len(acc.Images("rnnviz/grad_norm/rnn")), first, sorted(tags["images"]),
                                  spans, callback.placement)
    images16, norms16, tags16, spans16, placement = results["16-mixed"]
    images32, norms32, _, _, _ = results["32-true"]
    finite = all(torch.isfinite(torch.tensor(norms16)).tolist())
    ratio = norms16[0] / norms32[0]
    # the worker's stream exists on CUDA only; inline recordings have no span either
    spanned = placement == "thread" and DEVICE == "cuda"
    if spanned:
        spans_ok = len(spans16) == images16 and all(0 < v < float("inf") for v in spans16)
    else:
        spans_ok = not spans16
    report("Lightning 16-mixed on GPU with RNNViz(every_n_steps=1)",
           images16 == images32 == 4 and finite and 0.8 < ratio < 1.25 and spans_ok,
           f"{images16} grad-norm images (float32 run: {images32}); last-step ||dL/dh|| at step 0: "
           f"16-mixed {norms16[0]:.3e}, 32-true {norms32[0]:.3e} (ratio {ratio:.3f}); image tags {tags16}; "
           f"placement {placement}, device ms per recording on the worker's stream "
           f"{', '.join(f'{v:.1f}' for v in spans16) or 'none'}")


def check_device_reductions() -> None:
    torch.manual_seed(0)
    model = on_device.Seq2Seq().to(DEVICE)
    x = torch.randn(32, 300, 6, device=DEVICE)
    lengths = torch.randint(100, 301, (32,))
    lengths[0] = 300

    def recorded(keep: bool) -> tuple[Recording, float]:
        if DEVICE == "cuda":
            torch.cuda.synchronize()
        started = time.perf_counter()
        with Probe(model, on_device=keep).record(max_samples=16) as recording:
            model(x, lengths).backward()  # lengths on the CPU, as pack_padded_sequence wants them
        return recording, started

    def reported(recording: Recording, started: float) -> tuple[on_device.Collected, float]:
        out = on_device.Collected()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            on_device._report(recording, out)
        if DEVICE == "cuda":
            torch.cuda.synchronize()
        return out, time.perf_counter() - started

    for _ in range(2):  # the first round warms the kernels up
        kept, kept_s = reported(*recorded(True))
        host, host_s = reported(*recorded(False))
    placed = {name: str(record.device) for name, record in recorded(True)[0].items()}
    problems = []
    for what in ("pictures", "scalars_", "histograms", "texts", "documents"):
        try:
            _same_within(getattr(host, what), getattr(kept, what), what)
        except AssertionError as error:
            problems.append(str(error).splitlines()[0])
    report("statistics, histograms and payloads reduced on the device (Probe(on_device=True))", not problems,
           f"records on {sorted(set(placed.values()))}; record + report {kept_s * 1000:.0f} ms on the device, "
           f"{host_s * 1000:.0f} ms copied to the host first; {len(kept.pictures)} pictures, "
           f"{len(kept.scalars_)} scalars, {len(kept.histograms)} histograms"
           + (f"; differs: {problems[:3]}" if problems else ""))


def _same_within(a, b, where: str, rtol: float = 1e-4) -> None:
    """``tests/render/test_on_device._same`` with a tolerance for another summation order."""
    if isinstance(a, Mapping):
        assert set(a) == set(b), f"{where}: keys differ"
        for key in a:
            _same_within(a[key], b[key], f"{where}.{key}", rtol)
    elif isinstance(a, np.ndarray):
        assert isinstance(b, np.ndarray) and a.shape == b.shape, f"{where}: {type(b).__name__} {getattr(b, 'shape', '')}"
        if a.dtype.kind == "f":
            scale = float(np.nanmax(np.abs(a))) if np.isfinite(a).any() else 1.0
            np.testing.assert_allclose(b, a, rtol=rtol, atol=rtol * scale, equal_nan=True, err_msg=where)
        else:
            # bucket counts: a value on a bucket edge may fall either side with another rounding
            assert np.abs(a - b).sum() <= max(2, 1e-4 * np.abs(a).sum()), where
    elif isinstance(a, float):
        assert (np.isnan(a) and np.isnan(b)) or abs(a - b) <= rtol * max(abs(a), 1e-6), f"{where}: {a} vs {b}"
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _same_within(x, y, f"{where}[{i}]", rtol)
    else:
        assert not isinstance(b, torch.Tensor) and a == b, f"{where}: {a!r} vs {b!r}"


def main() -> None:
    global DEVICE
    if "--dry-run" in sys.argv:
        DEVICE = "cpu"
        # the probe's replay takes the path it takes on CUDA, the fused-kernel backward
        replay.auto_method = lambda device: "fused"
        print("dry run on the CPU: checks the script, not CUDA (the probe's replay forced to method='fused')")
    elif not torch.cuda.is_available():
        raise SystemExit("no CUDA device (use --dry-run to test the script on the CPU)")
    else:
        print(f"torch {torch.__version__}, {torch.cuda.get_device_name()}, cuDNN {torch.backends.cudnn.version()}")
    check_cudnn()
    check_fused_vs_loop()
    check_fp16_grad_scaler()
    check_lightning_16_mixed()
    check_device_reductions()
    if FAILURES:
        raise SystemExit(f"{len(FAILURES)} check(s) failed: {FAILURES}")


if __name__ == "__main__":
    main()
