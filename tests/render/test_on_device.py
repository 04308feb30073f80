"""Records kept on the device (``Probe(on_device=True)``, what the callbacks use): every statistic, histogram
and picture payload is reduced where the record lives and only small results cross to the host.

No GPU here: :mod:`tests.helpers.fake_device` makes CPU tensors behave as device tensors (``.numpy()``
refused, host and device tensors never mixed, every copy to the host counted). Each case reports the same
recording twice, once from the CPU and once from the "device", and checks that everything sent out is the
same and that what crossed is a small fraction of the record. ``tests/benchmarks/check_cuda.py`` does the
same on a real GPU.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence

from lightning_rnnviz import Probe
from lightning_rnnviz.probe.records import AttentionRecord, Recording, RNNRecord
from lightning_rnnviz.render.report import QUANTITIES, Guard, Reporter, histogram_buckets
from lightning_rnnviz.sinks.base import Histogram
from tests.helpers.fake_device import DEVICE, DeviceTensor, FakeDevice, record_to_device, to_device
from tests.helpers.histograms import numpy_histogram


class Collected:
    """An output that keeps everything a reporter sends (histograms bucketed at once, as the fan-out does)."""

    def __init__(self) -> None:
        self.pictures: dict[str, Any] = {}
        self.scalars_: dict[tuple[str, int], float] = {}
        self.histograms: dict[str, Any] = {}
        self.texts: dict[str, str] = {}
        self.documents: dict[str, Any] = {}

    def picture(self, job: Any) -> None:
        self.pictures[job.tag] = job.payload

    def scalars(self, values: Mapping[str, float], step: int) -> None:
        self.scalars_.update({(k, step): v for k, v in values.items()})

    def histogram(self, tag: str, buckets: Callable[[], Any], step: int) -> None:
        self.histograms[tag] = buckets()

    def text(self, tag: str, markdown: str, step: int) -> None:
        self.texts[tag] = markdown

    def document(self, name: str, data: Mapping[str, Any], step: int) -> None:
        self.documents[name] = data


def _record(model: nn.Module, run: Callable[[], torch.Tensor], **probe: Any) -> Recording:
    with Probe(model, strict=True, **probe).record() as recording:
        run().backward()
    return recording


class Seq2Seq(nn.Module):
    """A bidirectional 2-layer LSTM encoder over packed sequences, a GRU cell decoder and attention."""

    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.LSTM(6, 40, num_layers=2, bidirectional=True, batch_first=True)
        self.decoder = nn.GRUCell(80, 80)
        self.attn = nn.MultiheadAttention(80, 4, batch_first=True)

    def forward(self, x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        packed = pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False)
        out, _ = self.encoder(packed)
        out, _ = nn.utils.rnn.pad_packed_sequence(out, batch_first=True, total_length=x.shape[1])
        pad = (torch.arange(x.shape[1])[None] >= lengths[:, None]).to(x.device)  # lengths on the CPU
        context, _ = self.attn(out, out, out, key_padding_mask=pad)
        h = context[:, 0]
        for t in range(5):
            h = self.decoder(context[:, t], h)
        return h.pow(2).sum() + context.sum()


def _seq2seq() -> Recording:
    torch.manual_seed(0)
    model = Seq2Seq()
    x = torch.randn(6, 300, 6)  # longer than max_time: hidden, gate and attention payloads are binned
    lengths = torch.tensor([300, 280, 300, 150, 299, 7])
    return _record(model, lambda: model(x, lengths))


def _plain_rnns() -> Recording:
    torch.manual_seed(1)
    model = nn.ModuleDict({"gru": nn.GRU(5, 70, batch_first=True), "rnn": nn.RNN(5, 9, num_layers=2),
                           "proj": nn.LSTM(5, 12, proj_size=4, batch_first=True), "cell": nn.RNNCell(5, 6)})
    x = torch.randn(4, 30, 5)

    def run() -> torch.Tensor:
        h = torch.zeros(4, 6)
        for t in range(8):
            h = model["cell"](x[:, t], h)
        return (model["gru"](x)[0][:, -1].sum() + model["rnn"](x.transpose(0, 1))[0].pow(2).sum()
                + model["proj"](x)[1][0].sum() + h.sum())

    return _record(model, run)


def _nonfinite() -> Recording:
    """A module whose states hold NaN and Inf from the first step."""
    torch.manual_seed(2)
    model = nn.LSTM(3, 8, batch_first=True)
    with torch.no_grad():
        model.weight_ih_l0[0, 0] = float("nan")
    x = torch.randn(2, 10, 3)
    x[0, 0, 0] = float("inf")
    return _record(model, lambda: model(x)[0].sum())


def _custom_attention() -> Recording:
    class Additive(nn.Module):
        def forward(self, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
            return torch.softmax(q @ k.transpose(1, 2), -1) @ k

    torch.manual_seed(3)
    model = nn.ModuleDict({"score": Additive()})
    q, k = torch.randn(3, 4, 8, requires_grad=True), torch.randn(3, 7, 8)
    causal = torch.ones(4, 7, dtype=torch.bool).triu(4)

    def weights(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        logits = (args[0] @ args[1].transpose(1, 2)).masked_fill(causal, -torch.inf)
        return torch.softmax(logits, -1)

    return _record(model, lambda: model["score"](q, k).sum(), attention={"score": weights})


CASES = {"seq2seq": _seq2seq, "plain": _plain_rnns, "nonfinite": _nonfinite, "custom_attention": _custom_attention}


def _report(recording: Recording, out: Collected) -> Reporter:
    reporter = Reporter(QUANTITIES, recording.records, Guard("test", strict=True))
    reporter.report(recording, out, step=7)
    reporter.report(recording, out, step=8, prefix="rnnviz/val", training=False)
    reporter.end_epoch(0, 8, out)
    return reporter


def _same(a: Any, b: Any, where: str) -> None:
    if isinstance(a, Mapping):
        assert isinstance(b, Mapping) and set(a) == set(b), where
        for key in a:
            _same(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, np.ndarray):
        assert isinstance(b, np.ndarray), f"{where}: {type(b).__name__} reached the output, not numpy"
        assert a.shape == b.shape and a.dtype == b.dtype, where
        np.testing.assert_allclose(b, a, rtol=1e-6, atol=1e-12, equal_nan=True, err_msg=where)
    elif isinstance(a, float):
        assert isinstance(b, float), where
        assert (np.isnan(a) and np.isnan(b)) or b == pytest.approx(a, rel=1e-6, abs=1e-12), where
    elif isinstance(a, torch.Tensor):  # state kept between recordings: on the host
        assert type(b) is torch.Tensor and b.device.type == "cpu", f"{where}: {type(b).__name__}"
        torch.testing.assert_close(b, a, equal_nan=True, msg=where)
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _same(x, y, f"{where}[{i}]")
    else:
        assert not isinstance(b, torch.Tensor), f"{where}: a tensor reached the output"
        assert a == b, where


def _bytes(recording: Recording) -> int:
    total = 0
    for record in recording.values():
        tensors = [record.attention] if isinstance(record, AttentionRecord) else [
            record.hidden, record.hidden_grad, record.cell, record.cell_grad, *record.gates.values()]
        total += sum(t.numel() * t.element_size() for t in tensors if t is not None)
    return total


@pytest.mark.filterwarnings("ignore:test. NaN/Inf", "ignore:LSTM with projections is not supported with oneDNN")
@pytest.mark.parametrize("case", sorted(CASES))
def test_reported_on_the_device_as_on_the_cpu(case):
    recording = CASES[case]()
    assert recording.records and not recording.errors
    on_cpu = Collected()
    cpu_reporter = _report(recording, on_cpu)

    on_device = Collected()
    moved = Recording({k: record_to_device(r) for k, r in recording.items()})
    with FakeDevice() as device:
        assert all(r.device == DEVICE for r in moved.values())
        device_reporter = _report(moved, on_device)
    for what in ("pictures", "scalars_", "histograms", "texts", "documents"):
        _same(getattr(on_cpu, what), getattr(on_device, what), what)
    assert on_cpu.pictures and on_cpu.scalars_ and on_cpu.texts and on_cpu.documents
    assert bool(on_cpu.histograms) == bool(recording.rnn())
    _same(cpu_reporter.state_dict(), device_reporter.state_dict(), "state")
    # What crossed to the host: the pictures' payloads, and statistics and buckets worth a few kB, never
    # the record; no single copy is larger than the largest array a picture shows.
    shown, largest = _payload_bytes(on_device.pictures)
    assert device.transfers < shown + 0.01 * _bytes(recording) + 16384, (device.transfers, shown)
    assert device.largest <= max(largest, 16384), (device.largest, largest)


def _payload_bytes(pictures: Mapping[str, Any]) -> tuple[int, int]:
    """Total and largest bytes of the numpy arrays in the pictures' payloads."""
    arrays = []

    def walk(value: Any) -> None:
        if isinstance(value, np.ndarray):
            arrays.append(value.nbytes)
        elif isinstance(value, Mapping):
            for item in value.values():
                walk(item)

    walk(dict(pictures))
    return sum(arrays), max(arrays, default=0)


