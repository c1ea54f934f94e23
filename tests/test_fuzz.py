"""Property tests (hypothesis) for the readers of untrusted files: safetensors headers, the torch unpickler,
the image loader, config.json and whole converted model folders.

Whatever the bytes, each reader either returns what it promises or raises the project's own typed error with a
one-line message naming the file -- never another exception, never a crash, never an import. CI runs a few
hundred examples per target (a few seconds each); FUZZ_EXAMPLES=N runs N per target, for long sessions:

    FUZZ_EXAMPLES=20000 python -m pytest tests/test_fuzz.py -p no:cacheprovider
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import math
import os
import pickletools
import resource
import select
import shutil
import signal
import struct
import sys
import tempfile
import time
import zipfile
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
import safetensors.numpy
import torch
from checkpoints import IMAGES
from hypothesis import HealthCheck, event, example, given, settings, target
from hypothesis import strategies as st
from PIL import Image

from mlx_vit.classify import Classifier
from mlx_vit.convert import Quantize, convert
from mlx_vit.convert.safetensors_io import read_header, read_safetensors
from mlx_vit.convert.torch_pickle import MAX_PICKLE_BYTES, read_torch_bin
from mlx_vit.convert.transformers_vit import check_config
from mlx_vit.errors import CheckpointError, ConfigError, ImageError, MlxVitError
from mlx_vit.images import open_image
from mlx_vit.loading import load_model
from mlx_vit.preprocess import PreprocessConfig, preprocess

EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "0"))


def fuzz(ci_examples: int) -> settings:
    """Hypothesis settings: `ci_examples` in CI, FUZZ_EXAMPLES when set."""
    return settings(
        max_examples=EXAMPLES or ci_examples,
        deadline=None,
        database=None,  # leaves no .hypothesis folder behind
        suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow, HealthCheck.data_too_large],
    )


def _one_line_naming(error: Exception, path: Path) -> None:
    message = str(error)
    assert str(path) in message, message
    assert "\n" not in message and "\r" not in message, repr(message)


def _mutations(seed_len: int):
    """Edits of a seed file: overwrite bytes, insert bytes, cut the end."""
    return st.tuples(
        st.lists(st.tuples(st.integers(0, max(seed_len - 1, 0)), st.integers(0, 255)), max_size=8),
        st.lists(st.tuples(st.integers(0, seed_len), st.binary(min_size=1, max_size=16)), max_size=2),
        st.one_of(st.none(), st.integers(0, seed_len)),
    )


def _mutate(seed: bytes, mutation) -> bytes:
    edits, inserts, cut = mutation
    raw = bytearray(seed)
    for position, value in edits:
        if position < len(raw):
            raw[position] = value
    for position, chunk in sorted(inserts, reverse=True):
        raw[position:position] = chunk
    return bytes(raw[:cut])


# ----------------------------------------------------------------------------------------------------------
# safetensors


def _valid_safetensors_bytes() -> bytes:
    tensors = {"w": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.array([1, 2], dtype=np.int64),
               "m": np.array([1, 0, 1], dtype=np.uint8)}  # fmt: skip
    return safetensors.numpy.save(tensors, metadata={"format": "np"})


VALID_ST = _valid_safetensors_bytes()


def _st_bytes(header, data: bytes = b"") -> bytes:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + data


def _read_st_or_refuse(path: Path) -> None:
    try:
        result = read_safetensors(path)
    except CheckpointError as error:
        _one_line_naming(error, path)
    else:
        assert all(isinstance(v, np.ndarray) for v in result.values())
        header, _ = read_header(path)
        for name, entry in header.items():
            assert list(result[name].shape) == entry["shape"]


@fuzz(200)
@given(raw=st.binary(max_size=256))
def test_fuzz_safetensors_random_bytes(tmp_path, raw):
    path = tmp_path / "fuzz.safetensors"
    path.write_bytes(raw)
    _read_st_or_refuse(path)


@fuzz(200)
@given(mutation=_mutations(len(VALID_ST)))
def test_fuzz_safetensors_mutated(tmp_path, mutation):
    path = tmp_path / "fuzz.safetensors"
    path.write_bytes(_mutate(VALID_ST, mutation))
    _read_st_or_refuse(path)


_JSON_LEAF = st.one_of(st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(), st.text(max_size=4))
_DIM = st.one_of(st.integers(0, 4), st.integers(-(2**65), 2**66), _JSON_LEAF)


@fuzz(200)
@given(
    entries=st.dictionaries(
        st.one_of(st.text(max_size=3), st.just("__metadata__")),
        st.one_of(
            st.fixed_dictionaries({
                "dtype": st.one_of(st.sampled_from(["F32", "F16", "BF16", "U8", "I64", "BOOL", "X"]),
                                   _JSON_LEAF, st.lists(_JSON_LEAF, max_size=2)),
                "shape": st.one_of(st.lists(_DIM, max_size=4), _JSON_LEAF),
                "data_offsets": st.one_of(st.lists(st.one_of(st.integers(-2, 40), _DIM), max_size=3),
                                          _JSON_LEAF),
            }),
            st.dictionaries(st.text(max_size=2), _JSON_LEAF, max_size=2),
            _JSON_LEAF,
        ),
        max_size=3,
    ),
    data=st.binary(max_size=40),
)  # fmt: skip
def test_fuzz_safetensors_structured_headers(tmp_path, entries, data):
    path = tmp_path / "fuzz.safetensors"
    path.write_bytes(_st_bytes(json.dumps(entries).encode(), data))
    _read_st_or_refuse(path)


# ----------------------------------------------------------------------------------------------------------
# torch unpickler

# Modules no test imports: if the unpickler ever imported what a pickle names, one would appear in sys.modules.
WATCHED = ("antigravity", "tabnanny", "this", "pydoc", "runpy", "webbrowser")


def _valid_torch_bytes() -> tuple[bytes, bytes]:
    buffer = io.BytesIO()
    torch.save({"a": torch.arange(6.0).reshape(2, 3).t(), "b": torch.tensor([1, 2], dtype=torch.int64),
                "c": torch.tensor(1.5).bfloat16(), "d": torch.nn.Parameter(torch.ones(2))}, buffer)  # fmt: skip
    with zipfile.ZipFile(io.BytesIO(buffer.getvalue())) as archive:
        pkl = archive.read("archive/data.pkl")
    return buffer.getvalue(), pkl


VALID_TORCH, VALID_PKL = _valid_torch_bytes()


def _read_torch_or_refuse(path: Path) -> None:
    before = {name for name in WATCHED if name in sys.modules}
    try:
        result = read_torch_bin(path)
    except CheckpointError as error:
        _one_line_naming(error, path)
    else:
        assert isinstance(result, dict)
        assert all(isinstance(k, str) and isinstance(v, np.ndarray) for k, v in result.items())
    assert {name for name in WATCHED if name in sys.modules} == before


def _zip_with_pickle(path: Path, pickled: bytes) -> Path:
    with zipfile.ZipFile(io.BytesIO(VALID_TORCH)) as old, zipfile.ZipFile(path, "w") as new:
        for info in old.infolist():
            new.writestr(info, pickled if info.filename.endswith("data.pkl") else old.read(info.filename))
    return path


@fuzz(200)
@given(mutation=_mutations(len(VALID_PKL)))
def test_fuzz_torch_mutated_data_pkl(tmp_path, mutation):
    _read_torch_or_refuse(_zip_with_pickle(tmp_path / "fuzz.bin", _mutate(VALID_PKL, mutation)))


@fuzz(100)
@given(mutation=_mutations(len(VALID_TORCH)))
def test_fuzz_torch_mutated_zip(tmp_path, mutation):
    path = tmp_path / "fuzz.bin"
    path.write_bytes(_mutate(VALID_TORCH, mutation))
    _read_torch_or_refuse(path)


def _text(value: str) -> bytes:
    raw = value.encode()
    return b"\x8c" + bytes([len(raw)]) + raw


_GLOBALS = [
    ("torch._utils", "_rebuild_tensor_v2"), ("torch._utils", "_rebuild_parameter"), ("torch", "FloatStorage"),
    ("torch", "LongStorage"), ("collections", "OrderedDict"), ("os", "system"), ("posix", "system"),
    ("builtins", "eval"), ("builtins", "getattr"), ("importlib", "import_module"), ("antigravity", "geohash"),
    ("tabnanny", "check"), ("operator", "attrgetter"), ("torch._utils", "_rebuild_from_type_v2"),
    ("copyreg", "_reconstructor"), ("pydoc", "locate"), ("runpy", "run_path"), ("this", "s"),
]  # fmt: skip
# Pickle opcodes (protocol 4), some with arguments: globals, calls, containers, memo, persistent ids, extensions.
_OPCODES = st.one_of(
    st.sampled_from([b"N", b"}", b"]", b")", b"(", b"t", b"\x85", b"\x86", b"\x87", b"\x88", b"\x89", b"R", b"b",
                     b"\x81", b"\x92", b"o", b"s", b"u", b"a", b"e", b"\x8f", b"\x90", b"\x91", b"\x94", b"Q", b"2",
                     b"0", b"1", b"\x93", b"l"]),
    st.builds(lambda m: b"c" + f"{m[0]}\n{m[1]}\n".encode(), st.sampled_from(_GLOBALS)),
    st.builds(lambda m: _text(m[0]) + _text(m[1]) + b"\x93", st.sampled_from(_GLOBALS)),
    st.builds(lambda m: b"i" + f"{m[0]}\n{m[1]}\n".encode(), st.sampled_from(_GLOBALS)),
    st.builds(lambda i: b"K" + bytes([i]), st.integers(0, 255)),
    st.builds(lambda i: b"J" + struct.pack("<i", i), st.integers(-(2**31), 2**31 - 1)),
    st.builds(lambda i: b"\x8a\x09" + i.to_bytes(9, "little", signed=True), st.integers(-(2**71), 2**71 - 1)),
    st.builds(lambda i: b"q" + bytes([i]), st.integers(0, 4)),
    st.builds(lambda i: b"h" + bytes([i]), st.integers(0, 4)),
    st.builds(lambda i: b"\x82" + bytes([i]), st.integers(0, 255)),
    st.builds(_text, st.sampled_from(["storage", "0", "1", "cpu", "w", "state_dict", "../0", "data.pkl"])),
)  # fmt: skip


@fuzz(300)
@given(program=st.lists(_OPCODES, max_size=40))
def test_fuzz_torch_pickle_programs(tmp_path, program):
    """Random protocol-4 pickles made of dangerous and allowlisted globals, calls, memo and persistent ids."""
    _read_torch_or_refuse(_zip_with_pickle(tmp_path / "fuzz.bin", b"\x80\x04" + b"".join(program) + b"."))


# Object-graph limits. Programs of only the opcodes the stack machine runs (no globals, no calls), with memo use,
# nesting and bodies repeated up to a million times, so that pickles of several MB, millions of objects and deep
# nesting appear. Each is read in a forked child, stopped past FLOOD_SECONDS of CPU time, its memory measured:
# within the reader's limits (MAX_OPERATIONS, MAX_PICKLE_BYTES) a pickle is refused or read in bounded time and
# memory.
FLOOD_SECONDS = 5  # of CPU time; the slowest honest flood (1M operations) takes ~1.3 s on a 2-core x86 CPU
FLOOD_MB = 300  # a million operations legitimately make ~150-200 MB of Python objects while being parsed
_P61 = 2**61 - 1  # the modulus of Python's integer (and float) hash
_INTS = [0, 1, -1, 2, 255, 256, 2**31 - 1, -(2**31), 2**32, 2**61 - 1, 2**61, -(2**61 - 1), 2**63 - 1, 2**63,
         -(2**63), 2**64, 2**64 - 1, 10**30, 2**1000, -(2**2000)]  # fmt: skip
_STEPS = [1, -1, 2, 2**32, 2**40, _P61, 2 * _P61, 2**64]


def _long1(value: int) -> bytes:
    raw = value.to_bytes((value.bit_length() + 8) // 8, "little", signed=True)
    return b"\x8a" + bytes([len(raw)]) + raw


def _binint(value: int) -> bytes:
    return b"J" + struct.pack("<i", value)


def _string(value: str, long: bool) -> bytes:
    raw = value.encode("utf-8", "surrogatepass")
    return (b"X" + struct.pack("<I", len(raw)) if long or len(raw) > 255 else b"\x8c" + bytes([len(raw)])) + raw


# Stack-balanced pieces, so that most programs run far instead of stopping at their first operation: scalars
# (usable as keys), values (one object pushed, nested), and statements (what a repeated body does with them).
_SCALAR = st.one_of(
    st.sampled_from([b"N", b"\x88", b"\x89"]),
    st.builds(lambda i: b"K" + bytes([i]), st.integers(0, 255)),
    st.builds(_binint, st.one_of(st.integers(-(2**31), 2**31 - 1), st.sampled_from([0, 1, -1, 2**31 - 1]))),
    st.builds(_long1, st.one_of(st.sampled_from(_INTS), st.integers(-(2**100), 2**100))),
    st.builds(_string, st.one_of(st.text(max_size=8), st.sampled_from(["", "state_dict", "a" * 300])), st.booleans()),
)


def _containers(value):
    many = st.lists(value, max_size=4)
    return st.one_of(
        st.builds(lambda xs, end: b"(" + b"".join(xs) + end, many, st.sampled_from([b"t", b"l"])),
        st.builds(lambda x: x + b"\x85", value),
        st.builds(lambda x, y: x + y + b"\x86", value, value),
        st.builds(lambda x, y, z: x + y + z + b"\x87", value, value, value),
        st.builds(lambda xs: b"](" + b"".join(xs) + b"e", many),
        st.builds(lambda x: b"]" + x + b"a", value),
        st.builds(lambda kv: b"}(" + b"".join(k + v for k, v in kv) + b"u",
                  st.lists(st.tuples(_SCALAR, value), max_size=3)),
        st.builds(lambda k, v: b"}" + k + v + b"s", _SCALAR, value),
        st.builds(lambda ks: b"\x8f(" + b"".join(ks) + b"\x90", st.lists(_SCALAR, max_size=4)),
        st.builds(lambda ks: b"(" + b"".join(ks) + b"\x91", st.lists(_SCALAR, max_size=4)),
        st.builds(lambda x, put: x + put, value, st.sampled_from([b"\x94", b"q\x01", b"r\x02\x00\x00\x00", b"20"])),
    )  # fmt: skip


_VALUE = st.recursive(st.one_of(_SCALAR, st.sampled_from([b"]", b")", b"}", b"\x8f", b"h\x00"])),
                      _containers, max_leaves=8)  # fmt: skip
# Raw operations, some with arguments, for programs that are not balanced (and the limits' error paths).
_RAW_OPS = st.one_of(
    st.sampled_from([b"(", b"]", b")", b"}", b"\x8f", b"\x85", b"\x86", b"\x87", b"t", b"l", b"e", b"a", b"s", b"u",
                     b"\x90", b"\x91", b"N", b"\x88", b"\x89", b"\x94", b"2", b"0", b"1"]),
    st.builds(lambda op, i: op + bytes([i]), st.sampled_from([b"q", b"h"]), st.integers(0, 8)),
    st.builds(lambda op, i: op + struct.pack("<I", i), st.sampled_from([b"r", b"j"]),
              st.one_of(st.integers(0, 8), st.sampled_from([2**31 - 1, 2**32 - 1]))),
)  # fmt: skip


def _counted_op(*kinds: str):
    """("count", kind, base, step): an argument that is base + i * step in the i-th repetition of its body, so
    that a repeated body makes many distinct keys, strings or memo entries."""
    return st.tuples(st.just("count"), st.sampled_from(kinds), st.sampled_from(_INTS[:12]), st.sampled_from(_STEPS))


_KEY = st.one_of(_SCALAR, _counted_op("LONG1", "BININT", "SHORT_BINUNICODE"))


def _flat(parts) -> list:
    return [op for part in parts for op in (_flat(part) if isinstance(part, list) else [part])]


def _ops(*parts):
    """A statement: a list of operations (bytes, or counted arguments) from strategies of them or of lists."""
    return st.tuples(*parts).map(lambda xs: _flat(list(xs)))


_SOME_VALUES, _SOME_KEYS = st.lists(_VALUE, max_size=4), st.lists(_KEY, max_size=4)
# Statements for what the scaffold leaves on top of the stack (memo 0 is that container), each kind keeping it
# there, so that a body repeated a million times runs a million times.
_STATEMENTS = {
    "list": st.one_of(
        _ops(_VALUE, st.just(b"a")), _ops(st.just(b"("), _SOME_VALUES, st.just(b"e")), _ops(_KEY, st.just(b"a")),
        st.sampled_from([[b"h\x00a"], [b"2a"], [b"(h\x00h\x00e"], [b"h\x00\x85a"], [b"]\x94a"], [b"(h\x00\x91a"]]),
    ),
    "dict": st.one_of(
        _ops(_KEY, _VALUE, st.just(b"s")), _ops(_KEY, st.just(b"h\x00s")),
        _ops(st.just(b"("), st.lists(_ops(_KEY, _VALUE), max_size=3), st.just(b"u")),
    ),
    "set": st.one_of(_ops(st.just(b"("), _SOME_KEYS, st.just(b"\x90")), _ops(st.just(b"("), _KEY, st.just(b"\x90"))),
    "stack": st.one_of(
        _VALUE.map(lambda v: [v]), _ops(_VALUE, st.just(b"0")), _ops(_KEY),
        st.sampled_from([[b"h\x00"], [b"2"], [b"\x85"], [b"("], [b"t"], [b"l"], [b"1"], [b"]\x85"], [b"(]"], [b"\x94"],
                         [b"20"], [b"h\x00\x86"]]),
        _counted_op("BINPUT", "LONG_BINPUT", "LONG_BINGET").map(lambda op: [op]),
    ),
    "raw": st.one_of(_VALUE, _RAW_OPS, _counted_op("LONG1", "BININT", "BINPUT", "LONG_BINPUT", "LONG_BINGET",
                                                   "SHORT_BINUNICODE")).map(lambda op: [op]),
}  # fmt: skip
_SCAFFOLDS = {"list": [b"]q\x00"], "dict": [b"}q\x00"], "set": [b"\x8fq\x00"], "stack": [b"]q\x00", b"]q\x00("],
              "raw": [b"", b"]q\x00", b"}q\x00", b"(", b"]q\x00]q\x01"]}  # fmt: skip
_SUFFIXES = {"list": [b""], "dict": [b""], "set": [b""], "stack": [b"t", b"l", b"1", b"0", b"(t"],
             "raw": [b"", b"e", b"t", b"l", b"u", b"\x90", b"0", b"1", b"a", b"s"]}  # fmt: skip
# Repetitions of a body; 0 repeats it as often as the body before (n openings, then n closings).
_REPEATS = st.one_of(st.integers(1, 4), st.integers(1, 300), st.integers(0, 3000),
                     st.sampled_from([0, 10_000, 100_000, 1_000_000]))  # fmt: skip


def _program_of(kind: str):
    body = st.lists(_STATEMENTS[kind], min_size=1, max_size=4).map(lambda xs: [op for x in xs for op in x])
    return st.tuples(
        st.tuples(st.sampled_from(_SCAFFOLDS[kind]), st.lists(_VALUE, max_size=2 if kind == "stack" else 0)),
        st.lists(st.tuples(body, _REPEATS), min_size=1, max_size=3),
        st.lists(st.sampled_from(_SUFFIXES[kind]), max_size=3),
    )


_PICKLE_PROGRAM = st.one_of(*map(_program_of, _STATEMENTS))
# Repetitions are cut to keep every program within both limits: what is refused there is refused for what it does.
FLOOD_OPERATIONS = 1_000_000 - 200


def _counted(kind: str, value: int) -> bytes:
    if kind == "LONG1":
        return _long1(value)
    if kind == "BININT":
        return _binint((value + 2**31) % 2**32 - 2**31)
    if kind == "SHORT_BINUNICODE":
        return _string(str(value)[-200:], long=False)
    index = value % 2**32
    return {"BINPUT": b"q" + bytes([index % 256]), "LONG_BINPUT": b"r" + struct.pack("<I", index),
            "LONG_BINGET": b"j" + struct.pack("<I", index)}[kind]  # fmt: skip


def _op_bytes(op, i: int) -> bytes:
    return op if isinstance(op, bytes) else _counted(op[1], op[2] + i * op[3])


def _operations(raw: bytes) -> int:
    return sum(1 for _ in pickletools.genops(raw + b".")) - 1


def _pickle_program(program) -> bytes:
    """PROTO 2, the prefix, each body repeated (within the limits), the suffix, STOP."""
    (scaffold, prefix), segments, suffix = program
    head = scaffold + b"".join(_op_bytes(op, 0) for op in prefix)
    tail = b"".join(_op_bytes(op, 0) for op in suffix)
    operations = FLOOD_OPERATIONS - _operations(head) - _operations(tail)
    size = MAX_PICKLE_BYTES - 2**16 - len(head) - len(tail)
    parts, previous = [b"\x80\x02", head], 1
    for body, repeats in segments:
        each = b"".join(_op_bytes(op, 0) for op in body)
        # A counted argument can grow (LONG1 to 255 bytes, a memo index to 5): budget its largest form.
        most = len(each) + 260 * sum(not isinstance(op, bytes) for op in body)
        repeats = max(1, min(repeats or previous, operations // _operations(each), size // most))
        if all(isinstance(op, bytes) for op in body):
            parts.append(each * repeats)
        else:
            parts.append(b"".join(_op_bytes(op, i) for i in range(repeats) for op in body))
        operations, size, previous = operations - repeats * _operations(each), size - len(parts[-1]), repeats
    return b"".join([*parts, tail, b"."])


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _in_child(call, cpu_seconds: int) -> dict:
    """call() in a forked child: {"outcome", "seconds" (of CPU time), "mb" (its memory growth)}.

    The child is stopped by the kernel (SIGXCPU) past `cpu_seconds` of CPU time, and killed past ten times that
    of wall time (a hang): CPU time, not wall time, so that a busy machine does not fail the test, and a failing
    example costs seconds (shrinking runs many). A crash, a hang or a memory blow-up fails the test with its
    reason instead of taking pytest down. Without fork (macOS: forking a process that loaded Metal is unsafe),
    call() runs in-process and only its time is measured.
    """
    scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss: bytes on macOS, KiB on Linux
    if not hasattr(os, "fork") or sys.platform != "linux":
        start = _cpu_seconds()
        return {"outcome": call(), "seconds": _cpu_seconds() - start, "mb": 0}
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report, then leave without running pytest's or anyone's exit handlers
        try:
            os.close(read)
            resource.setrlimit(resource.RLIMIT_CPU, (cpu_seconds, cpu_seconds + 1))
            before, start = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, _cpu_seconds()
            try:
                outcome = call()
            except BaseException as error:  # noqa: BLE001 - reported to the parent
                outcome = f"{type(error).__name__}: {str(error)[:2000]}"
            seconds = _cpu_seconds() - start
            mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * scale / 2**20
            with os.fdopen(write, "wb") as out:
                out.write(json.dumps({"outcome": outcome, "seconds": seconds, "mb": mb}).encode())
        finally:
            os._exit(0)
    os.close(write)
    deadline, chunks = time.monotonic() + 10 * cpu_seconds, []
    with os.fdopen(read, "rb", buffering=0) as reader:
        while True:
            ready, _, _ = select.select([reader], [], [], max(0.0, deadline - time.monotonic()))
            if not ready:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
                return {"outcome": f"still running after {10 * cpu_seconds} s (killed)", "seconds": 0, "mb": 0}
            chunk = reader.read(1 << 16)
            if not chunk:
                break
            chunks.append(chunk)
    _, status = os.waitpid(pid, 0)
    if chunks:
        return json.loads(b"".join(chunks))
    if os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGXCPU:
        return {"outcome": f"over {cpu_seconds} s of CPU time (stopped)", "seconds": cpu_seconds, "mb": 0}
    return {"outcome": f"the child died (wait status {status})", "seconds": 0, "mb": 0}


def _torch_outcome(path: Path) -> str:
    """What read_torch_bin made of `path`: "ok", "refused: MESSAGE", or what went wrong."""
    before = {name for name in WATCHED if name in sys.modules}
    try:
        result = read_torch_bin(path)
    except CheckpointError as error:
        outcome = f"refused: {error}"
    else:
        named = isinstance(result, dict) and all(isinstance(k, str) for k in result)
        outcome = "ok" if named and all(isinstance(v, np.ndarray) for v in result.values()) else "returned junk"
    imported = {name for name in WATCHED if name in sys.modules} - before
    return f"imported {sorted(imported)}" if imported else outcome


# Found by this target (members of a set, shrunk by hand to this): 100,000 distinct integer keys that all hash
# alike (multiples of 2**61 - 1) in one SETITEMS, an 800 kB pickle of 200k operations, took ~22 s of CPU in the
# dict's probing (quadratic: 16k keys 1.5 s; a million, within the limits, hours). Integer keys are now refused
# beyond +-(2**61 - 1), where hash(n) is n.
COLLIDING_KEYS = ((b"}", [b"("]), [([("count", "LONG1", _P61, _P61), b"N"], 100_000)], [b"u"])


@fuzz(20)
@given(program=_PICKLE_PROGRAM)
@example(program=COLLIDING_KEYS)
def test_fuzz_pickle_object_graph_limits(tmp_path, program):
    """Floods of containers, memo entries, nesting and keys: refused or read, in bounded time and memory."""
    pickled = _pickle_program(program)
    path = _zip_with_pickle(tmp_path / "flood.bin", pickled)
    report = _in_child(lambda: _torch_outcome(path), FLOOD_SECONDS)
    outcome, seconds, mb = report["outcome"], report["seconds"], report["mb"]
    summary = f"{len(pickled):,} bytes: {outcome[:300]} in {seconds:.2f} s, +{mb:.0f} MB"
    if EXAMPLES:  # long sessions steer toward the slowest and largest floods (in CI that triples the time)
        target(seconds, label="CPU seconds")
        target(mb, label="MB")
    reason = outcome.replace(f"refused: {path}: ", "").replace("unsafe or malformed pickle: ", "")
    event(" ".join(reason.split()[:6])[:60])  # --hypothesis-show-statistics: how far the programs got
    assert outcome == "ok" or outcome.startswith("refused: "), summary
    if outcome != "ok":
        message = outcome.removeprefix("refused: ")
        assert str(path) in message and "\n" not in message and "\r" not in message, summary
    assert seconds < FLOOD_SECONDS and mb < FLOOD_MB, summary


# ----------------------------------------------------------------------------------------------------------
# images


def _image_seeds() -> dict[str, bytes]:
    """Small real files in every format and mode the loader handles specially."""
    photo = Image.open(IMAGES / "chelsea.png").convert("RGB").resize((24, 16))
    seeds = {}

    def save(name: str, image: Image.Image, format: str, **kwargs) -> None:
        buffer = io.BytesIO()
        image.save(buffer, format, **kwargs)
        seeds[name] = buffer.getvalue()

    exif = Image.Exif()
    exif[0x0112] = 6
    save("rgb.png", photo, "PNG")
    save("oriented.jpg", photo, "JPEG", exif=exif, quality=80)
    save("progressive.jpg", photo, "JPEG", progressive=True)
    save("cmyk.jpg", photo.convert("CMYK"), "JPEG")
    save("palette.gif", photo.convert("P"), "GIF", transparency=0)
    frames = [photo, photo.rotate(90), photo.transpose(Image.Transpose.FLIP_LEFT_RIGHT)]
    save("animated.gif", frames[0].convert("P"), "GIF", save_all=True, append_images=[f.convert("P") for f in frames])
    save("multi.tif", frames[0], "TIFF", save_all=True, append_images=frames[1:], compression="tiff_lzw")
    save("gray16.png", Image.fromarray(np.asarray(photo.convert("L")).astype(np.uint16) * 257), "PNG")
    save("gray16.tif", Image.fromarray(np.asarray(photo.convert("L")).astype(np.uint16) * 257), "TIFF")
    save("la.png", photo.convert("LA"), "PNG")
    save("rgba.webp", photo.convert("RGBA"), "WEBP")
    save("animated.webp", frames[0], "WEBP", save_all=True, append_images=frames[1:])
    save("bitonal.bmp", photo.convert("1"), "BMP")
    save("icon.ico", photo, "ICO")
    seeds["multipage.tif"] = (IMAGES / "multipage.tif").read_bytes()
    seeds["tiny.gif"] = (IMAGES / "no_time_for_that_tiny.gif").read_bytes()
    return seeds


IMAGE_SEEDS = _image_seeds()
PREPROCESS = PreprocessConfig.from_hf({"size": {"shortest_edge": 20}, "do_center_crop": True, "crop_size": 16})


def _open_or_refuse(path: Path) -> None:
    try:
        image = open_image(path, max_pixels=1_000_000)
    except ImageError as error:
        _one_line_naming(error, path)
    else:
        assert image.mode == "RGB" and image.width * image.height <= 1_000_000
        pixels = preprocess(image, PREPROCESS)
        assert pixels.shape == (16, 16, 3) and np.isfinite(pixels).all()


@pytest.mark.parametrize("seed", list(IMAGE_SEEDS))
def test_image_seeds_open(seed, tmp_path):
    path = tmp_path / seed
    path.write_bytes(IMAGE_SEEDS[seed])
    assert open_image(path).mode == "RGB"


@fuzz(200)
@given(seed=st.sampled_from(list(IMAGE_SEEDS)), data=st.data())
def test_fuzz_image_mutated(tmp_path, seed, data):
    raw = IMAGE_SEEDS[seed]
    path = tmp_path / f"fuzz-{seed}"
    path.write_bytes(_mutate(raw, data.draw(_mutations(len(raw)))))
    _open_or_refuse(path)


@fuzz(200)
@given(raw=st.binary(max_size=64), seed=st.sampled_from(list(IMAGE_SEEDS)))
def test_fuzz_image_header_then_noise(tmp_path, raw, seed):
    """A real file's first bytes (its magic and header) followed by noise."""
    path = tmp_path / "fuzz.img"
    path.write_bytes(IMAGE_SEEDS[seed][:32] + raw)
    _open_or_refuse(path)


