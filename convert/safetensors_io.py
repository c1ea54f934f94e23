"""A safetensors reader that validates the header before any tensor byte is used.

MLX's own loader once read out of bounds on malformed headers (ml-explore/mlx#3363, #3409); this one checks the
header length, every offset, dtype and shape first and returns numpy arrays (bfloat16 widened to float32).
"""

from __future__ import annotations

import math
import struct
from pathlib import Path
from typing import BinaryIO

import numpy as np

from mlx_vit.errors import CheckpointError, shown
from mlx_vit.files import MAX_JSON_BYTES, open_regular, parse_json

# The reference implementation allows 100 MB; a header is ~100 bytes a tensor, so a ViT-G's is ~100 kB, and this
# bounds the Python objects parsing it makes.
MAX_HEADER_BYTES = MAX_JSON_BYTES
MAX_DIMS = 32  # numpy 1.x's limit (2.x allows 64)
MAX_SIDE = 2**31 - 1  # MLX's shapes are 32-bit: a longer side (even beside a zero one) cannot become an array

DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": np.uint16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8,
    "U64": np.uint64, "U32": np.uint32, "U16": np.uint16, "U8": np.uint8, "BOOL": np.bool_,
}  # fmt: skip


def read_header(path: str | Path) -> tuple[dict, int]:
    """Return (tensor entries, data start) after checking that every entry lies inside the file."""
    path = Path(path)
    with open_regular(path, CheckpointError) as f:
        return header_of(f, path)


def header_of(f: BinaryIO, path: Path) -> tuple[dict, int]:
    """read_header on an open file (so that the file checked is the file then read)."""
    header, data_start, _ = parse_header(f, path)
    return header, data_start


def parse_header(f: BinaryIO, path: Path) -> tuple[dict, int, dict[str, str]]:
    """header_of, with the header's `__metadata__` ({} where it has none).

    The header is read as the reference reads it (serde_json into unsigned integers and Rust strings): UTF-8
    only, integers without a sign, strings without lone surrogates; and stricter where the reference guesses:
    a name twice, or an entry with other keys, is refused."""
    name = shown(path)
    size = f.seek(0, 2)
    f.seek(0)
    prefix = f.read(8)
    if len(prefix) < 8:
        raise CheckpointError(f"{name}: not a safetensors file (only {size} bytes)")
    (header_len,) = struct.unpack("<Q", prefix)
    if header_len > min(MAX_HEADER_BYTES, size - 8):
        raise CheckpointError(f"{name}: not a safetensors file (header length {header_len} is past the end)")
    raw = f.read(header_len)
    try:
        header = parse_json(raw, f"{name}: safetensors header", CheckpointError, object_pairs_hook=_strict_object,
                            parse_int=_unsigned)  # fmt: skip
    except _DuplicateKey as error:
        raise CheckpointError(f"{name}: safetensors header names '{shown(str(error), 80)}' twice") from None
    except _NotUtf8 as error:
        raise CheckpointError(f"{name}: safetensors header holds {shown(str(error), 80, quote=True)}, which is not "
                              "UTF-8 (a lone surrogate)") from None  # fmt: skip
    if not isinstance(header, dict):
        raise CheckpointError(f"{name}: safetensors header is not a JSON object")
    metadata = header.pop("__metadata__", None)
    if metadata is not None and not (isinstance(metadata, dict) and all(isinstance(v, str) for v in metadata.values())):
        raise CheckpointError(f"{name}: safetensors __metadata__ must map names to strings")
    data_start, data_len = 8 + header_len, size - 8 - header_len
    spans = []
    for key, entry in header.items():
        where = f"{name}: tensor '{shown(key, 80)}'"
        if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
            raise CheckpointError(f"{where} has a malformed header entry")
        dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
        if not isinstance(dtype, str) or dtype not in DTYPES:
            raise CheckpointError(f"{where} has unknown dtype '{shown(dtype, 40)}'")
        itemsize = np.dtype(DTYPES[dtype]).itemsize
        if not (
            isinstance(shape, list)
            and len(shape) <= MAX_DIMS
            and all(type(d) is int and 0 <= d <= MAX_SIDE for d in shape)
            and math.prod(d for d in shape if d) * itemsize < 2**63  # what numpy can shape, even when empty
        ):
            raise CheckpointError(f"{where} has an invalid shape {shown(shape, 120)}")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(type(o) is int for o in offsets)):
            raise CheckpointError(f"{where} has invalid data_offsets {shown(offsets, 80)}")
        begin, end = offsets
        if not 0 <= begin <= end <= data_len:
            raise CheckpointError(
                f"{where} lies outside the file (offsets {shown(begin, 40)}..{shown(end, 40)}, data: {data_len} bytes)"
            )
        # Exactly that size, as the reference requires: a longer span would be refused only when read, and
        # then as a file cut short
        needed = math.prod(shape) * itemsize
        if end - begin != needed:
            raise CheckpointError(f"{where} spans {end - begin} bytes (data_offsets {begin}..{end}), but its shape "
                                  f"{shown(shape, 120)} of {dtype} takes {needed}")  # fmt: skip
        spans.append((begin, end, key))
    if metadata is None:
        metadata = {}
    position = 0
    for begin, end, key in sorted(spans):
        if begin != position:
            problem = "overlaps the previous tensor" if begin < position else "leaves a gap before it"
            raise CheckpointError(f"{name}: tensor '{shown(key, 80)}' {problem}")
        position = end
    if position != data_len:
        raise CheckpointError(f"{name}: {data_len - position} bytes after the last tensor belong to none")
    return header, data_start, metadata


