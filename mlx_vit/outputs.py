"""Where results go: a table, json, jsonl or csv, on stdout or in a file, written as each batch finishes.

jsonl and csv are the formats for libraries. Each batch is appended in one write and flushed, so a run that is
killed keeps every batch it finished, and `resume=True` continues such a file (mlx_vit.resume reads it): the
inputs already in it are skipped, a partly written last line is cut off and redone, and nothing finished is ever
rewritten. json (one
array) and the table are written to a temporary file beside the output and moved into place at the end, so a
failed run leaves no half-written file behind.
"""

from __future__ import annotations

import contextlib
import csv
import errno
import io
import json
import logging
import os
import stat
import sys
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any, TextIO

import numpy as np

from mlx_vit.errors import OutputError, shown
from mlx_vit.files import os_reason, temporary_beside
from mlx_vit.resume import CSV_HEADER, Done, Tail, read_done

FORMATS = ("table", "json", "jsonl", "csv")
RESUMABLE = ("jsonl", "csv")
# How often appended results are also forced to the disk itself (flushing after every batch already keeps them
# when the process dies; this bounds what a power cut loses).
SYNC_SECONDS = 1.0

log = logging.getLogger(__name__)


def format_for(path: str | os.PathLike | None, given: str | None) -> str:
    """The format asked for, else the output file's extension (.json, .jsonl, .csv), else a table."""
    if given is not None:
        return given
    suffix = Path(path).suffix.lower().lstrip(".") if path is not None else ""
    return suffix if suffix in ("json", "jsonl", "csv") else "table"


def result_json(result: Any) -> dict[str, Any]:
    """A classification Result as JSON: {"path", "predictions": [{label, score, class_id}]} or {"path", "error"}."""
    if result.error:
        return {"path": result.path, "error": result.error}
    return {"path": result.path, "predictions": [vars(p) for p in result.predictions]}


def csv_rows(result: Any) -> list[list[Any]]:
    """One row per prediction (rank 1 first); an error, or no prediction over the threshold, is one row."""
    if result.error:
        return [[result.path, "", "", "", "", result.error]]
    if not result.predictions:
        return [[result.path, "", "", "", "", ""]]
    return [[result.path, rank, p.label, repr(p.score), p.class_id, ""] for rank, p in enumerate(result.predictions, 1)]


