"""Offline comparison: ``summary.json`` files written by hand in the vanishing-gradients example's layout,
read back, printed, drawn and compared through ``python -m lightning_rnnviz`` (in a subprocess and in
process), with every error a one-line ``error: ...`` and exit status 2."""

from __future__ import annotations

import html
import io
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from xml.etree import ElementTree

import numpy as np
import pytest
import tomllib
from PIL import Image

from lightning_rnnviz.cli import main
from lightning_rnnviz.render import offline
from lightning_rnnviz.render.gradients import NEAR_ZERO_LABEL
from lightning_rnnviz.render.offline import SummaryError, find_runs, read_summary, run_labels

ROOT = Path(__file__).resolve().parents[2]
LENGTH = 30
KINDS = {"rnn": "RNN_TANH", "gru": "GRU", "lstm": "LSTM"}


def grad_curve(kind: str, epoch: int) -> list[float | None]:
    """Plausible ``||dL/dh_t||``: the vanilla RNN's falls 0.21 decades per step back and underflows to zero
    at the first steps; the GRU's flattens with training and has a step without a finite value (null); the
    LSTM's tilts up."""
    slope = {"rnn": 0.21, "gru": 0.12 - 0.05 * epoch, "lstm": 0.08 - 0.06 * epoch}[kind]
    scale = {"rnn": 0.8, "gru": 0.5, "lstm": 0.3}[kind]
    curve: list[float | None] = [scale * 10 ** (-slope * (LENGTH - 1 - t)) for t in range(LENGTH)]
    if kind == "rnn":
        curve[:3] = [0.0, 0.0, 0.0]
    if kind == "gru":
        curve[10] = None
    return curve


def summary_document(kind: str, epochs: int = 3) -> dict:
    record_epochs = {}
    for e in range(epochs):
        record = {
            "step": 8 * (e + 1),
            "recordings": 3,
            "horizon": [{"rnn": 3.5, "gru": 9.0 + 5 * e, "lstm": 14.0 + 6 * e}[kind]],
            "decay_per_step": [{"rnn": -0.21, "gru": -(0.12 - 0.05 * e), "lstm": -(0.08 - 0.06 * e)}[kind]],
            "log10_ratio": [None if kind == "rnn" else round(-3.4 + e, 6)],
            "grad_norm": [grad_curve(kind, e)],
        }
        if kind == "gru":
            record["gate_means"] = {"reset": [0.51], "update": [round(0.5 + 0.1 * e, 6)]}
        if kind == "lstm":
            record["gate_means"] = {"input": [0.5], "forget": [0.73], "cell": [None], "output": [0.5]}
        record_epochs[str(e)] = record
    if kind == "lstm":  # a validation-only last epoch: no statistics, no curve
        record_epochs[str(epochs)] = {"step": 8 * epochs, "recordings": 0}
    findings = []
    if kind == "rnn":
        findings = [
            {"kind": "vanishing_gradient", "module": "rnn", "epoch": e, "layer": 0, "direction": None,
             "head": None, "gate": None, "value": 3.5, "threshold": 15.0, "step": 8 * (e + 1),
             "message": "the gradient reaches back 3.5 steps; a gated cell usually helps."}
            for e in range(epochs)
        ]
    return {"format": "lightning_rnnviz.summary", "version": 1,
            "modules": {"rnn": {"kind": KINDS[kind], "rows": ["layer 0"], "epochs": record_epochs}},
            "findings": findings}


def write_summary(run: Path, document: dict | str) -> Path:
    path = run / "rnnviz" / "summary.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(document if isinstance(document, str) else json.dumps(document, indent=1))
    return path


@pytest.fixture
def logs(tmp_path) -> Path:
    """``<save>/<kind>/version_0/rnnviz/summary.json`` for rnn, gru and lstm, as the example writes them."""
    for kind in KINDS:
        write_summary(tmp_path / "logs" / kind / "version_0", summary_document(kind))
    return tmp_path / "logs"


def bidirectional_document(epochs: int = 2, length: int = 40) -> dict:
    rows = ["layer 0 forward", "layer 0 reverse", "layer 1 forward", "layer 1 reverse"]
    t = np.arange(length)
    curves = [[float(10 ** (-0.03 * (length - 1 - t[i] if r % 2 == 0 else t[i]) * (1 + r))) for i in t]
              for r in range(4)]
    record = {"step": 5, "horizon": [12.0, 11.0, None, 4.0], "decay_per_step": [-0.03, -0.03, -0.06, -0.09],
              "log10_ratio": [-1.2, -1.2, -2.3, -3.5], "grad_norm": curves}
    return {
        "format": "lightning_rnnviz.summary", "version": 1,
        "modules": {
            "encoder.lstm": {"kind": "LSTM", "rows": rows, "epochs": {str(e): record for e in range(epochs)}},
            "decoder.attn": {"kind": "attention", "rows": ["head 0", "head 1"], "epochs": {
                "0": {"step": 5, "recordings": 2, "entropy_norm": [0.91, None], "entropy": [1.25, 0.31],
                      "focus": [0.2, 0.99]}}},
        },
        "findings": [
            {"kind": "exploding_gradient", "module": "encoder.lstm", "epoch": epochs - 1, "layer": 1,
             "direction": "reverse", "value": 1.3, "threshold": 1.0, "message": "grows back in time.",
             "step": 5},
            {"kind": "nonfinite", "module": "encoder.lstm", "epoch": epochs - 1, "value": 1, "threshold": 0,
             "message": "1 of 2 recordings held NaN/Inf."},
            {"kind": "attention_collapse", "module": "decoder.attn", "epoch": 0, "head": 1, "value": 0.99,
             "threshold": 0.9, "message": "every query looks at the same key."},
        ],
    }