class _DuplicateKey(Exception):
    pass


class _NotUtf8(Exception):
    pass


class _Signed(int):
    """An integer written with a sign ("-0" too): never a shape or an offset (serde reads those unsigned)."""


def _unsigned(text: str) -> int:
    return _Signed(int(text)) if text.startswith("-") else int(text)


def _strict_object(pairs: list[tuple[str, object]]) -> dict:
    # json.loads would keep the last of two entries silently, leaving the first one's bytes unaccounted for; and
    # it accepts "\ud800", which is no Rust string.
    for key, value in pairs:
        for text in (key, value) if isinstance(value, str) else (key,):
            try:
                text.encode("utf-8")
            except UnicodeEncodeError:
                raise _NotUtf8(text) from None
    result = dict(pairs)
    if len(result) != len(pairs):
        seen = set()
        raise _DuplicateKey(next(k for k, _ in pairs if k in seen or seen.add(k)))
    return result


def check_budget(total: int, budget: int | None, name: str) -> None:
    """Refuse tensors of `total` bytes over `budget` (convert.common.weight_budget), before any is read."""
    if budget is not None and total > budget:
        raise CheckpointError(f"{name}: its tensors take {total:,} bytes, more than its model could use "
                              f"({budget:,}); refused before reading them")  # fmt: skip


def bf16_to_f32(bits: np.ndarray) -> np.ndarray:
    """bfloat16 bit patterns (uint16) -> float32: exact, bfloat16 is float32's top half."""
    widened = bits.astype(np.uint32)
    widened <<= 16  # in place: a 0-d array stays an array (`<<` would make a numpy scalar of it)
    return widened.view(np.float32)


def read_safetensors(path: str | Path, budget: int | None = None) -> dict[str, np.ndarray]:
    """Every tensor of a safetensors file (its tensors at most `budget` bytes together, checked from the header)."""
    path = Path(path)
    tensors = {}
    # Plain reads, not a memory map: a file truncated under us is a short read here, not a SIGBUS.
    with open_regular(path, CheckpointError) as f:
        header, data_start = header_of(f, path)
        check_budget(sum(end - begin for begin, end in (e["data_offsets"] for e in header.values())), budget,
                     shown(path))  # fmt: skip
        for key, entry in header.items():
            begin, end = entry["data_offsets"]
            dtype = np.dtype(DTYPES[entry["dtype"]]).newbyteorder("<")
            try:
                array = np.empty(entry["shape"], dtype=dtype)
            except MemoryError:  # a sparse file's size is not memory: its tensors must fit
                raise CheckpointError(
                    f"{shown(path)}: tensor '{shown(key, 80)}' of {end - begin:,} bytes does not fit in memory"
                ) from None
            f.seek(data_start + begin)
            if f.readinto(memoryview(array.reshape(-1)).cast("B")) != end - begin:
                raise CheckpointError(
                    f"{shown(path)}: tensor '{shown(key, 80)}' was cut short (did the file change while read?)"
                )
            array = array.astype(dtype.newbyteorder("="), copy=False)
            tensors[key] = bf16_to_f32(array) if entry["dtype"] == "BF16" else array
    return tensors
