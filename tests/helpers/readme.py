"""README.md's commands, read as a user reads them, so that the tests run what README tells users to run."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

README = Path(__file__).resolve().parents[2] / "README.md"


def quick_start() -> list[str]:
    """The command lines of the first ``bash`` block under ``## Quick start``, comments removed."""
    text = README.read_text(encoding="utf-8")
    section = text.split("\n## Quick start\n", 1)[1]
    block = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    return [line.split("  #")[0].strip() for line in block.splitlines() if line.strip()]


def example_runs() -> list[tuple[str, list[str]]]:
    """``(example name, arguments)`` for each ``python examples/<name>.py ...`` line of the quick start."""
    runs = []
    for line in quick_start():
        words = shlex.split(line)
        if words[:1] == ["python"] and len(words) > 1 and words[1].startswith("examples/"):
            runs.append((Path(words[1]).stem, words[2:]))
    return runs
