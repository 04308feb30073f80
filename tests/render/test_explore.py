"""The probe set (issue 25): one recording's explorer data as a blob, compared with real ``Probe`` records of an
``nn.LSTM``, a bidirectional 2-layer ``nn.GRU`` on packed input and an ``nn.MultiheadAttention``."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from lightning_rnnviz import Probe
from lightning_rnnviz.payload import unpack
from lightning_rnnviz.probe.records import RNNRecord
from lightning_rnnviz.render.explore import MAX_BYTES, probe_set
from tests.helpers.fake_device import FakeDevice, record_to_device


def _lstm_record(hidden: int = 6, layers: int = 2, batch: int = 5, steps: int = 7) -> RNNRecord:
    torch.manual_seed(0)
    lstm = nn.LSTM(3, hidden, num_layers=layers, batch_first=True)
    x = torch.randn(batch, steps, 3)
    with Probe(lstm, strict=True).record() as recording:
        out, _ = lstm(x)
        out[:, -1].pow(2).sum().backward()  # many-to-one: the gradient fades going back
    return recording[""]


def _gru_record() -> RNNRecord:
    torch.manual_seed(1)
    gru = nn.GRU(3, 5, num_layers=2, bidirectional=True, batch_first=True)
    lengths = torch.tensor([6, 3, 5, 2])
    x = torch.randn(4, 6, 3)
    with Probe(gru, strict=True).record() as recording:
        packed = pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False)
        out, _ = pad_packed_sequence(gru(packed)[0], batch_first=True)
        out.pow(2).sum().backward()
    return recording[""]


def _attention_record():
    torch.manual_seed(2)
    attn = nn.MultiheadAttention(8, 2, batch_first=True)
    x = torch.randn(3, 5, 8)
    mask = torch.tensor([[False] * 5, [False] * 3 + [True] * 2, [False] * 4 + [True]])
    with Probe(attn, strict=True).record() as recording:
        out, _ = attn(x, x, x, key_padding_mask=mask)
        out.sum().backward()
    return recording[""]


def _layer(header, module=0, index=0):
    return header["modules"][module]["layers"][index]


def _horizon_reference(norm: np.ndarray, length: int, reverse: bool) -> int | None:
    """The grad_norm picture's definition, followed step by step: from the last step the direction processes,
    going back, the first step below 1 % of the sequence's peak."""
    curve = norm[:length]
    level = 0.01 * curve.max()
    order = range(length) if reverse else range(length - 1, -1, -1)
    for t in order:
        if curve[t] < level * (1 - 1e-6):
            return t
    return None


def test_lstm_probe_set_holds_the_records_tensors_at_its_rows():
    record = _lstm_record()
    rows = [3, 1]
    header, array = unpack(probe_set({"lstm": record}, rows, step=12, source="training"))
    assert header["format"] == "rnnviz-probe-set" and header["version"] == 1
    assert (header["step"], header["source"], header["rows"], header["steps"]) == (12, "training", rows, 7)
    assert header["lengths"] == [7, 7] and header["tokens"] is None
    module = header["modules"][0]
    assert (module["type"], module["name"], module["kind"], module["exact"]) == ("rnn", "lstm", "LSTM", True)
    assert [(la["layer"], la["direction"], la["label"]) for la in module["layers"]] == [
        (0, 0, "layer 0"), (1, 0, "layer 1")]
    for i, layer in enumerate(module["layers"]):
        assert layer["units"] == list(range(6)) and layer["units_total"] == 6 and layer["gate_units"] == list(range(6))
        np.testing.assert_array_equal(array(layer["hidden"]), record.hidden[i, rows].numpy())
        assert sorted(layer["gates"]) == sorted(["input", "forget", "cell", "output"])
        for gate, ref in layer["gates"].items():
            np.testing.assert_array_equal(array(ref), record.gates[gate][i, rows].numpy())
        norm = torch.linalg.vector_norm(record.hidden_grad[i, rows], dim=-1).numpy()
        np.testing.assert_allclose(array(layer["grad_norm"]), norm, rtol=1e-6)
        assert layer["horizon"] == [_horizon_reference(n, 7, False) for n in norm]
    assert any(h is not None for la in module["layers"] for h in la["horizon"])  # the gradient fades in time


