"""What an output being resumed already holds: the finished paths of a jsonl or csv file, where to go on writing,
and a csv's last image, read in one pass with every line bounded.

Only the one record a killed write cut short may be left out, and only if it could be the start of a result
mlx-vit writes; anything else wrong with the file stops the resume with one line (OutputError), the file
untouched. csv is read by Python's csv module, which parses quotes and quoted line breaks; a quote left open that
would swallow finished records is damage, not a cut.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import itertools
import os
import re
from array import array
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from mlx_vit.errors import OutputError, shown
from mlx_vit.files import MAX_JSON_BYTES, lines, open_regular, parse_json, path_string

CSV_HEADER = ["path", "rank", "label", "score", "class_id", "error"]
CSV_LINE = (",".join(CSV_HEADER) + "\r\n").encode()
JSONL_START = b'{"path": '  # how every line mlx-vit writes to jsonl begins (json.dumps of result_json)
# A result's line (jsonl) or record (csv) is at most this long: a path, and labels from a config file.
MAX_RECORD_BYTES = MAX_JSON_BYTES


class Done:
    """The paths an earlier run finished, as sorted 64-bit hashes: 8 bytes each, however long the paths.

    A path is hashed as an absolute path (from the current folder), so that `photos/a.jpg` finished once is
    skipped when the run resumes as `/home/me/photos/a.jpg`, and the other way round.
    """

    def __init__(self, hashes: Sequence[int] | None = None, failed: int = 0):  # an array("Q") or a numpy array
        import numpy as np  # here, not at import: `mlx-vit --help` reads the formats' names next door

        self.hashes = np.unique(np.asarray(hashes if hashes is not None else [], dtype=np.uint64))
        self.failed = failed  # of them, the paths whose result is an error (a resume does not retry them)

    def adding(self, key: int) -> Done:
        """These paths and the one whose key this is."""
        import numpy as np

        return Done(np.append(self.hashes, np.uint64(key)), self.failed)

    @staticmethod
    def key(path: str) -> int:
        digest = hashlib.blake2b(os.path.abspath(path).encode("utf-8", "surrogateescape"), digest_size=8).digest()
        return int.from_bytes(digest, "little")

    def __len__(self) -> int:
        return len(self.hashes)

    def __contains__(self, path: str) -> bool:
        if not len(self.hashes):
            return False
        key = self.key(path)
        at = int(self.hashes.searchsorted(self.hashes.dtype.type(key)))
        return at < len(self.hashes) and int(self.hashes[at]) == key


@dataclass
class Tail:
    """A resumed csv's last image: its path, where its rows end (they start where the finished part of the file
    ends), and how many ranks they hold (0: one row without a rank, an error or no prediction over the
    threshold). A killed batch may have cut it short of its ranks (see ResultWriter)."""

    path: str
    end: int
    ranks: int


def read_done(path: Path, format: str) -> tuple[Done, int, Tail | None]:
    """The finished paths of a jsonl or csv file, the byte length of its finished part (where to append), and
    for csv its last image (a Tail, whose rows follow the finished part; see ResultWriter).

    jsonl: every complete line. csv: every complete record but the last image's. Only the one incomplete last
    line or record, of the shape mlx-vit writes, may be left out; anything else wrong with the file stops the
    resume with one line, and the file is not touched. One pass, each line bounded.
    """
    name = shown(path)
    with open_regular(path, OutputError) as f:
        return READERS[format](f, name)


def _read_jsonl(f, name: str) -> tuple[Done, int, None]:
    hashes = array("Q")
    end = failures = 0
    for number, line in enumerate(lines(f, MAX_RECORD_BYTES, name, OutputError), 1):
        record = None
        if not line.endswith(b"\n"):  # the last line, cut short if it is the start of a result (redone)
            if b"\r" not in line and (line.startswith(JSONL_START) or JSONL_START.startswith(line)):
                break
        else:
            with contextlib.suppress(OutputError):  # not JSON, or nested too deeply
                record = parse_json(line, "", OutputError)
        failed = isinstance(record, dict) and isinstance(record.get("error"), str)
        result = isinstance(record, dict) and (failed or isinstance(record.get("predictions"), list))
        path = path_string(record.get("path"), opened=not failed) if result else None
        if path is None:
            raise OutputError(f"{name}: line {number} is not an mlx-vit result; not resuming (remove the file?)")
        hashes.append(Done.key(path))
        failures += failed
        end += len(line)
    return Done(hashes, failures), end, None


def _read_csv(f, name: str) -> tuple[Done, int, Tail | None]:
    """Records as Python's csv reader parses them (quoted line breaks and all), over the file's lines as they are
    read: when the reader hands a record back it has taken exactly the lines that hold it, so `taken` is where
    the record ends. An unclosed quote reaches the end of the file; that is the one incomplete record only if it
    is the last line (a write cut short), never when it swallowed whole lines after it."""
    taken = 0  # bytes of the lines the csv reader has taken so far
    last_line = b""

    def text() -> Iterator[str]:
        nonlocal taken, last_line
        for line in lines(f, MAX_RECORD_BYTES, name, OutputError):
            taken, last_line = taken + len(line), line
            yield line.decode("utf-8", "surrogateescape")

    def damaged(number: int, why: str) -> OutputError:
        return OutputError(f"{name}: record {number} is damaged ({shown(why, 80)}); not resuming (remove the file?)")

    hashes = array("Q")
    csv.field_size_limit(max(csv.field_size_limit(), MAX_RECORD_BYTES))  # mlx-vit writes labels that long
    reader = csv.reader(text(), strict=True)
    end = last_start = ranks = failures = 0  # where the finished records end; the last image's start; its ranks
    last_path, last_failed = None, False
    for number in itertools.count(1):
        try:
            row = next(reader, None)
        except csv.Error as error:
            # Only a quote still open at the end of the file can be a write cut short, and only if it swallowed
            # no finished record (and came after the header, which holds no quote).
            if "unexpected end of data" not in str(error) or f.read(1) or _swallows_a_record(f, end, taken):
                raise damaged(number, str(error)) from None
            if number == 1:
                raise OutputError(f"{name}: does not start with mlx-vit's csv header; not resuming") from None
            break  # the last record, cut short inside a quoted field: redone
        if row is None:
            break
        if not last_line.endswith(b"\n"):  # the last line, cut short: one record (the reader made one of it)
            f.seek(end)
            if number == 1 and not CSV_LINE.startswith(f.read(taken - end)):
                raise OutputError(f"{name}: does not start with mlx-vit's csv header; not resuming")
            break  # redone
        if number == 1:
            if row != CSV_HEADER:
                raise OutputError(f"{name}: does not start with mlx-vit's csv header; not resuming")
        elif len(row) != len(CSV_HEADER) or path_string(row[0], opened=not row[5]) is None:
            raise OutputError(f"{name}: record {number} is not an mlx-vit result; not resuming (remove the file?)")
        elif row[0] != last_path:
            if last_path is not None:
                hashes.append(Done.key(last_path))
                failures += last_failed
            last_path, last_start, ranks, last_failed = row[0], end, 0, bool(row[5])
        if number > 1 and row[1]:
            ranks += 1
        end = taken
    done = Done(hashes, failures + last_failed)  # a failed last image is kept, never redone (see CsvFormat)
    return (done, end, None) if last_path is None else (done, last_start, Tail(last_path, end, ranks))


def _swallows_a_record(f, start: int, end: int) -> bool:
    """Whether the unfinished last record (bytes start..end) is more than one record cut short: a quote left open
    that ran over finished records, each a whole line (whatever ends it) that is a record on its own (a quoted
    label or path may hold a line break, but not a record)."""
    if end - start > MAX_RECORD_BYTES:
        return True
    f.seek(start)
    for line in re.split(rb"\r\n|\n|\r", f.read(end - start))[1:-1]:  # the whole lines after the record's first
        try:
            rows = list(csv.reader([line.decode("utf-8", "surrogateescape") + "\r\n"], strict=True))
        except csv.Error:
            continue
        if len(rows) == 1 and len(rows[0]) == len(CSV_HEADER):
            return True
    return False


# The formats --resume continues (each an outputs.Format with `resumable` set), by name: their readers.
READERS = {"jsonl": _read_jsonl, "csv": _read_csv}
