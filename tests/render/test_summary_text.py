"""``summary.json``'s text: the compact JSON of the reporter's summary document, each epoch's record encoded
once (the file is rewritten at every epoch end and grows with the epochs), afresh where a record was
replaced."""

from __future__ import annotations

import json

import lightning_rnnviz.render.report as report
from lightning_rnnviz.render.findings import Finding
from lightning_rnnviz.render.report import QUANTITIES, Guard, Reporter


def _compact(document: dict) -> str:
    return json.dumps(document, separators=(",", ":"), allow_nan=False)


def _record(epoch: int) -> dict:
    return {"step": 10 * epoch, "recordings": 2, "length": 30.0, "exact": epoch % 2 == 0,
            "horizon": [float(epoch), None], "grad_norm": [[1e-3 * epoch, 0.5], [None, 2.0]],
            "shown": ["calls 0-1 chained, \"quoted\""]}


def _reporter(epochs: int) -> Reporter:
    reporter = Reporter(QUANTITIES, ["net", "décodeur"], Guard("test", strict=True))
    for name, kind in (("net", "LSTM"), ("décodeur", "GRU")):
        entry = reporter.summary.setdefault(name, {"kind": kind, "rows": ["layer 0", "layer 1"],
                                                   "epochs": {}})
        for epoch in range(epochs):  # 10 and 11 come after 9, as numbers
            entry["epochs"][epoch] = _record(epoch)
    reporter.findings = [Finding("vanishing_gradient", "net", 11, 2.5, 5.0, "gradient horizon 2.5 steps",
                                 layer=0, step=110, since=10)]
    reporter.pending = [Finding("nonfinite", "décodeur", 11, float("nan"), 0.0, "NaN", step=110)]
    return reporter


def test_the_text_is_the_compact_json_of_the_summary_document():
    reporter = _reporter(12)
    assert reporter.summary_text() == _compact(reporter.summary_document())
    assert Reporter(QUANTITIES, [], Guard("test")).summary_text() == _compact(
        Reporter(QUANTITIES, [], Guard("test")).summary_document())


def test_each_record_is_encoded_once_and_a_replaced_one_afresh(monkeypatch):
    reporter = _reporter(12)
    encoded: list[object] = []
    real = report._compact

    def counting(value: object) -> str:
        encoded.append(value)
        return real(value)

    monkeypatch.setattr(report, "_compact", counting)
    reporter.summary_text()
    records = [r for r in encoded if isinstance(r, dict)]
    assert len(records) == 24  # two modules, twelve epochs
    encoded.clear()
    reporter.summary["net"]["epochs"][12] = _record(12)
    assert reporter.summary_text() == _compact(reporter.summary_document())
    assert [r for r in encoded if isinstance(r, dict)] == [_record(12)]  # only the new epoch's
    # a resume (load_state_dict) keeps the records it is given: the one replaced is encoded afresh
    state = reporter.state_dict()
    state["summary"]["net"]["epochs"][3] = {**_record(3), "horizon": [99.0, None]}
    reporter.load_state_dict(state)
    encoded.clear()
    text = reporter.summary_text()
    assert text == _compact(reporter.summary_document())
    assert json.loads(text)["modules"]["net"]["epochs"]["3"]["horizon"] == [99.0, None]
    assert [r for r in encoded if isinstance(r, dict)] == [{**_record(3), "horizon": [99.0, None]}]