def attention_document(sharpen: float, heads: int = 2, epochs: int = 3, name: str = "decoder.attn") -> dict:
    """An attention module as the callback writes it: rows are heads, per epoch ``entropy_norm``, ``entropy``
    (nats, over 10 keys) and ``focus`` per head; head ``h`` sharpens ``sharpen * (1 + h)`` per epoch. The last
    head collapses at the last epoch where ``sharpen`` >= 0.1."""
    record_epochs = {}
    for e in range(epochs):
        norm = [round(0.95 - sharpen * (1 + h) * e, 6) for h in range(heads)]
        record_epochs[str(e)] = {
            "step": 10 * (e + 1), "recordings": 2, "entropy_norm": norm,
            "entropy": [round(v * float(np.log(10)), 6) for v in norm],
            "focus": [round(0.15 + sharpen * (1 + h) * e, 6) for h in range(heads)],
        }
    findings = []
    if sharpen >= 0.1:
        findings.append({"kind": "attention_collapse", "module": name, "epoch": epochs - 1, "head": heads - 1,
                         "value": 0.95, "threshold": 0.9, "message": "every query looks at the same key."})
    return {"format": "lightning_rnnviz.summary", "version": 1,
            "modules": {name: {"kind": "attention", "rows": [f"head {h}" for h in range(heads)],
                               "epochs": record_epochs}},
            "findings": findings}


def run_cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return subprocess.run([sys.executable, "-m", "lightning_rnnviz", *map(str, args)], capture_output=True,
                          text=True, env=env, cwd=ROOT, timeout=120, check=False)


def run_main(capsys, *args: str) -> tuple[int, str, str]:
    status = main([str(a) for a in args])
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def assert_one_line_error(err: str, match: str) -> None:
    assert err.startswith("error: ") and err.endswith("\n") and err.count("\n") == 1, err
    assert "Traceback" not in err
    assert re.search(match, err), err


# --- reading ----------------------------------------------------------------------------------------------
def test_read_summary_from_every_kind_of_path(logs):
    run = logs / "gru" / "version_0"
    for path in (run, run / "rnnviz", run / "rnnviz" / "summary.json", logs / "gru"):
        summary = read_summary(path)
        assert summary.path == run / "rnnviz" / "summary.json"
        assert summary.run_dir == run
    module = summary.module("rnn")
    assert (module.kind, module.rows, sorted(module.epochs)) == ("GRU", ["layer 0"], [0, 1, 2])
    epoch = module.epochs[1]
    assert (epoch.step, epoch.recordings, epoch.horizon) == (16, 3, [14.0])
    assert epoch.gate_means == {"reset": [0.51], "update": [0.6]}
    assert epoch.grad_norm.shape == (1, LENGTH) and np.isnan(epoch.grad_norm[0, 10])
    assert epoch.entropy_norm is None and epoch.stat("update", 0) == 0.6 and epoch.stat("focus", 0) is None


def test_nulls_are_nan_and_missing_fields_none(logs):
    rnn = read_summary(logs / "rnn" / "version_0").module("rnn")
    assert np.isnan(rnn.epochs[2].log10_ratio[0]) and rnn.epochs[2].gate_means == {}
    assert (rnn.epochs[2].grad_norm[0, :3] == 0).all()
    lstm = read_summary(logs / "lstm" / "version_0").module("rnn")
    assert sorted(lstm.epochs) == [0, 1, 2, 3]
    assert lstm.epochs[3].horizon is None and lstm.epochs[3].grad_norm is None
    assert np.isnan(lstm.epochs[0].gate_means["cell"][0])
    assert (lstm.last_epoch(), lstm.last_epoch(with_curve=True)) == (3, 2)
    [finding] = [f for f in read_summary(logs / "rnn" / "version_0").findings if f.epoch == 0]
    assert (finding.kind, finding.where) == ("vanishing_gradient", "layer 0")
    assert (finding.value, finding.threshold) == (3.5, 15.0)


def test_find_runs_lists_every_run_below_a_folder(logs):
    expected = [logs / k / "version_0" / "rnnviz" / "summary.json" for k in ("gru", "lstm", "rnn")]
    assert find_runs(logs) == expected


def test_run_labels():
    assert run_labels(["s/rnn/version_0", "s/gru/version_0", "s/lstm/version_0"]) == ["rnn", "gru", "lstm"]
    assert run_labels(["s/lstm/version_0", "s/lstm/version_1"]) == ["version_0", "version_1"]
    assert run_labels(["a/x/run", "b/y/run"]) == ["x/run", "y/run"]
    assert run_labels(["s/rnn/version_0", "s/rnn/version_0"]) == ["rnn", "rnn #2"]
    assert run_labels(["s/rnn", "s/gru/version_2"]) == ["rnn", "gru"]
    assert run_labels(["experiment"]) == ["experiment"]
    assert run_labels([]) == []


def test_run_labels_name_a_default_root_dir_run_from_its_folder():
    """``Trainer(default_root_dir=X)`` logs to ``X/lightning_logs/version_0``: the run is ``X``."""
    runs = ["s/exp_a/lightning_logs/version_0", "s/exp_b/lightning_logs/version_0"]
    assert run_labels(runs) == ["exp_a", "exp_b"]
    assert run_labels(["s/exp_a/lightning_logs/version_3"]) == ["exp_a"]
    assert run_labels(["s/exp_a/lightning_logs/version_0", "s/exp_b/lightning_logs/version_2"]) == \
        ["exp_a", "exp_b"]
    # versions of one folder: the version tells them apart; with another folder beside them, both parts
    assert run_labels(["s/exp_a/lightning_logs/version_0", "s/exp_a/lightning_logs/version_1"]) == \
        ["version_0", "version_1"]
    assert run_labels(["s/exp_a/lightning_logs/version_0", "s/exp_a/lightning_logs/version_1",
                       "s/exp_b/lightning_logs/version_0"]) == \
        ["exp_a/version_0", "exp_a/version_1", "exp_b/version_0"]
    # a W&B run's files folder (wandb/<run>/files/rnnviz/summary.json) is named from its run folder
    wandb = ["w/wandb/run-20250101_120000-abc123/files", "w/wandb/offline-run-20250101_130000-def456/files"]
    assert run_labels(wandb) == ["run-20250101_120000-abc123", "offline-run-20250101_130000-def456"]
    # a generic part is kept where nothing more telling is left
    assert run_labels(["/lightning_logs/version_0"]) == ["lightning_logs"]
    assert run_labels(["/rnnviz"]) == ["rnnviz"]


