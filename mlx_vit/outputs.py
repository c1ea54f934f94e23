"""Where results go: a table, json, jsonl or csv, on stdout or in a file, written as each batch finishes.

Each format is one class (a Format: how a batch of Results becomes text, and what ends the file), named in
FORMATS. jsonl and csv are the formats for libraries: each batch is appended in one write and flushed, so a run
that is killed keeps every batch it finished, and `resume=True` continues such a file (mlx_vit.resume reads it):
the inputs already in it are skipped, a partly written last line is cut off and redone, and nothing finished is
ever rewritten. json (one array) and the table are written to a temporary file beside the output and moved into
place at the end, so a failed run leaves no half-written file behind.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import logging
import os
import stat
import sys
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any, ClassVar, TextIO

from mlx_vit.errors import OutputError, shown
from mlx_vit.files import failing, os_reason, temporary_beside
from mlx_vit.resume import CSV_HEADER, Done, Tail, read_done
from mlx_vit.tables import console, results_table

# How often appended results are also forced to the disk itself (flushing after every batch already keeps them
# when the process dies; this bounds what a power cut loses).
SYNC_SECONDS = 1.0
# A table holds its rows until it is printed; a library's results come as several tables of this many images,
# so memory stays flat (jsonl and csv are the formats for libraries).
TABLE_ROWS = 1000

log = logging.getLogger(__name__)


def result_json(result: Any) -> dict[str, Any]:
    """A classification Result as JSON: {"path", "predictions": [{label, score, class_id}]} or {"path", "error"}."""
    if result.error:
        return {"path": result.path, "error": result.error}
    return {"path": result.path, "predictions": [vars(p) for p in result.predictions]}


def json_lines(results: list[Any]) -> str:
    """Results as JSON lines, one each; floats exact, never NaN or infinity."""
    return "".join(json.dumps(result_json(r), allow_nan=False) + "\n" for r in results)


class Format:
    """One output format: how a run's Results are written into its Output, a batch at a time.

    A new format is a subclass and its name in FORMATS. One that sets `resumable` is appended and flushed a batch
    at a time, and needs a reader in mlx_vit.resume.READERS for --resume; any other is written to a temporary file
    beside the output and moved into place when the run ends.
    """

    name: ClassVar[str]
    suffix: ClassVar[str | None] = None  # the -o extension that picks this format when --format does not
    resumable: ClassVar[bool] = False

    def __init__(self, output: Output, model_name: str, top_k: int | None = None, classes: int | None = None):
        self.output = output

    def write(self, results: list[Any]) -> None:
        """One batch of Results (never empty), in input order."""
        raise NotImplementedError

    def close(self) -> None:
        """What ends the output, after the last batch."""


class TableFormat(Format):
    """A table for people. It is laid out when complete, so a library comes as tables of TABLE_ROWS images."""

    name = "table"

    def __init__(self, output: Output, model_name: str, top_k: int | None = None, classes: int | None = None):
        super().__init__(output, model_name)
        self.model_name = model_name
        self.rows: list[Any] = []  # the Results of the table not printed yet
        self.printed = False

    def write(self, results: list[Any]) -> None:
        self.rows.extend(results)
        if len(self.rows) >= TABLE_ROWS:
            self._print()

    def close(self) -> None:
        if self.rows or not self.printed:  # a run with no inputs still prints its (empty) table
            self._print()

    def _print(self) -> None:
        file = self.output.stream()
        with self.output.writing():  # a full disk, /dev/full
            console(None if file is sys.stdout else file).print(results_table(self.rows, self.model_name))
        self.rows = []
        self.printed = True


class JsonFormat(Format):
    """One array, an object per input (result_json), exactly as json.dumps(list, indent=2) writes it."""

    name = "json"
    suffix = ".json"

    def write(self, results: list[Any]) -> None:
        items = ",\n".join(_indented(json.dumps(result_json(r), indent=2, allow_nan=False)) for r in results)
        self.output.append(("[\n" if self.output.fresh else ",\n") + items)  # the first batch opens the array

    def close(self) -> None:
        self.output.append("[]\n" if self.output.fresh else "\n]\n")


def _indented(text: str) -> str:
    return "\n".join("  " + line for line in text.split("\n"))


class JsonlFormat(Format):
    """The objects of json, one per line, appended as each batch finishes."""

    name = "jsonl"
    suffix = ".jsonl"
    resumable = True

    def write(self, results: list[Any]) -> None:
        self.output.append(json_lines(results))


class CsvFormat(Format):
    """A row per image and rank (CSV_HEADER's fields), lines ending in \\r\\n (RFC 4180), scores in full (repr).

    A resumed csv's last image may have been cut short of its ranks by a kill. With `top_k` and `classes` (the
    model's) known, one with as many ranks as the run makes, or a single unranked row, is whole: done, and kept.
    Otherwise it is redone if it is among the first results written (it comes first when the inputs are the
    same), and kept where it is if not; a result for it that comes later is dropped, never written twice.
    """

    name = "csv"
    suffix = ".csv"
    resumable = True

    def __init__(self, output: Output, model_name: str, top_k: int | None = None, classes: int | None = None):
        super().__init__(output, model_name)
        self.kept: int | None = None  # the hash of the resumed file's last image, kept where it is
        tail = output.tail
        if tail is not None and top_k is not None and (not tail.ranks or tail.ranks >= min(top_k, classes or top_k)):
            self._keep_tail()
            output.done = output.done.adding(self.kept)

    @staticmethod
    def rows(result: Any) -> list[list[Any]]:
        """One row per prediction (rank 1 first); an error, or no prediction over the threshold, is one row."""
        if result.error:
            return [[result.path, "", "", "", "", result.error]]
        if not result.predictions:
            return [[result.path, "", "", "", "", ""]]
        return [[result.path, rank, p.label, repr(p.score), p.class_id, ""]
                for rank, p in enumerate(result.predictions, 1)]  # fmt: skip

    def write(self, results: list[Any]) -> None:
        keys = [Done.key(r.path) for r in results]
        tail = self.output.tail
        if tail is not None:  # the last image of the file resumed: redone now, or kept
            again = [r for r, key in zip(results, keys, strict=True) if key == Done.key(tail.path)]
            if again and not any(r.error for r in again):
                self.output.tail = None  # redone: its new rows replace the old ones
            else:  # kept where it is; an error now does not replace what was finished
                self._keep_tail()
        if self.kept is not None and self.kept in keys:
            kept = results[keys.index(self.kept)].path
            log.info("%s: kept as the resumed file holds it (a kill may have cut its ranks short: remove its "
                     "rows and resume to redo it)", shown(kept))  # fmt: skip
            results = [r for r, key in zip(results, keys, strict=True) if key != self.kept]
        self.output.append(self._text(results))

    def close(self) -> None:
        self.output.keep_tail()
        if self.output.fresh:  # no result at all: the header alone
            self.output.append(self._text([]))

    def _keep_tail(self) -> None:
        self.kept = Done.key(self.output.tail.path)
        self.output.keep_tail()

    def _text(self, results: list[Any]) -> str:
        text = io.StringIO()
        writer = csv.writer(text)  # lines end in \r\n (RFC 4180), so a field holding a lone \r is quoted
        if self.output.fresh:
            writer.writerow(CSV_HEADER)
        for result in results:
            writer.writerows(self.rows(result))
        return text.getvalue()


FORMATS: dict[str, type[Format]] = {kind.name: kind for kind in (TableFormat, JsonFormat, JsonlFormat, CsvFormat)}


def format_for(path: str | os.PathLike | None, given: str | None) -> str:
    """The format asked for, else the output file's extension (.json, .jsonl, .csv), else a table.

    An extension that names another format than the one asked for is refused (OutputError): csv in `x.jsonl`
    would mislead every reader that trusts the name, and --resume of it later. One that names none (.txt) takes any.
    """
    suffix = Path(path).suffix.lower() if path is not None else ""
    named = next((name for name, kind in FORMATS.items() if kind.suffix == suffix), None)
    if given is not None and named is not None and given != named:
        raise OutputError(f"-o {shown(path)} --format {given}: the extension {shown(suffix)} names {named} output, "
                          f"not {given}; name the file for {given}, or leave --format out")  # fmt: skip
    return given or named or "table"


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
        self.resumable = FORMATS[format].resumable
        self.done = Done()
        self.file: TextIO | None = sys.stdout if path is None else None
        self.fresh = True  # nothing written yet: a csv starts with its header, a json array with [
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
        if resume and not self.resumable:
            resumable = " or ".join(n for n, kind in FORMATS.items() if kind.resumable)
            raise OutputError(f"{name}: --resume continues {resumable} output, not {format}")
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

    def writing(self):
        """A block whose OSError (a full disk, permissions) becomes this output's one-line OutputError."""
        return failing(self.path or "stdout", OutputError, "cannot write")

    def keep_tail(self) -> None:
        """A resumed csv's last image was not redone: its rows stay, and writing goes on after them."""
        if self.tail is not None:
            self._end, self.tail = self.tail.end, None

    def stream(self) -> TextIO:
        """The open file (opened now, at the first write)."""
        if self.file is not None:
            return self.file
        options = {"encoding": "utf-8", "errors": "surrogateescape", "newline": ""}
        with self.writing():
            if self._special:
                self.file = open(self.path, "w", **options)
            elif self._end is not None:
                self.file = open(self.path, "r+", **options)
                self.file.seek(self._end)
                self.file.truncate()
            elif self.resumable:
                self.file = open(self.path, "x", **options)
            else:
                fd, self._temporary = temporary_beside(self.path)
                self.file = os.fdopen(fd, "w", **options)
        return self.file

    def append(self, text: str) -> None:
        """Append `text` in one write and flush it; sync it to the disk at most every SYNC_SECONDS."""
        file = self.stream()
        with self.writing():
            file.write(text)
            file.flush()
            self.fresh = False
            if self.path is not None and not self._special and time.monotonic() - self._synced > SYNC_SECONDS:
                os.fsync(file.fileno())
                self._synced = time.monotonic()

    def finish(self) -> None:
        """Close the file; a json or table output is moved into place only now."""
        if self.path is None:
            return
        file = self.stream()
        try:
            with self.writing():
                file.flush()
                if not self._special:
                    os.fsync(file.fileno())
                file.close()
                if self._temporary is not None:
                    os.replace(self._temporary, self.path)
                    self._temporary = None
        except OutputError:
            self.abort()
            raise

    def abort(self) -> None:
        """After a failure: jsonl/csv keep what was finished; a json or table output is removed."""
        if self.path is not None and self.file is not None:
            with contextlib.suppress(OSError):
                self.file.close()
        if self._temporary is not None:
            with contextlib.suppress(OSError):
                self._temporary.unlink()
            self._temporary = None


class ResultWriter:
    """A run's sink for classification Results: each batch into an Output, in the Output's format."""

    def __init__(self, output: Output, model_name: str, top_k: int | None = None, classes: int | None = None):
        self.output = output
        self.format = FORMATS[output.format](output, model_name, top_k, classes)
        self.resumable = output.path is not None and output.resumable
        self.done = output.done  # after the format has seen it: a resumed csv's whole last image is done too

    def write(self, results: Iterable[Any]) -> None:
        results = list(results)
        if results:  # an empty batch has nothing to decide or open the file for
            self.format.write(results)

    def close(self) -> None:
        self.format.close()
        self.output.finish()

    def abort(self) -> None:
        self.output.abort()


class ResultCodec:
    """Results as bytes (a JSON line each, exact floats), to send them between ranks."""

    @staticmethod
    def encode(results: list[Any]) -> bytes:
        return json_lines(results).encode("utf-8", "surrogateescape")

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
