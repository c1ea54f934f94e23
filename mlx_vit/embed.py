"""Image features, and the index files `mlx-vit embed` writes and `mlx-vit search` reads.

An index is float32 rows, one per image in input order, with the images' paths:
- `.safetensors`: one tensor, `embeddings`, and the paths as a JSON list in the metadata (`paths`), with `model`,
  `count`, the settings that made the rows (`normalize`, `image_size`) and the fingerprint of the weights that
  made them (`weights_sha256`, see Engine.fingerprint), by which `search` refuses another model. A library whose
  paths would not fit in a header that readers accept (16 MiB here, 100 MB in the reference) keeps them in the
  sibling `FILE.paths.jsonl` instead, one JSON string a line, and names it in `paths_file`;
- `.npy`: the rows, and the paths one per line in the sibling `FILE.paths.txt`.

Both are written to temporary files and renamed into place, rows streamed, so a library's index never needs to fit
in memory; reading maps the rows rather than loading them.
"""

from __future__ import annotations

import json
import math
import os
import struct
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from mlx_vit.convert.safetensors_io import parse_header
from mlx_vit.errors import MlxVitError, shown
from mlx_vit.files import (
    MAX_JSON_BYTES,
    MAX_JSON_VALUES,
    MAX_PATH_BYTES,
    lines,
    npy_header,
    open_regular,
    parse_json,
    path_string,
    plain_name,
    replace_together,
)

if TYPE_CHECKING:
    from mlx_vit.engine import Engine

TENSOR = "embeddings"
FORMAT = "mlx-vit embeddings"
CHUNK_BYTES = 64 * 2**20
FINGERPRINT = "weights_sha256"  # the metadata key of the weights' fingerprint


class IndexFileError(MlxVitError):
    """An index file that cannot be written or read."""


@dataclass
class Embedded:
    """One input's features (float32), or the one-line error that stopped it."""

    path: str
    vector: np.ndarray | None = None
    error: str | None = None


def embedded_batches(engine: Engine, items: Iterable[Any], batch_size: int = 8, workers: int | None = None,
                     all_tokens: bool = False, normalize: bool = False,
                     one_per_line: bool = False) -> Iterator[list[Embedded]]:  # fmt: skip
    """Embedded records a batch at a time, in input order: a file that cannot be read, or whose features are
    not finite, is a record with its error. `one_per_line`: a path with a line break is refused (.paths.txt)."""
    for batch in engine.prepared_batches(items, batch_size, workers):
        records = [Embedded(result.path, error=result.error) for result, _ in batch]
        good = []
        for record, (_, pixels) in zip(records, batch, strict=True):
            if one_per_line and pixels is not None and "\n" in record.path:
                record.error = f"{shown(record.path)}: a path with a line break cannot go in a .paths.txt"
            elif pixels is not None:
                good.append((record, pixels))
        if good:
            vectors, finite = features(engine, np.stack([p for _, p in good]), all_tokens, normalize)
            for (record, _), vector, ok in zip(good, vectors, finite, strict=True):
                if ok:
                    record.vector = vector
                else:
                    record.error = f"{shown(record.path)}: the model computed NaN or infinite features"
        yield records


def features(engine: Engine, pixels: np.ndarray, all_tokens: bool = False,
             normalize: bool = False) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
    """(B, H, W, 3) pixels -> (float32 features, a per-image mask of those that are finite): pooled (what the head
    reads) or every token; `normalize` scales each vector (each token's) to unit L2 norm, as F.normalize does."""
    vectors = engine.features(pixels, all_tokens)
    finite = np.isfinite(vectors).reshape(len(vectors), -1).all(axis=1)
    if normalize:
        with np.errstate(all="ignore"):
            vectors = vectors / np.maximum(np.linalg.norm(vectors, axis=-1, keepdims=True), 1e-12)
    return vectors.astype(np.float32, copy=False), finite


def paths_file(path: str | os.PathLike) -> Path:
    """The sibling that holds an index's paths, one a line: FILE.npy -> FILE.paths.txt; FILE.safetensors ->
    FILE.paths.jsonl (for a library too large for its header)."""
    path = Path(path)
    return path.with_name(f"{path.stem}.paths.txt" if path.suffix.lower() == ".npy" else f"{path.stem}.paths.jsonl")