def test_compare_and_summary_name_default_root_dir_runs_from_their_folder(tmp_path, capsys):
    for name, kind in (("exp_a", "rnn"), ("exp_b", "gru")):
        write_summary(tmp_path / name / "lightning_logs" / "version_0", summary_document(kind))
    status, out, err = run_main(capsys, "compare", tmp_path / "exp_a", tmp_path / "exp_b",
                                "--out", tmp_path / "c.svg")
    assert (status, err) == (0, "")
    assert [line.split()[0] for line in out.splitlines()[1:3]] == ["exp_a", "exp_b"]
    assert "exp_a  (horizon 3.5 steps)" in (tmp_path / "c.svg").read_text()
    status, out, _ = run_main(capsys, "summary", tmp_path / "exp_b")
    assert out.startswith("run exp_b: ")


# --- the summary command ------------------------------------------------------------------------------------
GRU_SUMMARY = """\
run gru: {path}

rnn (GRU; 1 row)
  epoch  step  row      horizon  decay/step  log10 ratio  reset mean  update mean
      0     8  layer 0      9.0      -0.120        -3.40       0.510        0.500
      1    16  layer 0     14.0      -0.070        -2.40       0.510        0.600
      2    24  layer 0     19.0      -0.020        -1.40       0.510        0.700
  (horizon in steps; decay/step and log10 ratio in decades of ||dL/dh_t||)

findings: none
"""


def test_summary_command_in_a_subprocess(logs):
    done = run_cli("summary", logs / "gru" / "version_0")
    assert (done.returncode, done.stderr) == (0, "")
    assert done.stdout == GRU_SUMMARY.format(path=logs / "gru" / "version_0" / "rnnviz" / "summary.json")


def test_summary_shows_nan_missing_epochs_and_findings(logs, capsys):
    status, out, err = run_main(capsys, "summary", logs / "lstm" / "version_0")
    assert (status, err) == (0, "")
    assert "  epoch  step  row      horizon  decay/step  log10 ratio  input mean  forget mean  cell mean  " \
           "output mean" in out
    assert "      3    24  layer 0        -           -            -           -            -          -" \
           "            -" in out  # the validation-only epoch
    assert "      0     8  layer 0     14.0      -0.080        -3.40       0.500        0.730        nan" \
           in out

    status, out, _ = run_main(capsys, "summary", logs / "rnn" / "version_0", "--module", "rnn")
    assert status == 0
    assert "      2    24  layer 0      3.5      -0.210          nan" in out
    lines = out.splitlines()
    start = lines.index("findings (3)")
    assert lines[start + 1] == "  epoch  kind                module  where    value  threshold  message"
    assert lines[start + 2] == ("      0  vanishing_gradient  rnn     layer 0    3.5         15  the "
                                "gradient reaches back 3.5 steps; a gated cell usually helps.")


def test_summary_of_attention_and_bidirectional_modules(tmp_path, capsys):
    write_summary(tmp_path / "bi", bidirectional_document())
    status, out, _ = run_main(capsys, "summary", tmp_path / "bi")
    assert status == 0
    assert "decoder.attn (attention; 2 heads)" in out
    assert "  epoch  step  head    entropy_norm  entropy  focus" in out
    assert "      0     5  head 1           nan    0.310  0.990" in out
    assert "encoder.lstm (LSTM; 4 rows)" in out
    assert "      1     5  layer 1 forward        -" not in out  # null horizon is nan, not missing
    assert "      1     5  layer 1 forward      nan      -0.060        -2.30" in out
    assert "      1  exploding_gradient  encoder.lstm  layer 1 reverse    1.3          1  grows back in " \
           "time." in out
    assert "      1  nonfinite           encoder.lstm  -                    1          0  1 of 2 recordings" \
           in out
    status, out, _ = run_main(capsys, "summary", tmp_path / "bi", "--module", "decoder.attn")
    assert "encoder.lstm" not in out and "findings (1)" in out


def test_summary_of_an_empty_run(tmp_path, capsys):
    write_summary(tmp_path / "run", {"format": "lightning_rnnviz.summary", "version": 1})
    status, out, _ = run_main(capsys, "summary", tmp_path / "run")
    assert status == 0 and "no modules recorded yet" in out and "findings: none" in out


# --- the compare command ------------------------------------------------------------------------------------
def test_compare_in_a_subprocess_writes_a_png_and_the_table(logs, tmp_path):
    out = tmp_path / "compare.png"
    runs = [logs / k / "version_0" for k in ("rnn", "gru", "lstm")]
    done = run_cli("compare", *runs, "--out", out)
    assert (done.returncode, done.stderr) == (0, "")
    assert done.stdout == (
        "run   module  epoch  step  row      horizon  decay/step  log10 ratio  findings\n"
        "rnn   rnn         2    24  layer 0      3.5      -0.210          nan  vanishing_gradient\n"
        "gru   rnn         2    24  layer 0     19.0      -0.020        -1.40  -\n"
        "lstm  rnn         2    24  layer 0     26.0      +0.040        -1.40  -\n"
        f"wrote {out}\n"
    )
    with Image.open(out) as image:
        assert image.format == "PNG" and image.size == (1500, 810)
        assert image.info.get("dpi", (150, 150))[0] == pytest.approx(150, abs=0.05)
        rgb = np.asarray(image.convert("RGB")).astype(int)
    for color in ((31, 119, 180), (255, 127, 14), (44, 160, 44)):  # one curve per run, in C0, C1, C2
        assert (np.abs(rgb - color).sum(-1) < 30).sum() > 500, color
    assert 30_000 < out.stat().st_size < 300_000


