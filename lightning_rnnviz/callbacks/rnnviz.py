"""Lightning callbacks that record RNN/attention internals on logging steps and show them in the loggers.

This is the thin Lightning adapter: when to record (cadence, accumulation, validation), which namespace and
which loggers. What a recording becomes is :class:`lightning_rnnviz.render.report.Reporter`'s business, and
each logger's API is a sink's (:mod:`lightning_rnnviz.sinks`).
"""

from __future__ import annotations

import copy
import functools
import inspect
import math
import statistics
import time
from collections import Counter
from collections.abc import Callable, Collection, Mapping, Sequence
from typing import Any, Literal

import torch

from lightning_rnnviz.callbacks._copies import Results, SharedResult, check_saveable
from lightning_rnnviz.callbacks._lightning import CALLBACK_BASES, info
from lightning_rnnviz.callbacks._loggers import SUPPORTED, logger_kind, sink_for
from lightning_rnnviz.pipeline.drawing import spare_cores
from lightning_rnnviz.pipeline.recorder import Recorder, recorder_of
from lightning_rnnviz.pipeline.records import RecordKeeper
from lightning_rnnviz.pipeline.worker import Delivery, Report, one_thread
from lightning_rnnviz.probe import Recording, RNNVizWarning
from lightning_rnnviz.probe.held import locator
from lightning_rnnviz.probe.probe import Extractor
from lightning_rnnviz.probe.targets import ATTENTION_TYPES, is_supported, resolve_targets
from lightning_rnnviz.render.findings import Finding
from lightning_rnnviz.render.jobs import RENDERERS
from lightning_rnnviz.render.report import QUANTITIES, SCALARS, Guard, Reporter, scalar_layout


def _is_attention(name: str, module: torch.nn.Module, extractors: set[str]) -> bool:
    return name in extractors or isinstance(module, ATTENTION_TYPES)


def _loader_workers(trainer: Any) -> int:
    """Worker processes of the training data loaders (each keeps a core busy while it loads): one loader,
    or a list, tuple, dict or Lightning ``CombinedLoader`` of them."""
    found = trainer.train_dataloader
    loaders = getattr(found, "flattened", None)
    if loaders is None:
        loaders = list(found.values()) if isinstance(found, Mapping) else (
            list(found) if isinstance(found, (list, tuple)) else [found])
    return sum(int(getattr(loader, "num_workers", 0) or 0) for loader in loaders)


def _library(module: Any) -> str | None:
    """The forecasting library whose LightningModule ``module`` is (its class or a base defined there), read
    from the classes' modules: the library is not imported for it."""
    for cls in type(module).__mro__:
        root = (getattr(cls, "__module__", None) or "").partition(".")[0]
        if root in ("darts", "neuralforecast", "pytorch_forecasting"):
            return root
    return None


def _logger_hint(module: Any) -> str:
    """How to give the Trainer a logger, the way of the library that made it."""
    library = _library(module)
    if library == "darts":
        return ("darts trains without a logger by default: pass `log_tensorboard=True` to the model (e.g. "
                "`RNNModel(..., log_tensorboard=True)`, logs under its `work_dir`), or a logger in "
                "`pl_trainer_kwargs={\"logger\": TensorBoardLogger(...)}`, to see its figures.")
    if library == "neuralforecast":
        return ("With neuralforecast, pass a logger to the model, which hands it to the Trainer (e.g. "
                "`LSTM(..., logger=TensorBoardLogger(...))`), to see its figures.")
    return "Pass `logger=TensorBoardLogger(...)` (or any logger with a `log_dir`) to see its figures."


