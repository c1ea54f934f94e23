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
import os
import time
from pathlib import Path
from typing import Any

import numpy as np

from mlx_vit.embed import read_index, write_embeddings
from mlx_vit.errors import shown
from mlx_vit.files import os_reason, read_json
from mlx_vit.outputs import SYNC_SECONDS, Done, OutputError

INDEX_SUFFIXES = (".safetensors", ".npy")


def check_index_path(path: str | os.PathLike) -> None:
    if Path(path).suffix.lower() not in INDEX_SUFFIXES:
        raise OutputError(f"{shown(path)}: embeddings are written as .safetensors or .npy")


class EmbeddingSpool:
    """Rank 0's sink for `mlx-vit embed`: records with .path, .error and .vector (float32, `shape` each)."""

    def __init__(self, path: str | os.PathLike, model_name: str, shape: tuple[int, ...], resume: bool = False,
                 settings: dict[str, str] | None = None):  # fmt: skip
        self.path = Path(path)
        self.name = shown(self.path)
        check_index_path(self.path)
        self.model_name = model_name
        self.shape = tuple(shape)
        self.settings = dict(settings or {})  # what made the rows: a resume must not mix other ones in
        self.rows_path = self.path.with_name(f".{self.path.name}.rows")
        self.paths_path = self.path.with_name(f".{self.path.name}.paths.jsonl")
        self.meta_path = self.path.with_name(f".{self.path.name}.spool.json")
        self.previous: tuple[np.ndarray, list[str]] | None = None  # a complete index being extended
        self.resumable = True  # the spool stays
        self.rows = 0
        self._end = 0
        self._files: tuple[Any, Any] | None = None
        self._synced = time.monotonic()
        spooled = self.paths_path.exists()
        if (self.path.exists() or spooled) and not resume:
            what = "already exists" if self.path.exists() else "has an unfinished run's spool beside it"
            raise OutputError(f"{self.name}: {what}; --resume continues it, or remove it first")
        meta = {"model": model_name, "shape": list(self.shape), **self.settings}
        hashes = [np.zeros(0, np.uint64)]
        if self.path.exists():
            vectors, paths, made = read_index(self.path)
            self._check(tuple(vectors.shape[1:]), "the index")
            made_by = made.get("model")
            if made and {k: made.get(k) for k in ("model", *self.settings)} != {
                "model": model_name,
                **self.settings,
            }:
                raise OutputError(f"{self.name}: was made by {shown(made_by)} with {_settings(made)}; this "
                                  f"run is {shown(model_name)} with {_settings(self.settings)}: embed into a "
                                  "new file")  # fmt: skip
            self.previous = vectors, paths
            hashes.append(np.array([Done.key(p) for p in paths], dtype=np.uint64))
            if spooled and self._committed(hashes[-1]):
                self._remove_spool()  # a run killed after writing the index, before removing its spool
                spooled = False
        if spooled:
            if read_json(self.meta_path, OutputError) != meta:
                raise OutputError(f"{self.name}: its spool was made by another model or setting (--all-tokens, "
                                  "--normalize, --image-size); not resuming (remove the dot files beside "
                                  "it)")  # fmt: skip
            finished, self._end, self.rows = self._spooled()
            hashes.append(finished)
        self.done = Done(np.concatenate(hashes))
        self._meta = meta

    def _check(self, shape: tuple[int, ...], what: str) -> None:
        if shape != self.shape:
            raise OutputError(f"{self.name}: {what} holds vectors of shape {shape}, this model makes {self.shape}; "
                              "embed into a new file")  # fmt: skip

    def _spooled(self) -> tuple[np.ndarray, int, int]:
        """(hashes of the paths embedded, bytes of the paths file to keep, rows to keep) of a spool to resume.

        Only complete lines count, and only as far as the rows file holds their rows (after a power cut the
        paths may have reached the disk before the rows). A line with an error is no result: it is tried again.
        """
        row_bytes = 4 * int(np.prod(self.shape))
        available = self.rows_path.stat().st_size // row_bytes if self.rows_path.exists() else 0
        with open(self.paths_path, "rb") as f:
            lines = f.read().split(b"\n")[:-1]  # the piece after the last newline is a cut line
        hashes, end, rows = [], 0, 0
        for number, line in enumerate(lines, 1):
            try:
                record = json.loads(line)
                path, failed = record["path"], "error" in record
            except (ValueError, TypeError, KeyError):
                raise OutputError(f"{self.name}: line {number} of its spool is damaged; not resuming (remove the "
                                  "dot files beside it)") from None  # fmt: skip
            if not failed:
                if rows == available:
                    break
                rows += 1
                hashes.append(Done.key(path))
            end += len(line) + 1
        return np.array(hashes, dtype=np.uint64), end, rows

    def _committed(self, indexed: np.ndarray) -> bool:
        """Whether the spool's first embedded path is in the index: the index was written, the spool not removed."""
        with open(self.paths_path, "rb") as f:
            for line in f:
                with contextlib.suppress(ValueError, TypeError, KeyError):
                    record = json.loads(line)
                    if "error" not in record:
                        return record["path"] in Done(indexed)
        return False

    def _open(self) -> tuple[Any, Any]:
        if self._files is None:
            try:
                if not self.meta_path.exists():
                    self.meta_path.write_text(json.dumps(self._meta) + "\n")
                rows = open(self.rows_path, "ab")
                rows.truncate(self.rows * int(np.prod(self.shape)) * 4)
                paths = open(self.paths_path, "ab")
                paths.truncate(self._end)
            except OSError as error:
                raise OutputError(f"{self.name}: cannot write its spool ({os_reason(error)})") from None
            self._files = rows, paths
        return self._files

    def _write(self, file, data: bytes) -> None:
        try:
            file.write(data)
            file.flush()
        except OSError as error:
            raise OutputError(f"{self.name}: cannot write its spool ({os_reason(error)})") from None

    def write(self, records: list[Any]) -> None:
        """Append a batch: its rows first, then the lines that count them."""
        rows, paths = self._open()
        good = [r.vector for r in records if not r.error]
        if good:
            self._write(rows, np.stack(good).astype(np.float32).tobytes())
        lines = [{"path": r.path, "error": r.error} if r.error else {"path": r.path} for r in records]
        self._write(paths, "".join(json.dumps(line) + "\n" for line in lines).encode("utf-8", "surrogateescape"))
        self.rows += len(good)
        if time.monotonic() - self._synced > SYNC_SECONDS:  # as outputs.Output: on the disk within a second or so
            for file in (rows, paths):
                os.fsync(file.fileno())
            self._synced = time.monotonic()

    def close(self) -> None:
        """Write the index: the previous one's rows, then the spool's; then remove the spool."""
        self._open()
        for file in self._files:
            file.close()
        with open(self.paths_path, encoding="utf-8", errors="surrogateescape") as f:
            paths = [record["path"] for record in map(json.loads, f) if "error" not in record]
        if paths:
            vectors = np.memmap(self.rows_path, np.float32, "r", shape=(len(paths), *self.shape))
        else:
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


def _settings(values: dict[str, str]) -> str:
    return ", ".join(f"{k} {shown(values.get(k), 40)}" for k in ("normalize", "image_size", "all_tokens")) or "none"