def test_compare_a_folder_of_runs_and_other_formats(logs, tmp_path, capsys):
    svg, pdf = tmp_path / "c.svg", tmp_path / "c.pdf"
    status, out, err = run_main(capsys, "compare", logs, "--out", svg)
    assert (status, err) == (0, "")
    assert [line.split()[0] for line in out.splitlines()[1:4]] == ["gru", "lstm", "rnn"]
    root = ElementTree.parse(svg).getroot()
    assert root.tag.endswith("svg")
    assert "rnn: gradient norm per time step, epoch 2 (the last of each run)" in svg.read_text()
    status, _, _ = run_main(capsys, "compare", logs, "--out", pdf)
    assert status == 0 and pdf.read_bytes().startswith(b"%PDF-")
    first = pdf.read_bytes()
    run_main(capsys, "compare", logs, "--out", pdf)
    assert pdf.read_bytes() == first  # no dates inside: the same runs give the same file


def test_compare_epochs_rows_and_panels(tmp_path, capsys):
    write_summary(tmp_path / "runs" / "a", bidirectional_document(epochs=2, length=40))
    write_summary(tmp_path / "runs" / "b", bidirectional_document(epochs=4, length=25))
    png = tmp_path / "bi.png"
    status, out, _ = run_main(capsys, "compare", tmp_path / "runs", "--out", png)
    assert status == 0
    lines = out.splitlines()
    assert lines[0].split() == ["run", "module", "epoch", "step", "row", "horizon", "decay/step", "log10",
                                "ratio", "findings"]
    assert lines[1] == ("a    encoder.lstm      1     5  layer 0 forward     12.0      -0.030        -1.20  "
                        "nonfinite (module)")
    assert lines[3] == "a    encoder.lstm      1     5  layer 1 forward      nan      -0.060        -2.30  -"
    assert lines[4].endswith("layer 1 reverse      4.0      -0.090        -3.50  exploding_gradient")
    assert lines[5].startswith("b    encoder.lstm      3")
    with Image.open(png) as image:
        four_panels = image.size
    status, out, _ = run_main(capsys, "compare", tmp_path / "runs", "--epoch", "0", "--row", "3",
                              "--out", png)
    assert status == 0
    assert out.splitlines()[1:3] == [
        "a    encoder.lstm      0     5  layer 1 reverse      4.0      -0.090        -3.50  -",
        "b    encoder.lstm      0     5  layer 1 reverse      4.0      -0.090        -3.50  -",
    ]
    with Image.open(png) as image:
        one_panel = image.size
    assert four_panels[0] == one_panel[0] == 1500 and four_panels[1] > 2.5 * one_panel[1]


def test_compare_draws_zeros_nan_and_runs_without_a_curve(logs, tmp_path, capsys):
    document = summary_document("gru")
    document["modules"]["rnn"]["epochs"]["2"]["grad_norm"] = None  # say, a run whose backward never reached
    write_summary(logs / "flat" / "version_0", document)
    status, out, _ = run_main(capsys, "compare", logs / "rnn" / "version_0", logs / "flat" / "version_0",
                              "--epoch", "2", "--out", tmp_path / "c.svg")
    assert status == 0
    assert out.splitlines()[2].startswith("flat  rnn         2    24  layer 0     19.0")  # in the table still
    text = (tmp_path / "c.svg").read_text()
    assert "flat  (no gradient curve)" in text
    assert "rnn  (horizon 3.5 steps)" in text
    # as the live pictures: zero (and anything under 1e-7 of its curve's peak) sits a decade below the rest
    assert html.escape(f"{NEAR_ZERO_LABEL} drawn at 3e-07", quote=False) in text  # smallest drawn: 0.8e-5.46
    status, _, _ = run_main(capsys, "compare", logs / "gru" / "version_0", "--out", tmp_path / "g.svg")
    assert "no finite value at this step" in (tmp_path / "g.svg").read_text()


def test_compare_draws_float32_rounding_as_near_zero_not_as_decades_of_axis(logs):
    """A curve that has vanished to 1e-24 (float32 rounding, not gradient) is drawn as the live pictures draw
    it: values under 1e-7 of the curve's peak are triangles on a floor a decade below the rest, and the axis
    does not stretch over twenty decades to reach them."""
    document = summary_document("rnn")
    curve = document["modules"]["rnn"]["epochs"]["2"]["grad_norm"][0]
    curve[3:6] = [1e-24, 3e-20, 2e-9]  # under 1e-7 of the peak (0.8): near zero, all three
    write_summary(logs / "tiny" / "version_0", document)
    runs = [read_summary(logs / "tiny" / "version_0")]
    name, selected = offline.select_runs(runs)
    figure = offline.draw_compare(selected, name)
    ax = figure.axes[0]
    low, high = ax.get_ylim()
    smallest_drawn = min(v for v in curve[6:] if v)  # the first value above 1e-7 of the peak
    assert low == pytest.approx(smallest_drawn / 10 / 2) and high == pytest.approx(0.8 * 2)
    triangles = [line for line in ax.get_lines() if line.get_marker() == "v"]
    assert sum(len(line.get_xdata()) for line in triangles) == 6  # three zeros and three near zeros
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert f"{NEAR_ZERO_LABEL} drawn at {smallest_drawn / 10:.0e}" in legend