def _fits_in_header(text: str) -> bool:
    # The reader's limits (mlx_vit.files.parse_json), counted the same way, with room for the rest of the header.
    data = text.encode("utf-8", "surrogateescape")
    values = data.count(b",") + data.count(b":") + data.count(b"[") + data.count(b"{")
    return 2 * len(data) < MAX_JSON_BYTES and 2 * values < MAX_JSON_VALUES


def _lines(paths: Sequence[str]) -> bytes:
    for path in paths:
        if "\n" in path:
            raise IndexFileError(f"{shown(path)}: a path with a line break cannot be listed in a .paths.txt")
    return "".join(f"{p}\n" for p in paths).encode("utf-8", "surrogateescape")


def write_embeddings(path: str | os.PathLike, parts: Sequence[np.ndarray], paths: Sequence[str], model_name: str,
                     settings: dict[str, str] | None = None) -> None:  # fmt: skip
    """Write rows (`parts`, concatenated: arrays or memory maps of float32 rows) and their paths atomically.

    Every file is written in full to a temporary beside it first; only then are they renamed into place, one
    right after the other. `settings` (what made the rows, e.g. normalize) go into a safetensors index's metadata.
    """
    path = Path(path)
    rows = sum(len(p) for p in parts)
    if rows != len(paths):
        raise ValueError(f"{rows} rows for {len(paths)} paths")
    shape = (rows, *parts[0].shape[1:])
    siblings: dict[Path, bytes] = {}
    if path.suffix.lower() == ".npy":
        header = _npy_header(shape)
        siblings[paths_file(path)] = _lines(paths)
    else:
        listed = json.dumps(list(paths))
        metadata = {**(settings or {}), "format": FORMAT, "model": model_name, "count": str(rows)}
        if _fits_in_header(listed):
            metadata["paths"] = listed
        else:  # one JSON string a line: any path, line breaks included
            listing = paths_file(path)
            metadata["paths_file"] = listing.name
            siblings[listing] = "".join(json.dumps(p) + "\n" for p in paths).encode()
        header = _safetensors_header(shape, metadata)
    rows_bytes = (chunk for part in parts for chunk in _chunks(part))
    replace_together([*((sibling, [data]) for sibling, data in siblings.items()), (path, [header, *rows_bytes])],
                     IndexFileError)  # fmt: skip


