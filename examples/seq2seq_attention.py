"""Watch attention learn an alignment: a GRU encoder-decoder reversing random strings.

The task: read a string of random letters (``"hcbjafgide"``) and write it backwards (``"edigfajbch"``).
Output step ``t`` copies source position ``T - 1 - t``, so the right attention map is known in advance:
the anti-diagonal. Guessing scores ``1 / vocabulary`` token accuracy (10% here).

The model is a classic Bahdanau et al. (2015) sequence-to-sequence network::

    encoder.embed      nn.Embedding          letters -> vectors
    encoder.rnn        nn.GRU, bidirectional (batch, T_in, 2*hidden) annotations
    encoder.self_attn  nn.MultiheadAttention 2 heads of self-attention over the annotations (residual)
    encoder.norm       nn.LayerNorm
    encoder.bridge     nn.Linear             last states of both directions -> first decoder state
    decoder.embed      nn.Embedding          previous target letter (teacher forcing) or BOS
    decoder.attn       AdditiveAttention     score_j = v^T tanh(W_q s + W_k a_j); one call per output step
    decoder.cell       nn.GRUCell            called once per output step
    decoder.out        nn.Linear             [state, context] -> next-letter logits

``RNNViz`` finds the ``nn.GRU``, the ``nn.GRUCell`` and the ``nn.MultiheadAttention`` by itself (it
recomputes the per-head weights, so the forward may skip them with ``need_weights=False``). The custom
``AdditiveAttention`` needs one line telling how to read its weights: its forward returns
``(context, weights)`` with weights ``(batch, T_in)``, and as it is called once per decoding step the
callback stacks the calls into a ``(T_out, T_in)`` map. ``labels`` returns the letters of the drawn
source string as ``"input"`` and those of its target as ``"output"``; each picture takes the letters of
the sequence it runs over: the source's on ``encoder.rnn``'s time axis, on both axes of
``encoder.self_attn`` and on the columns of ``decoder.attn``; the target's (the letter each decoding step
writes) on ``decoder.cell``'s time axis and the rows of ``decoder.attn``. Source and target have one
length here; ``decoder.cell`` is told apart by its one call per step, ``encoder.self_attn`` by being
called with its query as its key.

What to look for in TensorBoard:

* the ``decoder.attn`` map starts as a blur and sharpens into the anti-diagonal within the first epochs;
* ``encoder.self_attn`` gets one map per head; the task does not need it, and its maps stay diffuse next
  to the sharp decoder map;
* the per-timestep gradient norms of ``encoder.rnn`` for both directions, and the update/reset gates of
  ``encoder.rnn`` and ``decoder.cell``;
* ``val/acc`` (teacher-forced token accuracy) climbs from 0.1 towards 1.

Run it and look::

    python examples/seq2seq_attention.py            # about a minute on 2 CPU cores
    python examples/seq2seq_attention.py --fast     # smoke run, well under a minute
    tensorboard --logdir lightning_logs --samples_per_plugin images=1000

At the end the script decodes the validation set greedily (no teacher forcing) and prints the token and
whole-string accuracy.
"""

from __future__ import annotations

import argparse
import string
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from pytorch_lightning.loggers import TensorBoardLogger
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_rnnviz import RNNViz

VAL_SEED = 20_240_601  # the validation set is the same for every --seed, so runs compare


def reversal_dataset(
    num_sequences: int, seq_len: int, vocab_size: int, generator: torch.Generator
) -> TensorDataset:
    """Random token strings and their reversals: two ``(num_sequences, seq_len)`` long tensors."""
    source = torch.randint(0, vocab_size, (num_sequences, seq_len), generator=generator)
    return TensorDataset(source, source.flip(1))


class AdditiveAttention(nn.Module):
    """Additive (Bahdanau) attention of one query over a sequence of keys, which are also the values."""

    def __init__(self, query_size: int, key_size: int, attn_size: int) -> None:
        super().__init__()
        self.query = nn.Linear(query_size, attn_size, bias=False)
        self.key = nn.Linear(key_size, attn_size)
        self.score = nn.Linear(attn_size, 1, bias=False)

    def forward(self, query: Tensor, keys: Tensor) -> tuple[Tensor, Tensor]:
        """Attend from ``query`` ``(batch, query_size)`` over ``keys`` ``(batch, T_in, key_size)``.

        Returns:
            ``context`` ``(batch, key_size)``, the weighted mean of the keys, and ``weights``
            ``(batch, T_in)``, which sum to 1 over ``T_in``.
        """
        scores = self.score(torch.tanh(self.query(query).unsqueeze(1) + self.key(keys))).squeeze(-1)
        weights = scores.softmax(dim=-1)
        context = torch.bmm(weights.unsqueeze(1), keys).squeeze(1)
        return context, weights


