"""Vanishing gradients, seen from inside: a vanilla RNN, a GRU and an LSTM on the adding problem.

The adding problem (Hochreiter & Schmidhuber, 1997): every step of a sequence carries a random value in
``[0, 1)`` and a marker bit. Exactly two steps are marked, the first within the first tenth of the
sequence and the second before its middle; the target, read from the last step only, is the sum of the
two marked values. Answering the constant 1.0 scores MSE ``1/6 ~ 0.167`` (the variance of a sum of two
uniform values), so a model gets below that only by carrying what it saw over at least half the sequence.

The script trains the three models on the same data, one ``Trainer`` each, each logging to
``<save-dir>/<kind>`` so that TensorBoard shows them side by side. What to look for (numbers from a
default run):

* ``rnnviz/grad_norm/rnn``: the exact ``||dL/dh_t||`` at every step ``t``, on a log axis. For the
  vanilla RNN it falls exponentially away from the last step, a straight line of about 0.2 decades per
  step (``decay_per_step`` in ``summary.json`` and the findings), some six decades over the sequence (``log10_ratio``), and it stays that way
  all run: the marked steps get no gradient, and ``val/loss`` stays on the baseline.
* The GRU and the LSTM start out the same way (``log10_ratio`` -3 to -6 at step 0), but their gates
  learn: within a few hundred steps the curve flattens and then tilts up, as the early, marked steps
  become what matters most, and ``val/loss`` falls to a few percent of the baseline.
  ``rnnviz/grad_decay/rnn`` draws one curve per epoch, so the whole change is one picture.
* ``rnnviz/gates/rnn``: the gate that keeps the previous state. The GRU's update gate ``z`` (PyTorch:
  ``h_t = (1 - z_t) * n_t + z_t * h_{t-1}``) rises from 0.5 to about 0.73 (``update_mean``), with a
  burst of units held open (the gates picture's bars; ``update_saturated_high`` with ``scalars="all"``)
  while it finds the task. The LSTM is started with forget-gate bias 1, so its forget gate begins near
  0.73; its mean hardly moves, while a few percent of its values come to saturate above 0.9
  (``forget_saturated_high`` with ``scalars="all"``).

Run it and look::

    python examples/vanishing_gradients.py          # about 3 minutes on 2 CPU cores
    python examples/vanishing_gradients.py --fast   # smoke run, well under a minute
    tensorboard --logdir lightning_logs --samples_per_plugin images=1000

At the end the script prints, measured on the validation set independently of the callback, each
model's loss next to the baseline, ``||dL/dh_t||`` at the first step relative to the last one, and the
mean keep gate of the GRU and the LSTM before and after training; then what the callback found wrong in
each model's last epoch (its findings), and it compares the three runs from their folders alone, as
``python -m lightning_rnnviz compare <run> <run> <run> --out <save-dir>/compare.png`` does: the
gradient norm per step of each model's last epoch on one picture, with each one's gradient horizon.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from pytorch_lightning.loggers import TensorBoardLogger
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_rnnviz import RNNViz, cli

KINDS = {"rnn": nn.RNN, "gru": nn.GRU, "lstm": nn.LSTM}
CELLS = {nn.RNN: nn.RNNCell, nn.GRU: nn.GRUCell, nn.LSTM: nn.LSTMCell}
BASELINE_MSE = 1 / 6  # predicting 1.0 for a sum of two U(0, 1) values
VAL_SEED = 20_240_601  # the validation set is the same for every --seed, so runs compare


def adding_problem(num_sequences: int, seq_len: int, generator: torch.Generator) -> TensorDataset:
    """Inputs ``(num_sequences, seq_len, 2)`` of (value, marker) pairs and targets ``(num_sequences,)``."""
    values = torch.rand(num_sequences, seq_len, generator=generator)
    rows = torch.arange(num_sequences)
    first = torch.randint(0, max(1, seq_len // 10), (num_sequences,), generator=generator)
    second = torch.randint(max(1, seq_len // 10), max(2, seq_len // 2), (num_sequences,), generator=generator)
    markers = torch.zeros(num_sequences, seq_len)
    markers[rows, first] = 1.0
    markers[rows, second] = 1.0
    return TensorDataset(torch.stack([values, markers], dim=-1), (values * markers).sum(dim=1))


class AddingModel(pl.LightningModule):
    """One recurrent layer read out at the last step; the recurrent module is ``self.rnn``."""

    def __init__(self, kind: str = "lstm", hidden_size: int = 64, lr: float = 1e-3) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.rnn = KINDS[kind](input_size=2, hidden_size=hidden_size, batch_first=True)
        self.head = nn.Linear(hidden_size, 1)
        if kind == "lstm":
            # Forget-gate bias 1 (Jozefowicz et al., 2015; Keras' default): start out remembering a little
            # more than half, or the LSTM can sit on the baseline for thousands of steps before it finds the
            # task.
            forget = slice(hidden_size, 2 * hidden_size)  # PyTorch orders the gates i, f, g, o
            with torch.no_grad():
                self.rnn.bias_ih_l0[forget] = 1.0
                self.rnn.bias_hh_l0[forget] = 0.0

    def forward(self, x: Tensor) -> Tensor:
        """``(batch, time, 2)`` -> predicted sums ``(batch,)``."""
        out, _ = self.rnn(x)
        return self.head(out[:, -1]).squeeze(-1)

    def training_step(self, batch: Sequence[Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        loss = F.mse_loss(self(x), y)
        self.log("train/loss", loss, batch_size=len(x))
        return loss

    def validation_step(self, batch: Sequence[Tensor], batch_idx: int) -> None:
        x, y = batch
        self.log("val/loss", F.mse_loss(self(x), y), batch_size=len(x), prog_bar=True)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=self.hparams.lr)


def hidden_grad_norms(model: AddingModel, x: Tensor, y: Tensor) -> Tensor:
    """``(time,)``: the mean over the batch of ``||dL/dh_t||``, found by unrolling ``model.rnn`` step by step.

    A cell with the same weights runs the recurrence one step at a time, so that every ``h_t`` is a node
    of the graph and autograd gives its total gradient, through all later steps.
    """
    rnn = model.rnn
    cell = CELLS[type(rnn)](rnn.input_size, rnn.hidden_size)
    cell.load_state_dict({name.removesuffix("_l0"): value for name, value in rnn.state_dict().items()})
    h = x.new_zeros(len(x), rnn.hidden_size)
    c = torch.zeros_like(h)
    states = []
    for t in range(x.shape[1]):
        if isinstance(cell, nn.LSTMCell):
            h, c = cell(x[:, t], (h, c))
        else:
            h = cell(x[:, t], h)
        states.append(h)
    loss = F.mse_loss(model.head(h).squeeze(-1), y)
    grads = torch.autograd.grad(loss, states)
    return torch.stack([g.norm(dim=-1).mean() for g in grads])


@torch.no_grad()
def keep_gate(rnn: nn.GRU | nn.LSTM, x: Tensor) -> Tensor:
    """The gate that keeps the previous state: ``(batch, time, hidden)`` for ``x`` ``(batch, time, 2)``.

    That is the LSTM's forget gate ``f_t`` and the GRU's update gate ``z_t``. Both are
    ``sigmoid(W x_t + b_i + U h_{t-1} + b_h)`` with the second block of the stacked weights: PyTorch orders
    the LSTM's gates ``i, f, g, o`` and the GRU's ``r, z, n``.
    """
    out, _ = rnn(x)
    previous = torch.cat([torch.zeros_like(out[:, :1]), out[:, :-1]], dim=1)  # h_{t-1}, with h_{-1} = 0
    block = slice(rnn.hidden_size, 2 * rnn.hidden_size)
    pre = (
        x @ rnn.weight_ih_l0[block].T
        + rnn.bias_ih_l0[block]
        + previous @ rnn.weight_hh_l0[block].T
        + rnn.bias_hh_l0[block]
    )
    return pre.sigmoid()


@dataclass(frozen=True)
class Config:
    seq_len: int = 30
    hidden_size: int = 64
    batch_size: int = 64
    train_batches: int = 200
    val_sequences: int = 512
    max_epochs: int = 10
    lr: float = 1e-3
    log_every_n_steps: int = 100


# The smoke run keeps a planted case: over 20 steps the vanilla RNN's gradient horizon (about 7 steps) is
# under half the sequence, and recordings every 2 steps give the 2 epochs 5 recordings, enough for its
# vanishing_gradient finding to persist and be reported (tests/test_examples.py checks that it is).
FAST = Config(
    seq_len=20,
    hidden_size=16,
    batch_size=32,
    train_batches=4,
    val_sequences=64,
    max_epochs=2,
    log_every_n_steps=2,
)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fast", action="store_true", help="tiny smoke run for CI: seconds, not minutes")
    parser.add_argument("--save-dir", default="lightning_logs", help="TensorBoard log root")
    parser.add_argument(
        "--max-epochs",
        type=int,
        default=None,
        help=f"default {Config.max_epochs}, or {FAST.max_epochs} with --fast",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--kinds", nargs="+", choices=list(KINDS), default=list(KINDS), help="which models to train"
    )
    parser.add_argument(
        "--num-threads",
        type=int,
        default=1,
        help="torch threads for the run (restored afterwards); models this small gain nothing from more, "
        "and extra threads slow them down many times over when the cores are busy",
    )
    return parser.parse_args(argv)


def train_one(
    kind: str, cfg: Config, train: TensorDataset, val: TensorDataset, opts: argparse.Namespace
) -> dict:
    """Fit one model with its own ``Trainer`` and logger, then measure it on the whole validation set."""
    pl.seed_everything(opts.seed)  # same initialisation stream and batch order for every kind
    model = AddingModel(kind, cfg.hidden_size, cfg.lr)
    val_x, val_y = val.tensors
    gated = kind in ("gru", "lstm")
    keep_before = keep_gate(model.rnn, val_x).mean().item() if gated else None

    logger = TensorBoardLogger(opts.save_dir, name=kind)
    viz = RNNViz()
    trainer = pl.Trainer(
        max_epochs=cfg.max_epochs,
        logger=logger,
        callbacks=[viz],
        log_every_n_steps=cfg.log_every_n_steps,
        gradient_clip_val=1.0,
        enable_checkpointing=False,  # this example is about the logs
        enable_progress_bar=not opts.fast,
        accelerator="cpu",
        devices=1,
    )
    trainer.fit(
        model,
        DataLoader(train, batch_size=cfg.batch_size, shuffle=True, num_workers=0),
        DataLoader(val, batch_size=cfg.batch_size, num_workers=0),
    )

    model.eval()
    norms = hidden_grad_norms(model, val_x, val_y)
    result = {
        "val_loss": trainer.callback_metrics["val/loss"].item(),
        "log10_grad_ratio": (norms[0] / norms[-1]).log10().item(),
        "log_dir": logger.log_dir,
        "findings": [f for f in viz.findings if f.epoch == trainer.current_epoch - 1],  # the last epoch's
    }
    if gated:
        result["keep_gate"] = (keep_before, keep_gate(model.rnn, val_x).mean().item())
    return result


def main(argv: Sequence[str] | None = None) -> dict:
    """Train the chosen kinds one after the other on the same data.

    Returns:
        ``{kind: {"val_loss", "log10_grad_ratio", "log_dir"}}``, where ``log10_grad_ratio`` is
        ``log10(||dL/dh_first|| / ||dL/dh_last||)`` and the GRU and LSTM also have ``"keep_gate": (before,
        after)``, the mean of :func:`keep_gate`; plus ``"baseline_mse"`` and ``"seconds"``.
    """
    opts = parse_args(argv)
    cfg = FAST if opts.fast else Config()
    if opts.max_epochs is not None:
        cfg = replace(cfg, max_epochs=opts.max_epochs)

    threads = torch.get_num_threads()
    torch.set_num_threads(opts.num_threads)
    try:
        start = time.perf_counter()
        train = adding_problem(
            cfg.train_batches * cfg.batch_size, cfg.seq_len, torch.Generator().manual_seed(opts.seed)
        )
        val = adding_problem(cfg.val_sequences, cfg.seq_len, torch.Generator().manual_seed(VAL_SEED))
        results: dict = {kind: train_one(kind, cfg, train, val, opts) for kind in opts.kinds}
        results["baseline_mse"] = BASELINE_MSE
        results["seconds"] = time.perf_counter() - start
    finally:
        torch.set_num_threads(threads)

    print(
        f"\nAdding problem, {cfg.seq_len} steps, {cfg.max_epochs} epochs of {cfg.train_batches} batches, "
        f"{results['seconds']:.0f} s. Validation MSE (answering 1.0 scores {BASELINE_MSE:.3f}):"
    )
    keep_names = {"gru": "update", "lstm": "forget"}
    for kind in opts.kinds:
        r = results[kind]
        ratio = r["val_loss"] / BASELINE_MSE
        verdict = "learned" if ratio < 0.1 else "stuck on the baseline" if ratio > 0.8 else "partly learned"
        line = (
            f"  {kind:>4}  val MSE {r['val_loss']:.4f} ({verdict});  "
            f"||dL/dh_first|| / ||dL/dh_last|| = 10^{r['log10_grad_ratio']:+.1f}"
        )
        if "keep_gate" in r:
            line += f";  mean {keep_names[kind]} gate {r['keep_gate'][0]:.2f} -> {r['keep_gate'][1]:.2f}"
        print(line)
        for finding in r["findings"]:  # what the callback says about the last epoch
            where = f" {finding.where}" if finding.where else ""
            print(f"        finding: {finding.kind}{where}: {finding.message}")
        if not r["findings"]:
            print("        no findings in the last epoch")
    if opts.fast:
        print("(--fast is a smoke run of the pipeline, far too short for any model to learn the task.)")
    print(
        "The vanilla RNN's gradient dies out exponentially on its way back from the last step, so it never\n"
        "learns that the marked values matter; the gated models learn to keep state, the gradient reaches\n"
        "the marked steps, and they learn. See it step by step:\n"
        f"  tensorboard --logdir {opts.save_dir} --samples_per_plugin images=1000"
    )
    # The three runs' gradient curves of the last epoch on one picture, from the run folders alone:
    runs = [results[kind]["log_dir"] for kind in opts.kinds]
    picture = str(Path(opts.save_dir) / "compare.png")
    print("\nCompared offline (the same as `python -m lightning_rnnviz compare " + " ".join(runs) + f" --out {picture}`):")
    cli.main(["compare", *runs, "--out", picture])
    results["compare"] = picture
    return results


if __name__ == "__main__":
    main()