def test_the_long_record_stays_on_the_device():
    """The seq2seq record (T=300, 2 layers x 2 directions x 40 units, 6 sequences) is 17.9 MB; what
    crosses is the pictures' binned payloads and under 1 % of it besides."""
    recording = _seq2seq()
    moved = Recording({k: record_to_device(r) for k, r in recording.items()})
    out = Collected()
    with FakeDevice() as device:
        _report(moved, out)
    record = _bytes(recording)
    shown, _ = _payload_bytes(out.pictures)
    assert record > 15_000_000 and shown < 0.08 * record
    assert device.transfers - shown < 0.01 * record, (device.transfers, shown)
    assert device.syncs < 200, device.syncs


@pytest.mark.filterwarnings("ignore:LSTM with projections is not supported with oneDNN")  # in _plain_rnns, once per process
def test_the_harness_catches_host_work_on_device_records():
    """The checks above could fail: the harness refuses numpy of a device tensor, mixing with a host
    tensor, and counts each copy."""
    x = to_device(torch.randn(4, 5))
    with FakeDevice() as device:
        assert isinstance(x.abs().sum(0), DeviceTensor) and x.device == DEVICE
        with pytest.raises(TypeError, match="numpy"):
            x.numpy()
        with pytest.raises(TypeError, match="numpy"):
            np.asarray(x)
        with pytest.raises(RuntimeError, match="same device"):
            x + torch.ones(5)
        assert isinstance(torch.arange(5, device=x.device), DeviceTensor)
        assert isinstance(torch.ones(5).to(x.device) + x, DeviceTensor)
        assert (x + torch.tensor(1.0)).shape == (4, 5)  # a 0-dim host tensor may mix, as on CUDA
        host = x.cpu()
        assert type(host) is torch.Tensor and device.transfers == 80
        float(x.sum())
        x[0].tolist()
        assert device.syncs == 3 and device.transfers == 80 + 4 + 20
    # The old host path: what the reporter did before records could stay on the device.
    record = record_to_device(_plain_rnns()["gru"])
    with FakeDevice(), pytest.raises(TypeError, match="numpy"):
        record.hidden[:, 0].numpy()


