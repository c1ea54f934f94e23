"""Embeddings of a run, on disk as each batch finishes, gathered into one index file at the end.

A safetensors or .npy file is written whole, so while a run goes on its vectors are appended to a spool beside
the output: `.NAME.rows` (float32 rows, back to back) and `.NAME.paths.jsonl` (a line per input, in order:
its path, and its error if it failed). The rows are written before the line that counts them, so after a kill
the complete lines say how many rows are good; `resume` cuts both back to that and goes on (`.NAME.spool.json`
records the model and row shape, so a resume with another model is refused). At the end the
index is written atomically (`embed.write_embeddings`) and the spool removed. Resuming an index that is
already complete adds what is new and writes it again: its old rows come first, unchanged.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import stat
import time
from array import array
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from mlx_vit.embed import FINGERPRINT, paths_file, read_index, write_embeddings
from mlx_vit.errors import OutputError, shown
from mlx_vit.files import (
    MAX_NAME_BYTES,
    beside,
    create_beside,
    exists,
    failing,
    lines,
    open_beside,
    open_regular,
    parse_json,
    path_string,
    read_json,
    refusal,
)
from mlx_vit.outputs import SYNC_SECONDS
from mlx_vit.resume import Done

INDEX_SUFFIXES = (".safetensors", ".npy")
# A spool line: a path as given (one argument: at most Linux's 128 KiB, up to 6 bytes a byte as JSON) and its
# error line.
MAX_SPOOL_LINE = 2**20


def check_index_path(path: str | os.PathLike) -> None:
    """Refuse, before a model loads, an output that is not an index, or whose files beside it could not be named."""
    path = Path(path)
    if path.suffix.lower() not in INDEX_SUFFIXES:
        raise OutputError(f"{shown(path)}: embeddings are written as .safetensors or .npy")
    listing = paths_file(path)
    if len(os.fsencode(listing.name)) > MAX_NAME_BYTES:
        raise OutputError(f"{shown(path)}: name too long to put {shown(listing.name, 60)} beside it (255 bytes at "
                          "most); choose a shorter one")  # fmt: skip


class EmbeddingSpool:
    """Rank 0's sink for `mlx-vit embed`: records with .path, .error and .vector (float32, `shape` each).

    The spool files are created with O_EXCL | O_NOFOLLOW, and reopened by --resume without following links: a
    link, FIFO or device found at their names is refused, never written through or waited on."""

    def __init__(self, path: str | os.PathLike, model_name: str, shape: tuple[int, ...], resume: bool = False,
                 settings: dict[str, str] | None = None):  # fmt: skip
        self.path = Path(path)
        self.name = shown(self.path)
        check_index_path(self.path)
        self.model_name = model_name
        self.shape = tuple(shape)
        self.row_bytes = 4 * math.prod(self.shape)
        self.settings = dict(settings or {})  # what made the rows: a resume must not mix other ones in
        self.rows_path = beside(self.path, ".rows")
        self.paths_path = beside(self.path, ".paths.jsonl")
        self.meta_path = beside(self.path, ".spool.json")
        self.previous: tuple[np.ndarray, list[str]] | None = None  # a complete index being extended
        self.resumable = True  # the spool stays
        self.rows = 0
        self._end = 0
        self._files: tuple[Any, Any] | None = None
        self._synced = time.monotonic()
        found = [p for p in (self.paths_path, self.rows_path, self.meta_path) if exists(p)]
        for spooled in found:  # only regular files of ours: a link or FIFO planted there is refused
            mode = os.lstat(spooled).st_mode
            if not stat.S_ISREG(mode):
                raise OutputError(f"{refusal(spooled, mode, 'a spool file mlx-vit wrote')} (remove it)")
        if (exists(self.path) or found) and not resume:
            what = "already exists" if exists(self.path) else "has an unfinished run's spool beside it"
            raise OutputError(f"{self.name}: {what}; --resume continues it, or remove it first")
        spooled = self.paths_path in found
        meta = {"model": model_name, "shape": list(self.shape), **self.settings}
        if self.path.suffix.lower() == ".safetensors" and not all(
            _utf8(v) for v in (model_name, *self.settings.values())
        ):
            raise OutputError(f"{self.name}: the model's name {shown(model_name)} is not UTF-8, which a safetensors "
                              "index's metadata must be; embed into a .npy")  # fmt: skip
        hashes = [np.zeros(0, np.uint64)]
        if exists(self.path):
            vectors, paths, made = read_index(self.path)
            self._check(tuple(vectors.shape[1:]), "the index")
            if made and FINGERPRINT not in made:  # an older index: its rows' weights are unknown, so it stays so
                self._weights_unknown(meta)
            if made and {k: made.get(k) for k in ("model", *self.settings)} != {"model": model_name, **self.settings}:
                raise OutputError(f"{self.name}: {_difference(made, meta)}: embed into a new file")
            self.previous = vectors, paths
            hashes.append(np.array([Done.key(p) for p in paths], dtype=np.uint64))
            if spooled and self._committed(hashes[-1]):
                self._remove_spool()  # a run killed after writing the index, before removing its spool
                spooled, found = False, []
        if not spooled and found:  # rows or meta of a run killed before its first batch: nothing to go on from
            self._remove_spool()
            found = []
        if spooled:
            spool_meta = read_json(self.meta_path, OutputError, MAX_SPOOL_LINE, follow=False)
            if isinstance(spool_meta, dict) and FINGERPRINT not in spool_meta:  # left by an older mlx-vit
                self._weights_unknown(meta)
            if spool_meta != meta:
                raise OutputError(f"{self.name}: its spool was made by another model or setting (--all-tokens, "
                                  "--normalize, --image-size); not resuming (remove the dot files beside "
                                  "it)")  # fmt: skip
            finished, self._end, self.rows = self._spooled()
            hashes.append(finished)
        self.done = Done(np.concatenate(hashes))
        self._meta = meta
        self._found = found  # spool files there already (a resume): reopened, not created

    def _weights_unknown(self, meta: dict[str, Any]) -> None:
        """Rows made before indexes recorded their weights: this run, which adds to them, records none either."""
        self.settings.pop(FINGERPRINT, None)
        meta.pop(FINGERPRINT, None)

    def _check(self, shape: tuple[int, ...], what: str) -> None:
        if shape != self.shape:
            raise OutputError(f"{self.name}: {what} holds vectors of shape {shape}, this model makes {self.shape}; "
                              "embed into a new file")  # fmt: skip

    def _records(self) -> Iterator[tuple[str, bool, int]]:
        """(path, failed, bytes) of each complete line of the paths file, in order; a damaged line stops the
        resume with one line (the piece after the last newline is a line cut short, and is not a record)."""
        source = shown(self.paths_path)
        with open_regular(self.paths_path, OutputError, follow=False) as f:
            for number, line in enumerate(lines(f, MAX_SPOOL_LINE, source, OutputError), 1):
                if not line.endswith(b"\n"):
                    return
                try:
                    record = parse_json(line, "", OutputError)
                except OutputError:
                    record = None
                failed = isinstance(record, dict) and "error" in record
                path = path_string(record.get("path"), opened=not failed) if isinstance(record, dict) else None
                if path is None or not isinstance(record.get("error", ""), str):
                    raise OutputError(f"{self.name}: line {number} of its spool is damaged; not resuming (remove "
                                      "the dot files beside it)")  # fmt: skip
                yield path, failed, len(line)

    def _spooled(self) -> tuple[np.ndarray, int, int]:
        """(hashes of the paths embedded, bytes of the paths file to keep, rows to keep) of a spool to resume.

        Only complete lines count, and only as far as the rows file holds their rows (after a power cut the
        paths may have reached the disk before the rows). A line with an error is no result: it is tried again.
        """
        available = os.lstat(self.rows_path).st_size // self.row_bytes if exists(self.rows_path) else 0
        hashes, end, rows = array("Q"), 0, 0
        for path, failed, length in self._records():
            if not failed:
                if rows == available:
                    break
                rows += 1
                hashes.append(Done.key(path))
            end += length
        return np.frombuffer(hashes, dtype=np.uint64), end, rows

    def _committed(self, indexed: np.ndarray) -> bool:
        """Whether the spool's first embedded path is in the index: the index was written, the spool not removed."""
        for path, failed, _ in self._records():
            if not failed:
                return path in Done(indexed)
        return False

    def _open(self) -> tuple[Any, Any]:
        if self._files is None:
            files = []
            with failing(self.name, OutputError, "cannot write its spool"):
                if self.meta_path not in self._found:
                    with os.fdopen(create_beside(self.meta_path, OutputError), "w") as f:
                        f.write(json.dumps(self._meta) + "\n")
                try:
                    for path, keep in ((self.rows_path, self.rows * self.row_bytes), (self.paths_path, self._end)):
                        opened = path in self._found
                        fd = open_beside(path, OutputError) if opened else create_beside(path, OutputError)
                        files.append(os.fdopen(fd, "wb"))
                        os.ftruncate(fd, keep)  # what a killed run left past the whole records
                        os.lseek(fd, keep, os.SEEK_SET)
                except BaseException:
                    for file in files:
                        file.close()
                    raise
            self._files = files[0], files[1]
        return self._files

    def _write(self, file, data: bytes) -> None:
        with failing(self.name, OutputError, "cannot write its spool"):
            file.write(data)
            file.flush()

    def write(self, records: list[Any]) -> None:
        """Append a batch: its rows first, then the lines that count them."""
        rows, paths = self._open()
        good = [r.vector for r in records if not r.error]
        if good:
            self._write(rows, np.stack(good).astype(np.float32).tobytes())
        listed = [{"path": r.path, "error": r.error} if r.error else {"path": r.path} for r in records]
        self._write(paths, "".join(json.dumps(item) + "\n" for item in listed).encode("utf-8", "surrogateescape"))
        self.rows += len(good)
        if time.monotonic() - self._synced > SYNC_SECONDS:  # as outputs.Output: on the disk within a second or so
            with failing(self.name, OutputError, "cannot write its spool"):
                for file in (rows, paths):
                    os.fsync(file.fileno())
            self._synced = time.monotonic()

    def close(self) -> None:
        """Write the index: the previous one's rows, then the spool's; then remove the spool."""
        for file in self._open():
            file.close()
        paths = [path for path, failed, _ in self._records() if not failed]
        with open_regular(self.rows_path, OutputError, follow=False) as f:
            if os.fstat(f.fileno()).st_size != len(paths) * self.row_bytes:
                raise OutputError(f"{self.name}: its spool's rows do not match its paths (changed while written?); "
                                  "--resume goes on from what is whole")  # fmt: skip
            vectors = np.memmap(f, np.float32, "r", shape=(len(paths), *self.shape)) if paths else None
        if vectors is None:
            vectors = np.zeros((0, *self.shape), np.float32)
        parts = [vectors]
        if self.previous is not None:
            if not paths:
                self._remove_spool()
                return  # nothing new: the index stays as it was
            parts = [self.previous[0], vectors]
            paths = self.previous[1] + paths
        write_embeddings(self.path, parts, paths, self.model_name, self.settings)
        del parts, vectors
        self.previous = None
        self._remove_spool()

    def _remove_spool(self) -> None:
        for path in (self.rows_path, self.paths_path, self.meta_path):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()

    def abort(self) -> None:
        """What was spooled stays for --resume; the index itself is untouched."""
        if self._files is not None:
            for file in self._files:
                with contextlib.suppress(OSError):
                    file.close()


def _utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
        return True
    except UnicodeEncodeError:  # an undecodable byte of a file name, as os.fsdecode keeps it
        return False


def _difference(made: dict[str, str], wanted: dict[str, Any]) -> str:
    """What differs between the index's settings and this run's, by name: the model, normalize, ..."""
    keys = [k for k in ("model", FINGERPRINT, "normalize", "image_size", "all_tokens")
            if k in wanted and made.get(k) != wanted[k]]  # fmt: skip
    was = ", ".join(_setting(k, made.get(k)) for k in keys)
    now = ", ".join(_setting(k, wanted[k]) for k in keys)
    return f"was made with {was}; this run has {now}"


def _setting(key: str, value: Any) -> str:
    """'normalize true'; a fingerprint by its first 12 digits, as `search` names it."""
    if key == FINGERPRINT:
        return f"weights {shown(str(value)[:12])}"
    return f"{key} {shown(value, 60)}"
