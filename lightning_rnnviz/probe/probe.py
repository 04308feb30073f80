"""``Probe``: record hidden states, gates, exact per-step gradients and attention of a model's modules.

On a recording, forward hooks keep each target module's inputs (detached) and a snapshot of its weights,
and tensor hooks on its outputs catch the upstream gradient of the user's own backward. When the block
exits, fused RNNs are replayed step by step on a graph of our own to get gates, lower layers' states and
the total ``dL/dh_t``; attention weights are recomputed per head without dropout. Hooks exist only
inside the block and never change a value: the training run is bit-identical with and without it.

This module holds the public names (:class:`Probe`, :class:`Capture`, :class:`RNNVizWarning`). A recording
runs in two modules, in this order: :mod:`~lightning_rnnviz.probe.capture` (the hooks, on the training
thread, up to the hand-off) and :mod:`~lightning_rnnviz.probe.build` (the replay into records, on any thread).
"""

from __future__ import annotations

import contextlib
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping

from torch import Tensor, nn

from lightning_rnnviz.probe import held
from lightning_rnnviz.probe.build import GradScale, _Builder
from lightning_rnnviz.probe.capture import Extractor, _Session, _Watch
from lightning_rnnviz.probe.known import KnownAttention, known_attention
from lightning_rnnviz.probe.records import Recording
from lightning_rnnviz.probe.targets import (
    ATTENTION_TYPES,
    extractor_form,
    resolve_targets,
    unreadable_attention,
)


class RNNVizWarning(UserWarning):
    """A capture or render step failed; the run goes on without that picture."""