def test_probe_on_device_records_the_same_on_the_cpu():
    torch.manual_seed(4)
    model = nn.LSTM(3, 6, num_layers=2, batch_first=True)
    x = torch.randn(2, 9, 3)
    default = _record(model, lambda: model(x)[0].sum())
    kept = _record(model, lambda: model(x)[0].sum(), on_device=True)
    a, b = default[""], kept[""]
    assert isinstance(b, RNNRecord) and b.device.type == "cpu" and b.cpu() is b and kept.cpu()[""] is b
    for field in ("hidden", "hidden_grad", "cell", "cell_grad"):
        assert torch.equal(getattr(a, field), getattr(b, field))
    assert all(torch.equal(a.gates[g], b.gates[g]) for g in a.gates)


def test_cpu_copies_device_records_to_the_host():
    recording = _seq2seq()
    moved = Recording({k: record_to_device(r) for k, r in recording.items()}, {"x": "failed"})
    with FakeDevice() as device:
        back = moved.cpu()
        counts = recording["attn"].key_counts
        assert device.transfers == _bytes(recording) + counts.numel() * counts.element_size()
        for name, record in back.items():
            assert record.device.type == "cpu"
            if isinstance(record, RNNRecord):
                assert torch.equal(record.hidden, recording[name].hidden)
                assert all(type(g) is torch.Tensor for g in record.gates.values())
            else:
                assert torch.equal(record.attention, recording[name].attention)
    assert back.errors == {"x": "failed"}


@pytest.mark.parametrize("values", [
    torch.linspace(-1, 1, 1001), torch.tensor([0.0, 1.0, float("nan"), 1.0, float("inf")]),
    torch.full((7,), 0.5), torch.tensor([float("nan")]), torch.zeros(0),
    torch.randn(3, 4, 50) * 10, torch.randn(1_000_003) * 1e-3 + 0.25, torch.randn(500) * 1e19,
], ids=["linspace", "nonfinite", "constant", "all_nan", "empty", "normal", "million", "huge"])
def test_histogram_buckets_match_the_numpy_buckets(values):
    """Counted on the device, the buckets are those the sinks count from numpy (the same float32 index)."""
    expected = numpy_histogram(values.numpy())
    with FakeDevice():
        buckets = histogram_buckets(to_device(values))
    got = Histogram.from_buckets(buckets)
    if expected is None:
        assert got is None
        return
    assert (got.min, got.max, got.num) == (expected.min, expected.max, expected.num)
    # float32 partial sums of 64 values: float32 precision, relative to the sum of magnitudes
    magnitude = float(np.abs(values.numpy()[np.isfinite(values.numpy())]).astype(np.float64).sum())
    assert got.sum == pytest.approx(expected.sum, rel=1e-6, abs=1e-6 * magnitude + 1e-12)
    assert got.sum_squares == pytest.approx(expected.sum_squares, rel=1e-6)
    np.testing.assert_array_equal(got.counts, expected.counts)
    np.testing.assert_allclose(got.limits, expected.limits, rtol=1e-12)


def test_histogram_buckets_without_bincount(monkeypatch):
    """Where PyTorch refuses ``bincount`` (deterministic algorithms on some devices), a sort counts the same."""
    values = torch.randn(5000)
    expected = histogram_buckets(values)

    def refused(*args: Any, **kwargs: Any) -> torch.Tensor:
        raise RuntimeError("bincount does not have a deterministic implementation")

    monkeypatch.setattr(torch, "bincount", refused)
    got = histogram_buckets(values)
    np.testing.assert_array_equal(got["counts"], expected["counts"])
    assert got["counts"].sum() == 5000