# ----------------------------------------------------------------------------------------------------------
# config.json

_CONFIG_VALUE = st.one_of(
    st.integers(-5, 300), st.integers(-(2**70), 2**70), st.floats(allow_nan=True), st.booleans(), st.none(),
    st.text(max_size=6), st.lists(st.integers(0, 300), max_size=3), st.dictionaries(st.text(max_size=2), st.integers()),
)  # fmt: skip
_CONFIG_KEYS = ["image_size", "patch_size", "num_channels", "hidden_size", "num_hidden_layers", "num_attention_heads",
                "intermediate_size", "hidden_act", "layer_norm_eps", "qkv_bias", "architectures", "id2label",
                "model_type", "pooler_act", "encoder_stride"]  # fmt: skip


@fuzz(300)
@given(changes=st.dictionaries(st.sampled_from(_CONFIG_KEYS), _CONFIG_VALUE, max_size=4))
def test_fuzz_config_json(changes):
    config = {"model_type": "vit", "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
              "intermediate_size": 64, "image_size": 32, "patch_size": 8, **changes}  # fmt: skip
    try:
        check_config(config, "/models/x/config.json")
    except ConfigError as error:
        assert str(error).startswith("/models/x/config.json: ") and "\n" not in str(error), str(error)


_PREPROCESSOR_KEYS = ["size", "crop_size", "do_center_crop", "do_resize", "resample", "image_mean", "image_std",
                      "rescale_factor", "do_normalize"]  # fmt: skip


