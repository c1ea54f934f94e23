"""Rich tables for people: classify's results and search's matches, with paths and labels shown as data (never
markup or terminal commands) and paths that keep their file names in any width; and the console they print on."""

from __future__ import annotations

import errno
import os
from typing import Any, TextIO

from mlx_vit.errors import shown


def results_table(results: list[Any], model_name: str):
    """A rich Table of Results. Paths and labels are data, never markup or terminal commands."""
    from rich.table import Table

    table = Table(title=cell(f"mlx-vit · {model_name}"), title_justify="left")
    table.add_column("image")
    table.add_column("#", justify="right")
    table.add_column("label")
    table.add_column("score", justify="right")
    table.add_column("class", justify="right")
    for result in results:
        if result.error:
            table.add_row(path_cell(result.path), "", "[red]failed (see above)[/red]", "", "", end_section=True)
            continue
        if not result.predictions:
            table.add_row(path_cell(result.path), "", "[dim]none over the threshold[/dim]", "", "", end_section=True)
            continue
        for rank, p in enumerate(result.predictions, 1):
            last = rank == len(result.predictions)
            table.add_row(path_cell(result.path) if rank == 1 else "", str(rank), cell(p.label), f"{p.score:.4f}",
                          str(p.class_id), end_section=last)  # fmt: skip
    return table


def console(file: TextIO | None = None):
    """A rich Console for `file` (stdout when None) that reports a reader gone away as the OSError it is: rich's own
    handling ends the process with exit code 1 and no word, before the summary line."""
    from rich.console import Console

    def broken_pipe() -> None:
        raise BrokenPipeError(errno.EPIPE, "Broken pipe")

    made = Console(file=file)
    made.on_broken_pipe = broken_pipe
    return made


def cell(value: object):
    """Text from a file, a path or a label, for a rich table: no markup, emoji code or control character acts."""
    from rich.text import Text

    return Text(shown(value))


def path_cell(path: str | os.PathLike) -> PathCell:
    """A path for a rich table's cell (every table that shows paths uses this): see PathCell."""
    return PathCell(path)


class PathCell:
    """A path in a rich table's cell, shown as `cell` shows text, that keeps its file name in any width.

    A column narrower than the path loses the path's middle (`short_path`), never its end: the rows of a folder's
    images differ only there, and rich would otherwise cut every one to the same `~/Pictures/originals/…`. A file
    name wider than the column itself is folded onto more lines.
    """

    def __init__(self, path: str | os.PathLike):
        self.text = shown(path)

    def __rich_measure__(self, console, options):
        from rich.cells import cell_len
        from rich.measure import Measurement

        whole = cell_len(self.text)
        return Measurement(min(whole, cell_len(short_path(self.text, 0))), whole)

    def __rich_console__(self, console, options):
        from rich.text import Text

        yield Text(short_path(self.text, options.max_width), overflow="fold")


def short_path(text: str, width: int) -> str:
    """`text` (a path, as `shown` makes it) in `width` terminal cells where it can be: the start of its folder,
    `…/` and its file name, whole. A file name wider than that comes as `…/NAME` (to be folded), a text without a
    folder as it is."""
    from rich.cells import cell_len, set_cell_size

    if cell_len(text) <= width or "/" not in text.rstrip("/"):
        return text
    folder, _, name = text.rstrip("/").rpartition("/")
    name = "…/" + name + "/" * (len(text) - len(text.rstrip("/")))  # a folder's trailing slash stays
    room = width - cell_len(name)
    if room <= 0:
        return name
    return set_cell_size(folder, room).rstrip() + name  # rstrip: a wide character cut in half pads a space
