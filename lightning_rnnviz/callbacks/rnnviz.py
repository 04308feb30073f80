"""Lightning callbacks that record RNN/attention internals on logging steps and show them in TensorBoard."""

from __future__ import annotations

import time
import warnings
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Callback
from pytorch_lightning.loggers import TensorBoardLogger
from pytorch_lightning.utilities import rank_zero_info

from lightning_rnnviz import render
from lightning_rnnviz.callbacks._shared import one_thread, shared_recorder
from lightning_rnnviz.probe import AttentionRecord, Recording, RNNRecord, RNNVizWarning
from lightning_rnnviz.probe.probe import Extractor
from lightning_rnnviz.probe.targets import ATTENTION_TYPES, is_supported, resolve_targets
from lightning_rnnviz.sinks import FileSink, Sink, TensorBoardSink, safe_name
from lightning_rnnviz.sinks.background import BackgroundRenderer, InlineRenderer, Job

QUANTITIES = ("hidden", "gates", "grad_norm", "grad_decay", "attention")
RENDERERS = ("fast", "matplotlib")


def _is_attention(name: str, module: torch.nn.Module, extractors: set[str]) -> bool:
    return name in extractors or isinstance(module, ATTENTION_TYPES)


class RNNViz(Callback):
    r"""Show what happens inside a model's RNNs and attention while it trains, in TensorBoard.

    On the training batches Lightning logs on (``every_n_steps``, by default the Trainer's
    ``log_every_n_steps``) and on the very first batch, the callback records the batch's
    forward and backward with a :class:`~lightning_rnnviz.Probe`, then draws figures and writes
    scalars on the same step as the ``self.log`` scalars of that batch. On other batches it attaches
    no hook and does no work. Validation draws the same sample (the first batch of the first
    validation dataloader) at every validation run. Works on global rank zero only, with no collective.

    What it logs (``<m>`` is the module's name made safe, as in ``model.named_modules()``):

    ====================================  ====================================================================
    tag                                   content
    ====================================  ====================================================================
    ``rnnviz/hidden/<m>``                 image: units x time heatmap of one sample; histogram of ``h_t``
    ``rnnviz/hidden/<m>/<stat>``          ``mean_abs``, ``saturated`` (tanh-bounded states), ``step_change``
    ``rnnviz/gates/<m>``                  image: mean gate activation over time + per-unit saturation
    ``rnnviz/gates/<m>/<gate>``           histogram of that gate's activations
    ``rnnviz/gates/<m>/<stat>``           ``<gate>_mean``, ``<gate>_saturated_low``, ``<gate>_saturated_high``
    ``rnnviz/grad_norm/<m>``              image: ``||dL/dh_t||`` against ``t`` (log axis), this step
    ``rnnviz/grad_norm/<m>/<stat>``       ``first_norm``, ``last_norm``, ``log10_ratio``, ``decay_per_step``
    ``rnnviz/grad_decay/<m>``             image at each epoch end: one curve per epoch so far
    ``rnnviz/attention/<m>``              image: per-head maps, rows = query steps, columns = key steps
    ``rnnviz/attention/<m>/<stat>``       ``entropy/head<h>``, ``entropy_norm/head<h>``, ``focus/head<h>``
    ``rnnviz/val/<quantity>/<m>``         validation images (hidden, gates, attention) of the fixed sample
    ====================================  ====================================================================

    Statistics of multi-layer or bidirectional modules carry a suffix such as ``/layer1_reverse``.
    Without a ``TensorBoardLogger`` but with another logger, images go to
    ``<logger.log_dir>/rnnviz/<quantity>/<m>/step_<n>.png`` and scalars to ``logger.log_metrics``.

    Args:
        every_n_steps: record every ``n`` optimizer steps, with Lightning's rule (the batch where
            ``(batches_that_stepped + 1) % n == 0``); ``None`` follows ``trainer.log_every_n_steps``.
        modules: qualified names or fnmatch patterns of the modules to watch; ``None`` watches every
            supported module. Unknown names fail at fit start with the list of names that exist.
        attention: ``{name or pattern: fn(module, args, output) -> weights}`` for custom attention
            modules; weights ``(batch, [heads,] T_out, T_in)``, or ``(batch, T_in)`` per decoding step.
        labels: ``fn(batch) -> list[str]``: tokens of the drawn input sequence (batch row ``sample``) for
            the time axes of hidden-state figures and the key axis of attention maps (and the query
            axis of ``nn.MultiheadAttention`` self-attention of the same length); or ``fn(batch) ->
            {"input": [...], "output": [...]}`` to label a decoder's query (output) axis too.
        sample: which sequence of the batch the figures draw.
        max_samples: how many sequences of the batch are recorded and replayed (cost control); the
            statistics average over them. ``None`` records the whole batch.
        top_k: most units per layer shown in hidden-state heatmaps (by variance over time).
        max_heads: most attention heads drawn.
        max_time: most time columns in a figure; longer sequences are averaged in bins.
        histograms: write activation histograms (TensorBoard's distributions view).
        renderer: ``"fast"`` paints the pictures with numpy and Pillow (3-30 ms each);
            ``"matplotlib"`` draws matplotlib figures (0.16-1 s of CPU each, in a child process by default).
        background: draw figures in a low-priority child process, so the training thread only hands
            over small already-reduced arrays; ``False`` draws on the training thread. ``None`` (default)
            picks the training thread for ``"fast"`` and the child process for ``"matplotlib"``.
        validation: draw the fixed validation sample at each validation run.
        log_first_step: also record the very first training batch, for instant feedback.
        strict: re-raise errors of capture and rendering instead of warning once (for tests).

    Raises:
        ValueError: an argument is out of range (the message names it and the fix).

    Example::

        >>> import pytorch_lightning as pl
        >>> from lightning_rnnviz import RNNViz
        >>> trainer = pl.Trainer(callbacks=[RNNViz()], logger=False, enable_progress_bar=False)
    """

    quantities: tuple[str, ...] = QUANTITIES

    def __init__(
        self,
        every_n_steps: int | None = None,
        modules: Sequence[str] | None = None,
        attention: Mapping[str, Extractor] | None = None,
        labels: Callable[[Any], Sequence[str]] | None = None,
        *,
        sample: int = 0,
        max_samples: int | None = 16,
        top_k: int = 64,
        max_heads: int = 8,
        max_time: int = 256,
        histograms: bool = True,
        renderer: str = "fast",
        background: bool | None = None,
        validation: bool = True,
        log_first_step: bool = True,
        strict: bool = False,
    ) -> None:
        if every_n_steps is not None and (isinstance(every_n_steps, bool) or not isinstance(every_n_steps, int)
                                          or every_n_steps <= 0):
            raise ValueError(
                f"`every_n_steps` must be a positive int or None (follow `log_every_n_steps`), got {every_n_steps!r}."
            )
        for arg, value in (("top_k", top_k), ("max_heads", max_heads), ("max_time", max_time)):
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"`{arg}` must be a positive int, got {value!r}.")
        if max_samples is not None and (isinstance(max_samples, bool) or not isinstance(max_samples, int)
                                        or max_samples <= 0):
            raise ValueError(f"`max_samples` must be a positive int or None (whole batch), got {max_samples!r}.")
        if isinstance(sample, bool) or not isinstance(sample, int) or sample < 0:
            raise ValueError(f"`sample` must be a non-negative int, got {sample!r}.")
        if max_samples is not None and sample >= max_samples:
            raise ValueError(
                f"`sample={sample}` is not among the `max_samples={max_samples}` recorded sequences; "
                f"raise `max_samples` above {sample} or pick a smaller `sample`."
            )
        if renderer not in RENDERERS:
            raise ValueError(f"`renderer` must be one of {RENDERERS}, got {renderer!r}.")
        if background is not None and not isinstance(background, bool):
            raise ValueError(f"`background` must be True, False or None (automatic), got {background!r}.")
        if isinstance(modules, str):
            modules = [modules]
        if labels is not None and not callable(labels):
            raise ValueError(f"`labels` must be a function `batch -> list[str]`, got {type(labels).__name__}.")
        self.every_n_steps = every_n_steps
        self.modules = list(modules) if modules is not None else None
        self.attention = dict(attention) if attention else None
        self.labels = labels
        self.sample = sample
        self.max_samples = max_samples
        self.top_k = top_k
        self.max_heads = max_heads
        self.max_time = max_time
        self.histograms = histograms
        self.renderer = renderer
        self.background = renderer == "matplotlib" if background is None else background
        self.validation = validation
        self.log_first_step = log_first_step
        self.strict = strict
        self.decay_history: dict[str, dict[int, torch.Tensor]] = {}
        self.error_counts: Counter[str] = Counter()
        # Runtime state, created in `on_fit_start` (the callback must pickle for ddp_spawn).
        self.enabled = False
        self._names: set[str] = set()
        self._sink: Sink | None = None
        self._image_spec: tuple[str, str] | None = None
        self._recorder: Any = None
        self.drawer_peak_rss_mb: float | None = None
        self._epoch_sums: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self._layer_labels: dict[str, list[str]] = {}  # module -> "layer 0", "layer 0 reverse", ...
        self._warned: set[str] = set()

    # --- identity and state ----------------------------------------------------------------------
    @property
    def state_key(self) -> str:
        return self._generate_state_key(
            quantities=self.quantities,
            every_n_steps=self.every_n_steps,
            modules=self.modules,
            attention=sorted(self.attention or {}),
        )

    def state_dict(self) -> dict[str, Any]:
        return {"decay_history": {m: dict(h) for m, h in self.decay_history.items()}}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.decay_history = {m: dict(h) for m, h in state_dict.get("decay_history", {}).items()}

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_sink"] = None  # a writer belongs to one process
        state["_recorder"] = None
        return state

    # --- fit start and end -------------------------------------------------------------------------
    def _relevant(self, name: str, module: torch.nn.Module, extractors: set[str]) -> bool:
        attention = _is_attention(name, module, extractors)
        wants_attention = "attention" in self.quantities
        wants_rnn = any(q != "attention" for q in self.quantities)
        return (attention and wants_attention) or (not attention and wants_rnn and is_supported(module))

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.enabled = False
        if not trainer.is_global_zero:
            return
        try:
            targets, extractors = resolve_targets(pl_module, self.modules, self.attention)
        except ValueError as error:
            if self.modules is not None or self.attention:
                raise
            self._disable(f"{error} {type(self).__name__} does nothing in this run.")
            return
        self._names = {n for n, m in targets.items() if self._relevant(n, m, set(extractors))}
        if not self._names:
            self._disable(
                f"{type(self).__name__} found no module to watch for {', '.join(self.quantities)} "
                "(e.g. `AttentionMonitor` on a model without attention); it does nothing in this run."
            )
            return
        self._sink, self._image_spec = self._make_sink(trainer)
        if self._sink is None:
            why = "`fast_dev_run` replaces the loggers" if trainer.fast_dev_run else "the Trainer has no logger"
            self._disable(
                f"{type(self).__name__} has nowhere to write: {why}. Pass "
                "`logger=TensorBoardLogger(...)` (or any logger with a `log_dir`) to see its figures; "
                "it does nothing in this run."
            )
            return
        self.enabled = True
        recorder = self._recorder = shared_recorder(trainer)
        recorder.members = [m for m in recorder.members if m is not self] + [self]
        recorder.probe = None  # rebuilt for the current members
        if recorder.renderer is None:
            recorder.renderer = (
                BackgroundRenderer(self._image_spec) if self.background else InlineRenderer(self._sink)
            )
        if isinstance(self._sink, TensorBoardSink):
            rank_zero_info(
                "lightning_rnnviz: TensorBoard keeps 10 images per tag by default; to see every recorded "
                "step run `tensorboard --logdir <dir> --samples_per_plugin images=100`."
            )

    def _disable(self, message: str) -> None:
        self.enabled = False
        warnings.warn(message, RNNVizWarning, stacklevel=3)

    def _make_sink(self, trainer: pl.Trainer) -> tuple[Sink | None, tuple[str, str] | None]:
        """The sink for scalars and histograms, and where images go (``(kind, folder)``)."""
        for logger in trainer.loggers:
            if isinstance(logger, TensorBoardLogger):
                writer = logger.experiment
                return TensorBoardSink(writer, histograms=self.histograms), ("tensorboard", writer.get_logdir())
        for logger in trainer.loggers:
            # A logger's own log_dir, never trainer.log_dir: that one is a collective.
            log_dir = getattr(logger, "log_dir", None) or getattr(logger, "save_dir", None)
            if log_dir:
                root = Path(log_dir) / "rnnviz"
                sink = FileSink(root, lambda m, s, lg=logger: lg.log_metrics(m, step=s))
                return sink, ("files", str(root))
        return None, None

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._shutdown(trainer)

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._shutdown(trainer)

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._shutdown(trainer)

    def _shutdown(self, trainer: pl.Trainer) -> None:
        recorder = shared_recorder(trainer)
        recorder.abort()
        recorder.members = [m for m in recorder.members if m is not self]
        recorder.probe = None
        if not recorder.members:
            recorder.written.clear()
        if not recorder.members and recorder.renderer is not None:
            renderer, recorder.renderer = recorder.renderer, None
            # Let the drawing process finish what it was handed, then stop it.
            self._guard("stop the drawing process", renderer.close)
            self._report_render_errors(renderer)
            if renderer.dropped:
                warnings.warn(
                    f"{type(self).__name__}: the drawing process fell behind and {renderer.dropped} figures were "
                    "dropped (oldest first). Record less often (`every_n_steps`), watch fewer `modules`, or "
                    "draw on the training thread with `background=False`.",
                    RNNVizWarning,
                    stacklevel=3,
                )
            self.drawer_peak_rss_mb = getattr(renderer, "peak_rss_mb", None)
        if self._sink is not None:
            self._guard("flush", lambda: self._sink.flush())
            self._sink.close()
        self._sink = None
        self.enabled = False

    def _report_render_errors(self, renderer: BackgroundRenderer | InlineRenderer) -> None:
        for line in renderer.errors():
            self._guard("draw a figure", lambda msg=line: (_ for _ in ()).throw(RuntimeError(msg)))

    # --- training ----------------------------------------------------------------------------------
    def _wants(self, trainer: pl.Trainer, batch_idx: int) -> bool:
        if not self.enabled:
            return False
        loop = trainer.fit_loop.epoch_loop
        if trainer.lightning_module.automatic_optimization and loop._should_accumulate():
            return False  # Lightning logs on the last micro-batch of an accumulation window
        if self.log_first_step and loop._batches_that_stepped == 0 and trainer.current_epoch == 0:
            return True
        n = self.every_n_steps or trainer.log_every_n_steps
        return n > 0 and (loop._batches_that_stepped + 1) % n == 0

    @staticmethod
    def _batch_key(trainer: pl.Trainer) -> tuple[str, int]:
        return ("train", trainer.fit_loop.epoch_loop.batch_progress.total.ready)

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        if not self.enabled:
            return
        recorder = shared_recorder(trainer)
        wanting = [m for m in recorder.members if m._wants(trainer, batch_idx)]
        self._guard("record", lambda: recorder.begin(self._batch_key(trainer), pl_module, wanting))

    def on_after_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        recorder = self._recorder if self.enabled else None
        if recorder is not None and recorder.is_open:
            # The scale the loss was multiplied by for this backward (read before `scaler.update()`).
            recorder.amp_scale = self._amp_scale(trainer)

    @staticmethod
    def _amp_scale(trainer: pl.Trainer) -> float | None:
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        if scaler is None or not scaler.is_enabled():
            return None
        return float(scaler.get_scale())

    def _grad_scale(self, trainer: pl.Trainer) -> float | None:
        """What the loss behind the recorded gradients was multiplied by, relative to the batch's loss."""
        recorder = shared_recorder(trainer)
        scale = recorder.amp_scale or 1.0
        if trainer.lightning_module.automatic_optimization:
            scale /= trainer.accumulate_grad_batches
        return None if scale == 1.0 else scale

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if not self.enabled:
            return
        recorder = shared_recorder(trainer)
        recording, wanting = recorder.end(self._batch_key(trainer), self._grad_scale(trainer))
        recorder.amp_scale = None
        if recording is None or self not in wanting:
            return
        started = time.perf_counter()
        step = trainer.fit_loop.epoch_loop._batches_that_stepped
        self._emit(recording, batch, step, prefix="rnnviz", training=True)
        recorder.spent_s += time.perf_counter() - started
        if self is wanting[-1]:  # the last monitor of this batch reports what the batch cost
            self._report_render_errors(recorder.renderer)
            render_s, write_s = recorder.drawing_since_begin()
            self._guard("overhead statistics", lambda: self._sink.scalars({
                "rnnviz/overhead/train_thread_ms": 1e3 * recorder.spent_s,
                "rnnviz/overhead/replay_ms": 1e3 * recorder.replay_s,
                "rnnviz/overhead/render_ms": 1e3 * render_s,
                "rnnviz/overhead/write_ms": 1e3 * write_s,
                "rnnviz/overhead/dropped_figures": float(recorder.renderer.dropped),
            }, step))

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self.enabled or "grad_decay" not in self.quantities:
            return
        epoch = trainer.current_epoch
        step = trainer.fit_loop.epoch_loop._batches_that_stepped
        for name, (total, count) in self._epoch_sums.items():
            self.decay_history.setdefault(name, {})[epoch] = total / count
        updated, self._epoch_sums = set(self._epoch_sums), {}
        started = time.perf_counter()
        drawn = False
        # Redraw only what this epoch added to: an epoch without a recording changes no picture.
        for name, history in self.decay_history.items():
            if name not in self._names or name not in updated:
                continue
            rows = next(iter(history.values())).shape[0]
            labels = self._layer_labels.get(name) or [f"row {i}" for i in range(rows)]
            payload = {"history": {e: h.numpy() for e, h in history.items()}, "name": name, "layer_labels": labels}
            with one_thread():
                self._figure("grad_decay", name, step, "rnnviz", lambda p=payload: p)
            drawn = True
        if drawn:
            spent_ms = 1e3 * (time.perf_counter() - started)
            self._guard("overhead statistics",
                        lambda: self._sink.scalars({"rnnviz/overhead/epoch_end_ms": spent_ms}, step))
        self._guard("flush", lambda: self._sink.flush())

    # --- validation --------------------------------------------------------------------------------
    def _wants_val(self, trainer: pl.Trainer, batch_idx: int, dataloader_idx: int) -> bool:
        return (self.enabled and self.validation and not trainer.sanity_checking
                and batch_idx == 0 and dataloader_idx == 0)

    def _val_key(self, trainer: pl.Trainer) -> tuple[str, int, int]:
        return ("val", trainer.fit_loop.epoch_loop._batches_that_stepped, trainer.fit_loop.epoch_loop.batch_progress.total.ready)

    def on_validation_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        if not self._wants_val(trainer, batch_idx, dataloader_idx):
            return
        recorder = shared_recorder(trainer)
        wanting = [m for m in recorder.members if m._wants_val(trainer, batch_idx, dataloader_idx)]
        self._guard("record", lambda: recorder.begin(self._val_key(trainer), pl_module, wanting))

    def on_validation_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        if not self._wants_val(trainer, batch_idx, dataloader_idx):
            return
        recording, wanting = shared_recorder(trainer).end(self._val_key(trainer), None)
        if recording is not None and self in wanting:
            step = trainer.fit_loop.epoch_loop._batches_that_stepped
            self._emit(recording, batch, step, prefix="rnnviz/val", training=False)

    # --- drawing and writing -----------------------------------------------------------------------
    def _tokens(self, batch: Any) -> dict[str, list[str]] | None:
        if self.labels is None:
            return None
        tokens = self.labels(batch)
        if isinstance(tokens, Mapping):
            unknown = set(tokens) - {"input", "output"}
            if unknown:
                raise ValueError(f"`labels(batch)` may return keys 'input' and 'output', got {sorted(unknown)}.")
            return {k: self._token_list(v) for k, v in tokens.items()}
        return {"input": self._token_list(tokens)}

    @staticmethod
    def _token_list(tokens: Any) -> list[str]:
        if isinstance(tokens, str) or not isinstance(tokens, Sequence):
            raise ValueError(f"`labels(batch)` must return a list of str, got {type(tokens).__name__}.")
        return [str(t) for t in tokens]

    def _emit(self, recording: Recording, batch: Any, step: int, prefix: str, training: bool) -> None:
        with one_thread():
            self._emit_records(recording, batch, step, prefix, training)

    def _emit_records(self, recording: Recording, batch: Any, step: int, prefix: str, training: bool) -> None:
        mine = {n: r for n, r in recording.items() if n in self._names}
        self._guard("draw the chosen `sample`", lambda: self._check_sample(mine))
        tokens: dict[str, list[str]] | None = None
        if self.labels is not None:
            tokens = self._guard("use the `labels` tokens", lambda: self._checked_tokens(batch, mine))
        self._warn_nonfinite(mine, step)
        for name, record in mine.items():
            if isinstance(record, RNNRecord):
                self._emit_rnn(name, record, step, prefix, training, tokens)
            elif isinstance(record, AttentionRecord) and "attention" in self.quantities:
                self._emit_attention(name, record, step, prefix, training, tokens)
        self._guard("flush", lambda: self._sink.flush())

    def _warn_nonfinite(self, records: Mapping[str, Any], step: int) -> None:
        """One warning per run when a recording holds NaN/Inf (the figures mark them at every step)."""
        if "nonfinite" in self._warned:
            return
        for name, record in records.items():
            fields = ("hidden", "hidden_grad", "cell", "cell_grad") if isinstance(record, RNNRecord) else ("attention",)
            # A finite sum means finite values (one pass, no mask); only a non-finite sum needs the real check.
            bad = [f for f in fields if getattr(record, f) is not None and not bool(getattr(record, f).sum().isfinite())
                   and not bool(torch.isfinite(getattr(record, f)).all())]
            if bad:
                self._warned.add("nonfinite")
                warnings.warn(
                    f"{type(self).__name__}: NaN/Inf in {', '.join(bad)} of {name!r} at step {step}. Training goes "
                    "on; the figures mark non-finite values (this warning is shown once).",
                    RNNVizWarning,
                    stacklevel=3,
                )
                return

    def _check_sample(self, records: Mapping[str, Any]) -> None:
        for name, record in records.items():
            batch = record.batch if isinstance(record, RNNRecord) else record.attention.shape[0]
            if self.sample >= batch:
                raise ValueError(
                    f"`sample={self.sample}` is past the {batch} recorded sequences of {name!r}; the last one is "
                    f"drawn instead. Pick `sample` below {batch}."
                )

    def _checked_tokens(self, batch: Any, records: Mapping[str, Any]) -> dict[str, list[str]] | None:
        """``labels(batch)``, checked against the time axes of this recording: each token list must fit
        at least one of them; figures then use it wherever its length matches."""
        tokens = self._tokens(batch)
        lengths: set[int] = set()
        for record in records.values():
            if isinstance(record, RNNRecord):
                lengths.add(int(record.lengths[min(self.sample, record.batch - 1)]))
            else:
                sample = min(self.sample, record.attention.shape[0] - 1)
                queries, keys = record.attention.shape[-2:]
                lengths.update((queries, int(record.key_lengths[sample]) if record.key_lengths is not None else keys))
        for axis, values in (tokens or {}).items():
            if len(values) not in lengths:
                raise ValueError(
                    f"`labels(batch)` returned {len(values)} {axis} tokens but the recorded sequences have "
                    f"{', '.join(str(n) for n in sorted(lengths))} steps; return one token per time step of "
                    f"batch row `sample={self.sample}`."
                )
        return tokens

    @staticmethod
    def _fitting(tokens: list[str] | None, length: int) -> list[str] | None:
        return tokens if tokens is not None and len(tokens) == length else None

    def _emit_rnn(self, name: str, record: RNNRecord, step: int, prefix: str, training: bool,
                  tokens: dict[str, list[str]] | None) -> None:
        sample = min(self.sample, record.batch - 1)
        self._layer_labels[name] = [record.layer_label(i) for i in range(record.hidden.shape[0])]
        if "hidden" in self.quantities:
            length = int(record.lengths[sample])
            labels = self._fitting(tokens.get("input") if tokens else None, length)
            self._figure("hidden", name, step, prefix,
                         lambda: render.reduce_hidden(record, sample, self.top_k, self.max_time, labels))
            if training:
                self._stats("hidden", name, step, lambda: render.hidden_stats(record))
            self._histogram(f"{prefix}/hidden/{safe_name(name)}", step, lambda: _valid_values(record, record.hidden))
        if "gates" in self.quantities and record.gates:
            self._figure("gates", name, step, prefix, lambda: render.reduce_gates(record, self.max_time))
            if training:
                self._stats("gates", name, step, lambda: render.gate_stats(record))
            for gate, values in record.gates.items():
                self._histogram(f"{prefix}/gates/{safe_name(name)}/{gate}", step,
                                lambda v=values: _valid_values(record, v))
        if training and "grad_norm" in self.quantities and record.hidden_grad is not None:
            self._figure("grad_norm", name, step, prefix, lambda: render.reduce_grad_norm(record))
            self._stats("grad_norm", name, step, lambda: render.grad_stats(record))
        if training and "grad_decay" in self.quantities and record.hidden_grad is not None:
            self._accumulate_decay(name, record)

    def _emit_attention(self, name: str, record: AttentionRecord, step: int, prefix: str, training: bool,
                        tokens: dict[str, list[str]] | None) -> None:
        sample = min(self.sample, record.attention.shape[0] - 1)
        queries, keys = record.attention.shape[-2:]
        if record.key_lengths is not None:
            keys = int(record.key_lengths[sample])
        key_labels = query_labels = None
        if tokens:
            key_labels = self._fitting(tokens.get("input"), keys)
            query_labels = self._fitting(tokens.get("output"), queries)
            if "output" not in tokens and record.kind == "MultiheadAttention" and queries == keys:
                query_labels = key_labels  # self-attention over one sequence
        self._figure("attention", name, step, prefix, lambda: render.reduce_attention(
            record, sample, self.max_heads, query_labels, key_labels, self.max_time))
        if training:
            self._stats("attention", name, step, lambda: render.attention_stats(record))

    def _accumulate_decay(self, name: str, record: RNNRecord) -> None:
        norm = record.grad_norm  # (rows, T)
        finite = torch.isfinite(norm)
        values = torch.where(finite, norm, torch.zeros_like(norm)).double()
        total, count = self._epoch_sums.get(name, (values.new_zeros(0), values.new_zeros(0)))
        steps = max(total.shape[-1] if total.numel() else 0, values.shape[-1])
        total = _pad_to(total, values.shape[0], steps)
        count = _pad_to(count, values.shape[0], steps)
        total[:, : values.shape[-1]] += values
        count[:, : values.shape[-1]] += finite.double()
        self._epoch_sums[name] = (total, count)

    def _figure(self, quantity: str, name: str, step: int, prefix: str, reduce: Callable[[], Any]) -> None:
        """Reduce on this thread (milliseconds), draw and write wherever the renderer does."""
        tag = f"{prefix}/{quantity}/{safe_name(name)}"
        if (tag, step) in self._recorder.written:
            return  # another monitor on this Trainer drew this picture for this step already
        self._recorder.written.add((tag, step))

        def work() -> None:
            payload = reduce()
            if payload is not None:
                self._renderer.submit(Job(quantity, payload, tag, step, self.renderer))

        self._guard(f"draw {quantity} of {name!r}", work)

    @property
    def _renderer(self) -> BackgroundRenderer | InlineRenderer:
        return self._recorder.renderer

    def _stats(self, quantity: str, name: str, step: int, compute: Callable[[], Mapping[str, float]]) -> None:
        base = f"rnnviz/{quantity}/{safe_name(name)}"
        self._guard(f"{quantity} statistics of {name!r}",
                    lambda: self._sink.scalars({f"{base}/{k}": float(v) for k, v in compute().items()}, step))

    def _histogram(self, tag: str, step: int, values: Callable[[], np.ndarray]) -> None:
        self._guard(f"histogram {tag!r}", lambda: self._sink.histogram(tag, values, step))

    def _guard(self, what: str, fn: Callable[[], Any]) -> Any:
        """Run ``fn``; an error is warned once per ``what``, counted, and never reaches training."""
        try:
            return fn()
        except Exception as error:  # noqa: BLE001 - the run must not die for a picture
            if self.strict:
                raise
            self._problem(what, error)
            return None

    def _problem(self, what: str, error: BaseException | str) -> None:
        self.error_counts[what] += 1
        if what not in self._warned:
            self._warned.add(what)
            detail = error if isinstance(error, str) else f"{type(error).__name__}: {error}"
            warnings.warn(
                f"{type(self).__name__} could not {what} ({detail}); skipped, training goes on. Further "
                "errors are counted in `error_counts`.",
                RNNVizWarning,
                stacklevel=3,
            )

    def _report_render_errors(self, renderer: BackgroundRenderer | InlineRenderer) -> None:
        """Errors the drawing process reported: warned once, counted; raised with ``strict``."""
        for line in renderer.errors():
            if self.strict:
                raise RuntimeError(f"drawing process: {line}")
            self._problem("draw a figure", line)