class Output:
    """An output stream for one run: `append` per batch, then `finish()` (or `abort()` on failure).

    Checks happen at once (an output that exists is continued only with `resume`); the file itself is opened at
    the first write, so a run that fails before it leaves nothing behind. An existing output that is not a
    regular file (`/dev/stdout`, a pipe) is written as it is, never resumed.
    """

    def __init__(self, path: str | os.PathLike | None, format: str, resume: bool = False):
        if format not in FORMATS:
            raise OutputError(f"{shown(format, quote=True)}: not an output format ({', '.join(FORMATS)})")
        self.path = Path(path) if path is not None else None
        self.format = format
        self.done = Done()
        self.file: TextIO | None = sys.stdout if path is None else None
        self.fresh = True  # nothing written yet: a csv starts with its header
        self._end: int | None = None  # where a resumed file's finished part ends
        self.tail: Tail | None = None  # a resumed csv's last image, until it is redone or kept
        self._special = False
        self._temporary: Path | None = None
        self._synced = time.monotonic()
        if self.path is None:
            if resume:
                raise OutputError("--resume needs -o FILE: the results to continue are read from it")
            return
        name = shown(self.path)
        if resume and format not in RESUMABLE:
            raise OutputError(f"{name}: --resume continues jsonl or csv output, not {format}")
        try:
            mode = self.path.stat().st_mode
        except FileNotFoundError:
            return
        except OSError as error:
            raise OutputError(f"{name}: cannot write ({os_reason(error)})") from None
        if not stat.S_ISREG(mode):
            if resume or stat.S_ISDIR(mode):
                what = "resumed" if resume else "replaced"
                raise OutputError(f"{name}: is not a regular file, so it cannot be {what}")
            self._special = True
        elif not resume:
            raise OutputError(f"{name}: already exists; --resume continues it, or remove it first")
        else:
            self.done, self._end, self.tail = read_done(self.path, format)
            self.fresh = self._end == 0

    def keep_tail(self) -> None:
        """A resumed csv's last image was not redone: its rows stay, and writing goes on after them."""
        if self.tail is not None:
            self._end, self.tail = self.tail.end, None

    def stream(self) -> TextIO:
        """The open file (opened now, at the first write)."""
        if self.file is not None:
            return self.file
        options = {"encoding": "utf-8", "errors": "surrogateescape", "newline": ""}
        try:
            if self._special:
                self.file = open(self.path, "w", **options)
            elif self._end is not None:
                self.file = open(self.path, "r+", **options)
                self.file.seek(self._end)
                self.file.truncate()
            elif self.format in RESUMABLE:
                self.file = open(self.path, "x", **options)
            else:
                fd, self._temporary = temporary_beside(self.path)
                self.file = os.fdopen(fd, "w", **options)
        except OSError as error:
            raise OutputError(f"{shown(self.path)}: cannot write ({os_reason(error)})") from None
        return self.file

    def append(self, text: str) -> None:
        """Append `text` in one write and flush it; sync it to the disk at most every SYNC_SECONDS."""
        file = self.stream()
        try:
            file.write(text)
            file.flush()
            self.fresh = False
            if self.path is not None and not self._special and time.monotonic() - self._synced > SYNC_SECONDS:
                os.fsync(file.fileno())
                self._synced = time.monotonic()
        except OSError as error:
            raise OutputError(f"{shown(self.path or 'stdout')}: cannot write ({os_reason(error)})") from None

    def finish(self) -> None:
        """Close the file; a json or table output is moved into place only now."""
        if self.path is None:
            return
        file = self.stream()
        try:
            file.flush()
            if not self._special:
                os.fsync(file.fileno())
            file.close()
            if self._temporary is not None:
                os.replace(self._temporary, self.path)
                self._temporary = None
        except OSError as error:
            self.abort()
            raise OutputError(f"{shown(self.path)}: cannot write ({os_reason(error)})") from None

    def abort(self) -> None:
        """After a failure: jsonl/csv keep what was finished; a json or table output is removed."""
        if self.path is not None and self.file is not None:
            with contextlib.suppress(OSError):
                self.file.close()
        if self._temporary is not None:
            with contextlib.suppress(OSError):
                self._temporary.unlink()
            self._temporary = None


# A table holds its rows until it is printed; a library's results come as several tables of this many images,
# so memory stays flat (jsonl and csv are the formats for libraries).
TABLE_ROWS = 1000


