"""The drawing process: draws and encodes, hands pictures back, bounded and drop-oldest, reports errors,
loads no torch, stops cleanly."""

from __future__ import annotations

import io
import os
import pickle
import signal
import struct
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lightning_rnnviz.pipeline.drawing import (
    BackgroundRenderer,
    DrawingProcess,
    InlineRenderer,
    NotReady,
    serve,
)
from lightning_rnnviz.render.jobs import Job


def _job(step: int = 0) -> Job:
    history = {0: np.logspace(-3, 0, 10)[None], 1: np.logspace(-2, 0, 10)[None]}
    return Job("grad_decay", {"history": history, "name": "rnn", "layer_labels": ["layer 0"]},
               "rnnviz/grad_decay/rnn", step)


def _size(png: bytes) -> tuple[int, int]:
    with Image.open(io.BytesIO(png)) as image:
        return image.size


def test_child_draws_hands_pictures_back_and_stops():
    renderer = BackgroundRenderer()
    renderer.submit(_job(step=3))
    renderer.close(timeout=120)
    assert not renderer.alive
    [(tag, step, picture)] = renderer.take()
    assert (tag, step) == ("rnnviz/grad_decay/rnn", 3)
    assert _size(picture.png) == (picture.width, picture.height) and max(picture.width, picture.height) <= 800
    assert renderer.errors() == [] and renderer.peak_rss_mb > 0


def test_child_reports_errors_instead_of_dying():
    renderer = BackgroundRenderer()
    renderer.submit(Job("hidden", {"not": "a payload"}, "rnnviz/hidden/rnn", 0))
    renderer.submit(_job(step=1))
    renderer.close(timeout=120)
    errors = renderer.errors()
    assert len(errors) == 1 and errors[0].startswith("hidden rnnviz/hidden/rnn: ")
    assert [step for _, step, _ in renderer.take()] == [1]  # the next job still ran


def test_pending_work_is_bounded_and_drops_the_oldest():
    renderer = BackgroundRenderer(max_pending=2)
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
    assert [step for _, step, _ in renderer.take()] == [0, 4, 5]


def test_child_loads_neither_torch_nor_lightning():
    renderer = BackgroundRenderer()
    renderer.submit(_job(step=0))
    deadline = time.monotonic() + 120
    while not renderer.has_results and time.monotonic() < deadline:
        time.sleep(0.2)
    maps = Path(f"/proc/{renderer._process.pid}/maps").read_text()
    renderer.close(timeout=60)
    assert len(renderer.take()) == 1
    assert "libtorch" not in maps and "pytorch_lightning" not in maps


def test_serve_reads_until_end_of_input():
    header = struct.Struct("<Q")
    blob = pickle.dumps(_job(step=9))
    stream = io.BytesIO(header.pack(len(blob)) + blob)
    out = io.BytesIO()
    serve(stream, out)
    replies, data = [], out.getvalue()
    while data:
        (size,) = header.unpack(data[:8])
        if size == 0:
            break
        replies.append(pickle.loads(data[8 : 8 + size]))
        data = data[8 + size :]
    assert [kind for kind, _ in replies] == ["picture", "peak_rss_kb"]
    tag, step, png, width, height = replies[0][1]
    assert (tag, step) == ("rnnviz/grad_decay/rnn", 9) and _size(png) == (width, height)


@pytest.mark.parametrize("aside", [False, True], ids=["encoded-inline", "encoded-aside"])
def test_inline_renderer_draws_on_the_calling_thread(aside):
    renderer = InlineRenderer(encode_aside=aside)
    renderer.submit(_job(step=2))
    renderer.wait()
    assert renderer.has_results and renderer.render_s > 0 and renderer.encode_s > 0
    [(tag, step, picture)] = renderer.take()
    assert step == 2 and picture.rgb().shape == (picture.height, picture.width, 3)
    assert renderer.dropped == 0 and renderer.errors() == [] and renderer.take() == []
    renderer.close()