def test_draw_compare_figure_is_matplotlib_without_pyplot(logs):
    import matplotlib

    summaries = [read_summary(logs / k / "version_0") for k in ("rnn", "gru")]
    name, runs = offline.select_runs(summaries)
    figure = offline.draw_compare(runs, name)
    assert isinstance(figure, matplotlib.figure.Figure)
    assert "matplotlib.pyplot" not in sys.modules or not matplotlib.pyplot.get_fignums()
    legend = [t.get_text() for t in figure.axes[0].get_legend().get_texts()]
    assert legend == ["rnn  (horizon 3.5 steps)", "gru  (horizon 19.0 steps)", f"{NEAR_ZERO_LABEL} drawn at 3e-07",
                      "no finite value at this step"]
    assert figure.axes[0].get_yscale() == "log"
    assert figure.axes[0].get_xlabel() == "time step t (sequence position)"


# --- errors -----------------------------------------------------------------------------------------------
def test_errors_in_a_subprocess_are_one_line(tmp_path):
    done = run_cli("summary", tmp_path / "nothing")
    assert done.returncode == 2 and done.stdout == ""
    assert_one_line_error(done.stderr, r"nothing: no such file or folder\.")


def test_help(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--help"])
    assert exit_.value.code == 0
    text = capsys.readouterr().out
    assert "summary" in text and "compare" in text
    assert "lightning-rnnviz compare lightning_logs/rnn/version_0 lightning_logs/gru/version_0 --out " \
           "grads.png" in text
    with pytest.raises(SystemExit) as exit_:
        main(["compare", "--help"])
    assert exit_.value.code == 0 and "--epoch N|last" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_:
        main([])
    assert exit_.value.code == 2 and "required: COMMAND" in capsys.readouterr().err


def _several(tmp_path: Path) -> Path:
    for kind in ("rnn", "gru"):
        write_summary(tmp_path / "runs" / kind / "version_0", summary_document(kind))
    return tmp_path / "runs"


def _file(name: str, content: str | bytes):
    def make(tmp_path: Path) -> Path:
        path = tmp_path / "run" / "rnnviz" / "summary.json"
        path.parent.mkdir(parents=True)
        (path.write_bytes if isinstance(content, bytes) else path.write_text)(content)
        return tmp_path / "run"
    make.__name__ = name
    return make


def _document(**changes):
    def make(tmp_path: Path) -> Path:
        document = summary_document("rnn")
        for dotted, value in changes.items():
            *parents, last = dotted.split("__")
            target = document
            for key in parents:
                target = target[key]
            target[last] = value
        write_summary(tmp_path / "run", document)
        return tmp_path / "run"
    return make


def _empty_folder(tmp_path: Path) -> Path:
    (tmp_path / "run").mkdir()
    return tmp_path / "run"


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda tmp: tmp / "missing", r"missing: no such file or folder\.$"),
        (_empty_folder, (r"is not a lightning_rnnviz run: no summary\.json, rnnviz/summary\.json or "
                         r"\*\*/rnnviz/summary\.json in it; it is written at each training epoch's end by "
                         r"the `RNNViz` callback")),
        (_several, r"runs: holds 2 runs; pass one of them: \S+/gru/version_0, \S+/rnn/version_0\.$"),
        (_file("truncated", '{"format": "lightning_rnnviz.summary", "version": 1, "modules": {'),
         (r"is not valid JSON \(Expecting property name enclosed in double quotes at line 1, column 66\); a "
          r"damaged or truncated summary")),
        (_file("foreign", '{"name": "hparams", "lr": 0.1}'),
         r"is JSON but not a lightning_rnnviz summary \(no \"format\": 'lightning_rnnviz.summary'\)"),
        (_file("list", "[1, 2]"), r"is JSON but not a lightning_rnnviz summary"),
        (_file("binary", b"\x89PNG\r\n\x1a\n\xff\xfe"), r"is not a text file"),
        (_document(version=2), (r"was written by a newer lightning_rnnviz \(summary version 2; this one "
                                r"reads version 1\); upgrade lightning_rnnviz")),
        (_document(version="1"), r"has an invalid summary version '1'"),
        (_document(modules=[]), r"`modules` is list, not an object; a damaged summary"),
        (_document(modules__rnn__epochs={"last": {}}),
         r"`modules\.rnn\.epochs` has the key 'last', not an epoch"),
        (_document(modules__rnn__epochs__0__horizon="3.5"),
         r"`modules\.rnn\.epochs\.0\.horizon` is str, not a list"),
        (_document(modules__rnn__epochs__0__grad_norm=[[1.0, "x"]]),
         r"`modules\.rnn\.epochs\.0\.grad_norm\[0\]\[1\]` is 'x', not a number or null"),
        (_document(findings={"a": 1}), r"`findings` is dict, not a list"),
        (_document(findings=[{"kind": "vanishing_gradient", "epoch": "2"}]),
         r"`findings\[0\]\.epoch` is '2', not an integer"),
    ],
)
def test_summary_errors(tmp_path, capsys, make, match):
    path = make(tmp_path)
    with pytest.raises(SummaryError, match=match):
        read_summary(path)
    status, out, err = run_main(capsys, "summary", path)
    assert (status, out) == (2, "")
    assert_one_line_error(err, match)


def test_summary_unknown_module(logs, capsys):
    status, _, err = run_main(capsys, "summary", logs / "rnn" / "version_0", "--module", "decoder")
    assert status == 2
    assert_one_line_error(err, r"summary\.json: has no module 'decoder'; it has 'rnn'\.$")


@pytest.mark.parametrize(
    ("extra", "match"),
    [
        (["--out", "{tmp}/c.jpg"],
         r"`--out \S+/c\.jpg`: unknown picture format '\.jpg'; end the name with \.png, \.svg, \.pdf\.$"),
        (["--out", "{tmp}/c"], r"unknown picture format '\(no suffix\)'"),
        (["--out", "{tmp}/no/such/folder/c.png"], r"the folder \S+/no/such/folder does not exist\.$"),
        (["--module", "decoder", "--out", "{tmp}/c.png"],
         r"run 'gru' \(\S+summary\.json\) has no module 'decoder'; it has 'rnn'\.$"),
        (["--epoch", "7", "--out", "{tmp}/c.png"],
         r"run 'gru' has no epoch 7 of module 'rnn'; it has epochs 0, 1, 2\.$"),
        (["--row", "1", "--out", "{tmp}/c.png"],
         r"`--row 1` is out of range for module 'rnn' of run 'gru'; its rows are 0 \(layer 0\)\.$"),
    ],
)
def test_compare_errors(logs, tmp_path, capsys, extra, match):
    args = ["compare", logs] + [a.format(tmp=tmp_path) for a in extra]
    status, out, err = run_main(capsys, *args)
    assert (status, out) == (2, "")
    assert_one_line_error(err, match)
    assert not list(tmp_path.glob("c*"))