class Probe:
    """Record what happens inside a model's recurrent and attention modules on one batch.

    Supported: ``nn.RNN``, ``nn.LSTM``, ``nn.GRU`` (fused, replayed for gates and exact gradients),
    ``nn.RNNCell``, ``nn.LSTMCell``, ``nn.GRUCell`` called in a loop (each call is one step; the calls of a fused module that each start from the
    previous call's final state are one sequence, see ``call``),
    ``nn.MultiheadAttention`` (also inside the ``nn.Transformer*Layer`` modules), the Temporal Fusion
    Transformer attention of pytorch-forecasting, darts and neuralforecast (``probe/known.py``: read in
    their own layouts, before dropout, with the keys their masks allowed), and any module with a custom
    attention extractor. With ``modules=None``, a module whose class says attention but that none of these
    reads is named in one warning that shows the ``attention=`` form.

    Args:
        model: the model to watch.
        modules: qualified names (as in ``model.named_modules()``) or fnmatch patterns of the modules to
            record; ``None`` records every supported module.
        attention: ``{name or pattern: fn(module, args, output) -> weights}`` for custom attention
            modules; ``weights`` is ``(batch, [heads,] T_out, T_in)``, or ``(batch, T_in)`` for one
            decoding step. The rows of all calls in a block are stacked in call order. What an
            extractor returns is checked: non-negative, each row (last axis) summing to 1 (within 1e-3,
            2e-2 for 16-bit floats; rows of NaN, fully masked, pass), the same batch, heads and key
            length in every call of a block; a 4-d result has the module's head count (``num_heads``,
            ``n_head``, ``n_heads``) on axis 1, and is not a known class's weights transposed. Anything else
            (a context vector, transposed weights) is
            an error of capture: one warning naming the extractor, the module and the shape, and that
            module's record is dropped for the block.
        strict: re-raise errors from capture and replay instead of warning once and dropping that
            module's record (for tests).
        call: which call of a fused ``nn.RNN/LSTM/GRU`` a record shows when the module is called several
            times in one block: an index among the block's forward calls (0-based, negative from the
            end). ``None`` records the calls as one sequence when each starts from the previous call's
            final state (an encoder whose state starts its decoder, laid end to end on each sequence's
            time axis; a decoder that calls ``nn.GRU`` once per output step; unidirectional modules
            only; see ``RNNRecord.calls`` and ``call_starts``); otherwise it shows the last call whose outputs
            received a gradient, else the last call, and warns once which one it shows. An index past
            a block's calls drops that module's record for the block (as an error of capture).
        on_device: leave the records' tensors on the device where each module ran instead of copying
            them to the CPU (``lengths`` and ``key_lengths`` are on the CPU either way). The callbacks
            use it so that statistics, histograms and picture payloads are reduced on the GPU and only
            their small results cross to the host; :meth:`Recording.cpu` copies a recording over.

    Raises:
        ValueError: a name or pattern matches no module (the message lists those that exist), names a
            module of an unsupported type, or the model has no supported module; ``call`` is not an int
            or ``None``.

    Example::

        >>> import torch
        >>> from lightning_rnnviz import Probe
        >>> model = torch.nn.LSTM(input_size=3, hidden_size=8, num_layers=2, batch_first=True)
        >>> x = torch.randn(4, 10, 3)
        >>> with Probe(model).record() as rec:
        ...     output, (h_n, c_n) = model(x)
        ...     output[:, -1].sum().backward()
        >>> r = rec[""]  # the root module's name
        >>> r.hidden.shape, r.hidden_grad.shape, r.grad_norm.shape
        (torch.Size([2, 4, 10, 8]), torch.Size([2, 4, 10, 8]), torch.Size([2, 10]))
        >>> bool(r.grad_norm[1, 0] > 0)  # many-to-one loss, yet the first step gets its true gradient
        True
    """

    def __init__(
        self,
        model: nn.Module,
        modules: Iterable[str] | None = None,
        attention: Mapping[str, Extractor] | None = None,
        strict: bool = False,
        call: int | None = None,
        on_device: bool = False,
    ) -> None:
        if call is not None and (isinstance(call, bool) or not isinstance(call, int)):
            raise ValueError(
                f"`call` must be an int (0-based index of a module's forward call in a block, negative from "
                f"the end) or None (the last call that received a gradient), got {call!r}."
            )
        self.call = call
        self.on_device = bool(on_device)
        self.model = model
        self.targets, extractor_keys = resolve_targets(model, modules, attention)
        self.extractors: dict[str, Extractor] = {n: attention[k] for n, k in extractor_keys.items()}
        self.strict = strict
        self.error_counts: Counter[str] = Counter()
        self._warned: set[str] = set()
        self._encoder_layers = self._find_encoder_layers(model)
        # attention classes of other libraries read without an extractor (known.py)
        self.known: dict[str, KnownAttention] = {
            n: entry for n, m in self.targets.items()
            if n not in self.extractors and (entry := known_attention(type(m))) is not None
        }
        if modules is None:
            readable = [n for n, m in self.targets.items() if n in self.extractors or isinstance(m, ATTENTION_TYPES)]
            unread = unreadable_attention(model, readable)
            if unread:
                self._warn_unreadable(model, unread)

    @staticmethod
    def _warn_unreadable(model: nn.Module, names: list[str]) -> None:
        """One warning for the modules whose class says attention but that nothing can read."""
        named = dict(model.named_modules())
        listed = [f"{n!r} ({type(named[n]).__name__})" for n in names[:4]]
        more = f" and {len(names) - 4} more" if len(names) > 4 else ""
        which = f"module {listed[0]}" if len(names) == 1 else f"modules {', '.join(listed)}{more}"
        keys = "" if len(names) == 1 else " (a key may be an fnmatch pattern that names several)"
        held.warn(
            f"lightning_rnnviz does not record {which}: the class looks like attention, but it is not "
            "`nn.MultiheadAttention` nor an attention class lightning_rnnviz knows. To record it, give an "
            f"extractor of its weights, {extractor_form(names[0])}{keys} (`Probe(attention=...)`, "
            "`RNNViz(attention=...)`).",
            RNNVizWarning,
            stacklevel=3,
            where=held.where(model, names[0]),
        )

    def _find_encoder_layers(self, model: nn.Module) -> dict[str, tuple[nn.TransformerEncoderLayer, str | None, int]]:
        """Watched ``self_attn`` of encoder layers: ``name -> (layer, enclosing encoder's name, index)``.

        An encoder layer in eval mode may take PyTorch's fused fast path, which it takes only while no
        forward hook sits on it or its children; such layers are recorded from the enclosing
        ``nn.TransformerEncoder`` instead (see ``capture._Session.attach``).
        """
        named = dict(model.named_modules())
        found = {}
        for name, module in named.items():
            if not isinstance(module, nn.TransformerEncoder):
                continue
            for index, layer in enumerate(module.layers):
                child = f"{name}.layers.{index}.self_attn" if name else f"layers.{index}.self_attn"
                if child in self.targets and child not in self.extractors:
                    found[child] = (layer, name, index)
        for name, module in named.items():
            child = f"{name}.self_attn" if name else "self_attn"
            if isinstance(module, nn.TransformerEncoderLayer) and child in self.targets and child not in found:
                if child not in self.extractors:
                    found[child] = (module, None, -1)
        return found

    @contextlib.contextmanager
    def record(self, max_samples: int | None = None, grad_scale: GradScale = None) -> Iterator[Recording]:
        """Watch the modules inside this block; the recording is filled when the block exits.

        Args:
            max_samples: keep only the first ``max_samples`` sequences of the batch (and replay only
                those); gradients stay exact since sequences do not interact inside a module.
            grad_scale: the loss scale of a ``GradScaler`` (a number, a tensor or a function returning
                one, read when the block exits): recorded gradients are divided by it.

        Yields:
            A :class:`Recording`, empty until the block exits.
        """
        recording = Recording()
        with self.capture(max_samples) as captured:
            yield recording
        captured.finish(grad_scale, into=recording)

    @contextlib.contextmanager
    def capture(self, max_samples: int | None = None) -> Iterator[Capture]:
        """:meth:`record` in two parts, for a caller that finishes the recording on another thread: the
        hooks exist inside this block only, and what they caught is finished into a :class:`Recording`
        later by :meth:`Capture.finish`, after :meth:`Capture.hand_off` on this thread.

        Args:
            max_samples: as for :meth:`record`.

        Yields:
            The :class:`Capture` of the block.
        """
        if max_samples is not None and (not isinstance(max_samples, int) or max_samples < 1):
            raise ValueError(f"`max_samples` must be a positive int or None, got {max_samples!r}.")
        session = _Session(self, max_samples)
        try:
            session.attach()
            yield Capture(session)
        finally:
            session.detach()

    def _skip(self, watch: _Watch, reason: str) -> None:
        watch.failed = f"not recorded: {reason}"
        if watch.name not in self._warned:
            self._warned.add(watch.name)
            held.warn(f"lightning_rnnviz does not record module {watch.name!r} here ({reason}).",
                      RNNVizWarning, stacklevel=4, where=held.where(self.model, watch.name))

    def _warn_calls(self, name: str, shown: int, total: int, with_grad: bool) -> None:
        """Once per module: several calls that are not one chain of steps; say which one is shown."""
        key = f"{name}\0calls"
        if key in self._warned:
            return
        self._warned.add(key)
        which = "the last whose output received a gradient"
        if not with_grad:
            which = "the last (none received a gradient)"
        held.warn(
            f"lightning_rnnviz: module {name!r} was called {total} times in one recording, not as a chain (each "
            f"call from the last one's final state), so its record shows call {shown + 1} of {total}, {which}. Choose another with "
            "`call=` (`RNNViz(call=...)`, `Probe(call=...)`: 0-based among the forward calls, negative from the end).",
            RNNVizWarning,
            stacklevel=2,
            where=held.where(self.model, name),
        )

    def _fail(self, watch: _Watch, error: BaseException, where: str) -> None:
        self.error_counts[watch.name] += 1
        watch.failed = f"{type(error).__name__}: {error}"
        if self.strict:
            raise error
        if watch.name not in self._warned:
            self._warned.add(watch.name)
            held.warn(
                f"lightning_rnnviz could not {where} module {watch.name!r} ({watch.failed}); its record "
                "is dropped and training goes on. Further errors of this module are counted in "
                "`Probe.error_counts`. Pass `strict=True` to raise instead.",
                RNNVizWarning,
                stacklevel=2,
                where=held.where(self.model, watch.name),
            )


