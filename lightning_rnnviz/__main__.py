"""``python -m lightning_rnnviz summary RUN``, ``compare RUN [RUN ...] --out FILE`` (runs read back from
their ``summary.json``) and ``explore RUN -o FILE.html`` (see :mod:`lightning_rnnviz.cli`)."""

from lightning_rnnviz.cli import main

if __name__ == "__main__":
    raise SystemExit(main(prog="python -m lightning_rnnviz"))