class RNNViz(*CALLBACK_BASES):
    r"""Show what happens inside a model's RNNs and attention while it trains, in TensorBoard, W&B or MLflow.

    On the training batches Lightning logs on (``every_n_steps``, by default the Trainer's
    ``log_every_n_steps``) and on the very first batch, the callback records the batch's
    forward and backward with a :class:`~lightning_rnnviz.Probe`, then draws figures and writes
    scalars on the same step as the ``self.log`` scalars of that batch. On other batches it attaches
    no hook and does no work. Validation draws the same sample (the first batch of the first
    validation dataloader) at every validation run. Works on global rank zero only, with no collective,
    with ``lightning.pytorch`` and ``pytorch_lightning`` alike (it subclasses the ``Callback`` of both).

    What it logs (``<m>`` is the module's name made safe, as in ``model.named_modules()``; the scalars
    marked *all* only with ``scalars="all"``):

    ====================================  ====================================================================
    tag                                   content
    ====================================  ====================================================================
    ``rnnviz/hidden/<m>``                 image: units x time heatmap of one sample
    ``rnnviz/hidden_dist/<m>``            histogram of ``h_t``
    ``rnnviz/hidden/<m>/<stat>``          ``mean_abs``; *all*: ``saturated`` (tanh-bounded states),
                                          ``step_change``
    ``rnnviz/gates/<m>``                  image: mean gate activation over time + units held closed or open
    ``rnnviz/gates_dist/<m>/<gate>``      histogram of that gate's activations
    ``rnnviz/gates/<m>/<stat>``           ``<gate>_mean``; *all*: ``<gate>_saturated_low``,
                                          ``<gate>_saturated_high``
    ``rnnviz/grad_norm/<m>``              image: ``||dL/dh_t||`` against ``t`` (log axis), this step
    ``rnnviz/grad_norm/<m>/<stat>``       ``first_norm``, ``last_norm``, ``log10_ratio``, ``horizon`` (steps
                                          back with ``||dL/dh_t||`` >= 1% of its peak); *all*:
                                          ``decay_per_step``
    ``rnnviz/<quantity>/<m>/exact``       *all*: 1 for a record verified exact, 0 for an approximate one
                                          (by default the pictures' titles and ``summary.json`` say so)
    ``rnnviz/overhead/<what>``            *all*: what each recording cost (``train_thread_ms``,
                                          ``replay_ms``, ``render_ms``, ``write_ms``, ...), ``every_n_steps``
    ``rnnviz/grad_decay/<m>``             image at each epoch end: one curve per epoch so far
    ``rnnviz/findings``                   text at each epoch end: the epoch's findings (see ``findings``)
    ``rnnviz/attention/<m>``              image: per-head maps, rows = query steps, columns = key steps
    ``rnnviz/attention/<m>/<stat>``       ``entropy_norm/head<h>``; *all*: ``entropy/head<h>``,
                                          ``focus/head<h>``
    ``rnnviz/val/<quantity>/<m>``         validation images (hidden, gates, attention) of the fixed sample
    ``rnnviz/probe_set/train``, ``/val``  TensorBoard only: the explorer's data of each training and
                                          validation recording, a probe set (see ``probe_set``)
    ====================================  ====================================================================

    Statistics of multi-layer or bidirectional modules carry a suffix such as ``/layer1_reverse``. Every
    statistic is computed either way: the findings, ``summary.json`` and ``compare`` use them all.
    Every logger of the Trainer gets every picture and scalar (each picture is drawn once): a
    ``TensorBoardLogger`` in a run of our own, ``<log_dir>/rnnviz``, shown by TensorBoard beside the
    logger's run (with a Custom Scalars layout per module); a ``WandbLogger`` in its media panel and
    charts; an ``MLFlowLogger`` as images and metrics; any other logger with a local ``log_dir`` as
    ``<log_dir>/rnnviz/<quantity>/<m>/step_<n>.png`` files, with scalars through ``logger.log_metrics``.

    A pickle of the callback holds its constructor arguments only (what it found stays with the object, and
    in Lightning checkpoints through ``state_dict``), so a restricted loader needs only the class allow-listed
    (darts: ``darts.utils.serialization.add_safe_globals([RNNViz])``; ``torch.load(weights_only=True)``:
    ``torch.serialization.add_safe_globals([RNNViz])``); functions passed to it must be importable by name.
    A copy (``copy.deepcopy``, as neuralforecast makes of its models) has the same arguments and reports to
    the original: ``findings``, ``decay_history``, ``error_counts``, ``placement``, ``cadence``, ... of the
    object the user holds show what the copy did.

    Args:
        every_n_steps: record every ``n`` optimizer steps, with Lightning's rule (the batch where
            ``(batches_that_stepped + 1) % n == 0``); ``None`` follows ``trainer.log_every_n_steps``.
        modules: qualified names or fnmatch patterns of the modules to watch; ``None`` watches every
            supported module. Unknown names fail at fit start with the list of names that exist.
        attention: ``{name or pattern: fn(module, args, output) -> weights}`` for custom attention
            modules; weights ``(batch, [heads,] T_out, T_in)``, or ``(batch, T_in)`` per decoding step.
        labels: ``fn(batch) -> list[str]``: tokens of the drawn input sequence (batch row ``sample``), on
            every axis of that length; or ``fn(batch) -> {"input": [...], "output": [...]}`` for an
            encoder-decoder: each module's axes get the tokens of the sequence they run over (the input's
            on an encoder's time axis and both axes of its self-attention, the output's on a decoder's time
            axis and both axes of its self-attention, cross-attention's queries the output's and keys the
            input's; :mod:`lightning_rnnviz.render.labels` tells how each role is recognised). Add
            ``"modules": {name: "input" | "output" | [tokens] | None | {"query": ..., "key": ...}}`` to
            choose a module's tokens where the guess is wrong. A ``labels`` that also accepts a row,
            ``fn(batch, row)``, gives the probe set every sequence's tokens (see ``probe_set``).
        sample: which sequence of the batch the figures draw.
        max_samples: how many sequences of the batch are recorded and replayed (cost control); the
            statistics average over them. ``None`` records the whole batch.
        top_k: most units per layer shown in hidden-state heatmaps (by variance over time).
        max_heads: most attention heads drawn.
        max_time: most time columns in a figure; longer sequences are averaged in bins.
        histograms: write activation histograms (TensorBoard's distributions view).
        renderer: ``"fast"`` paints the pictures with numpy and Pillow (3-30 ms each);
            ``"matplotlib"`` draws matplotlib figures (0.16-1 s of CPU each, in a child process by default).
        background: ``"thread"`` finishes each recording on the recording worker, a thread beside
            training (:mod:`lightning_rnnviz.pipeline`: the training thread keeps the capture and a
            hand-off); ``False`` on the training thread; ``True`` draws figures in a low-priority child
            process. ``None`` (default): the child process for ``"matplotlib"``; for ``"fast"``, the worker
            wherever a core is free of the training (on an accelerator the training occupies one thread,
            on the CPU its intra-op threads), else the training thread (``placement`` says which was used).
        validation: draw the fixed validation sample at each validation run.
        log_first_step: also record the very first training batch, for instant feedback.
        call: for a fused RNN called several times in one training step, which forward call is recorded
            (0-based, negative from the end); ``None`` records calls that each start from the last one's
            final state as one sequence (an encoder and its decoder), and otherwise the last call whose
            output received a gradient, with one warning per module that says so.
        save_records: keep what each recording step drew and measured (the reduced payloads of the pictures
            and the statistics) as one compressed ``.npz`` a step in ``<run data folder>/records/``, for
            :func:`lightning_rnnviz.load_records`; ``"full"`` also keeps every recorded tensor (large: about
            1 s and 12 MB a step for a 64 x 100 x 256 LSTM record, written on the training thread).
        save_records_max_mb: bound on the records' files of one run; beyond it they stop, with one warning.
        strict: re-raise errors of capture and rendering instead of warning once (for tests).
        budget: the largest share of the training's wall time the callback's own work on the training
            thread may take (e.g. ``0.03``); past it, recordings are spaced out to a multiple of
            ``every_n_steps`` (never closer), said once on the console, and kept in ``cadence`` (with
            ``scalars="all"`` also logged, ``rnnviz/overhead/every_n_steps``). ``None``: every
            ``every_n_steps``, whatever it costs.
        scalars: ``"default"`` writes the scalars a user reads (per module: the gradient's ``first_norm``,
            ``last_norm``, ``horizon``, ``log10_ratio``; the hidden state's ``mean_abs``; each gate's
            ``<gate>_mean``; attention's ``entropy_norm`` per head), nine for a one-layer LSTM; ``"all"``
            also the others of the table above, the ``exact`` flags and ``rnnviz/overhead/*``.
        probe_set: the explorer's data: every recording (training and validation) writes, to TensorBoard,
            one probe set of these rows of the recorded batch: every layer's hidden states (at most 256 units
            per layer and direction, those of the largest variance), gate activations, ``||dL/dh_t||`` and
            its horizon (training only: validation has no gradients), attention weights per head and the
            tokens, at most 2 MiB (sequences are dropped from the end to fit; the probe set's notes say
            so). An int ``K``: the first ``K`` rows, at most ``max_samples`` (the probe set's notes say
            when it capped them); a sequence of row indices, each below ``max_samples``; ``None``: none.
            Validation records the first validation batch, so the rows are the same sequences at every
            validation. Tokens, written to the logs with the data: a ``labels`` that accepts
            ``(batch, row)`` (e.g. ``def labels(batch, row=0)``) is called once per probe row (and
            ``labels(batch)`` still draws the pictures' ``sample``; a ``labels`` that needs the row gets
            ``labels(batch, sample)`` there); a ``labels(batch)`` gives the tokens of the ``sample`` row only,
            the other rows have none.

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
        modules: str | Sequence[str] | None = None,
        attention: Mapping[str, Extractor] | None = None,
        labels: Callable[[Any], Sequence[str] | Mapping[str, Sequence[str]]] | None = None,
        *,
        sample: int = 0,
        max_samples: int | None = 16,
        top_k: int = 64,
        max_heads: int = 8,
        max_time: int = 256,
        histograms: bool = True,
        renderer: Literal["fast", "matplotlib"] = "fast",
        background: bool | Literal["thread"] | None = None,
        validation: bool = True,
        log_first_step: bool = True,
        call: int | None = None,
        save_records: bool | Literal["full"] = False,
        save_records_max_mb: float = 256,
        strict: bool = False,
        budget: float | None = None,
        scalars: Literal["default", "all"] = "default",
        probe_set: int | Sequence[int] | None = 8,
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
        if background is not None and not isinstance(background, bool) and background != "thread":
            raise ValueError(f"`background` must be True (a child process), \"thread\", False (the training thread) "
                             f"or None (automatic), got {background!r}.")
        if isinstance(modules, str):
            modules = [modules]
        if save_records not in (True, False, "full"):
            raise ValueError(f"`save_records` must be True (what the pictures and statistics show), \"full\" (also "
                             f"every recorded tensor) or False, got {save_records!r}.")
        if (isinstance(save_records_max_mb, bool) or not isinstance(save_records_max_mb, (int, float))
                or not save_records_max_mb > 0):
            raise ValueError(f"`save_records_max_mb` must be a positive number of megabytes, got {save_records_max_mb!r}.")
        if call is not None and (isinstance(call, bool) or not isinstance(call, int)):
            raise ValueError(f"`call` must be an int (which forward call of a module, 0-based, negative from the "
                             f"end) or None (the last call that received a gradient), got {call!r}.")
        if budget is not None and (isinstance(budget, bool) or not isinstance(budget, (int, float))
                                   or not 0 < budget < 1):
            raise ValueError(f"`budget` must be a share of the training time between 0 and 1 (e.g. 0.03 for 3 %) "
                             f"or None (no limit), got {budget!r}.")
        if not isinstance(scalars, str) or scalars not in SCALARS:
            raise ValueError(f"`scalars` must be \"default\" (the few a user reads: gradient norms and horizon, mean "
                             f"|h|, gate means, attention entropy) or \"all\" (every statistic, the `exact` flags and "
                             f"the callback's overhead), got {scalars!r}.")
        if labels is not None and not callable(labels):
            raise ValueError(f"`labels` must be a function `batch -> list[str]`, got {type(labels).__name__}.")
        probe_set, probe_rows, probe_notes = _probe_rows(probe_set, max_samples)
        self.probe_set = probe_set
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
        self.background = True if background is None and renderer == "matplotlib" else background
        self._results = Results()  # placement, stride, cadence, ...: shared with the copies (`__deepcopy__`)
        self.validation = validation
        self.log_first_step = log_first_step
        self.call = call
        self.save_records = save_records
        self.save_records_max_mb = save_records_max_mb
        self.strict = strict
        self.budget = budget
        self.scalars = scalars
        self._guard = Guard(type(self).__name__, strict, RNNVizWarning)
        self._reporter = Reporter(self.quantities, (), self._guard, sample=sample, top_k=top_k,
                                  max_heads=max_heads, max_time=max_time, renderer=renderer, histograms=histograms,
                                  scalars=scalars, probe_rows=probe_rows, probe_notes=probe_notes)
        # Runtime state, created in `on_fit_start` (a pickle holds the constructor arguments only).
        self.enabled = False
        self._recorder: Any = None
        self._amp_seen: float | None = None  # the AMP loss scale of the recorded batch's backward
        self._kinds: dict[str, str] = {}  # watched module -> "LSTM", "GRU", ..., or "attention"
        self._bidirectional: set[str] = set()  # watched modules with two directions

    #: where pictures were drawn in the last fit: ``"inline"``, ``"thread"`` or ``"process"``
    placement = SharedResult()
    #: recordings are every ``stride * every_n_steps`` steps, as the ``budget`` allows
    stride = SharedResult()
    #: the steps between recordings in use (``every_n_steps * stride``)
    cadence = SharedResult()
    #: the drawing process's peak memory in the last fit (``background=True``)
    drawer_peak_rss_mb = SharedResult()
    #: milliseconds spent at fit start (``"start"``), at fit end (``"end"``: closing, flushing) and, in
    #: between, writing the ``rnnviz/overhead/*`` scalars and flushing the loggers after each recording
    #: (``"flushes"``: time no ``train_thread_ms`` can hold)
    fit_overhead_ms = SharedResult()

    # --- identity and state ----------------------------------------------------------------------
    @property
    def decay_history(self) -> dict[str, dict[int, torch.Tensor]]:
        """``{module: {epoch: (layers*directions, time) mean gradient norm per step}}``, saved with the callback."""
        return self._settled().decay_history

    @property
    def error_counts(self) -> Counter[str]:
        """How often each piece of the callback's work failed (warned once each)."""
        return self._guard.counts

    @property
    def state_key(self) -> str:
        # Lightning reads it on every hook call (to name the hook for its profiler), some 6 times a
        # step: built once per settings, and during a fit those of its start, without reading them again.
        cached = self.__dict__.get("_state_key")
        if cached is not None and self.enabled:
            return cached[1]
        settings = (self.quantities, self.every_n_steps, tuple(self.modules or ()), self.modules is None,
                    tuple(sorted(self.attention or {})))
        if cached is None or cached[0] != settings:
            key = self._generate_state_key(quantities=self.quantities, every_n_steps=self.every_n_steps,
                                           modules=self.modules, attention=sorted(self.attention or {}))
            cached = self._state_key = (settings, key)
        return cached[1]

    @property
    def watched(self) -> set[str]:
        """The modules whose records this monitor reports (set at fit start)."""
        return self._reporter.names

    @property
    def findings(self) -> list[Finding]:
        """Every finding so far, epoch by epoch (see :mod:`lightning_rnnviz.render.findings`); saved with the
        callback, so a resumed run keeps them."""
        return self._settled().findings

    def _settled(self) -> Reporter:
        """The reporter, once the recording worker has finished the recordings it was handed and closed the
        epochs (their curves, findings and summary; not waiting for the epoch's ``grad_decay`` picture):
        read during a fit (a checkpoint, another callback's epoch end), the state the worker adds to is
        read complete."""
        recorder = self._recorder
        if recorder is not None and recorder.worker is not None:
            recorder.worker.wait_settled()
        return self._reporter

    def state_dict(self) -> dict[str, Any]:
        return self._settled().state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._reporter.load_state_dict(state_dict)

    # --- saving and copying ------------------------------------------------------------------------
    def _arguments(self) -> dict[str, Any]:
        """The constructor arguments that make a callback like this one (its current settings)."""
        return {name: getattr(self, name) for name in _parameters()}

    def _own_additions(self) -> dict[str, Any]:
        """Attributes a subclass added beside what ``RNNViz.__init__`` makes (kept by pickles and copies)."""
        own = _own_attributes()
        return {k: v for k, v in self.__dict__.items() if k not in own}

    def __getstate__(self) -> dict[str, Any] | tuple[dict[str, Any], dict[str, Any]]:
        """What a pickle holds: the constructor arguments only (and what a subclass added), so that a safe
        loader needs nothing allow-listed but the class (``add_safe_globals([RNNViz])``). Results, loggers,
        threads and drawing processes stay behind; Lightning checkpoints keep the results (``state_dict``).

        Raises:
            pickle.PicklingError: an argument holds a lambda or local function, which pickle cannot save;
                the message names it and says how to pass one it can.
        """
        arguments = self._arguments()
        check_saveable(type(self).__name__, arguments)
        added = self._own_additions()
        return (arguments, added) if added else arguments

    def __setstate__(self, state: Any) -> None:
        arguments, added = state if isinstance(state, tuple) else (state, {})
        if not set(arguments) <= set(_parameters()):  # an earlier development version pickled the whole state
            whole, results = dict(arguments), Results()
            for name in vars(results):
                if name in whole:
                    setattr(results, name, whole.pop(name))
            self.__dict__.update(whole, _results=results)
            return
        RNNViz.__init__(self, **arguments)
        self.__dict__.update(added)

    def __deepcopy__(self, memo: dict[int, Any]) -> RNNViz:
        """A callback with the same arguments that reports to this one: libraries that copy the callbacks they
        are given (neuralforecast copies its models, callbacks included) train with the copy, and
        ``findings``, ``decay_history``, ``error_counts``, ``placement``, ... of the object the user holds
        show what the copy did. Its run state (hooks, loggers, worker) is its own."""
        twin = type(self).__new__(type(self))
        memo[id(self)] = twin
        RNNViz.__init__(twin, **copy.deepcopy(self._arguments(), memo))
        twin.__dict__.update(copy.deepcopy(self._own_additions(), memo))
        twin._share_results(self)
        return twin

    def __copy__(self) -> RNNViz:
        """As :meth:`__deepcopy__`, the arguments not copied."""
        twin = type(self).__new__(type(self))
        RNNViz.__init__(twin, **self._arguments())
        twin.__dict__.update(self._own_additions())
        twin._share_results(self)
        return twin

    def _share_results(self, original: RNNViz) -> None:
        self._reporter, self._guard, self._results = original._reporter, original._guard, original._results

    # --- fit start and end -------------------------------------------------------------------------
    def _relevant(self, name: str, module: torch.nn.Module, extractors: set[str]) -> bool:
        attention = _is_attention(name, module, extractors)
        wants_attention = "attention" in self.quantities
        wants_rnn = any(q != "attention" for q in self.quantities)
        return (attention and wants_attention) or (not attention and wants_rnn and is_supported(module))

    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        started = time.perf_counter()
        try:
            self._start(trainer, pl_module)
        finally:
            self.fit_overhead_ms["start"] = 1e3 * (time.perf_counter() - started)

    def _start(self, trainer: Any, pl_module: Any) -> None:
        self.enabled = False
        if not trainer.is_global_zero:
            return
        self._guard.locate = locator(pl_module)  # our warnings point at the user's classes
        try:
            targets, extractors = resolve_targets(pl_module, self.modules, self.attention)
        except ValueError as error:
            if self.modules is not None or self.attention:
                raise
            self._disable(f"{error} {type(self).__name__} does nothing in this run.")
            return
        names = {n: m for n, m in targets.items() if self._relevant(n, m, set(extractors))}
        if not names:
            self._disable(
                f"{type(self).__name__} found no module to watch for {', '.join(self.quantities)} "
                "(e.g. `AttentionMonitor` on a model without attention); it does nothing in this run."
            )
            return
        self._reporter.names = set(names)
        self._kinds = {n: "attention" if _is_attention(n, m, set(extractors)) else type(m).__name__
                       for n, m in names.items()}
        self._bidirectional = {n for n, m in names.items() if getattr(m, "bidirectional", False) is True}
        recorder = recorder_of(trainer)
        if recorder.fanout is None and not self._open_output(trainer, recorder):
            return
        _ = self.state_key  # this fit's: read from its settings now, not again until it ends
        self.enabled = True
        self._recorder = recorder
        recorder.join(self)

    def _open_output(self, trainer: Any, recorder: Recorder) -> bool:
        """One fan-out over every logger of ``trainer``, shared by the monitors on it."""
        if trainer.fast_dev_run:
            self._disable(
                f"{type(self).__name__} has nowhere to write: `fast_dev_run` replaces the loggers. Run without "
                "`fast_dev_run` to see its figures; it does nothing in this run."
            )
            return False
        sinks, unsupported = [], []
        for logger in trainer.loggers:
            try:
                sink = sink_for(logger, self.histograms)
            except Exception as error:  # noqa: BLE001 - one logger we cannot open must not stop the others
                if self.strict:
                    raise
                self._guard.problem(f"write to {type(logger).__name__}", error)
                continue
            if sink is None:
                unsupported.append(type(logger).__name__)
            else:
                sinks.append(sink)
        if unsupported:
            self._guard.once("loggers", (
                f"{type(self).__name__} cannot write to {', '.join(unsupported)}: it has no image API we know and "
                f"no local `log_dir`. Supported: {SUPPORTED}."))
        if not sinks:
            if not trainer.loggers:
                self._disable(f"{type(self).__name__} has nowhere to write: the Trainer has no logger. "
                              f"{_logger_hint(trainer.lightning_module)} It does nothing in this run.")
            return False
        self.placement = self._placement(trainer)
        recorder.open(sinks, self.placement, self._guard, self._keeper(sinks))
        if any(logger_kind(lg) == "tensorboard" for lg in trainer.loggers):
            info(trainer, "lightning_rnnviz: TensorBoard keeps 10 images per tag by default; to see every recorded "
                 "step run `tensorboard --logdir <dir> --samples_per_plugin images=1000`.")
        return True

    def _keeper(self, sinks: list[Any]) -> RecordKeeper | None:
        """Where ``save_records`` keeps its files: the data folder of the first logger that has a local one."""
        if not self.save_records:
            return None
        folder = next((s.data_dir for s in sinks if s.data_dir is not None), None)
        if folder is None:
            self._guard.once("records", f"{type(self).__name__}: `save_records` needs a logger with a local folder "
                             "(TensorBoardLogger, CSVLogger, WandbLogger); no records are kept in this run.")
            return None
        return RecordKeeper(folder, full=self.save_records == "full", max_mb=self.save_records_max_mb,
                            warn=self._warn_once)

    def _warn_once(self, message: str) -> None:
        """Warn ``message``, after our name, once per run (the records keeper's notes)."""
        self._guard.once(message, f"{type(self).__name__}: {message}")

    def _placement(self, trainer: Any) -> str:
        """Where a recording is finished: as asked, or (``background=None``, the fast renderer) on a worker
        thread when the machine has a core the training does not occupy, else on the training thread."""
        if self.background is True:
            return "process"
        if self.background == "thread":
            return "thread"
        if self.background is None:
            device = getattr(trainer.strategy, "root_device", None)
            if spare_cores(accelerator=device is not None and device.type != "cpu") >= 1:
                return "thread"
        return "inline"

    def _disable(self, message: str) -> None:
        self.enabled = False
        self._guard.warn(message, stacklevel=3)

    def on_fit_end(self, trainer: Any, pl_module: Any) -> None:
        self._shutdown(trainer)

    def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
        self._shutdown(trainer)

    def teardown(self, trainer: Any, pl_module: Any, stage: str) -> None:
        self._shutdown(trainer)

    def _shutdown(self, trainer: Any) -> None:
        started = time.perf_counter()
        try:
            self._stop(trainer)
        finally:
            self.fit_overhead_ms["end"] = self.fit_overhead_ms.get("end", 0.0) + 1e3 * (time.perf_counter() - started)

    def _stop(self, trainer: Any) -> None:
        recorder = recorder_of(trainer)
        if self.enabled:  # (what the fit end writes and flushes is its own)
            self.fit_overhead_ms["flushes"] = 1e3 * recorder.flushes_s
        fanout = recorder.leave(self, self.strict, self.cadence)
        for line in recorder.take_lines():  # the last epoch ends' findings, finished by the worker
            info(trainer, line)
        if fanout is not None:  # the last monitor: the output is closed
            self._report_render_errors(fanout.renderer)
            if fanout.renderer.dropped:
                self._guard.warn(
                    f"{type(self).__name__}: the drawing process fell behind and {fanout.renderer.dropped} figures "
                    "were dropped (oldest first). Record less often (`every_n_steps`), watch fewer `modules`, or "
                    "draw on the training thread with `background=False`.",
                    stacklevel=3,
                )
            self.drawer_peak_rss_mb = fanout.renderer.peak_rss_mb or recorder.drawing_peak_rss_mb
        self.enabled = False

    def _report_render_errors(self, renderer: Any) -> None:
        """Errors the drawing process reported: warned once, counted; raised with ``strict``."""
        for line in renderer.errors():
            if self.strict:
                raise RuntimeError(f"drawing process: {line}")
            self._guard.problem("draw a figure", line)

    # --- training ----------------------------------------------------------------------------------
    def _wants(self, trainer: Any, batch_idx: int) -> bool:
        if not self.enabled:
            return False
        loop = trainer.fit_loop.epoch_loop
        stepped = loop._batches_that_stepped
        n = self.every_n_steps or trainer.log_every_n_steps
        if not ((n > 0 and (stepped + 1) % (n * self.stride) == 0)
                or (self.log_first_step and stepped == 0 and trainer.current_epoch == 0)):
            return False  # (the cheap test first: it runs at every batch)
        # Lightning logs on the last micro-batch of an accumulation window
        return not (trainer.lightning_module.automatic_optimization and loop._should_accumulate())

    def _spend(self, trainer: Any, seconds: float, recording: bool) -> None:
        """Account for what a recording (or an epoch end) cost the training thread, and space recordings out
        when the budget asks for it."""
        recorder = self._recorder
        recorder.spend(seconds, recording)
        for member in recorder.members:
            member._follow_budget(trainer, recorder)

    def _follow_budget(self, trainer: Any, recorder: Recorder) -> None:
        """``stride``: the fewest ``every_n_steps`` per recording that keep the callback's share of the wall
        time within ``budget``. With ``c`` the training-thread cost of a recording (the median of the last
        five, the first left out: it sets things up) and ``s`` the training's own time per step so far,
        ``c / (stride * n * s + c) <= budget``."""
        costs = recorder.costs[1:][-5:]
        steps = trainer.fit_loop.epoch_loop._batches_that_stepped
        if self.budget is None or not costs or steps <= 0 or recorder.clock is None:
            return
        n = self.every_n_steps or trainer.log_every_n_steps
        step_s = max(time.perf_counter() - recorder.clock - recorder.spent_total_s, 1e-9) / steps
        cost = statistics.median(costs)
        stride = max(1, math.ceil(cost * (1 - self.budget) / (self.budget * n * step_s)))
        if stride > 1 and "budget" not in self._guard.warned:
            self._guard.warned.add("budget")
            info(trainer, f"lightning_rnnviz: recording every {stride * n} steps to stay under {self.budget:.0%} of "
                 f"training time (a recording costs the training thread {1e3 * cost:.0f} ms, a step takes "
                 f"{1e3 * step_s:.1f} ms); budget=None records every {n}.")
        self.stride = stride
        self.cadence = stride * n

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        if not self.enabled:
            return
        recorder = self._recorder
        if recorder.start_clock():  # the first monitor: the budget's clock starts with training
            self._recheck_placement(trainer, recorder)
        self.stride, self.cadence = 1, self.every_n_steps or trainer.log_every_n_steps

    def _recheck_placement(self, trainer: Any, recorder: Recorder) -> None:
        """Once the training's data loaders exist (not yet at fit start): an automatic choice of the worker
        is taken back when their worker processes leave no core free of the training."""
        if self.background is not None or recorder.worker is None:
            return
        try:
            workers = _loader_workers(trainer)
        except Exception:  # noqa: BLE001 - a data source without loaders: nothing to count
            workers = 0
        device = getattr(trainer.strategy, "root_device", None)
        if workers and spare_cores(accelerator=device is not None and device.type != "cpu",
                                   loader_workers=workers) < 1:
            recorder.drop_worker()
            for member in recorder.members:
                member.placement = "inline"

    @staticmethod
    def _batch_key(trainer: Any) -> tuple[str, int]:
        return ("train", trainer.fit_loop.epoch_loop.batch_progress.total.ready)

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        if not self.enabled:
            return
        self._amp_seen = None
        recorder = self._recorder
        if self is recorder.members[0]:
            recorder.batch_start()
        wanting = [m for m in recorder.members if m._wants(trainer, batch_idx)]
        if wanting or recorder.holds_batch:  # else a batch nobody records: no work at all (most batches)
            self._guard.run("record", recorder.begin, self._batch_key(trainer), pl_module, wanting)

    def on_after_backward(self, trainer: Any, pl_module: Any) -> None:
        recorder = self._recorder if self.enabled else None
        if recorder is not None and recorder.is_open:
            # The scale the loss was multiplied by for this backward (read before `scaler.update()`).
            self._amp_seen = self._amp_scale(trainer)

    @staticmethod
    def _amp_scale(trainer: Any) -> float | None:
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        if scaler is None or not scaler.is_enabled():
            return None
        return float(scaler.get_scale())

    def _grad_scale(self, trainer: Any) -> float | None:
        """What the loss behind the recorded gradients was multiplied by, relative to the batch's loss."""
        scale, self._amp_seen = self._amp_seen or 1.0, None
        if trainer.lightning_module.automatic_optimization:
            scale /= trainer.accumulate_grad_batches
        return None if scale == 1.0 else scale

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        if not self.enabled:
            return
        recorder = self._recorder
        if recorder.worker is not None:
            if recorder.is_open:  # the first monitor to get here hands the recording over
                step = trainer.fit_loop.epoch_loop._batches_that_stepped
                scale = self._grad_scale(trainer)
                self._hand_off(recorder, self._batch_key(trainer), scale, batch, step, "rnnviz", True)
            if self is recorder.members[-1] and recorder.worker.has_ready:
                self._deliver(trainer, recorder)
            return
        recording, wanting = (recorder.end(self._batch_key(trainer), self._grad_scale(trainer))
                              if recorder.holds_batch else (None, []))
        if recording is None or self not in wanting:
            if self is recorder.members[-1] and recorder.fanout.renderer.has_results:
                self._guard.run("write pictures", recorder.fanout.drain)  # from the drawing process
            return
        started = time.perf_counter()
        step = trainer.fit_loop.epoch_loop._batches_that_stepped
        self._emit(recording, batch, step, prefix="rnnviz", training=True, wanting=wanting)
        self._guard.run("write pictures", recorder.fanout.wait)  # encoded and written before training goes on
        recorder.charge(time.perf_counter() - started)
        if self is wanting[-1]:  # the last monitor of this batch reports what the batch cost and flushes
            self._report_render_errors(recorder.fanout.renderer)
            self._spend(trainer, recorder.finish_inline(step, self.cadence), recording=True)

    def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        if not self.enabled:
            return
        recorder = self._recorder
        fanout = recorder.fanout
        step = trainer.fit_loop.epoch_loop._batches_that_stepped
        if recorder.worker is not None:
            # the worker closes the epoch after its recordings (its statistics are complete then): the
            # training thread neither waits for them nor draws; what it writes and says comes back with
            # the next delivery (at the latest, at fit end)
            close = functools.partial(self._reporter.close_epoch, trainer.current_epoch, step)
            draw = functools.partial(self._reporter.draw_epoch, step)
            self._guard.run("record", recorder.end_epoch, close, draw, step)
            if self is recorder.members[-1]:
                self._deliver(trainer, recorder)
            return
        started = time.perf_counter()
        with one_thread():
            drawn, lines = self._reporter.end_epoch(trainer.current_epoch, step, fanout)
        self._guard.run("write pictures", fanout.wait)
        for line in lines:  # a finding that appeared or cleared
            info(trainer, line)
        if drawn:
            spent_ms = 1e3 * (time.perf_counter() - started)
            if self.scalars == "all":
                self._guard.run("overhead statistics", fanout.scalars, {"rnnviz/overhead/epoch_end_ms": spent_ms}, step)
            self._spend(trainer, spent_ms / 1e3, recording=False)
        self._guard.run("flush", fanout.flush, only_if_written=True)

    # --- validation --------------------------------------------------------------------------------
    def _wants_val(self, trainer: Any, batch_idx: int, dataloader_idx: int) -> bool:
        return (self.enabled and self.validation and not trainer.sanity_checking
                and batch_idx == 0 and dataloader_idx == 0)

    def _val_key(self, trainer: Any) -> tuple[str, int, int]:
        return ("val", trainer.fit_loop.epoch_loop._batches_that_stepped, trainer.fit_loop.epoch_loop.batch_progress.total.ready)

    def on_validation_batch_start(
        self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        if not self._wants_val(trainer, batch_idx, dataloader_idx):
            return
        recorder = recorder_of(trainer)
        wanting = [m for m in recorder.members if m._wants_val(trainer, batch_idx, dataloader_idx)]
        self._guard.run("record", recorder.begin, self._val_key(trainer), pl_module, wanting)

    def on_validation_batch_end(
        self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int, dataloader_idx: int = 0,
    ) -> None:
        if not self._wants_val(trainer, batch_idx, dataloader_idx):
            return
        recorder = recorder_of(trainer)
        if recorder.worker is not None:
            step = trainer.fit_loop.epoch_loop._batches_that_stepped
            self._hand_off(recorder, self._val_key(trainer), None, batch, step, "rnnviz/val", False)
            return
        recording, wanting = recorder.end(self._val_key(trainer), None)
        if recording is not None and self in wanting:
            step = trainer.fit_loop.epoch_loop._batches_that_stepped
            self._emit(recording, batch, step, prefix="rnnviz/val", training=False, wanting=wanting)
            if self is wanting[-1]:  # the last monitor of the batch flushes and lets the recording go
                self._guard.run("flush", recorder.fanout.flush)
                recorder.release()

    # --- what a recording becomes ------------------------------------------------------------------
    def _hand_off(self, recorder: Recorder, key: Any, grad_scale: float | None, batch: Any, step: int, prefix: str,
                  training: bool) -> None:
        """The worker's route, at the end of a recorded batch: the first monitor to get there hands the
        capture over with every wanting monitor's report (the others find it gone)."""
        def reports(wanting: list[RNNViz]) -> list[Report]:
            shown = _probe_modules(wanting)
            return [member._report_for(batch, step, prefix, training, shown.get(id(member), ()))
                    for member in wanting]

        if self._guard.run("record", recorder.hand_off, key, grad_scale, reports, step, prefix):
            recorder.write_layout(functools.partial(_charts, recorder.members))

    def _report_for(self, batch: Any, step: int, prefix: str, training: bool, probe_modules: Collection[str]) -> Report:
        """This monitor's part of a recording, for the worker: ``labels(batch)`` is called here, on the
        training thread (the user's function, and a batch that training may reuse), its error kept for the
        report to warn about as it would on this thread."""
        tokens = probe_tokens = None
        if self.labels is not None:
            tokens = _called_now(self._sample_tokens, batch)
            if self._reporter.probe_rows is not None:
                probe_tokens = _called_now(functools.partial(self._probe_tokens, sample=tokens), batch)
        reporter = self._reporter

        def report(recording: Recording, out: Delivery) -> None:
            reporter.report(recording, out, step, prefix=prefix, training=training, tokens=tokens,
                            probe_tokens=probe_tokens, probe_modules=probe_modules)

        return report

    def _sample_tokens(self, batch: Any) -> Any:
        """What ``labels`` gives for the pictures' ``sample``: ``labels(batch)``, or ``labels(batch, sample)``
        for a ``labels`` that needs the row."""
        takes_batch, _ = _label_forms(self.labels)
        return self.labels(batch) if takes_batch else self.labels(batch, self.sample)

    def _probe_tokens(self, batch: Any, sample: Callable[[], Any]) -> dict[int, Any]:
        """``{row: labels' tokens}`` for the probe set's rows: each row's, from a ``labels`` that accepts
        ``(batch, row)``; else only the ``sample`` row's, ``sample()`` (the pictures' ``labels(batch)``, not
        called again)."""
        rows = self._reporter.probe_rows or []
        _, takes_row = _label_forms(self.labels)
        if takes_row:
            return {row: self.labels(batch, row) for row in rows}
        return {self.sample: sample()} if self.sample in rows else {}

    def _deliver(self, trainer: Any, recorder: Recorder) -> None:
        """Write what the worker has finished (see :meth:`Recorder.deliver`) and count what it cost."""
        for seconds, recording in recorder.deliver(recorder.worker, self.strict, self.cadence):
            self._spend(trainer, seconds, recording=recording)
        for line in recorder.take_lines():  # a finding that appeared or cleared, from an epoch end
            info(trainer, line)

    def _emit(self, recording: Recording, batch: Any, step: int, prefix: str, training: bool,
              wanting: list[RNNViz]) -> None:
        recorder = self._recorder
        recorder.write_layout(functools.partial(_charts, recorder.members))
        tokens = probe_tokens = None
        if self.labels is not None:
            tokens = _once(functools.partial(self._sample_tokens, batch))
            if self._reporter.probe_rows is not None:
                probe_tokens = functools.partial(self._probe_tokens, batch, sample=tokens)
        with one_thread():
            self._reporter.report(recording, recorder.fanout, step, prefix=prefix, training=training, tokens=tokens,
                                  probe_tokens=probe_tokens,
                                  probe_modules=_probe_modules(wanting).get(id(self), ()))
        if self is recorder.members[0]:  # every monitor's modules, kept once
            recorder.keep_full(recording, step, prefix)


def _probe_modules(wanting: Sequence[RNNViz]) -> dict[int, set[str]]:
    """Who writes a recording's probe set, by ``id``, and of which modules: the first monitor that asks for
    one, with the modules of every monitor that asks (one probe set per recording, its rows and tokens that
    monitor's); the others write none."""
    asking = [member for member in wanting if member._reporter.probe_rows is not None]
    return {id(asking[0]): set().union(*(member.watched for member in asking))} if asking else {}


def _called_now(work: Callable[[Any], Any], batch: Any) -> Callable[[], Any]:
    """``work(batch)`` called now (on the training thread: the user's function, and a batch that training
    may reuse), as a function that gives its value later, or raises its error there (where the reporter's
    guard warns about it as it would on this thread)."""
    try:
        value = work(batch)
    except Exception as error:  # noqa: BLE001 - reported by the reporter's guard, as inline
        failed = error

        def later() -> Any:
            raise failed
    else:
        def later() -> Any:
            return value
    return later


def _once(work: Callable[[], Any]) -> Callable[[], Any]:
    """``work`` called at most once: later calls give its value, or raise its error, again."""
    done: list[tuple[bool, Any]] = []

    def once() -> Any:
        if not done:
            try:
                done.append((True, work()))
            except Exception as error:  # noqa: BLE001 - raised again to every caller
                done.append((False, error))
        ok, value = done[0]
        if not ok:
            raise value
        return value

    return once


def _label_forms(labels: Callable[..., Any]) -> tuple[bool, bool]:
    """Whether ``labels`` can be called as ``labels(batch)`` and as ``labels(batch, row)`` (a function whose
    signature cannot be read is taken for ``labels(batch)``)."""
    try:
        signature = inspect.signature(labels)
    except (TypeError, ValueError):
        return True, False
    forms = []
    for args in ((None,), (None, 0)):
        try:
            signature.bind(*args)
        except TypeError:
            forms.append(False)
        else:
            forms.append(True)
    return (forms[0] or not forms[1]), forms[1]


def _probe_rows(probe_set: Any, max_samples: int | None) -> tuple[Any, list[int] | None, list[str]]:
    """``probe_set`` as kept (an int, a list or ``None``), the rows it chooses and the probe set's notes."""
    if probe_set is None:
        return None, None, []
    if isinstance(probe_set, int) and not isinstance(probe_set, bool):
        if probe_set <= 0:
            raise ValueError(f"`probe_set` must be a positive number of sequences, a list of row indices or None "
                             f"(no probe set), got {probe_set!r}.")
        if max_samples is not None and probe_set > max_samples:
            return probe_set, list(range(max_samples)), [
                f"probe_set={probe_set} asks for {probe_set} sequences; max_samples={max_samples} records "
                f"{max_samples}: raise max_samples for more"]
        return probe_set, list(range(probe_set)), []
    if isinstance(probe_set, Sequence) and not isinstance(probe_set, (str, bytes)):
        rows = list(probe_set)
        if not rows or any(isinstance(r, bool) or not isinstance(r, int) or r < 0 for r in rows):
            raise ValueError(f"`probe_set` as a sequence must hold non-negative row indices of the recorded batch, "
                             f"at least one, got {probe_set!r}.")
        if len(set(rows)) < len(rows):
            raise ValueError(f"`probe_set` names a row twice: {probe_set!r}.")
        past = [r for r in rows if max_samples is not None and r >= max_samples]
        if past:
            raise ValueError(f"`probe_set` rows {past} are not among the `max_samples={max_samples}` recorded "
                             f"sequences; raise `max_samples` above {max(past)} or pick rows below {max_samples}.")
        return rows, rows, []
    raise ValueError(f"`probe_set` must be a positive int (the first rows), a list of row indices or None (no probe "
                     f"set), got {probe_set!r}.")


def _charts(members: Sequence[RNNViz]) -> dict[str, dict[str, list[str]]]:
    """The Custom Scalars layout of every monitor on a Trainer."""
    charts: dict[str, dict[str, list[str]]] = {}
    for member in members:
        for category, group in scalar_layout(member._kinds, member.quantities, member.scalars,
                                             member._bidirectional).items():
            charts.setdefault(category, {}).update(group)
    return charts


@functools.cache
def _parameters() -> tuple[str, ...]:
    """The names of ``RNNViz.__init__``'s arguments, each kept as the attribute of the same name."""
    return tuple(inspect.signature(RNNViz.__init__).parameters)[1:]


@functools.cache
def _own_attributes() -> frozenset[str]:
    """The attributes ``RNNViz.__init__`` makes, and those a run adds: ``state_key``'s cache, and the model's
    ``log`` and ``log_dict`` that Lightning attaches to every callback at each fit."""
    blank = RNNViz.__new__(RNNViz)
    RNNViz.__init__(blank)
    return frozenset(blank.__dict__) | {"_state_key", "log", "log_dict"}


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
