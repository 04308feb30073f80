"""The drawing process: bounded, drop-oldest, reports errors, loads no torch, stops cleanly."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
from PIL import Image

from lightning_rnnviz.sinks.background import BackgroundRenderer, InlineRenderer, Job, serve
from lightning_rnnviz.sinks.files import FileSink


def _job(step: int = 0) -> Job:
    history = {0: np.logspace(-3, 0, 10)[None], 1: np.logspace(-2, 0, 10)[None]}
    return Job("grad_decay", {"history": history, "name": "rnn", "layer_labels": ["layer 0"]},
               "rnnviz/grad_decay/rnn", step)


def test_child_draws_writes_and_stops(tmp_path):
    renderer = BackgroundRenderer(("files", str(tmp_path)))
    renderer.submit(_job(step=3))
    renderer.close(timeout=120)
    assert not renderer.alive
    image = np.asarray(Image.open(tmp_path / "grad_decay" / "rnn" / "step_3.png"))
    assert image.ndim == 3 and image.shape[2] in (3, 4) and max(image.shape[:2]) <= 800
    assert renderer.errors() == []


def test_child_reports_errors_instead_of_dying(tmp_path):
    renderer = BackgroundRenderer(("files", str(tmp_path)))
    renderer.submit(Job("hidden", {"not": "a payload"}, "rnnviz/hidden/rnn", 0))
    renderer.submit(_job(step=1))
    renderer.close(timeout=120)
    errors = renderer.errors()
    assert len(errors) == 1 and errors[0].startswith("hidden rnnviz/hidden/rnn: ")
    assert (tmp_path / "grad_decay" / "rnn" / "step_1.png").exists()  # the next job still ran


def test_pending_work_is_bounded_and_drops_the_oldest(tmp_path):
    import os
    import signal

    renderer = BackgroundRenderer(("files", str(tmp_path)), max_pending=2)
    os.kill(renderer._process.pid, signal.SIGSTOP)  # a child that has fallen behind
    try:
        big = _job(step=0)
        big.payload["history"][0] = np.logspace(-3, 0, 40_000)[None]  # 320 KB: more than a pipe holds
        big.payload["history"][1] = np.logspace(-2, 0, 40_000)[None]
        renderer.submit(big)
        deadline = time.monotonic() + 30
        while renderer._pending and time.monotonic() < deadline:
            time.sleep(0.01)  # the feed thread takes job 0 and blocks writing it
        for step in range(1, 6):
            renderer.submit(_job(step=step))
        assert renderer.dropped == 3  # jobs 1, 2, 3: the oldest go first
        assert len(renderer._pending) == 2
    finally:
        os.kill(renderer._process.pid, signal.SIGCONT)
    renderer.close(timeout=120)
    written = sorted(p.name for p in (tmp_path / "grad_decay" / "rnn").iterdir())
    assert written == ["step_0.png", "step_4.png", "step_5.png"]


def test_child_loads_neither_torch_nor_lightning(tmp_path):
    renderer = BackgroundRenderer(("files", str(tmp_path)))
    renderer.submit(_job(step=0))
    deadline = time.monotonic() + 120
    path = tmp_path / "grad_decay" / "rnn" / "step_0.png"
    while not path.exists() and time.monotonic() < deadline:
        time.sleep(0.2)
    maps = Path(f"/proc/{renderer._process.pid}/maps").read_text()
    renderer.close(timeout=60)
    assert path.exists()
    assert "libtorch" not in maps and "pytorch_lightning" not in maps


def test_serve_reads_until_end_of_input(tmp_path):
    import io
    import pickle
    import struct

    header = struct.Struct("<Q")
    stream = io.BytesIO()
    for message in (("files", str(tmp_path)), _job(step=9)):
        blob = pickle.dumps(message)
        stream.write(header.pack(len(blob)) + blob)
    stream.seek(0)
    out = io.BytesIO()
    serve(stream, out)
    assert (tmp_path / "grad_decay" / "rnn" / "step_9.png").exists()
    assert out.getvalue().startswith(b"#peak_rss_kb ")  # no error line, only the exit report


def test_inline_renderer_writes_on_the_calling_thread(tmp_path):
    renderer = InlineRenderer(FileSink(tmp_path))
    renderer.submit(_job(step=2))
    assert (tmp_path / "grad_decay" / "rnn" / "step_2.png").exists()
    assert renderer.dropped == 0 and renderer.errors() == []