def test_bidirectional_gru_on_packed_input_zero_past_each_length():
    record = _gru_record()
    rows = [0, 1, 3]
    header, array = unpack(probe_set({"enc.gru": record}, rows, step=0, source="training",
                                     tokens=[list("abcdef"), None, ["x", "y"]]))
    assert header["lengths"] == [6, 3, 2]
    assert header["tokens"] == [list("abcdef"), None, ["x", "y", "", "", "", ""]]
    layers = header["modules"][0]["layers"]
    assert [(la["layer"], la["direction"], la["label"]) for la in layers] == [
        (0, 0, "layer 0 forward"), (0, 1, "layer 0 reverse"), (1, 0, "layer 1 forward"), (1, 1, "layer 1 reverse")]
    for i, layer in enumerate(layers):
        hidden = array(layer["hidden"])
        np.testing.assert_array_equal(hidden, record.hidden[i, rows].numpy())
        norm = array(layer["grad_norm"])
        for k, length in enumerate(header["lengths"]):
            assert not hidden[k, length:].any() and not norm[k, length:].any()
            assert hidden[k, :length].any() and (norm[k, :length] > 0).all()
            for gate in ("reset", "update", "new"):
                assert not array(layer["gates"][gate])[k, length:].any()
            assert layer["horizon"][k] == _horizon_reference(norm[k], length, layer["direction"] == 1)


def test_attention_weights_per_head_with_padded_keys_zero():
    record = _attention_record()
    rows = [2, 1]
    header, array = unpack(probe_set({"attn": record}, rows, step=4, source="validation"))
    module = header["modules"][0]
    assert (module["type"], module["kind"], module["heads"]) == ("attention", "MultiheadAttention", 2)
    assert module["key_lengths"] == [4, 3] and module["query_lengths"] == [4, 3]
    assert module["tokens_are_steps"] is True and header["steps"] == 5 and header["lengths"] == [4, 3]
    weights = array(module["weights"])
    np.testing.assert_array_equal(weights, record.attention[rows].numpy())
    assert not weights[0, :, :, 4:].any() and not weights[1, :, :, 3:].any()
    assert any("no gradients" in n for n in header["notes"])


def test_units_by_variance_over_valid_steps():
    torch.manual_seed(3)
    hidden = 0.01 * torch.randn(1, 4, 10, 300)
    loud = [7, 42, 299]
    hidden[0, :, :, loud] *= 100
    hidden[0, 1, 6:] = 0  # padding
    hidden[0, 1, 6:, 5] = 1000.0  # a unit loud only on padded steps: not chosen
    record = RNNRecord("rnn", "RNN_TANH", hidden, {}, None, None, None, torch.tensor([10, 6, 10, 10]))
    header, array = unpack(probe_set({"rnn": record}, [0, 1, 2, 3], step=1, source="validation", max_units=3))
    layer = _layer(header)
    assert layer["units"] == loud and layer["units_total"] == 300
    np.testing.assert_array_equal(array(layer["hidden"])[1, :6], hidden[0, 1, :6][:, loud].numpy())
    assert not array(layer["hidden"])[1, 6:].any()
    assert any("the 3 of 300 units with the largest variance" in n for n in header["notes"])
    # 256 by default
    header, array = unpack(probe_set({"rnn": record}, [0, 1], step=1, source="validation"))
    assert len(_layer(header)["units"]) == 256 and set(loud) <= set(_layer(header)["units"])
    assert array(_layer(header)["hidden"]).shape == (2, 10, 256)


def test_the_size_bound_drops_sequences_from_the_end_and_says_so():
    record = _lstm_record(hidden=64, layers=1, batch=8, steps=50)
    whole = probe_set({"lstm": record}, range(8), step=0, source="training")
    header, _ = unpack(whole)
    assert header["rows"] == list(range(8)) and len(whole) == header["bytes"]
    bound = len(whole) // 3
    blob = probe_set({"lstm": record}, range(8), step=0, source="training", max_bytes=bound)
    header, array = unpack(blob)
    assert len(blob) <= bound and header["bytes"] == len(blob)
    k = len(header["rows"])
    assert header["rows"] == list(range(k)) and 1 <= k < 8 and len(header["lengths"]) == k
    # as many as fit: one more would not
    assert len(probe_set({"lstm": record}, range(k + 1), step=0, source="training")) > bound
    np.testing.assert_array_equal(array(_layer(header)["hidden"]), record.hidden[0, :k].numpy())
    assert any(f"{k} of the 8 sequences" in n for n in header["notes"])
    with pytest.raises(ValueError, match="one sequence of the probe set takes"):
        probe_set({"lstm": record}, range(8), step=0, source="training", max_bytes=1000)


def test_large_lstm_fits_the_default_bound():
    """LSTM 2 x 512, 200 steps: 256 units a layer, and as many of 8 sequences as fit 2 MiB (one)."""
    record = _lstm_record(hidden=512, layers=2, batch=8, steps=200)
    blob = probe_set({"lstm": record}, range(8), step=0, source="training")
    header, array = unpack(blob)
    assert len(blob) <= MAX_BYTES == 2 * 1024 * 1024
    assert all(len(la["units"]) == 256 for la in header["modules"][0]["layers"])
    assert header["rows"] == [0]
    layer = _layer(header, index=1)
    np.testing.assert_array_equal(array(layer["hidden"])[0], record.hidden[1, 0][:, layer["units"]].numpy())