def _chunks(part: np.ndarray):
    step = max(1, CHUNK_BYTES // max(1, part[0].nbytes if len(part) else 1))
    for start in range(0, len(part), step):
        yield np.ascontiguousarray(part[start : start + step], dtype="<f4").tobytes()


def _npy_header(shape: tuple[int, ...]) -> bytes:
    import io

    buffer = io.BytesIO()
    np.lib.format.write_array_header_1_0(buffer, {"descr": "<f4", "fortran_order": False, "shape": shape})
    return buffer.getvalue()


def _safetensors_header(shape: tuple[int, ...], metadata: dict[str, str]) -> bytes:
    size = int(np.prod(shape)) * 4
    header = {"__metadata__": metadata, TENSOR: {"dtype": "F32", "shape": list(shape), "data_offsets": [0, size]}}
    data = json.dumps(header).encode("utf-8")
    data += b" " * (-len(data) % 8)  # the data starts 8-byte aligned
    return struct.pack("<Q", len(data)) + data


def read_embeddings(path: str | os.PathLike) -> tuple[np.ndarray, list[str], str | None]:
    """(rows as a read-only float32 memory map, paths, model name or None) of an index, checked."""
    vectors, paths, settings = read_index(path)
    return vectors, paths, settings.get("model")


def read_index(path: str | os.PathLike) -> tuple[np.ndarray, list[str], dict[str, str]]:
    """read_embeddings, with what made the rows (a safetensors index's metadata less its paths; {} for .npy).

    Every number is checked against the file before it sizes anything: the rows against the file's length, the
    paths (read a line at a time, each at most a path long) against the rows."""
    path = Path(path)
    name = shown(path)
    with open_regular(path, IndexFileError) as f:
        size = os.fstat(f.fileno()).st_size
        if path.suffix.lower() == ".npy":
            shape, offset = _npy_rows(f, name)
            settings = {}
            listing = paths_file(path)
        else:
            try:
                header, offset, metadata = parse_header(f, path)
            except MlxVitError as error:
                raise IndexFileError(str(error)) from None
            entry = header.get(TENSOR)
            if metadata.get("format") != FORMAT:
                raise IndexFileError(f"{name}: not an index from mlx-vit embed (its metadata names no such format)")
            if set(header) != {TENSOR} or entry["dtype"] != "F32" or len(entry["shape"]) < 2:
                raise IndexFileError(f"{name}: not an index (one float32 tensor '{TENSOR}', from mlx-vit embed)")
            shape = tuple(entry["shape"])
            settings = {k: v for k, v in metadata.items() if k not in ("paths", "paths_file")}
            listing = _listing(path, metadata, name)
        rows = shape[0]
        if size != offset + 4 * math.prod(shape):
            raise IndexFileError(f"{name}: its size does not match its {shape} float32 rows (cut short?)")
        if listing is None:
            paths = _paths(parse_json(metadata["paths"].encode(), f"{name}: paths", IndexFileError), rows, name)
        elif path.suffix.lower() == ".npy":
            paths = _read_listing(listing, rows, name, _text_line)
        else:
            paths = _read_listing(listing, rows, name, _json_line)
        if rows == 0:
            return np.zeros(shape, np.float32), paths, settings
        return np.memmap(f, np.float32, "r", offset=offset, shape=shape), paths, settings


def _npy_rows(f, name: str) -> tuple[tuple[int, ...], int]:
    """The shape of a .npy index's float32 rows and where they start, its header checked before any arithmetic."""
    shape, fortran, dtype = npy_header(f, name, IndexFileError)
    if fortran or dtype != np.dtype("<f4") or len(shape) < 2:
        raise IndexFileError(f"{name}: not an index (float32 rows, from mlx-vit embed)")
    return shape, f.tell()


def _listing(path: Path, metadata: dict[str, str], name: str) -> Path | None:
    """The file beside a safetensors index that holds its paths, or None where its metadata holds them."""
    if "paths" in metadata:
        return None
    listed = metadata.get("paths_file")
    if listed is None:
        raise IndexFileError(f"{name}: not an index (no paths in its metadata; was it written by mlx-vit embed?)")
    if not plain_name(listed) or listed == path.name:  # only a file beside the index: not another folder's
        raise IndexFileError(f"{name}: its paths_file {shown(listed, 60, quote=True)} is not a file name beside it")
    return path.with_name(listed)


def _paths(values: Any, rows: int, name: str) -> list[str]:
    if not isinstance(values, list) or len(values) != rows:
        raise IndexFileError(f"{name}: its metadata's paths are not a list of {rows} paths")
    paths = [path_string(value) for value in values]
    if None in paths:
        raise IndexFileError(f"{name}: path {paths.index(None) + 1} of its metadata is not a file path")
    return paths


def _text_line(line: bytes) -> Any:
    return line.decode("utf-8", "surrogateescape")


def _json_line(line: bytes) -> Any:
    return parse_json(line, "", IndexFileError)


def _read_listing(listing: Path, rows: int, index: str, parse) -> list[str]:
    """An index's paths, a line each (`parse` makes the path of a line without its newline): exactly `rows`
    of them, each line at most a path long (as JSON: 6 bytes a byte), never more read than that."""
    source = shown(listing)
    paths = []
    try:
        f = open_regular(listing, IndexFileError)
    except IndexFileError as error:
        raise IndexFileError(f"{index}: cannot read its paths ({error})") from None
    with f:
        for number, line in enumerate(lines(f, 6 * MAX_PATH_BYTES + 3, source, IndexFileError), 1):
            if number > rows or not line.endswith(b"\n"):
                raise IndexFileError(f"{index}: {source} holds more than its {rows} paths, or ends cut short")
            try:
                paths.append(path_string(parse(line[:-1])))
            except IndexFileError:
                paths.append(None)
            if paths[-1] is None:
                raise IndexFileError(f"{index}: line {number} of {source} is not a file path")
    if len(paths) != rows:
        raise IndexFileError(f"{index}: holds {rows} rows but {len(paths)} paths; write the index again")
    return paths
