"""Short real fits of the forecasting libraries' models with ``RNNViz`` passed the library's own way
(pytorch-forecasting, darts, neuralforecast; see tests/helpers/forecasting.py): training is bit-identical with
and without the callback, every expected tag is written for each recurrent and attention module, and our
package warns nothing beyond what is expected.

Each test skips where its library is not installed (CI installs the three: ``.[test,forecast]``).
"""

from __future__ import annotations

import re
import warnings

import pytest
import torch

from lightning_rnnviz import RNNViz, RNNVizWarning
from tests.helpers.events import RunEvents
from tests.helpers.forecasting import HEADS, MODELS, STEPS, build

EVERY = 2

pytestmark = [
    pytest.mark.slow,
    # the libraries' own, on every fit: Lightning's save_hyperparameters on pytorch-forecasting's models
    pytest.mark.filterwarnings(
        r"ignore:Attribute '(loss|logging_metrics)' is an instance of `nn.Module` and is already saved"
        r":UserWarning"
    ),
]



@pytest.fixture(autouse=True)
def _one_intra_op_thread():
    """Tiny models: one intra-op thread is faster, and far steadier on a shared 2-core machine, where two
    OpenMP threads made these fits 3-5 times slower (a 6-step neuralforecast TFT: 6-9 s, 25-30 s under load)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


LSTM_GATES = ("input", "forget", "cell", "output")
GRU_GATES = ("reset", "update", "new")


def _library(name: str) -> None:
    pytest.importorskip(MODELS[name].library)


def _fit(name, callbacks, save_dir):
    """Fit, returning what it left and the RNNViz warnings it gave (every other warning follows the filters:
    an error unless filtered)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", RNNVizWarning)
        fitted = build(name, callbacks, save_dir)
    ours = [str(w.message) for w in caught if issubclass(w.category, RNNVizWarning)]
    others = [f"{w.category.__name__}: {w.message}" for w in caught if not issubclass(w.category, RNNVizWarning)]
    assert not others, others
    return fitted, ours


def _suffixes(module: torch.nn.RNNBase) -> list[str]:
    if module.num_layers == 1 and not module.bidirectional:
        return [""]
    return [f"/layer{layer}{'_reverse' if d else ''}" for layer in range(module.num_layers)
            for d in range(2 if module.bidirectional else 1)]


def _gates(module: torch.nn.RNNBase) -> tuple[str, ...]:
    return LSTM_GATES if isinstance(module, torch.nn.LSTM) else GRU_GATES if isinstance(module, torch.nn.GRU) else ()


def _expected_recurrent(name: str, module: torch.nn.RNNBase) -> dict[str, set[str]]:
    """The tags of one recurrent module, by kind, training and validation."""
    images = {f"rnnviz/{q}/{name}" for q in ("hidden", "grad_norm", "grad_decay", "val/hidden")}
    scalars = {f"rnnviz/{q}/{name}/exact" for q in ("hidden", "grad_norm")}
    histograms = {f"rnnviz/hidden_dist/{name}", f"rnnviz/val/hidden_dist/{name}"}
    for sfx in _suffixes(module):
        scalars |= {f"rnnviz/hidden/{name}/{s}{sfx}" for s in ("mean_abs", "saturated", "step_change")}
        scalars |= {f"rnnviz/grad_norm/{name}/{s}{sfx}"
                    for s in ("first_norm", "last_norm", "log10_ratio", "decay_per_step", "horizon")}
    gates = _gates(module)
    if gates:
        images |= {f"rnnviz/gates/{name}", f"rnnviz/val/gates/{name}"}
        scalars.add(f"rnnviz/gates/{name}/exact")
        for gate in gates:
            histograms |= {f"rnnviz/gates_dist/{name}/{gate}", f"rnnviz/val/gates_dist/{name}/{gate}"}
            for sfx in _suffixes(module):
                scalars |= {f"rnnviz/gates/{name}/{gate}_{s}{sfx}"
                            for s in ("mean", "saturated_low", "saturated_high")}
    return {"images": images, "scalars": scalars, "histograms": histograms}


