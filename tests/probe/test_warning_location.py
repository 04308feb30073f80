"""A warning about a module points at the user's code: the line where the user's class is defined (the
module's own, or the nearest enclosing one), given with ``warnings.warn_explicit``; where no class is the
user's, where ``warnings.warn`` would. Filters and the once-per-location registry act as on any warning."""

from __future__ import annotations

import inspect
import threading
import warnings

import pytest
import torch
from torch import nn

from lightning_rnnviz.probe import Probe, RNNVizWarning, held
from lightning_rnnviz.probe import build as build_module


class BahdanauAttention(nn.Module):
    """Attention that nothing reads without an extractor (its class says attention)."""

    def __init__(self) -> None:
        super().__init__()
        self.score = nn.Linear(4, 1)


class Seq2Seq(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.GRU(3, 4, batch_first=True)
        self.attention = BahdanauAttention()


class Encoder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.rnn = nn.LSTM(3, 4, batch_first=True)


class Model(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.encoder = Encoder()
        self.head = nn.Linear(4, 1)


def _line(cls: type) -> int:
    return inspect.getsourcelines(cls)[1]


def _ours(caught) -> list[warnings.WarningMessage]:
    return [w for w in caught if issubclass(w.category, RNNVizWarning)]


def test_unreadable_attention_points_at_its_own_class():
    with pytest.warns(RNNVizWarning, match="does not record module 'attention' \\(BahdanauAttention\\)") as caught:
        Probe(Seq2Seq())
    (warning,) = _ours(caught)
    assert (warning.filename, warning.lineno) == (__file__, _line(BahdanauAttention))


def test_several_calls_point_at_the_class_that_holds_the_library_module():
    model = Model()
    x = torch.randn(2, 5, 3)
    with pytest.warns(RNNVizWarning, match="called 2 times") as caught, Probe(model).record():
        a, _ = model.encoder.rnn(x)
        b, _ = model.encoder.rnn(x)  # a fresh state: not a chain
        (a.sum() + b.sum()).backward()
    (warning,) = _ours(caught)
    # nn.LSTM is PyTorch's: the nearest class of the user's that holds it
    assert (warning.filename, warning.lineno) == (__file__, _line(Encoder))


def test_a_capture_error_points_at_the_users_class(monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("replay broke")

    monkeypatch.setattr(build_module, "replay_rnn", broken)
    model = Model()
    with pytest.warns(RNNVizWarning, match="could not replay module 'encoder.rnn'") as caught, Probe(model).record():
        model.encoder.rnn(torch.randn(2, 5, 3))[0].sum().backward()
    (warning,) = _ours(caught)
    assert (warning.filename, warning.lineno) == (__file__, _line(Encoder))


def test_a_worker_threads_warning_points_at_the_users_class_when_given():
    """Held on another thread, given here: it points at the class, not at the thread or at ``give``."""
    kept: held.Held = []

    def work():
        with held.held() as mine:
            held.warn("about 'encoder.rnn'", RNNVizWarning, where=held.where(Model(), "encoder.rnn"))
        kept.extend(mine)

    worker = threading.Thread(target=work)
    worker.start()
    worker.join()
    with pytest.warns(RNNVizWarning, match="about 'encoder.rnn'") as caught:
        for message, category, where in kept:
            held.give(message, category, where)
    assert (caught[0].filename, caught[0].lineno) == (__file__, _line(Encoder))


def test_without_a_class_of_the_users_it_points_where_warn_would():
    assert held.locate(nn.LSTM(3, 4)) is None and held.locate(None) is None
    assert held.locate(nn.Sequential(nn.LSTM(3, 4)), "0") is None
    line = inspect.currentframe().f_lineno + 2
    with pytest.warns(RNNVizWarning, match="plain") as caught:
        held.give("plain", RNNVizWarning, held.where(nn.LSTM(3, 4)), stacklevel=1)
    assert (caught[0].filename, caught[0].lineno) == (__file__, line)


def test_the_users_filters_match_their_module_and_the_default_action_shows_it_once():
    where = held.where(Model(), "encoder.rnn")
    with warnings.catch_warnings():
        warnings.filterwarnings("error", category=RNNVizWarning, module=__name__)
        with pytest.raises(RNNVizWarning, match="filtered"):
            held.give("filtered", RNNVizWarning, where)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")
        for _ in range(3):
            held.give("repeated", RNNVizWarning, where)
        held.give("another", RNNVizWarning, where)
    assert [str(w.message) for w in caught] == ["repeated", "another"]
