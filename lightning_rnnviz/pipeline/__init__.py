"""A recording's route, stage by stage, and where each stage runs.

    capture -> hand-off | replay -> reduce -> draw -> encode -> deliver (and keep)

- **capture** (training thread): the hooks of :meth:`lightning_rnnviz.probe.Probe.capture` during the
  user's forward and backward.
- **hand-off** (training thread): :func:`worker.hand_off` makes the capture its own (copies, dropout masks,
  on CUDA an event), and :class:`worker.Worker` takes it.
- **replay** (worker): :meth:`lightning_rnnviz.probe.Capture.finish`, the exact ``dL/dh_t`` and gates.
- **reduce** (worker): :class:`lightning_rnnviz.render.report.Reporter`, statistics, histograms, findings,
  each picture's payload (a :class:`lightning_rnnviz.render.jobs.Job`) and the explorer's probe set (one
  blob, :mod:`lightning_rnnviz.render.explore`; TensorBoard serves it to :mod:`lightning_rnnviz.explorer`).
- **draw, encode**: :func:`lightning_rnnviz.render.jobs.draw` and the PNG encoder; on the worker, or where
  no core is spare on the training thread or in a drawing process (:mod:`drawing`).
- **deliver**: :class:`fanout.Fanout` writes each result to every logger's sink (:mod:`lightning_rnnviz.sinks`,
  one adapter per logger API) and to the records kept on disk (:mod:`records`).

One :class:`recorder.Recorder` per Trainer owns a recording from the first hook to the last write: the
probe's block, the output, the worker and what it all cost the training thread. The Lightning callbacks
(:mod:`lightning_rnnviz.callbacks`) only decide when to record, and which loggers to write to.

The modules import the stages' packages (probe, render, sinks), never the other way round; this package's
``__init__`` imports nothing, so that a drawing process started with ``python -m
lightning_rnnviz.pipeline.drawing`` loads neither torch nor Lightning.
"""
