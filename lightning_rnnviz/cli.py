"""The command line: ``lightning-rnnviz`` (or ``python -m lightning_rnnviz``) ``summary RUN`` prints a run's
per-epoch statistics and findings; ``compare RUN [RUN ...] --out FILE.png`` draws the runs' gradient norm
curves ``||dL/dh_t||`` of a recurrent module on one picture (of an attention module, its ``entropy_norm`` and
``focus`` per head) and prints their statistics side by side. ``RUN`` is a run folder (the logger's
``log_dir``, or its ``rnnviz/`` folder) or a ``summary.json``; for ``compare``, a folder that holds several
runs stands for all of them. What it reads and draws is :mod:`lightning_rnnviz.render.offline`'s.
``explore RUN -o FILE.html`` writes the explorer (TensorBoard's ``rnnviz`` tab) over every probe set in the
event files under ``RUN`` as one self-contained HTML page (:mod:`lightning_rnnviz.explorer`).
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure

from lightning_rnnviz.explorer.reading import ProbeSetError, read_probe_sets
from lightning_rnnviz.render.offline import (
    OUTPUT_FORMATS,
    SummaryError,
    compare_table,
    draw_compare,
    read_summaries,
    read_summary,
    run_labels,
    save_figure,
    select_runs,
    summary_text,
)

_EXAMPLES = """\
examples:
  {prog} summary lightning_logs/lstm/version_0
  {prog} compare lightning_logs/rnn/version_0 lightning_logs/gru/version_0 --out grads.png
  {prog} compare lightning_logs --epoch 0 --out grads.svg   (every run below lightning_logs)
  {prog} compare exp_a exp_b --module decoder.attn --out attn.png   (Trainer(default_root_dir="exp_a"), ...)
  {prog} explore lightning_logs/lstm/version_0 -o explorer.html
"""


def _epoch_arg(text: str) -> int | str:
    if text == "last":
        return text
    if re.fullmatch(r"\d+", text):
        return int(text)
    raise argparse.ArgumentTypeError(f"{text!r} is not an epoch number or 'last'")


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Read the summary.json that lightning_rnnviz's RNNViz callback writes beside a run: "
                    "print its statistics and findings, or compare several runs' gradient norms or "
                    "attention; or write the explorer over a run's probe sets as one HTML page.",
        epilog=_EXAMPLES.format(prog=prog or "lightning-rnnviz"),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    summary = commands.add_parser(
        "summary", help="print a run's statistics per module and epoch, and its findings",
        description="Print a run's statistics per module, epoch and row, then its findings.",
    )
    summary.add_argument("run", metavar="RUN",
                         help="a run folder (the logger's log_dir, or its rnnviz/) or a summary.json")
    summary.add_argument("--module", metavar="NAME", help="only this module (its qualified name)")
    compare = commands.add_parser(
        "compare", help="draw several runs' gradient norm curves (or attention per head) on one picture",
        description="Draw ||dL/dh_t|| per time step of several runs on one picture (one panel per layer and "
                    "direction) and print their statistics side by side. Of an attention module: its "
                    "entropy_norm and focus per head, one colour per run; of one head (--head I), per "
                    "epoch.",
    )
    compare.add_argument("runs", nargs="+", metavar="RUN",
                         help="run folders or summary.json files; a folder that holds several runs adds "
                              "them all")
    compare.add_argument("--module", metavar="NAME",
                         help="the module to compare (default: the only recurrent module all runs have, "
                              "else the only attention module)")
    compare.add_argument("--epoch", type=_epoch_arg, default="last", metavar="N|last",
                         help="which epoch (default: each run's last epoch with a gradient curve, or "
                              "with attention statistics)")
    compare.add_argument("--row", "--head", type=int, metavar="I",
                         help="only row I (layer*directions + direction), or head I of an attention module")
    compare.add_argument("--out", required=True, metavar="FILE",
                         help="the picture to write: .png (150 dpi), .svg or .pdf")
    explore = commands.add_parser(
        "explore", help="write the explorer over a run's probe sets as one self-contained HTML page",
        description="Read every probe set (the explorer's data, which the RNNViz callback writes for "
                    "TensorBoard's rnnviz tab) from the event files under RUN and write the explorer over "
                    "them as one HTML page that opens without a server: for W&B (wandb.Html), MLflow "
                    "artifacts or sharing. It holds every recorded step, so it can be large.",
    )
    explore.add_argument("run", metavar="RUN",
                         help="a log folder: the logger's log_dir, or any folder above it (every run below "
                              "it is read; each folder with event files is one run, as in TensorBoard)")
    explore.add_argument("-o", "--out", required=True, metavar="FILE", help="the HTML page to write")
    explore.add_argument("--title", metavar="TEXT", help="the page's title (default: rnnviz explorer: RUN)")
    return parser


def main(argv: Sequence[str] | None = None, prog: str | None = None) -> int:
    """Run the command line; returns the exit status (0, or 2 after printing ``error: ...``)."""
    args = build_parser(prog).parse_args(argv)
    try:
        if args.command == "summary":
            sys.stdout.write(summary_text(read_summary(args.run), args.module))
        elif args.command == "explore":
            _explore(args, sys.stdout.write)
        else:
            _compare(args, sys.stdout.write)
    except (SummaryError, ProbeSetError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


def _compare(args: argparse.Namespace, write: Callable[[str], Any]) -> None:
    out = Path(args.out)
    if out.suffix.lower() not in OUTPUT_FORMATS:  # before any reading: fail fast
        save_figure(Figure(), out)
    summaries = read_summaries(args.runs)
    labels = run_labels([s.run_dir for s in summaries])
    name, runs = select_runs(summaries, labels, args.module, args.epoch, args.row)
    fig = draw_compare(runs, name, args.row, args.epoch)
    save_figure(fig, out)
    write(compare_table(runs, args.row))
    write(f"wrote {out}\n")


def _explore(args: argparse.Namespace, write: Callable[[str], Any]) -> None:
    runs_json, blobs = read_probe_sets(args.run)
    if not blobs:
        raise ProbeSetError(
            f"no probe sets of lightning_rnnviz under {args.run!r}: the RNNViz callback writes them to "
            f"TensorBoard's event files (tags rnnviz/probe_set/train and /val) at its recordings, unless "
            f"probe_set= turns them off")
    from lightning_rnnviz.explorer.export import page

    out = Path(args.out)
    title = args.title or f"rnnviz explorer: {args.run}"
    out.write_text(page(runs_json, blobs, title=title), encoding="utf-8")
    steps = sum(len(tag["steps"]) for run in runs_json["runs"] for tag in run["tags"].values())
    size = sum(len(blob) for blob in blobs.values())
    write(f"wrote {out}: {steps} probe sets of {len(runs_json['runs'])} run(s), {size} bytes of data\n")


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
