"""Assertions shared by the probe tests: a record against the step-by-step reference."""

from __future__ import annotations

import torch

from lightning_rnnviz.probe.records import RNNRecord
from tests.helpers.reference import RNNReference

VAL_TOL = dict(rtol=1e-5, atol=1e-5)
GRAD_TOL = dict(rtol=1e-4, atol=1e-5)


def close(actual, expected, what: str, tol) -> None:
    assert actual is not None, f"{what} is None"
    assert actual.dtype == torch.float32, f"{what} dtype {actual.dtype}"
    assert actual.device.type == "cpu", f"{what} on {actual.device}"
    got, want = tuple(actual.shape), tuple(expected.shape)
    assert got == want, f"{what}: shape {got} != {want}"
    torch.testing.assert_close(actual, expected.float(), **tol, msg=lambda m: f"{what}: {m}")


def assert_matches(r: RNNRecord, ref: RNNReference, *, grads: bool = True, grad_scale: float = 1.0) -> None:
    """Every field of ``r`` against the reference (``grads=False``: gradients must be absent)."""
    assert isinstance(r, RNNRecord)
    assert r.kind == ref.kind
    assert r.num_layers == ref.num_layers
    assert r.num_directions == ref.num_directions
    assert r.exact is True
    assert torch.equal(r.lengths.long(), ref.lengths.long()), (r.lengths, ref.lengths)
    close(r.hidden, ref.hidden(), "hidden", VAL_TOL)

    expected_gates = ref.gates()
    assert set(r.gates) == set(expected_gates), sorted(r.gates)
    for name, value in expected_gates.items():
        close(r.gates[name], value, f"gates[{name!r}]", VAL_TOL)

    if ref.kind.startswith("LSTM"):
        close(r.cell, ref.cell(), "cell", VAL_TOL)
    else:
        assert r.cell is None and r.cell_grad is None

    if not grads:
        assert r.hidden_grad is None
        assert r.cell_grad is None
        assert r.grad_norm is None
        return
    close(r.hidden_grad, ref.hidden_grad() / grad_scale, "hidden_grad", GRAD_TOL)
    if ref.kind.startswith("LSTM"):
        close(r.cell_grad, ref.cell_grad() / grad_scale, "cell_grad", GRAD_TOL)
    gn = r.grad_norm
    assert gn is not None and tuple(gn.shape) == (ref.rows, ref.time)
    # lined up as the record says (tests/probe/test_grad_alignment.py checks when each alignment is chosen)
    expected = ref.grad_norm(r.grad_alignment) / grad_scale
    torch.testing.assert_close(gn, expected.float(), equal_nan=True, **GRAD_TOL)

    # padded steps are exactly zero everywhere
    pad = ~ref.valid_mask()
    if pad.any():
        assert not r.hidden[:, pad].any()
        assert not r.hidden_grad[:, pad].any()
        for g in r.gates.values():
            assert not g[:, pad].any()
        if r.cell is not None:
            assert not r.cell[:, pad].any() and not r.cell_grad[:, pad].any()
