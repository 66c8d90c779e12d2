"""Where the views print: a terminal gets rich's colours and wrapping, a pipe plain text.

Piped, tables are one line per row with no colours, no box and no trailing blanks, so
grep and awk work.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any, TextIO

from rich.console import Console, RenderableType

# Piped output is read by programs and in logs, not squeezed into a window: wide enough
# for a 32-character id, a label, a timestamp and a useful piece of the last error.
PIPE_WIDTH = 160


def make_console(file: TextIO | None = None) -> Console:
    """A console for stdout: rich's own terminal detection, a fixed width when piped."""
    console = Console(file=file or sys.stdout, markup=False, highlight=False, emoji=False)
    if not console.is_terminal:
        console.width = _pipe_width()
    return console


def _pipe_width() -> int:
    try:
        columns = int(os.environ.get("COLUMNS", ""))
    except ValueError:
        return PIPE_WIDTH
    return columns if columns >= 40 else PIPE_WIDTH


def emit(console: Console, renderable: RenderableType) -> None:
    """Print; when piped, without the blanks rich pads every line with to the full width."""
    if console.is_terminal:
        console.print(renderable)
        return
    with console.capture() as captured:
        console.print(renderable)
    lines = [line.rstrip() for line in captured.get().splitlines()]
    console.file.write("".join(line + "\n" for line in lines))
    console.file.flush()


def emit_json(console: Console, document: Any) -> None:
    console.file.write(json.dumps(document, indent=2) + "\n")
    console.file.flush()