def test_inline_renderer_encodes_on_a_helper_in_order_and_reports_its_errors(monkeypatch):
    """Drawing stays on the caller's thread; the PNG encoding runs on one helper thread, the pictures come
    back in the order submitted, an encoding error is reported (not raised), and `close` stops the helper."""
    import threading

    from lightning_rnnviz.pipeline import drawing as background
    from lightning_rnnviz.sinks.base import Picture

    drawn_on, encoded_on = [], []
    real_draw, real_encode = background.draw, Picture.from_rgb

    def draw(job):
        drawn_on.append(threading.current_thread().name)
        return real_draw(job)

    def encode(rgb):
        encoded_on.append(threading.current_thread().name)
        if rgb.shape[1] == 0:
            raise ValueError("empty picture")
        return real_encode(rgb)

    monkeypatch.setattr(background, "draw", draw)
    monkeypatch.setattr(Picture, "from_rgb", staticmethod(encode))
    renderer = InlineRenderer(encode_aside=True)
    for step in range(5):
        renderer.submit(_job(step=step))
    monkeypatch.setattr(background, "draw", lambda job: np.zeros((3, 0, 3), np.uint8))
    renderer.submit(_job(step=5))
    renderer.wait()
    assert [step for _, step, _ in renderer.take()] == [0, 1, 2, 3, 4]
    [error] = renderer.errors()
    assert error.startswith("encode rnnviz/grad_decay/rnn: ValueError: empty picture")
    assert set(drawn_on) == {threading.current_thread().name}
    assert encoded_on and all(name.startswith("rnnviz-encode") for name in encoded_on)
    renderer.close()
    assert not any(t.name.startswith("rnnviz-encode") for t in threading.enumerate())


def test_the_workers_drawing_process_draws_each_picture_as_the_worker_would():
    """Byte for byte the PNG the worker's own drawing gives; an error is raised for that job only."""
    from lightning_rnnviz.pipeline.worker import draw_here

    drawing = DrawingProcess()
    try:
        deadline = time.monotonic() + 120
        while True:  # until it has started, it says so at once
            try:
                drawing.draw(_job(0))
                break
            except NotReady:
                assert time.monotonic() < deadline
                time.sleep(0.05)
        for step in (2, 5):
            assert drawing.draw(_job(step)).png == draw_here(_job(step)).png
        with pytest.raises(RuntimeError, match="drawing process: hidden rnnviz/hidden/rnn: "):
            drawing.draw(Job("hidden", {"not": "a payload"}, "rnnviz/hidden/rnn", 0))
        assert drawing.draw(_job(7)).png == draw_here(_job(7)).png  # the next job still runs
    finally:
        drawing.close()
    assert not drawing.alive and drawing.peak_rss_mb > 0


def test_once_the_drawing_process_is_gone_the_worker_draws_itself_and_says_so_once():
    from lightning_rnnviz.pipeline.recorder import Recorder
    from lightning_rnnviz.pipeline.worker import draw_here
    from lightning_rnnviz.render.report import Guard

    recorder = Recorder()
    recorder.guard = Guard("RNNViz")
    recorder.drawing = DrawingProcess()
    recorder.drawing._process.kill()
    recorder.drawing._process.wait()
    with pytest.warns(UserWarning, match="the drawing process (is gone|stopped).*draws the pictures itself") as caught:
        assert recorder._draw(_job(3)).png == draw_here(_job(3)).png
        assert recorder._draw(_job(4)).png == draw_here(_job(4)).png
    assert len(caught) == 1 and recorder.drawing is None


def test_while_the_drawing_process_starts_the_worker_draws_itself_without_waiting():
    from lightning_rnnviz.pipeline.recorder import Recorder
    from lightning_rnnviz.pipeline.worker import draw_here
    from lightning_rnnviz.render.report import Guard

    recorder = Recorder()
    recorder.guard = Guard("RNNViz")
    recorder.drawing = DrawingProcess()
    os.kill(recorder.drawing._process.pid, signal.SIGSTOP)  # a child that has not said it is ready
    try:
        started = time.perf_counter()
        assert recorder._draw(_job(3)).png == draw_here(_job(3)).png
        assert time.perf_counter() - started < 5 and recorder.drawing is not None and not recorder.drawing.ready
    finally:
        os.kill(recorder.drawing._process.pid, signal.SIGCONT)
        recorder._close_drawing()
    assert recorder.guard.warned == set()