def test_compare_module_choice_errors(tmp_path, capsys):
    write_summary(tmp_path / "bi", bidirectional_document())
    rnn = summary_document("rnn")
    rnn["modules"]["encoder.lstm"] = rnn["modules"].pop("rnn")
    rnn["modules"]["other"] = rnn["modules"]["encoder.lstm"]
    write_summary(tmp_path / "two", rnn)
    status, _, err = run_main(capsys, "compare", tmp_path / "two", "--out", tmp_path / "c.png")
    assert status == 2
    assert_one_line_error(err, r"several recurrent modules are common to all runs; pick one with `--module "
                               r"NAME` \(modules of each run: two: 'encoder.lstm', 'other'\)\.$")
    write_summary(tmp_path / "gru", summary_document("gru"))
    status, _, err = run_main(capsys, "compare", tmp_path / "bi", tmp_path / "gru",
                              "--out", tmp_path / "c.png")
    assert_one_line_error(err, r"no recurrent or attention module is common to all runs; pick one with "
                               r"`--module NAME` \(modules of each run: bi: 'decoder.attn', 'encoder.lstm'; "
                               r"gru: 'rnn'\)\.$")
    document = summary_document("gru")
    for epoch in document["modules"]["rnn"]["epochs"].values():
        epoch.pop("grad_norm")
    write_summary(tmp_path / "flat", document)
    status, _, err = run_main(capsys, "compare", tmp_path / "flat", "--out", tmp_path / "c.png")
    assert_one_line_error(err, r"no run has a gradient curve \(`grad_norm`\) of module 'rnn' at the chosen "
                               r"epoch")
    assert not (tmp_path / "c.png").exists()


def test_bad_epoch_argument(logs, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["compare", str(logs), "--epoch", "first", "--out", "x.png"])
    assert exit_.value.code == 2 and "'first' is not an epoch number or 'last'" in capsys.readouterr().err


def test_console_script_is_declared():
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    module, _, function = scripts["lightning-rnnviz"].partition(":")
    assert getattr(__import__(module, fromlist=[function]), function) is main


def test_output_png_bytes_are_a_picture(logs, tmp_path, capsys):
    png = tmp_path / "c.png"
    run_main(capsys, "compare", logs, "--row", "0", "--out", png)
    with Image.open(io.BytesIO(png.read_bytes())) as image:
        image.load()
        assert image.mode in ("RGB", "RGBA")


def test_summary_shows_the_mean_sequence_length_when_there(tmp_path, capsys):
    document = summary_document("rnn", epochs=1)
    document["modules"]["rnn"]["epochs"]["0"]["length"] = 27.5
    write_summary(tmp_path / "run", document)
    status, out, _ = run_main(capsys, "summary", tmp_path / "run")
    assert status == 0
    assert "  epoch  step  length  row      horizon  decay/step  log10 ratio\n" \
           "      0     8    27.5  layer 0      3.5      -0.210          nan\n" in out
    assert "; length: mean valid sequence length)" in out


def test_summary_says_which_calls_a_module_showed(tmp_path, capsys):
    """DeepAR's `rnn`: its encoder and decoder calls as one sequence, as summary.json keeps it."""
    document = summary_document("lstm", epochs=2)
    document["modules"]["rnn"]["epochs"]["1"]["shown"] = [
        "calls 1-2 of 2 as one sequence, each from the last one's final state (24 + 6 steps)"]
    write_summary(tmp_path / "deepar", document)
    status, out, err = run_main(capsys, "summary", tmp_path / "deepar")
    assert (status, err) == (0, "")
    assert "  shows calls 1-2 of 2 as one sequence, each from the last one's final state (24 + 6 steps)" in out
    document["modules"]["rnn"]["epochs"]["1"]["shown"] = [3]
    write_summary(tmp_path / "broken", document)
    status, out, err = run_main(capsys, "summary", tmp_path / "broken")
    assert status != 0 and "shown[0]" in err


def test_compare_says_which_calls_each_run_shows(tmp_path, capsys):
    shown = "calls 1-2 of 2 as one sequence, each from the last one's final state (24 + 6 steps)"
    for name in ("a", "b"):
        document = summary_document("gru", epochs=2)
        if name == "b":
            document["modules"]["rnn"]["epochs"]["1"]["shown"] = [shown]
        write_summary(tmp_path / name, document)
    status, out, err = run_main(capsys, "compare", tmp_path / "a", tmp_path / "b", "--out", str(tmp_path / "c.png"))
    assert status == 0, err
    assert f"b: rnn shows {shown}" in out and "a: rnn shows" not in out


# --- comparing attention modules ----------------------------------------------------------------------------
ATTENTION_TABLE = """\
run    module        epoch  step  head    entropy_norm  entropy  focus  findings
exp_a  decoder.attn      2    30  head 0         0.850    1.957  0.250  -
exp_a  decoder.attn      2    30  head 1         0.750    1.727  0.350  -
exp_b  decoder.attn      2    30  head 0         0.550    1.266  0.550  -
exp_b  decoder.attn      2    30  head 1         0.150    0.345  0.950  attention_collapse
(entropy_norm: entropy / log(keys), 1 = uniform over the keys, 0 = one key; entropy in nats; focus: mean \
largest weight of a query)
"""