class Encoder(nn.Module):
    def __init__(self, vocab_size: int, embed_size: int, hidden_size: int, num_heads: int) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab_size, embed_size)
        self.rnn = nn.GRU(embed_size, hidden_size, batch_first=True, bidirectional=True)
        self.self_attn = nn.MultiheadAttention(2 * hidden_size, num_heads, batch_first=True)
        self.norm = nn.LayerNorm(2 * hidden_size)
        self.bridge = nn.Linear(2 * hidden_size, hidden_size)

    def forward(self, source: Tensor) -> tuple[Tensor, Tensor]:
        """Tokens ``(batch, T_in)`` -> annotations ``(batch, T_in, 2*hidden)``, state ``(batch, hidden)``."""
        annotations, last = self.rnn(self.embed(source))  # last: (directions, batch, hidden)
        mixed, _ = self.self_attn(annotations, annotations, annotations, need_weights=False)
        annotations = self.norm(annotations + mixed)
        state = torch.tanh(self.bridge(torch.cat([last[0], last[1]], dim=-1)))
        return annotations, state


class Decoder(nn.Module):
    def __init__(self, vocab_size: int, embed_size: int, hidden_size: int, key_size: int) -> None:
        super().__init__()
        self.bos = vocab_size  # one extra embedding row starts every output
        self.embed = nn.Embedding(vocab_size + 1, embed_size)
        self.attn = AdditiveAttention(hidden_size, key_size, hidden_size)
        self.cell = nn.GRUCell(embed_size + key_size, hidden_size)
        self.out = nn.Linear(hidden_size + key_size, vocab_size)

    def step(self, token: Tensor, state: Tensor, keys: Tensor) -> tuple[Tensor, Tensor]:
        """One output step: previous ``token`` ``(batch,)`` -> logits ``(batch, vocab)``, new state."""
        context, _ = self.attn(state, keys)
        state = self.cell(torch.cat([self.embed(token), context], dim=-1), state)
        return self.out(torch.cat([state, context], dim=-1)), state

    def forward(self, target: Tensor, state: Tensor, keys: Tensor) -> Tensor:
        """Teacher forcing: logits ``(batch, T_out, vocab)``; step ``t`` is fed ``target[:, t-1]`` or BOS."""
        previous = torch.cat([torch.full_like(target[:, :1], self.bos), target[:, :-1]], dim=1)
        logits = []
        for t in range(target.shape[1]):
            step_logits, state = self.step(previous[:, t], state, keys)
            logits.append(step_logits)
        return torch.stack(logits, dim=1)

    @torch.no_grad()
    def generate(self, length: int, state: Tensor, keys: Tensor) -> Tensor:
        """Greedy decoding, each step fed its own previous prediction: ``(batch, length)`` tokens."""
        token = torch.full(state.shape[:1], self.bos, dtype=torch.long, device=state.device)
        tokens = []
        for _ in range(length):
            logits, state = self.step(token, state, keys)
            token = logits.argmax(dim=-1)
            tokens.append(token)
        return torch.stack(tokens, dim=1)


class Seq2Seq(pl.LightningModule):
    """GRU encoder-decoder with additive attention, trained with teacher forcing."""

    def __init__(
        self,
        vocab_size: int = 10,
        embed_size: int = 16,
        hidden_size: int = 48,
        num_heads: int = 2,
        lr: float = 3e-3,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.encoder = Encoder(vocab_size, embed_size, hidden_size, num_heads)
        self.decoder = Decoder(vocab_size, embed_size, hidden_size, key_size=2 * hidden_size)

    def forward(self, source: Tensor, target: Tensor) -> Tensor:
        keys, state = self.encoder(source)
        return self.decoder(target, state, keys)

    @torch.no_grad()
    def generate(self, source: Tensor) -> Tensor:
        keys, state = self.encoder(source)
        return self.decoder.generate(source.shape[1], state, keys)

    def _loss_and_accuracy(self, batch: Sequence[Tensor]) -> tuple[Tensor, Tensor]:
        source, target = batch
        logits = self(source, target)
        loss = F.cross_entropy(logits.flatten(0, 1), target.flatten())
        accuracy = (logits.argmax(dim=-1) == target).float().mean()
        return loss, accuracy

    def training_step(self, batch: Sequence[Tensor], batch_idx: int) -> Tensor:
        loss, accuracy = self._loss_and_accuracy(batch)
        self.log("train/loss", loss, batch_size=len(batch[0]))
        self.log("train/acc", accuracy, batch_size=len(batch[0]))
        return loss

    def validation_step(self, batch: Sequence[Tensor], batch_idx: int) -> None:
        loss, accuracy = self._loss_and_accuracy(batch)
        self.log("val/loss", loss, batch_size=len(batch[0]))
        self.log("val/acc", accuracy, batch_size=len(batch[0]), prog_bar=True)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=self.hparams.lr)