class Capture:
    """What the hooks of one :meth:`Probe.capture` block caught, to be finished into a :class:`Recording`.

    The two steps split where a recording may change threads. :meth:`hand_off`, on the training thread
    right after the block, makes what the capture holds its own: copies of the tensors it only referenced
    (the user may reuse or change them once training goes on), and the inter-layer dropout masks drawn
    from the generator states taken at the calls (only that thread may touch the global generator).
    :meth:`finish` then replays and builds the records on any thread, touching nothing process-wide.
    """

    def __init__(self, session: _Session) -> None:
        self._session = session
        self.handed_off = False

    def hand_off(self) -> list[Tensor]:
        """Copy what is referenced, draw the dropout masks; the tensors the capture now holds (a caller that
        finishes on another CUDA stream marks them used there)."""
        self.handed_off = True
        return self._session.hand_off()

    def finish(self, grad_scale: GradScale = None, into: Recording | None = None) -> Recording:
        """Replay and build every record (see :meth:`Probe.record` for ``grad_scale``). After
        :meth:`hand_off` nothing process-wide is touched: the replay leaves TF32 as the user set it, which
        a module's own kernels used too, and the dropout masks were drawn already."""
        recording = Recording() if into is None else into
        _Builder(self._session, own_flags=not self.handed_off).finalize(recording, grad_scale)
        return recording
