"""``python -m lightning_rnnviz summary RUN`` and ``compare RUN [RUN ...] --out FILE``: runs read back from
their ``summary.json`` (see :mod:`lightning_rnnviz.render.offline`)."""

from lightning_rnnviz.render.offline import main

if __name__ == "__main__":
    raise SystemExit(main(prog="python -m lightning_rnnviz"))
