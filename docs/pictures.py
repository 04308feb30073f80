"""Copy the README's pictures out of the event files of default runs of the two examples.

``python docs/pictures.py --vanishing DIR --seq2seq DIR``, where ``DIR`` are the ``--save-dir`` folders of
``examples/vanishing_gradients.py`` and ``examples/seq2seq_attention.py`` (run with their default
settings), plus the ``compare.png`` the first one writes. Each picture is the callback's own PNG, as
TensorBoard shows it.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.helpers.events import RunEvents  # noqa: E402

# docs file -> (example, run folder under its save dir, tag, which step: "first" or "last")
PICTURES = {
    "grad_norm.png": ("vanishing", "rnn/version_0", "rnnviz/grad_norm/rnn", "last"),
    "grad_decay.png": ("vanishing", "lstm/version_0", "rnnviz/grad_decay/rnn", "last"),
    "hidden.png": ("vanishing", "lstm/version_0", "rnnviz/hidden/rnn", "last"),
    "gates.png": ("vanishing", "gru/version_0", "rnnviz/gates/rnn", "last"),
    "attention_step0.png": ("seq2seq", "seq2seq_attention/version_0", "rnnviz/attention/decoder.attn", "first"),
    "attention.png": ("seq2seq", "seq2seq_attention/version_0", "rnnviz/attention/decoder.attn", "last"),
    "attention_mha.png": ("seq2seq", "seq2seq_attention/version_0", "rnnviz/attention/encoder.self_attn", "last"),
}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vanishing", required=True, help="save dir of examples/vanishing_gradients.py")
    parser.add_argument("--seq2seq", required=True, help="save dir of examples/seq2seq_attention.py")
    parser.add_argument("--out", default=str(ROOT / "docs"))
    opts = parser.parse_args(argv)
    roots = {"vanishing": Path(opts.vanishing), "seq2seq": Path(opts.seq2seq)}
    for name, (example, run, tag, which) in PICTURES.items():
        images = RunEvents(roots[example] / run).Images(tag)
        image = images[0] if which == "first" else images[-1]
        (Path(opts.out) / name).write_bytes(image.encoded_image_string)
        print(f"{name}: {tag} of {run}, step {image.step}, {image.width}x{image.height}")
    shutil.copyfile(roots["vanishing"] / "compare.png", Path(opts.out) / "compare.png")
    print("compare.png: the vanishing-gradients example's offline comparison")


if __name__ == "__main__":
    main()
