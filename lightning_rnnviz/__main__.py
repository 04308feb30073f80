"""``python -m lightning_rnnviz summary RUN`` and ``compare RUN [RUN ...] --out FILE``: runs read back from
their ``summary.json`` (see :mod:`lightning_rnnviz.cli`)."""

from lightning_rnnviz.cli import main

if __name__ == "__main__":
    raise SystemExit(main(prog="python -m lightning_rnnviz"))