def _attention_runs(tmp_path: Path) -> list[Path]:
    """Two runs of ``Trainer(default_root_dir=exp_a)`` and ``exp_b``: b's heads sharpen 4x faster."""
    runs = [tmp_path / name / "lightning_logs" / "version_0" for name in ("exp_a", "exp_b")]
    write_summary(runs[0], attention_document(0.05))
    write_summary(runs[1], attention_document(0.2))
    return runs


def test_compare_attention_in_a_subprocess_writes_a_png_and_the_table(tmp_path):
    out = tmp_path / "attention.png"
    done = run_cli("compare", *_attention_runs(tmp_path), "--out", out)
    assert (done.returncode, done.stderr) == (0, "")
    assert done.stdout == ATTENTION_TABLE + f"wrote {out}\n"
    with Image.open(out) as image:
        assert image.format == "PNG" and image.size == (840, 900)  # drawn for a ~350 px card: few large words
        rgb = np.asarray(image.convert("RGB")).astype(int)
    for color in ((31, 119, 180), (255, 127, 14)):  # one colour per run, bars per head
        assert (np.abs(rgb - color).sum(-1) < 30).sum() > 10_000, color
    assert (rgb.sum(-1) < 30).sum() > 1_000  # the black ticks where each head started (epoch 0)


def test_compare_picks_the_only_common_attention_module(tmp_path, capsys):
    """Runs without a recurrent module (transformers): their one attention module; the table's findings per
    head and of the whole module."""
    runs = _attention_runs(tmp_path)
    document = attention_document(0.2)
    document["findings"].append({"kind": "nonfinite", "module": "decoder.attn", "epoch": 2, "value": 1,
                                 "threshold": 0, "message": "1 of 2 recordings held NaN/Inf."})
    write_summary(runs[1], document)
    status, out, err = run_main(capsys, "compare", tmp_path / "exp_a", tmp_path / "exp_b", "--out",
                                tmp_path / "a.svg")
    assert (status, err) == (0, "")
    lines = out.splitlines()
    assert lines[3] == ("exp_b  decoder.attn      2    30  head 0         0.550    1.266  0.550  "
                        "nonfinite (module)")
    assert lines[4].endswith("head 1         0.150    0.345  0.950  attention_collapse")
    svg = (tmp_path / "a.svg").read_text()
    assert "attention per head, epoch 2 (last)" in svg
    assert "entropy_norm   1 = uniform, 0 = one key" in svg and "focus   mean largest weight" in svg


def test_draw_compare_of_attention_heads(tmp_path):
    runs = _attention_runs(tmp_path)
    document = attention_document(0.05, epochs=2)
    document["modules"]["decoder.attn"]["epochs"]["1"]["entropy_norm"][1] = None  # no query with 2 keys
    write_summary(runs[0], document)
    name, compared = offline.select_runs([read_summary(r) for r in runs])
    assert name == "decoder.attn" and [r.epoch for r in compared] == [1, 2]
    figure = offline.draw_compare(compared, name)
    entropy, focus = figure.axes
    assert [t.get_text() for t in figure.legends[0].get_texts()] == ["exp_a (epoch 1)", "exp_b (epoch 2)",
                                                                      "first epoch"]
    assert figure.legends[0].get_title().get_text() == "decoder.attn\nattention per head, last epoch"
    assert entropy.get_ylim() == focus.get_ylim() == (0, 1.05)
    assert [t.get_text() for t in focus.get_xticklabels()] == ["0", "1"] and focus.get_xlabel() == "head"
    heights = {ax: sorted(round(p.get_height(), 3) for p in ax.patches) for ax in (entropy, focus)}
    assert heights[entropy] == [0.15, 0.55, 0.9]  # a's head 1 has no value: no bar, the words n/a
    assert heights[focus] == [0.2, 0.25, 0.55, 0.95]
    assert [t.get_text() for t in entropy.texts] == ["n/a"] and not focus.texts
    starts = sorted(round(float(seg[0][1]), 3) for c in entropy.collections for seg in c.get_segments())
    assert starts == [0.95, 0.95, 0.95, 0.95]  # each run's epoch 0, where its heads started


def test_compare_one_attention_head_over_epochs(tmp_path, capsys):
    runs = _attention_runs(tmp_path)
    for flag in ("--head", "--row"):
        status, out, err = run_main(capsys, "compare", *runs, flag, "1", "--epoch", "1", "--out",
                                    tmp_path / "h.svg")
        assert (status, err) == (0, "")
        assert out.splitlines()[1:3] == [
            "exp_a  decoder.attn      1    20  head 1         0.850    1.957  0.250  -",
            "exp_b  decoder.attn      1    20  head 1         0.550    1.266  0.550  -",
        ]
    name, compared = offline.select_runs([read_summary(r) for r in runs], row=1, epoch=1)
    figure = offline.draw_compare(compared, name, row=1, epoch=1)
    entropy, focus = figure.axes
    assert focus.get_xlabel() == "epoch"
    assert figure.legends[0].get_title().get_text() == "decoder.attn\nattention head 1 per epoch"
    assert [t.get_text() for t in figure.legends[0].get_texts()] == ["exp_a", "exp_b", "epoch 1"]
    a, _, b, _ = entropy.get_lines()  # per run: its line over the epochs, and the table's epoch marked
    assert list(a.get_xdata()) == [0, 1, 2] and np.allclose(a.get_ydata(), [0.95, 0.85, 0.75])
    assert np.allclose(b.get_ydata(), [0.95, 0.55, 0.15])