def _valid_values(record: RNNRecord, values: torch.Tensor) -> np.ndarray:
    """The entries of ``values`` ``(rows, batch, time, units)`` at valid steps, flattened."""
    if record.all_valid:
        return values.reshape(-1).numpy()  # no padding: a view, no copy
    return values[:, record.valid_mask()].flatten().numpy()


def _pad_to(t: torch.Tensor, rows: int, steps: int) -> torch.Tensor:
    out = torch.zeros(rows, steps, dtype=torch.float64)
    if t.numel():
        out[:, : t.shape[-1]] = t
    return out


class HiddenStateMonitor(RNNViz):
    """Hidden-state heatmaps, statistics and histograms only; options as :class:`RNNViz`."""

    quantities = ("hidden",)


class GateActivationMonitor(RNNViz):
    """LSTM/GRU gate activations and saturation only; options as :class:`RNNViz`."""

    quantities = ("gates",)


class GradientNormMonitor(RNNViz):
    """Per-step ``||dL/dh_t||`` and its decay across epochs only; options as :class:`RNNViz`."""

    quantities = ("grad_norm", "grad_decay")


class AttentionMonitor(RNNViz):
    """Per-head attention maps and their entropy and focus only; options as :class:`RNNViz`."""

    quantities = ("attention",)