@fuzz(300)
@given(values=st.dictionaries(st.sampled_from(_PREPROCESSOR_KEYS), _CONFIG_VALUE, max_size=4))
def test_fuzz_preprocessor_config(values):
    try:
        config = PreprocessConfig.from_hf(values, "vit", "/models/x/preprocessor_config.json")
    except ConfigError as error:
        assert str(error).startswith("/models/x/preprocessor_config.json: ") and "\n" not in str(error)
    else:
        assert PreprocessConfig.from_dict(config.to_dict()) == config


# ----------------------------------------------------------------------------------------------------------
# converted model folders: config.json, manifest.json and model.safetensors, edited, then loaded as the CLI does
# (load_model) and run once. Seeds: the tiny ViT converted to float32, float16 and 4-bit.

FOLDER_SECONDS = 5  # a tiny model loads in ~5 ms; a config the loader lets through must never take seconds
FOLDER_MB = 300  # nor allocate more than this (ru_maxrss: the high-water mark, so generous)


@pytest.fixture(scope="module")
def converted(vit_folder, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("converted")
    photo = root / "photo.png"
    Image.open(IMAGES / "chelsea.png").convert("RGB").resize((40, 30)).save(photo)
    return {"photo": photo, "float32": convert(str(vit_folder), root / "float32"),
            "float16": convert(str(vit_folder), root / "float16", dtype="float16"),
            "4-bit": convert(str(vit_folder), root / "4-bit", quantize=Quantize(4, 32))}  # fmt: skip


_SEEDS = ["float32", "float16", "4-bit"]
_JSON_LEAVES = st.one_of(
    st.none(), st.booleans(), st.integers(-3, 300), st.integers(-(2**80), 2**80),
    st.sampled_from([0, -1, 2**24, 2**24 + 1, 16_384, 2**31, 2**53 + 1, 2**63, 2**64, 10**30]),
    st.floats(), st.sampled_from([1e308, -1e308, 5e-324, 1e-12, 0.5, 1.0, 1e-300]),
    st.text(max_size=8), st.text(st.characters(max_codepoint=0x9F), max_size=4),  # control characters
    st.sampled_from(["", "gelu", "gelu_new", "relu", "tanh", "float32", "float16", "bfloat16", "affine", "mlx-vit",
                     "vit", "regression", "model.safetensors", "config.json", "\x1b[2J", "\u202e", "x" * 300]),
)  # fmt: skip


def _json_containers(inner):
    return st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3)