def test_rows_past_the_batch_are_left_out_and_arguments_checked():
    record = _gru_record()
    header, _ = unpack(probe_set({"gru": record}, [2, 9], step=0, source="training"))
    assert header["rows"] == [2] and any("rows 9 were not recorded" in n for n in header["notes"])
    with pytest.raises(ValueError, match="none of the rows"):
        probe_set({"gru": record}, [9], step=0, source="training")
    with pytest.raises(ValueError, match="source"):
        probe_set({"gru": record}, [0], step=0, source="test")
    with pytest.raises(ValueError, match="at least one record"):
        probe_set({}, [0], step=0, source="training")


def test_header_is_plain_json_with_nulls_for_missing_gradients():
    record = _lstm_record()
    record.hidden_grad = None
    header, _ = unpack(probe_set({"lstm": record}, [0], step=2, source="training"))
    assert _layer(header)["grad_norm"] is None and _layer(header)["horizon"] is None
    assert any("no gradients for 'lstm'" in n for n in header["notes"])
    json.dumps(header, allow_nan=False)


def test_records_on_a_device_give_the_same_blob_and_only_it_crosses():
    cpu = {"gru": _gru_record(), "attn": _attention_record()}
    rows = [1, 0]
    # the attention's 3 sequences bound the batch
    expected = probe_set(cpu, rows, step=3, source="training")
    moved = {k: record_to_device(r) for k, r in cpu.items()}
    with FakeDevice() as device:
        blob = probe_set(moved, rows, step=3, source="training")
    assert blob == expected
    # what crossed: the blob's arrays, and the gradient norms of every recorded sequence (float64, computed once
    # per record for the statistics too), never the record
    gru = cpu["gru"]
    norms = 8 * gru.hidden.shape[0] * gru.batch * gru.time
    assert device.transfers <= len(blob) + norms, (device.transfers, len(blob), norms)
    record_bytes = sum(t.numel() * 4 for t in [gru.hidden, gru.hidden_grad, *gru.gates.values()])
    assert device.transfers < record_bytes


def _top(values: np.ndarray, mask: np.ndarray, most: int) -> list[int]:
    """The ``most`` units of the largest variance over the valid steps, ascending (numpy, for reference)."""
    valid = values[mask]  # (steps, units)
    return sorted(np.argsort(-valid.var(0), kind="stable")[:most].tolist())


def test_where_one_sequence_does_not_fit_fewer_units_are_kept():
    record = _lstm_record(hidden=64, layers=1, batch=2, steps=50)
    one = len(probe_set({"lstm": record}, [0], step=0, source="training"))
    bound = one // 2
    blob = probe_set({"lstm": record}, [0, 1], step=0, source="training", max_bytes=bound)
    header, array = unpack(blob)
    layer = _layer(header)
    assert len(blob) <= bound and header["rows"] == [0]
    cap = len(layer["units"])
    assert 1 <= cap < 64 and layer["gate_units"] == layer["units"]
    # the variance over the probe set asked for (both sequences), as the units were chosen before the bound
    both = record.hidden[0, :2].numpy()
    assert layer["units"] == _top(both, np.ones((2, 50), bool), cap)
    np.testing.assert_array_equal(array(layer["hidden"]), record.hidden[0, :1][..., layer["units"]].numpy())
    np.testing.assert_array_equal(array(layer["gates"]["forget"]),
                                  record.gates["forget"][0, :1][..., layer["units"]].numpy())
    assert array(layer["grad_norm"]).shape == (1, 50)
    assert any(f"at most {cap} units per layer" in n for n in header["notes"])
    assert any("1 of the 2 sequences" in n for n in header["notes"])


@pytest.mark.filterwarnings("ignore:LSTM with projections is not supported with oneDNN")
def test_a_projected_lstm_chooses_its_gate_units_apart():
    torch.manual_seed(4)
    lstm = nn.LSTM(3, 6, proj_size=4, batch_first=True)
    with Probe(lstm, strict=True).record() as recording:
        lstm(torch.randn(3, 5, 3))[0].sum().backward()
    record = recording[""]
    header, array = unpack(probe_set({"lstm": record}, [0, 2], step=0, source="training"))
    layer = _layer(header)
    assert (layer["units"], layer["units_total"], layer["gate_units"]) == ([0, 1, 2, 3], 4, list(range(6)))
    header, array = unpack(probe_set({"lstm": record}, [0, 2], step=0, source="training", max_units=3))
    layer = _layer(header)
    mask = np.ones((2, 5), bool)
    assert layer["units"] == _top(record.hidden[0, [0, 2]].numpy(), mask, 3)
    gates = sum(record.gates[g][0, [0, 2]].numpy()[mask].var(0) for g in record.gates)
    assert layer["gate_units"] == sorted(np.argsort(-gates, kind="stable")[:3].tolist())
    np.testing.assert_array_equal(array(layer["gates"]["cell"]),
                                  record.gates["cell"][0, [0, 2]][..., layer["gate_units"]].numpy())