@dataclass(frozen=True)
class Config:
    seq_len: int = 10
    vocab_size: int = 10
    hidden_size: int = 48
    batch_size: int = 64
    train_batches: int = 100
    val_sequences: int = 512
    max_epochs: int = 8
    log_every_n_steps: int = 50


FAST = Config(
    seq_len=6,
    vocab_size=6,
    hidden_size=16,
    batch_size=32,
    train_batches=4,
    val_sequences=64,
    max_epochs=2,
    log_every_n_steps=4,
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
        "--num-threads",
        type=int,
        default=1,
        help="torch threads for the run (restored afterwards); models this small gain nothing from more, "
        "and extra threads slow them down many times over when the cores are busy",
    )
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict:
    """Train, then decode the validation set greedily.

    Returns:
        ``{"val_loss", "val_acc", "greedy_token_acc", "greedy_string_acc", "chance_acc", "log_dir",
        "seconds"}``; accuracies are fractions, ``val_acc`` is teacher-forced, ``log_dir`` the run's
        TensorBoard directory.
    """
    opts = parse_args(argv)
    cfg = FAST if opts.fast else Config()
    if opts.max_epochs is not None:
        cfg = replace(cfg, max_epochs=opts.max_epochs)
    alphabet = string.ascii_lowercase[: cfg.vocab_size]

    threads = torch.get_num_threads()
    torch.set_num_threads(opts.num_threads)
    try:
        start = time.perf_counter()
        pl.seed_everything(opts.seed)
        train = reversal_dataset(
            cfg.train_batches * cfg.batch_size,
            cfg.seq_len,
            cfg.vocab_size,
            torch.Generator().manual_seed(opts.seed),
        )
        val = reversal_dataset(
            cfg.val_sequences, cfg.seq_len, cfg.vocab_size, torch.Generator().manual_seed(VAL_SEED)
        )
        train_loader = DataLoader(train, batch_size=cfg.batch_size, shuffle=True, num_workers=0)
        val_loader = DataLoader(val, batch_size=cfg.batch_size, num_workers=0)

        model = Seq2Seq(vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size)
        viz = RNNViz(
            # output = (context, weights), weights (batch, T_in), one call per decoding step
            attention={"decoder.attn": lambda module, args, output: output[1]},
            # a row's source string and the string the decoder must write: the drawn row's (row 0) for the
            # pictures, and every row of the explorer's probe set
            labels=lambda batch, row=0: {
                "input": [alphabet[i] for i in batch[0][row].tolist()],
                "output": [alphabet[i] for i in batch[1][row].tolist()],
            },
        )
        logger = TensorBoardLogger(opts.save_dir, name="seq2seq_attention")
        trainer = pl.Trainer(
            max_epochs=cfg.max_epochs,
            logger=logger,
            callbacks=[viz],
            log_every_n_steps=cfg.log_every_n_steps,
            enable_checkpointing=False,  # this example is about the logs
            enable_progress_bar=not opts.fast,
            accelerator="cpu",
            devices=1,
        )
        trainer.fit(model, train_loader, val_loader)

        model.eval()
        source, target = val.tensors
        predicted = model.generate(source)
        result = {
            "val_loss": trainer.callback_metrics["val/loss"].item(),
            "val_acc": trainer.callback_metrics["val/acc"].item(),
            "greedy_token_acc": (predicted == target).float().mean().item(),
            "greedy_string_acc": (predicted == target).all(dim=1).float().mean().item(),
            "chance_acc": 1 / cfg.vocab_size,
            "log_dir": logger.log_dir,
            "seconds": time.perf_counter() - start,
        }
    finally:
        torch.set_num_threads(threads)

    def spell(tokens: Tensor) -> str:
        return "".join(alphabet[i] for i in tokens.tolist())

    print(
        f"\nReversing {cfg.seq_len} letters out of {cfg.vocab_size}, {cfg.max_epochs} epochs, "
        f"{result['seconds']:.0f} s.\n"
        f"  greedy decoding of the validation set: token accuracy {result['greedy_token_acc']:.3f} "
        f"(chance {result['chance_acc']:.3f}), whole strings right {result['greedy_string_acc']:.3f}\n"
        f"  e.g. {spell(source[0])} -> {spell(predicted[0])} (want {spell(target[0])})"
    )
    if opts.fast:
        print("  (--fast is a smoke run of the pipeline, far too short to learn the task.)")
    print(
        "  the decoder.attn maps sharpen into the anti-diagonal as the model learns; see them with\n"
        f"  tensorboard --logdir {opts.save_dir} --samples_per_plugin images=1000"
    )
    return result


if __name__ == "__main__":
    main()