_JSON_VALUES = st.recursive(_JSON_LEAVES, _json_containers, max_leaves=6)
_KNOWN_KEYS = ["format", "format_version", "model", "id2label", "preprocessing", "dtype", "quantization",
               "architecture", "problem_type", "source", "files", "size", "sha256", "image_size", "patch_size",
               "num_channels", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
               "hidden_act", "layer_norm_eps", "qkv_bias", "num_labels", "distillation_token", "distilled_head",
               "pooler", "pooler_act", "bits", "group_size", "mode", "layers", "skipped", "10", "-1", "00"]  # fmt: skip


def _paths(node, path=()):
    """Every place in a JSON document: the paths of all its values, containers included."""
    yield path
    items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
    for key, child in items:
        yield from _paths(child, (*path, key))


def _nudged(data, value):
    """A value near `value`, of its type mostly: what an off-by-one or a hand edit makes."""
    if value is None:
        return data.draw(_JSON_VALUES)
    if isinstance(value, bool):
        return not value
    if isinstance(value, int):
        return data.draw(st.sampled_from([value + 1, value - 1, value * 2, value // 2, -value, 0, value * 2**40]))
    if isinstance(value, float):
        whole = float(int(value)) if math.isfinite(value) else 0.5
        return data.draw(st.sampled_from([value * 10, value / 10, -value, 0.0, 1.0, value * 1e300, whole]))
    if isinstance(value, str):
        return data.draw(st.sampled_from([value + "x", value[:-1], value.upper(), value + "\n", " " + value, ""]))
    if isinstance(value, list):
        return data.draw(st.sampled_from([value + value[-1:], value[:-1], value[::-1], [value]]))
    return data.draw(st.sampled_from([{**value, data.draw(st.sampled_from(_KNOWN_KEYS)): 1}, {}, [value]]))


def _edit_json(data, document):
    """`document` with 1-3 edits: a value deleted, replaced by any JSON, nudged, or a key added."""
    document = copy.deepcopy(document)
    for _ in range(data.draw(st.integers(1, 3), label="edits")):
        path = data.draw(st.sampled_from(list(_paths(document))), label="at")
        parent = document
        for key in path[:-1]:
            parent = parent[key]
        node = parent[path[-1]] if path else document
        edit = data.draw(st.sampled_from(["delete", "replace", "nudge", "add key"]), label="edit")
        if edit == "add key" or not path:
            if isinstance(node, dict):
                node[data.draw(st.one_of(st.sampled_from(_KNOWN_KEYS), st.text(max_size=6)))] = data.draw(_JSON_VALUES)
            elif isinstance(node, list):
                node.append(data.draw(_JSON_VALUES))
        elif edit == "delete":
            del parent[path[-1]]
        else:
            parent[path[-1]] = data.draw(_JSON_VALUES) if edit == "replace" else _nudged(data, node)
    return document


_MX_DTYPES = [mx.float32, mx.float16, mx.bfloat16, mx.int32, mx.int8, mx.uint8, mx.uint32, mx.int64, mx.bool_,
              mx.complex64, mx.uint16]  # fmt: skip
_TENSOR_NAMES = st.one_of(
    st.sampled_from(["blocks.2.norm1.weight", "head.scales", "pooler.dense.weight", "dist_token", "head_dist.weight",
                     "blocks.0.attn.qkv.scales", "blocks.0.mlp.fc1.biases", "norm.weight", "cls_token", ""]),
    st.text(st.characters(blacklist_categories=["Cs"]), min_size=1, max_size=12),
)  # fmt: skip
_SPECIAL = [float("nan"), float("inf"), -float("inf"), 3e38, -3e38, 1e-45, 65504.0, 65520.0, 1e20, 0.0, -0.0]


def _edit_tensor(data, array: mx.array) -> mx.array:
    # Value and float-dtype edits keep the model loadable, so the forward pass meets them; the rest are refused.
    edit = data.draw(st.sampled_from(["dtype", "float dtype", "float dtype", "flatten", "unsqueeze", "transpose", "cut",
                                      "grow", "empty", "scalar", "fill", "fill", "poke", "poke", "poke"]),
                     label="tensor edit")  # fmt: skip
    if edit in ("dtype", "float dtype"):
        return array.astype(data.draw(st.sampled_from(_MX_DTYPES[:3] if edit == "float dtype" else _MX_DTYPES)))
    if edit == "flatten":
        return array.reshape(-1)
    if edit == "unsqueeze":
        return array[None]
    if edit == "transpose":
        return array.T
    if edit == "cut":
        return array[: max(array.shape[0] - 1, 0)] if array.ndim else array.reshape(1)
    if edit == "grow":
        return mx.concatenate([array, array[:1]]) if array.ndim and array.shape[0] else mx.zeros((2,), array.dtype)
    if edit == "empty":
        return array[:0] if array.ndim else array.reshape(1)[:0]
    if edit == "scalar":
        return array.reshape(-1)[0] if array.size else mx.array(0, array.dtype)
    value = data.draw(st.sampled_from(_SPECIAL))
    if edit == "fill" or not array.size:
        return mx.full(array.shape, value).astype(array.dtype)
    flat = array.reshape(-1)
    flat[data.draw(st.integers(0, array.size - 1))] = mx.array(value).astype(array.dtype)
    return flat.reshape(array.shape)


def _edit_weights(data, folder: Path) -> None:
    """Drop, rename, add or change (dtype, shape, values) 1-3 tensors, written back with MLX as convert writes."""
    path = folder / "model.safetensors"
    tensors = mx.load(str(path))
    for _ in range(data.draw(st.integers(1, 3), label="tensor edits")):
        edit = data.draw(st.sampled_from(["drop", "rename", "add", "change", "change"]), label="weights edit")
        name = data.draw(st.sampled_from(sorted(tensors)), label="tensor") if tensors else None
        if edit == "add" or name is None:
            shape = data.draw(st.lists(st.integers(0, 4), max_size=3))
            tensors[data.draw(_TENSOR_NAMES)] = mx.zeros(shape).astype(data.draw(st.sampled_from(_MX_DTYPES)))
        elif edit == "drop":
            del tensors[name]
        elif edit == "rename":
            tensors[data.draw(_TENSOR_NAMES)] = tensors.pop(name)
        else:
            tensors[name] = _edit_tensor(data, tensors[name])
    path.unlink()
    mx.save_safetensors(str(path), tensors, metadata={"format": "mlx"})


def _write_manifest(data, folder: Path, edit: bool) -> None:
    """The manifest after the files changed: sizes brought up to date (so loading goes on), left stale, or
    deleted; then, with `edit`, its JSON edited."""
    path = folder / "manifest.json"
    manifest = json.loads(path.read_text())
    state = data.draw(st.sampled_from(["resized", "resized", "stale", "deleted"]), label="manifest")
    if state == "deleted":
        path.unlink()
        return
    if state == "resized":
        for name, entry in manifest["files"].items():
            entry["size"] = (folder / name).stat().st_size
    if edit:
        manifest = _edit_json(data, manifest)
    path.write_text(json.dumps(manifest))


def _load_or_refuse(folder: Path, photo: Path, weights_edited: bool) -> None:
    """load_model(folder) and one image through it, as `mlx-vit classify` does: results, or a typed error of one
    line naming the folder (or the image), in bounded time and memory."""
    scale = 1 if sys.platform == "darwin" else 1024
    start, before = time.monotonic(), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    try:
        loaded = load_model(str(folder))
    except MlxVitError as error:
        _one_line_naming(error, folder)
        event(_reason(error, folder))  # --hypothesis-show-statistics: how far the edits got
    else:
        classifier = Classifier(loaded)
        config = loaded.model.config
        try:
            classifier.check_classifies()
            pixels = classifier.pixels([photo])
            assert pixels.shape == (1, config.image_size, config.image_size, 3), pixels.shape
            logits = classifier.logits(pixels)
            assert logits.shape == (1, config.num_labels) and logits.dtype == np.float32, logits.shape
            # Weights that were only checked finite may still overflow float32 on the way: the classifier must
            # then say so (next line), never hand out NaN. Untouched weights compute finite logits.
            assert weights_edited or np.isfinite(logits).all(), logits
            [predictions] = classifier.classify([photo], top_k=3)
            assert len(predictions) == min(3, config.num_labels)
            assert all(np.isfinite(p.score) for p in predictions), predictions
            event("loaded and classified")
        except MlxVitError as error:
            message = str(error)
            event(_reason(error, folder))
            assert str(folder) in message or str(photo) in message, message
            assert "\n" not in message and "\r" not in message, repr(message)
    seconds = time.monotonic() - start
    mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * scale / 2**20
    assert seconds < FOLDER_SECONDS and mb < FOLDER_MB, f"{seconds:.1f} s, +{mb:.0f} MB"


def _reason(error: Exception, folder: Path) -> str:
    """The kind of a refusal, for hypothesis' statistics: the error's type and first words, without the path."""
    words = str(error).replace(str(folder), "FOLDER").split()
    return " ".join([type(error).__name__, *words[:5]])[:60]


@contextlib.contextmanager
def _folder_copy(converted, seed: str, tmp_path: Path):
    """A fresh copy of a seed folder for one example, removed after it (examples share tmp_path)."""
    folder = Path(tempfile.mkdtemp(dir=tmp_path)) / "model"
    shutil.copytree(converted[seed], folder)
    try:
        yield folder
    finally:
        shutil.rmtree(folder.parent)


@fuzz(300)
@given(seed=st.sampled_from(_SEEDS), data=st.data())
def test_fuzz_converted_config(converted, tmp_path, seed, data):
    """config.json edited (every key, nested ones too), the manifest updated, stale or deleted."""
    with _folder_copy(converted, seed, tmp_path) as folder:
        config = _edit_json(data, json.loads((folder / "config.json").read_text()))
        (folder / "config.json").write_text(json.dumps(config, indent=data.draw(st.sampled_from([None, 2]))))
        _write_manifest(data, folder, edit=False)
        _load_or_refuse(folder, converted["photo"], weights_edited=False)


@fuzz(100)
@given(seed=st.sampled_from(_SEEDS), data=st.data())
def test_fuzz_converted_manifest(converted, tmp_path, seed, data):
    """manifest.json edited: its files, sizes, digests and source."""
    with _folder_copy(converted, seed, tmp_path) as folder:
        _write_manifest(data, folder, edit=True)
        _load_or_refuse(folder, converted["photo"], weights_edited=False)


@fuzz(300)
@given(seed=st.sampled_from(_SEEDS), data=st.data())
def test_fuzz_converted_weights(converted, tmp_path, seed, data):
    """model.safetensors edited: its bytes (header or anywhere), or its tensors (dropped, renamed, added, or
    of another dtype, shape or values)."""
    with _folder_copy(converted, seed, tmp_path) as folder:
        path = folder / "model.safetensors"
        how = data.draw(st.sampled_from(["header bytes", "any bytes", "tensors", "tensors"]), label="how")
        if how == "tensors":
            _edit_weights(data, folder)
        else:
            raw = path.read_bytes()
            head = 8 + struct.unpack("<Q", raw[:8])[0] if how == "header bytes" else len(raw)
            path.write_bytes(_mutate(raw[:head], data.draw(_mutations(head), label="bytes")) + raw[head:])
        _write_manifest(data, folder, edit=False)
        _load_or_refuse(folder, converted["photo"], weights_edited=True)