def _expected_attention(name: str, heads: int) -> dict[str, set[str]]:
    scalars = {f"rnnviz/attention/{name}/exact"}
    scalars |= {f"rnnviz/attention/{name}/{s}/head{h}" for s in ("entropy", "entropy_norm", "focus")
                for h in range(heads)}
    return {"images": {f"rnnviz/attention/{name}", f"rnnviz/val/attention/{name}"}, "scalars": scalars}


def _missing(events: RunEvents, expected: dict[str, set[str]]) -> dict[str, list[str]]:
    tags = events.Tags()
    missing = {kind: sorted(want - set(tags.get(kind, []))) for kind, want in expected.items()}
    return {kind: tags for kind, tags in missing.items() if tags}


def _recorded_steps() -> list[int]:
    """The training steps a recording falls on: the first, then Lightning's logging rule for EVERY."""
    return sorted({0} | {s for s in range(STEPS) if (s + 1) % EVERY == 0})


@pytest.mark.parametrize("name", list(MODELS))
def test_fit_is_bit_identical_and_writes_every_recurrent_tag(tmp_path, name):
    _library(name)
    spec = MODELS[name]
    plain, _ = _fit(name, [], tmp_path / "without")
    callback = RNNViz(every_n_steps=EVERY, strict=True, scalars="all")  # every tag, `exact` flags included
    watched, ours = _fit(name, [callback], tmp_path / "with")

    # Training is bit-identical: every state_dict entry.
    assert plain.global_step == watched.global_step == STEPS
    before, after = plain.weights(), watched.weights()
    assert before.keys() == after.keys()
    differ = [k for k in before if not torch.equal(before[k], after[k])]
    assert not differ, f"{name}: weights differ with the callback: {differ}"

    # Our package warned nothing beyond what is expected of this model.
    unexpected = [m for m in ours if not any(re.search(p, m) for p in spec.expected_warnings)]
    assert not unexpected, unexpected

    # The recurrent modules are the ones this table names (a library release that renames them shows here).
    modules = dict(watched.module.named_modules())
    recurrent = sorted(n for n, m in modules.items() if isinstance(m, torch.nn.RNNBase))
    assert recurrent == sorted(spec.recurrent)

    events = RunEvents(watched.log_dir)
    assert (watched.log_dir / "rnnviz").is_dir(), sorted(events.runs)
    expected: dict[str, set[str]] = {}
    for module_name in spec.recurrent:
        for kind, tags in _expected_recurrent(module_name, modules[module_name]).items():
            expected.setdefault(kind, set()).update(tags)
    assert not _missing(events, expected), f"{name}: tags missing: {_missing(events, expected)}"
    assert "rnnviz/findings" in events.Tags()["tensors"]
    for module_name in spec.recurrent:
        for quantity in ("hidden", "grad_norm"):
            steps = [e.step for e in events.Images(f"rnnviz/{quantity}/{module_name}")]
            assert steps == _recorded_steps(), (module_name, quantity, steps)
    # Every record was checked against what the modules returned, and matched (CPU, float32).
    assert _not_exact(events, spec.recurrent) == {}


def _not_exact(events: RunEvents, modules) -> dict[str, list[float]]:
    """The ``.../<module>/exact`` scalars of ``modules`` that are not 1 at every recorded step."""
    out = {}
    for tag in events.Tags()["scalars"]:
        if tag.endswith("/exact") and tag.split("/")[2] in modules:
            values = sorted({e.value for e in events.Scalars(tag)})
            if values != [1.0]:
                out[tag] = values
    return out


TFTS = [name for name, spec in MODELS.items() if spec.attention]


@pytest.mark.parametrize("name", TFTS)
def test_tft_attention_is_recorded_without_an_extractor(tmp_path, name):
    _library(name)
    spec = MODELS[name]
    watched, _ = _fit(name, [RNNViz(every_n_steps=EVERY, strict=True, scalars="all")], tmp_path)
    events = RunEvents(watched.log_dir)
    expected: dict[str, set[str]] = {}
    for module_name in spec.attention:
        for kind, tags in _expected_attention(module_name, HEADS).items():
            expected.setdefault(kind, set()).update(tags)
    assert not _missing(events, expected), f"{name}: tags missing: {_missing(events, expected)}"
    for module_name in spec.attention:
        steps = [e.step for e in events.Images(f"rnnviz/attention/{module_name}")]
        assert steps == _recorded_steps(), (module_name, steps)
    assert _not_exact(events, spec.attention) == {}