def _glyph_heights(figure, png: Path, width: int = 350) -> dict[str, float]:
    """Each text of ``figure`` (saved as ``png``): the height in pixels of its ink in the PNG scaled to
    ``width`` (rows with a dark pixel inside the text's box; of a text turned 90 degrees, columns)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    offline.save_figure(figure, png)
    with Image.open(png) as image:
        full = image.size
        scale = width / full[0]
        grey = np.asarray(image.convert("L").resize((width, round(full[1] * scale)), Image.LANCZOS))
    figure.set_dpi(offline.PNG_DPI)
    canvas = FigureCanvasAgg(figure)
    canvas.draw()
    assert canvas.get_width_height() == full
    unseen = set()  # tick labels a locator made beyond the axis' limits: not drawn
    for ax in figure.axes:
        for labels, (low, high), at in ((ax.get_xticklabels(), sorted(ax.get_xlim()), 0),
                                        (ax.get_yticklabels(), sorted(ax.get_ylim()), 1)):
            unseen.update(t for t in labels if not low - 1e-9 <= t.get_position()[at] <= high + 1e-9)
    heights = {}
    for text in figure.findobj(lambda a: hasattr(a, "get_rotation") and hasattr(a, "get_text")):
        if not text.get_visible() or not text.get_text().strip() or text in unseen:
            continue
        box = text.get_window_extent(canvas.get_renderer())
        top, bottom = full[1] - box.y1, full[1] - box.y0
        crop = grey[max(0, int(top * scale) - 1): int(bottom * scale) + 2,
                    max(0, int(box.x0 * scale) - 1): int(box.x1 * scale) + 2]
        ink = crop < 128
        lines = max(1, text.get_text().count("\n") + 1)
        along = np.flatnonzero(ink.any(0 if text.get_rotation() == 90 else 1))
        heights[text.get_text()] = (along[-1] - along[0] + 1) / lines if along.size else 0.0
    return heights


def test_attention_picture_type_is_readable_at_card_size(tmp_path):
    """TensorBoard and W&B show pictures about 350 px wide: every word of the attention comparison, its
    rendered glyphs measured on the PNG scaled to that width, stays at least 7 px high (a digit of the
    tick labels included; the gradient-norm comparison's tick digits are about 4 px there)."""
    runs = _attention_runs(tmp_path)
    for row in (None, 1):
        name, compared = offline.select_runs([read_summary(r) for r in runs], row=row)
        heights = _glyph_heights(offline.draw_compare(compared, name, row=row), tmp_path / "a.png")
        assert {"0.0", "0.5", "1.0", "exp_a", "decoder.attn\nattention head 1 per epoch" if row else "head"} \
            <= set(heights)
        small = {text: round(h, 1) for text, h in heights.items() if h < 7}
        assert not small, small


def test_compare_attention_errors(tmp_path, capsys):
    runs = _attention_runs(tmp_path)
    status, out, err = run_main(capsys, "compare", *runs, "--head", "2", "--out", tmp_path / "c.png")
    assert (status, out) == (2, "")
    assert_one_line_error(err, r"`--head 2` is out of range for attention module 'decoder.attn' of run "
                               r"'exp_a'; its heads are 0, 1\.$")
    # the same name recurrent in one run and attention in another
    mixed = summary_document("gru")
    mixed["modules"]["decoder.attn"] = mixed["modules"].pop("rnn")
    write_summary(tmp_path / "exp_c" / "lightning_logs" / "version_0", mixed)
    status, _, err = run_main(capsys, "compare", tmp_path / "exp_a", tmp_path / "exp_c", "--module",
                              "decoder.attn", "--out", tmp_path / "c.png")
    assert status == 2
    assert_one_line_error(err, r"module 'decoder.attn' is an attention module in run 'exp_a' and a recurrent "
                               r"module in run exp_c \(GRU\); `compare` compares one kind at a time")
    # two attention modules, no recurrent one: which?
    two = attention_document(0.05)
    two["modules"]["encoder.attn"] = two["modules"]["decoder.attn"]
    write_summary(tmp_path / "two", two)
    status, _, err = run_main(capsys, "compare", tmp_path / "two", "--out", tmp_path / "c.png")
    assert_one_line_error(err, r"no recurrent module and several attention modules are common to all runs; "
                               r"pick one with `--module NAME`")
    # an attention module whose epochs have no statistics
    empty = attention_document(0.05)
    for record in empty["modules"]["decoder.attn"]["epochs"].values():
        for stat in ("entropy_norm", "entropy", "focus"):
            record.pop(stat)
    write_summary(tmp_path / "empty", empty)
    status, _, err = run_main(capsys, "compare", tmp_path / "empty", "--out", tmp_path / "c.png")
    assert_one_line_error(err, r"no run has attention statistics \(`entropy_norm`, `entropy`, `focus`\) of "
                               r"module 'decoder.attn' at the chosen epoch")
    assert not (tmp_path / "c.png").exists()


def test_compare_counts_back_from_the_end_for_end_aligned_curves(tmp_path, capsys):
    """summary.json's `alignment: end` (lengths that differ, a many-to-one loss): the curves end together and
    the axis counts steps back; runs lined up differently are refused with the reason."""
    for name, steps in (("a", 3), ("b", 5)):
        document = summary_document("gru", epochs=1)
        record = document["modules"]["rnn"]["epochs"]["0"]
        record["grad_norm"] = [[10.0 ** (k - steps) for k in range(steps)]]
        record["alignment"] = "end"
        write_summary(tmp_path / name, document)
    from lightning_rnnviz.render.offline import draw_compare, read_summaries, select_runs

    module, runs = select_runs(read_summaries([tmp_path / "a", tmp_path / "b"]))
    fig = draw_compare(runs, module)
    ax = fig.axes[0]
    ends = [line.get_xdata()[-1] for line in ax.get_lines() if len(line.get_xdata()) > 1]
    assert ends == [4, 4]
    assert fig.axes[0].get_xlabel() == "steps before each sequence's end"
    document = summary_document("gru", epochs=1)
    write_summary(tmp_path / "c", document)
    status, out, err = run_main(capsys, "compare", tmp_path / "a", tmp_path / "c", "--out", str(tmp_path / "x.png"))
    assert status != 0 and "line their sequences up differently" in err