class ResultWriter:
    """Classification Results into an Output, batch by batch, in the Output's format.

    A resumed csv's last image may have been cut short of its ranks by a kill. With `top_k` and `classes` (the
    model's) known, one with as many ranks as the run makes, or a single unranked row, is whole: done, and kept.
    Otherwise it is redone if it is among the first results written (it comes first when the inputs are the
    same), and kept where it is if not; a result for it that comes later is dropped, never written twice.
    """

    def __init__(self, output: Output, model_name: str, top_k: int | None = None, classes: int | None = None):
        self.output = output
        self.resumable = output.path is not None and output.format in RESUMABLE
        self.model_name = model_name
        self.table_rows: list[Any] = []  # a table is laid out when complete: TABLE_ROWS results at a time
        self.count = 0
        self.kept: int | None = None  # the hash of a resumed csv's last image, kept where it is
        tail = output.tail
        if tail is not None and top_k is not None and (not tail.ranks or tail.ranks >= min(top_k, classes or top_k)):
            output.keep_tail()
            self.kept = Done.key(tail.path)
            output.done = Done(np.append(output.done.hashes, np.uint64(self.kept)))
        self.done = output.done

    def write(self, results: Iterable[Any]) -> None:
        results = list(results)
        if not results:  # nothing to decide or open the file for
            return
        format = self.output.format
        if format == "table":
            self.table_rows.extend(results)
            if len(self.table_rows) >= TABLE_ROWS:
                self._print_table()
        elif format == "jsonl":
            self.output.append("".join(json.dumps(result_json(r), allow_nan=False) + "\n" for r in results))
        elif format == "csv":
            keys = [Done.key(r.path) for r in results]
            tail = self.output.tail
            if tail is not None:  # the last image of the file resumed: redone now, or kept
                again = [r for r, key in zip(results, keys, strict=True) if key == Done.key(tail.path)]
                if again and not any(r.error for r in again):
                    self.output.tail = None  # redone: its new rows replace the old ones
                else:  # kept where it is; an error now does not replace what was finished
                    self.output.keep_tail()
                    self.kept = Done.key(tail.path)
            if self.kept is not None and self.kept in keys:
                kept = results[keys.index(self.kept)].path
                log.info("%s: kept as the resumed file holds it (a kill may have cut its ranks short: remove its "
                         "rows and resume to redo it)", shown(kept))  # fmt: skip
                results = [r for r, key in zip(results, keys, strict=True) if key != self.kept]
            text = io.StringIO()
            writer = csv.writer(text)  # lines end in \r\n (RFC 4180), so a field holding a lone \r is quoted
            if self.output.fresh and results:
                writer.writerow(CSV_HEADER)
            for result in results:
                writer.writerows(csv_rows(result))
            self.output.append(text.getvalue())
        else:  # one JSON array, as json.dumps(list, indent=2) writes it, element by element
            items = [_indented(json.dumps(result_json(r), indent=2, allow_nan=False)) for r in results]
            text = ",\n".join(items)
            if items:
                self.output.append(("[\n" if self.count == 0 else ",\n") + text)
        self.count += len(results)

    def close(self) -> None:
        self.output.keep_tail()
        if self.output.format == "json":
            self.output.append("[]\n" if self.count == 0 else "\n]\n")
        elif self.output.format == "csv" and self.output.fresh:
            self.output.append(",".join(CSV_HEADER) + "\r\n")
        elif self.output.format == "table" and (self.table_rows or self.count == 0):
            self._print_table()
        self.output.finish()

    def _print_table(self) -> None:
        file = self.output.stream()
        try:
            console(None if file is sys.stdout else file).print(results_table(self.table_rows, self.model_name))
        except OSError as error:  # a full disk, /dev/full
            raise OutputError(f"{shown(self.output.path or 'stdout')}: cannot write ({os_reason(error)})") from None
        self.table_rows = []

    def abort(self) -> None:
        self.output.abort()


def _indented(text: str) -> str:
    return "\n".join("  " + line for line in text.split("\n"))


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
            table.add_row(cell(result.path), "", "[red]failed (see above)[/red]", "", "", end_section=True)
            continue
        if not result.predictions:
            table.add_row(cell(result.path), "", "[dim]none over the threshold[/dim]", "", "", end_section=True)
            continue
        for rank, p in enumerate(result.predictions, 1):
            last = rank == len(result.predictions)
            table.add_row(cell(result.path) if rank == 1 else "", str(rank), cell(p.label), f"{p.score:.4f}",
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


class ResultCodec:
    """Results as bytes (a JSON line each, exact floats), to send them between ranks."""

    @staticmethod
    def encode(results: list[Any]) -> bytes:
        return "".join(json.dumps(result_json(r), allow_nan=False) + "\n" for r in results).encode(
            "utf-8", "surrogateescape"
        )

    @staticmethod
    def decode(data: bytes) -> list[Any]:
        from mlx_vit.classify import Prediction, Result

        results = []
        for line in data.decode("utf-8", "surrogateescape").split("\n")[:-1]:
            record = json.loads(line)
            found = record.get("predictions")
            results.append(Result(record["path"], [Prediction(**p) for p in found] if found is not None else None,
                                  record.get("error")))  # fmt: skip
        return results


RESULTS = ResultCodec()
