"""Differential fuzz targets: mlx-vit's checkpoint readers against the reference readers, byte for byte.

The rule: for any bytes, an mlx-vit reader either refuses (CheckpointError, one line naming the file) or returns
exactly the weights the reference reader returns for the same bytes:

    read_torch_bin    torch.load(path, map_location="cpu") -- weights_only=True (the default), and, when ours
                      accepts, weights_only=False too (through an unpickler that resolves only the globals torch's
                      weights-only allowlist names, so that no mutated pickle imports anything)
    read_safetensors  safetensors.numpy.load_file(path) (safetensors.torch.load_file where numpy lacks the dtype)
    read_npz          np.load(path, allow_pickle=False), every member read

Same keys, same shapes, same dtypes (bfloat16 widened to float32 exactly; byte order normalized: a big-endian
float32 equals a little-endian one holding the same values), same bytes. Accepting a file the reference refuses is
a failure, and so is reading a file that torch.load reads as a legacy (non-zip) checkpoint: ours refuses those by
design. Any exception other than CheckpointError from ours is a failure.

The reference runs in-process and only where ours accepted (a refusal needs no comparison): every declared size
it then meets was already bounded by ours (tensors at most 2x the file). Two allocations are not: CPython's
unpickler (weights_only=False) makes its memo as long as the largest LONG_BINPUT index, and a legacy file that ours
wrongly reads declares its storage sizes itself; so torch.load runs under an address-space cap (RLIMIT_AS: 2 GB
over the current size, Linux) and a file asking for more is refused by it with MemoryError. CI runs do not shrink
a failing example (it is printed as drawn); FUZZ_EXAMPLES runs do.

Targets: torch.save zip files mutated as raw bytes, as zip structure (member names and order, records, header
fields, what comes before and after), and as pickles (opcode edits, protocol-4 frames, memo); legacy torch.save
files; safetensors files as raw bytes and as structured header edits; .npz files as raw bytes and as member and
.npy header edits. The named cases (test_*_case) always run. CI runs each target briefly; long runs:

    FUZZ_EXAMPLES=3000 nice -n 10 python -m pytest tests/test_differential.py -p no:cacheprovider \
        --hypothesis-show-statistics

Each example fails with every way it breaks the rule, one line each.
"""

from __future__ import annotations

import contextlib
import io
import json
import pickle
import pickletools
import re
import resource
import struct
import sys
import traceback
import types
import warnings
import zipfile
import zlib
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import pytest
import safetensors.numpy
import safetensors.torch
import torch
from hypothesis import HealthCheck, Phase, event, given, settings
from hypothesis import strategies as st
from hypothesis.control import currently_in_test_context
from test_fuzz import EXAMPLES, _mutate, _mutations

from mlx_vit.convert.jax_npz import read_npz
from mlx_vit.convert.safetensors_io import read_safetensors
from mlx_vit.convert.torch_pickle import read_torch_bin
from mlx_vit.errors import CheckpointError


def fuzz(ci_examples: int) -> settings:
    """Hypothesis settings: `ci_examples` in CI, FUZZ_EXAMPLES when set. CI does not shrink (a failing example
    is reported as drawn, in seconds rather than a minute); long runs do."""
    return settings(
        max_examples=EXAMPLES or ci_examples,
        deadline=None,
        database=None,  # leaves no .hypothesis folder behind
        phases=list(Phase) if EXAMPLES else [Phase.explicit, Phase.generate],
        suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow, HealthCheck.data_too_large],
    )


def _report(problems: list[str], path: Path) -> None:
    """Fail the example with every way it breaks the rule (a long-run collector may replace this function)."""
    assert not problems, "\n".join(problems)


def _event(text: str) -> None:
    """hypothesis' statistics (--hypothesis-show-statistics) of what ours made of the examples."""
    if currently_in_test_context():
        event(text)


def _line(error: BaseException, limit: int = 160) -> str:
    message = str(error)
    if "WeightsUnpickler error:" in message:  # torch's weights-only refusal: the reason is at the end
        message = "Weights only load failed: " + message.split("WeightsUnpickler error:", 1)[1]
    text = " ".join(f"{type(error).__name__}: {message}".split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


# ----------------------------------------------------------------------------------------------------------
# comparison


def _ours(reader, path: Path) -> tuple[dict | None, list[str]]:
    """(ours' arrays, problems); None where ours refused."""
    try:
        result = reader(path)
    except CheckpointError as error:
        message = str(error)
        problems = []
        if str(path) not in message:
            problems.append(f"[refusal does not name the file] {message[:200]!r}")
        if "\n" in message or "\r" in message:
            problems.append(f"[refusal is not one line] {message[:200]!r}")
        _event(f"ours refuses: {' '.join(message.replace(str(path), '').split()[:5])[:50]}")
        return None, problems
    except Exception as error:  # noqa: BLE001 - any other exception breaks the rule
        where = traceback.extract_tb(error.__traceback__)[-1]
        at = f"{Path(where.filename).name}:{where.lineno}"
        return None, [f"[ours raises {type(error).__name__}] {_line(error)} at {at}"]
    _event("ours accepts")
    if not isinstance(result, dict) or not all(isinstance(k, str) and isinstance(v, np.ndarray)
                                               for k, v in result.items()):  # fmt: skip
        return None, [f"[ours returns junk] {type(result).__name__}"]
    return result, []


_NUMPY_OF_TORCH = {
    torch.float32: np.float32, torch.float16: np.float16, torch.float64: np.float64, torch.int64: np.int64,
    torch.int32: np.int32, torch.int16: np.int16, torch.int8: np.int8, torch.uint8: np.uint8, torch.bool: np.bool_,
    torch.uint16: np.uint16, torch.uint32: np.uint32, torch.uint64: np.uint64,
}  # fmt: skip
_SAME_SIZE_INT = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


@dataclass(frozen=True)
class Expected:
    """A reference tensor as ours must return it: numpy dtype (native order), shape, C-order bytes."""

    dtype: np.dtype
    shape: tuple[int, ...]
    raw: bytes


def _bits_of(tensor: torch.Tensor) -> np.ndarray:
    """The tensor's elements' bits (C order) as unsigned integers: no float conversion ever touches them."""
    size = tensor.element_size()
    ints = tensor.detach().view(_SAME_SIZE_INT[size]).contiguous().numpy()
    return ints.view({1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}[size])


def _expected_tensor(tensor: torch.Tensor) -> Expected | str:
    if tensor.dtype == torch.bfloat16:  # widened exactly: the bits become float32's top half
        widened = (_bits_of(tensor).astype(np.uint32) << np.uint32(16)).view(np.float32)
        return Expected(np.dtype(np.float32), tuple(tensor.shape), widened.tobytes())
    dtype = _NUMPY_OF_TORCH.get(tensor.dtype)
    if dtype is None or tensor.element_size() not in _SAME_SIZE_INT or tensor.layout != torch.strided:
        return f"a {tensor.dtype} ({tensor.layout}) tensor, which has no numpy equivalent"
    return Expected(np.dtype(dtype), tuple(tensor.shape), _bits_of(tensor).tobytes())


def _expected_array(array: np.ndarray) -> Expected:
    native = array.astype(array.dtype.newbyteorder("="), copy=False)  # a byte swap: bit-exact
    return Expected(native.dtype, tuple(array.shape), np.ascontiguousarray(native).tobytes())


def _compare(ours: dict[str, np.ndarray], expected: dict[str, Expected | str], reference: str) -> list[str]:
    problems = []
    only_ours, only_theirs = sorted(set(ours) - set(expected)), sorted(set(expected) - set(ours))
    if only_ours or only_theirs:
        problems.append(f"[keys differ] ours only {[k[:40] for k in only_ours[:3]]} ({len(only_ours)}), "
                        f"{reference} only {[k[:40] for k in only_theirs[:3]]} ({len(only_theirs)})")  # fmt: skip
    for key in sorted(set(ours) & set(expected)):
        want, got, name = expected[key], ours[key], repr(key[:40])
        if isinstance(want, str):
            problems.append(f"[reference value has no numpy equivalent] {name}: {reference} returns {want}")
            continue
        if tuple(got.shape) != want.shape:
            problems.append(f"[shape differs] {name}: ours {tuple(got.shape)}, {reference} {want.shape}")
            continue
        native = got.dtype.newbyteorder("=")
        if native != want.dtype:
            problems.append(f"[dtype differs] {name}: ours {got.dtype}, {reference} {want.dtype}")
            continue
        if np.ascontiguousarray(got.astype(native, copy=False)).tobytes() != want.raw:
            problems.append(f"[values differ] {name} ({want.dtype}{list(want.shape)}): ours "
                            f"{got.reshape(-1)[:3].tolist()}..., {reference} "
                            f"{np.frombuffer(want.raw, want.dtype)[:3].tolist()}...")  # fmt: skip
    return problems


# ----------------------------------------------------------------------------------------------------------
# reference readers

# weights_only=False runs Python's unpickler: this one resolves only what torch's weights-only allowlist names,
# so a mutated pickle never imports or calls anything else (torch.load maps storage types itself).
_TORCH_ALLOWED = frozenset(torch._weights_only_unpickler._get_allowed_globals())


class _GuardedUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        if f"{module}.{name}" not in _TORCH_ALLOWED:
            raise pickle.UnpicklingError(f"(test guard) global {module}.{name} is not in torch's allowlist")
        return super().find_class(module, name)


_GUARDED_PICKLE = types.ModuleType("pickle")
_GUARDED_PICKLE.Unpickler = _GuardedUnpickler
_GUARDED_PICKLE.load = lambda file, **kwargs: _GuardedUnpickler(file, **kwargs).load()
_GUARDED_PICKLE.UnpicklingError = pickle.UnpicklingError


@contextlib.contextmanager
def _address_space_cap(extra: int = 2**31):
    """At most `extra` more bytes of address space while the reference runs: CPython's unpickler (weights_only=False)
    sizes its memo by the largest LONG_BINPUT index (2**32 - 1: a 32 GB array), which must fail, not swap."""
    if sys.platform != "linux":
        yield
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    with open("/proc/self/statm") as f:
        limit = int(f.read().split()[0]) * resource.getpagesize() + extra
    resource.setrlimit(resource.RLIMIT_AS, (limit if hard == resource.RLIM_INFINITY else min(limit, hard), hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


def _torch_load(path: Path, weights_only: bool) -> tuple[bool, object]:
    """(True, what torch.load returns) or (False, why it refused: one line)."""
    try:
        with warnings.catch_warnings(), _address_space_cap():
            warnings.simplefilter("ignore")
            if weights_only:
                return True, torch.load(path, map_location="cpu", weights_only=True)
            return True, torch.load(path, map_location="cpu", weights_only=False, pickle_module=_GUARDED_PICKLE)
    except Exception as error:  # noqa: BLE001 - however the reference refuses
        return False, _line(error)


def _torch_weights(value: object) -> dict[str, Expected | str] | str:
    """A reference result as weights, or what it is instead of a flat dict of named tensors."""
    if not isinstance(value, dict):
        return f"a {type(value).__name__}"
    for key, item in value.items():
        if not isinstance(key, str) or not isinstance(item, torch.Tensor):
            return f"a dict whose entry {str(key)[:40]!r} is a {type(item).__name__}"
    return {key: _expected_tensor(item) for key, item in value.items()}


def _check_torch(path: Path) -> list[str]:
    ours, problems = _ours(read_torch_bin, path)
    if ours is None:
        return problems
    with open(path, "rb") as f:
        is_zip = f.read(4) == b"PK\x03\x04"  # what torch.load looks at to choose the zip reader
    default = _torch_problems(ours, path, is_zip, weights_only=True)
    unsafe = _torch_problems(ours, path, is_zip, weights_only=False)
    # weights_only=False mostly says the same again: only what it says differently is added
    return problems + default + [p for p in unsafe if p.replace(_UNSAFE, "torch.load") not in default]


_UNSAFE = "torch.load(weights_only=False)"


def _torch_problems(ours: dict[str, np.ndarray], path: Path, is_zip: bool, weights_only: bool) -> list[str]:
    reference = "torch.load" if weights_only else _UNSAFE
    accepted, value = _torch_load(path, weights_only)
    if not accepted:
        return [f"[ours accepts, {reference} refuses] {value}"]
    problems = [] if is_zip else [f"[ours reads a file {reference} reads as a legacy (non-zip) checkpoint]"]
    weights = _torch_weights(value)
    if isinstance(weights, str):
        what = f"{weights}; ours {len(ours)} arrays"
        return [*problems, f"[{reference} returns other than a flat dict of tensors] {what}"]
    return problems + _compare(ours, weights, reference)


def _safetensors_reference(path: Path) -> tuple[bool, dict[str, Expected | str] | str]:
    try:
        return True, {key: _expected_array(value) for key, value in safetensors.numpy.load_file(path).items()}
    except Exception:  # noqa: BLE001 - numpy may lack the dtype (bfloat16, float8): torch has them
        pass
    try:
        return True, {key: _expected_tensor(value) for key, value in safetensors.torch.load_file(path).items()}
    except Exception as error:  # noqa: BLE001
        return False, _line(error)


def _check_safetensors(path: Path) -> list[str]:
    ours, problems = _ours(read_safetensors, path)
    if ours is None:
        return problems
    accepted, expected = _safetensors_reference(path)
    if not accepted:
        return [*problems, f"[ours accepts, safetensors refuses] {expected}"]
    return problems + _compare(ours, expected, "safetensors")


def _npz_reference(path: Path) -> tuple[bool, dict[str, Expected | str] | str]:
    try:
        loaded = np.load(path, allow_pickle=False)
        if not isinstance(loaded, np.lib.npyio.NpzFile):
            return True, f"a single {type(loaded).__name__}, not named arrays"
        with loaded:
            values = {key: loaded[key] for key in loaded.files}
    except Exception as error:  # noqa: BLE001
        return False, _line(error)
    return True, {key: _expected_array(value) if isinstance(value, np.ndarray) else f"a {type(value).__name__}"
                  for key, value in values.items()}  # fmt: skip


def _check_npz(path: Path) -> list[str]:
    ours, problems = _ours(read_npz, path)
    if ours is None:
        return problems
    accepted, expected = _npz_reference(path)
    if not accepted:
        return [*problems, f"[ours accepts, np.load refuses] {expected}"]
    if isinstance(expected, str):
        return [*problems, f"[np.load returns other than named arrays] {expected}; ours {len(ours)} arrays"]
    return problems + _compare(ours, expected, "np.load")


def _run(check, path: Path, raw: bytes) -> None:
    path.write_bytes(raw)
    _report(check(path), path)


# ----------------------------------------------------------------------------------------------------------
# a zip writer that can make every field say something else


@dataclass
class Member:
    """One zip member; `local`/`central` override header fields (name, flags, method, crc, csize, usize, version,
    and central `offset` and `external` attributes)."""

    name: str | bytes
    data: bytes
    local: dict = field(default_factory=dict)
    central: dict = field(default_factory=dict)
    zip64: str = ""  # "local", "central" or "both": sizes (and the offset) in ZIP64 extra fields
    descriptor: bool = True  # as torch.save: flag bit 3, sizes and CRC after the data
    align: int = 64  # as torch.save: data aligned by a padding extra field
    deflate: bool = False


def _build_zip(members: list[Member], *, end: dict | None = None, zip64_end: bool = False, comment: bytes = b"",
               central_order: list[int] | None = None) -> bytes:  # fmt: skip
    out, entries = bytearray(), []
    for m in members:
        name = m.name if isinstance(m.name, bytes) else m.name.encode("utf-8", "surrogateescape")
        payload = m.data
        if m.deflate:
            packer = zlib.compressobj(6, zlib.DEFLATED, -15)
            payload = packer.compress(m.data) + packer.flush()
        crc, csize, usize, offset = zlib.crc32(m.data), len(payload), len(m.data), len(out)
        method = 8 if m.deflate else 0
        flags = 0x808 if m.descriptor else 0
        local = {"name": name, "flags": flags, "method": method, "crc": crc, "csize": csize, "usize": usize,
                 "version": 45 if m.zip64 else 20, **m.local}  # fmt: skip
        if m.descriptor and not {"crc", "csize", "usize"} & set(m.local):
            local.update(crc=0, csize=0, usize=0)
        extra = b""
        if m.zip64 in ("local", "both"):
            extra = struct.pack("<HHQQ", 1, 16, local["usize"], local["csize"])
            local.update(csize=0xFFFFFFFF, usize=0xFFFFFFFF)
        start = offset + 30 + len(local["name"]) + len(extra)
        if m.align and start % m.align:
            pad = (-start - 4) % m.align
            extra += struct.pack("<HH", 0x4246, pad) + b"Z" * pad  # torch's "FB" padding record
        out += struct.pack("<IHHHHHIIIHH", 0x04034B50, local["version"], local["flags"], local["method"], 0, 0x21,
                           local["crc"] & 0xFFFFFFFF, local["csize"] & 0xFFFFFFFF, local["usize"] & 0xFFFFFFFF,
                           len(local["name"]), len(extra))  # fmt: skip
        out += local["name"] + extra + payload
        if m.descriptor:
            wide = m.zip64 in ("local", "both")
            out += struct.pack("<IIQQ" if wide else "<IIII", 0x08074B50, crc, csize, usize)
        central = {"name": name, "flags": flags, "method": method, "crc": crc, "csize": csize, "usize": usize,
                   "version": 45 if m.zip64 else 20, "offset": offset, **m.central}  # fmt: skip
        cextra = b""
        if m.zip64 in ("central", "both"):
            cextra = struct.pack("<HHQQQ", 1, 24, central["usize"], central["csize"], central["offset"])
            central.update(csize=0xFFFFFFFF, usize=0xFFFFFFFF, offset=0xFFFFFFFF)
        entries.append(struct.pack("<IHHHHHHIIIHHHHHII", 0x02014B50, 45, central["version"], central["flags"],
                                   central["method"], 0, 0x21, central["crc"] & 0xFFFFFFFF,
                                   central["csize"] & 0xFFFFFFFF, central["usize"] & 0xFFFFFFFF,
                                   len(central["name"]), len(cextra), 0, 0, 0, central.get("external", 0),
                                   central["offset"] & 0xFFFFFFFF)
                       + central["name"] + cextra)  # fmt: skip
    order = central_order if central_order is not None else range(len(entries))
    directory = b"".join(entries[i] for i in order if 0 <= i < len(entries))
    values = {"disk": 0, "cd_disk": 0, "count": len(members), "total": len(members), "cd_size": len(directory),
              "cd_offset": len(out), **(end or {})}  # fmt: skip
    out += directory
    if zip64_end:
        record = len(out)
        out += struct.pack("<IQHHIIQQQQ", 0x06064B50, 44, 45, 45, 0, 0, values["count"], values["total"],
                           values["cd_size"], values["cd_offset"])  # fmt: skip
        out += struct.pack("<IIQI", 0x07064B50, 0, record, 1)
        values.update(count=0xFFFF, total=0xFFFF, cd_size=0xFFFFFFFF, cd_offset=0xFFFFFFFF)
    out += struct.pack("<IHHHHIIH", 0x06054B50, values["disk"], values["cd_disk"], values["count"] & 0xFFFF,
                       values["total"] & 0xFFFF, values["cd_size"] & 0xFFFFFFFF, values["cd_offset"] & 0xFFFFFFFF,
                       len(comment))  # fmt: skip
    return bytes(out + comment)


def _members_of(raw: bytes) -> list[Member]:
    with zipfile.ZipFile(io.BytesIO(raw)) as archive:
        return [Member(info.filename, archive.read(info), deflate=info.compress_type == zipfile.ZIP_DEFLATED)
                for info in archive.infolist()]  # fmt: skip


# ----------------------------------------------------------------------------------------------------------
# torch seeds


def _torch_bytes(value: object, **kwargs) -> bytes:
    buffer = io.BytesIO()
    torch.save(value, buffer, **kwargs)
    return buffer.getvalue()


def _state_dicts() -> dict[str, dict]:
    generator = torch.Generator().manual_seed(20240601)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=generator)

    base = randn(4, 6)
    linear = torch.nn.Linear(3, 2)
    with torch.no_grad():
        linear.weight.copy_(randn(2, 3))
        linear.bias.copy_(randn(2))
    return {
        "mixed": {"f32": randn(2, 3), "f16": randn(5).half(), "bf16": randn(2, 2).bfloat16(),
                  "i64": torch.arange(-3, 4), "param": torch.nn.Parameter(randn(3))},
        # one storage under six tensors: offsets, transposes, steps (non-contiguous), the same tensor twice
        "views": {"base": base, "row": base[1], "block": base[1:3, 2:5], "t": base.t(), "step": base[:, ::2],
                  "again": base},
        "ordered": linear.state_dict(),  # an OrderedDict with _metadata (BUILD)
        "dtypes": {"f64": randn(3).double(), "i32": torch.arange(4, dtype=torch.int32),
                   "i16": torch.arange(-2, 2, dtype=torch.int16), "i8": torch.tensor([-128, 0, 127], dtype=torch.int8),
                   "u8": torch.tensor([0, 255], dtype=torch.uint8), "bool": torch.tensor([True, False, True]),
                   "scalar": torch.tensor(2.5), "empty": torch.zeros(0, 3), "bf16s": torch.tensor(-1.5).bfloat16(),
                   "nan": torch.tensor([float("nan"), -0.0, float("inf")])},
    }  # fmt: skip


STATE_DICTS = _state_dicts()
_STORAGE_ITEMSIZE = {"FloatStorage": 4, "HalfStorage": 2, "BFloat16Storage": 2, "LongStorage": 8, "IntStorage": 4,
                     "ShortStorage": 2, "CharStorage": 1, "ByteStorage": 1, "BoolStorage": 1,
                     "DoubleStorage": 8}  # fmt: skip


def _ops(pickled: bytes) -> list[tuple[str, object, bytes]]:
    """(opcode name, argument, its bytes) for each opcode of a pickle, STOP last."""
    found = list(pickletools.genops(pickled))
    ends = [position for _, _, position in found[1:]] + [len(pickled)]
    return [(op.name, arg, pickled[position:stop]) for (op, arg, position), stop in zip(found, ends, strict=True)]


def _storage_types(pickled: bytes) -> dict[str, str]:
    """Storage key -> storage type, read off the persistent ids ('storage', type, key, location, numel), the memo
    followed (a second storage of a type names 'storage' and the type by BINGET)."""
    found, memo, last, strings, state, kind = {}, {}, None, [], None, None
    for name, arg, _ in _ops(pickled):
        if name in ("BINPUT", "LONG_BINPUT", "PUT"):
            memo[arg] = last
            continue
        if name == "MEMOIZE":
            memo[len(memo)] = last
            continue
        if name in ("BINGET", "LONG_BINGET", "GET"):
            value = memo.get(arg)
        elif name == "GLOBAL":
            value = ("global", arg.split(" ")[-1])
        elif name == "STACK_GLOBAL":
            value = ("global", strings[-1] if strings else "")
        else:
            value = arg if isinstance(arg, str) else None
        if isinstance(value, str):
            strings.append(value)
        last = value
        if value == "storage":
            state = "type"
        elif state == "type" and isinstance(value, tuple):
            kind, state = value[1], "key"
        elif state == "key" and isinstance(value, str):
            found[value], state = kind, None
    return found


@dataclass
class TorchSeed:
    name: str
    raw: bytes
    members: list[Member]
    prefix: str
    pickled: bytes
    storages: dict[str, str]  # key -> storage type


def _torch_seed(name: str, raw: bytes) -> TorchSeed:
    members = _members_of(raw)
    pkl = next(m for m in members if str(m.name).endswith("data.pkl"))
    return TorchSeed(name, raw, members, str(pkl.name)[: -len("data.pkl")], pkl.data, _storage_types(pkl.data))


TORCH_SEEDS = {name: _torch_seed(name, _torch_bytes(sd)) for name, sd in STATE_DICTS.items()}
TORCH_SEEDS |= {f"{name}-p4": _torch_seed(f"{name}-p4", _torch_bytes(STATE_DICTS[name], pickle_protocol=4))
                for name in ("mixed", "ordered")}  # fmt: skip
LEGACY_SEEDS = {name: _torch_bytes(STATE_DICTS[name], _use_new_zipfile_serialization=False)
                for name in ("mixed", "views", "dtypes")}  # fmt: skip
_P2 = [name for name in TORCH_SEEDS if not name.endswith("-p4")]


def _rebuilt(seed: TorchSeed, **kwargs) -> list[Member]:
    return [replace(m, **kwargs) for m in seed.members]


def _with_pickle(seed: TorchSeed, pickled: bytes) -> bytes:
    return _build_zip([replace(m, data=pickled) if m.data is seed.pickled else m for m in seed.members])


def _byteswapped(seed: TorchSeed, data: bytes, member: str) -> bytes:
    key = member.rsplit("/", 1)[-1]
    size = _STORAGE_ITEMSIZE.get(seed.storages.get(key, ""), 1)
    if size == 1 or len(data) % size:
        return data
    return np.frombuffer(data, f"<u{size}").byteswap().tobytes()


def _big_endian(seed: TorchSeed, members: list[Member]) -> list[Member]:
    """byteorder 'big' and every storage's elements byte-swapped: the same values, as a big-endian saver wrote."""
    out = []
    for m in members:
        name = str(m.name)
        if name.endswith("/byteorder"):
            m = replace(m, data=b"big")
        elif "/data/" in name:
            m = replace(m, data=_byteswapped(seed, m.data, name))
        out.append(m)
    return out


# ----------------------------------------------------------------------------------------------------------
# torch: named cases (always run)


def _renamed(members: list[Member], old: str, new: str) -> list[Member]:
    return [replace(m, name=str(m.name).replace(old, new)) for m in members]


def _member(members: list[Member], suffix: str) -> Member:
    return next(m for m in members if str(m.name).endswith(suffix))


def _set_record(members: list[Member], record: str, value: bytes | None, prefix: str = "archive/") -> list[Member]:
    kept = [m for m in members if str(m.name) != prefix + record]
    if value is None:
        return kept
    index = next((i for i, m in enumerate(members) if str(m.name) == prefix + record), len(kept))
    return kept[:index] + [Member(prefix + record, value)] + kept[index:]


def _junk_pickle() -> bytes:
    return pickle.dumps({}, protocol=2)


def _string_op(value: str, form: str) -> bytes:
    raw = value.encode("utf-8", "surrogatepass")
    return {"BINUNICODE": b"X" + struct.pack("<I", len(raw)) + raw,
            "SHORT_BINUNICODE": b"\x8c" + bytes([len(raw) % 256]) + raw,
            "BINUNICODE8": b"\x8d" + struct.pack("<Q", len(raw)) + raw,
            "SHORT_BINSTRING": b"U" + bytes([len(raw) % 256]) + raw,
            "SHORT_BINBYTES": b"C" + bytes([len(raw) % 256]) + raw,
            "UNICODE": b"V" + value.encode("raw-unicode-escape", "surrogatepass") + b"\n"}[form]  # fmt: skip


def _int_op(value: int, form: str) -> bytes:
    if form == "BININT1" and 0 <= value < 256:
        return b"K" + bytes([value])
    if form == "BININT2" and 0 <= value < 65536:
        return b"M" + struct.pack("<H", value)
    if form in ("BININT", "BININT1", "BININT2") and -(2**31) <= value < 2**31:
        return b"J" + struct.pack("<i", value)
    if form == "INT":
        return b"I" + str(value).encode() + b"\n"
    raw = value.to_bytes((value.bit_length() + 8) // 8, "little", signed=True)
    return b"\x8a" + bytes([len(raw)]) + raw


_MIXED = TORCH_SEEDS["mixed"]
_ALT = bytes(reversed(_member(_MIXED.members, "data/0").data))  # data/0's bytes, reversed: other values
_OTHER = _torch_bytes({"f32": torch.zeros(2, 3), "i64": torch.arange(100, 107)})
_LEGACY_OTHER = _torch_bytes({"f32": torch.ones(2, 3), "i64": torch.arange(7)}, _use_new_zipfile_serialization=False)

TORCH_CASES: dict[str, bytes] = {
    # baselines: untouched files, and the same files written again by this test's zip writer
    **{f"seed {name}": seed.raw for name, seed in TORCH_SEEDS.items()},
    **{f"rebuilt {name}": _build_zip(seed.members) for name, seed in TORCH_SEEDS.items()},
    "rebuilt mixed, no alignment or descriptors": _build_zip(_rebuilt(_MIXED, align=0, descriptor=False)),
    "rebuilt mixed, deflated": _build_zip(_rebuilt(_MIXED, deflate=True)),
    "big-endian mixed": _build_zip(_big_endian(_MIXED, _MIXED.members)),
    "big-endian dtypes": _build_zip(_big_endian(TORCH_SEEDS["dtypes"], TORCH_SEEDS["dtypes"].members)),
    # case-only names: torch looks records up case-insensitively (miniz), zipfile does not
    "archive/DATA/0 beside archive/data/0 (first)": _build_zip([Member("archive/DATA/0", _ALT), *_MIXED.members]),
    "archive/DATA/0 beside archive/data/0 (last)": _build_zip([*_MIXED.members, Member("archive/DATA/0", _ALT)]),
    "archive/DATA/0 (zeros) as 3rd member: torch reads it": _build_zip([*_MIXED.members[:2],
                                                                        Member("archive/DATA/0", bytes(24)),
                                                                        *_MIXED.members[2:]]),
    "data/0 renamed DATA/0": _build_zip(_renamed(_MIXED.members, "data/0", "DATA/0")),
    "data.pkl renamed DATA.PKL": _build_zip(_renamed(_MIXED.members, "data.pkl", "DATA.PKL")),
    "archive/DATA.PKL (junk) beside data.pkl": _build_zip([*_MIXED.members,
                                                           Member("archive/DATA.PKL", _junk_pickle())]),
    "folder ARCHIVE/": _build_zip(_renamed(_MIXED.members, "archive/", "ARCHIVE/")),
    "folder Archive/ for data only": _build_zip(_renamed(_MIXED.members, "archive/data/", "Archive/data/")),
    "BYTEORDER = big, storages swapped": _build_zip(_renamed(_big_endian(_MIXED, _MIXED.members), "byteorder",
                                                             "BYTEORDER")),  # fmt: skip
    "byteorder and BYTEORDER = big": _build_zip([*_MIXED.members, Member("archive/BYTEORDER", b"big")]),
    # where data.pkl is
    "data.pkl renamed olddata.pkl": _build_zip(_renamed(_MIXED.members, "data.pkl", "olddata.pkl")),
    "olddata.pkl (junk) beside data.pkl": _build_zip([*_MIXED.members, Member("archive/olddata.pkl", _junk_pickle())]),
    "data.pkl under other/": _build_zip(_renamed(_MIXED.members, "archive/data.pkl", "other/data.pkl")),
    "another folder first": _build_zip([Member("aaa/version", b"3"), *_MIXED.members]),
    "another folder's data.pkl first": _build_zip([Member("aaa/data.pkl", _junk_pickle()), *_MIXED.members]),
    "all members at the top level": _build_zip(_renamed(_MIXED.members, "archive/", "")),
    "all members under a/archive/": _build_zip(_renamed(_MIXED.members, "archive/", "a/archive/")),
    "central directory in reverse order": _build_zip(_MIXED.members, central_order=list(range(6, -1, -1))),
    # duplicates
    "archive/data/0 twice (other bytes first)": _build_zip([Member("archive/data/0", _ALT), *_MIXED.members]),
    "archive/data/0 twice (other bytes last)": _build_zip([*_MIXED.members, Member("archive/data/0", _ALT)]),
    "archive/data.pkl twice (junk last)": _build_zip([*_MIXED.members, Member("archive/data.pkl", _junk_pickle())]),
    "archive/version twice": _build_zip([*_MIXED.members, Member("archive/version", b"99")]),
    # records
    **{f"version = {v!r}": _build_zip(_set_record(_MIXED.members, "version", v))
       for v in [None, b"1", b"3\n", b" 3", b"3abc", b"+3", b"10", b"0", b"-1", b"11", b"99", b"x", b"", b"0x3",
                 b"18446744073709551617"]},
    ".data/version only": _build_zip(_renamed(_MIXED.members, "archive/version", "archive/.data/version")),
    ".data/version = 99 beside version = 3": _build_zip([*_MIXED.members, Member("archive/.data/version", b"99")]),
    **{f"byteorder = {v!r}": _build_zip(_set_record(_MIXED.members, "byteorder", v))
       for v in [None, b"big", b" big ", b"big\n", b"BIG", b"little\n", b"Little", b"", b"\xff"]},
    **{f".format_version = {v!r}": _build_zip(_set_record(_MIXED.members, ".format_version", v))
       for v in [None, b"0", b"2", b"x", b""]},
    **{f".storage_alignment = {v!r}": _build_zip(_set_record(_MIXED.members, ".storage_alignment", v))
       for v in [None, b"0", b"-5", b" 64\n", b"1_0", b"x", b""]},
    "no .data/serialization_id": _build_zip(_set_record(_MIXED.members, ".data/serialization_id", None)),
    "constants.pkl (TorchScript marker)": _build_zip([*_MIXED.members, Member("archive/constants.pkl", b"")]),
    # around the archive
    "junk prepended": b"JUNK" * 8 + _MIXED.raw,
    "PK\\3\\4 junk prepended": b"PK\x03\x04" + bytes(60) + _MIXED.raw,
    "another zip appended": _MIXED.raw + _OTHER,
    "junk appended": _MIXED.raw + b"junk",
    "legacy file, then a zip": _LEGACY_OTHER + _MIXED.raw,
    "zip, then a legacy file": _MIXED.raw + _LEGACY_OTHER,
    # storages
    "data/0 longer than declared": _build_zip([replace(m, data=m.data + bytes(8)) if str(m.name).endswith("data/0")
                                               else m for m in _MIXED.members]),  # fmt: skip
    "FloatStorage read as HalfStorage": _with_pickle(_MIXED, _MIXED.pickled.replace(b"torch\nFloatStorage",
                                                                                    b"torch\nHalfStorage", 1)),
    # wrapped state dicts: torch.load returns the wrapper
    "{'model': sd}": _torch_bytes({"model": STATE_DICTS["mixed"]}),
    "{'state_dict': sd}": _torch_bytes({"state_dict": STATE_DICTS["mixed"]}),
    "{'model': sd, 'epoch': 3}": _torch_bytes({"model": STATE_DICTS["mixed"], "epoch": 3}),
}  # fmt: skip


def _requires_grad_int(seed: TorchSeed) -> bytes:
    """The first NEWFALSE after the LongStorage tensor's persistent id made NEWTRUE: an int64 tensor with grad."""
    ops, out, armed = _ops(seed.pickled), [], False
    for name, arg, raw in ops:
        if name == "GLOBAL" and arg == "torch LongStorage":
            armed = True
        if armed and name == "NEWFALSE":
            raw, armed = b"\x88", False
        out.append(raw)
    return _with_pickle(seed, b"".join(out))


TORCH_CASES["int64 tensor requires_grad"] = _requires_grad_int(TORCH_SEEDS["mixed"])


def _pickle_cases() -> dict[str, bytes]:
    """Pickle-level cases on 'mixed' (protocol 2) and 'mixed-p4' (protocol 4, framed)."""
    p2, p4 = TORCH_SEEDS["mixed"], TORCH_SEEDS["mixed-p4"]
    ops2, ops4 = _ops(p2.pickled), _ops(p4.pickled)
    stop2 = len(p2.pickled) - 1

    def framed(length: int) -> bytes:
        parts = [raw if name != "FRAME" else b"\x95" + struct.pack("<Q", length) for name, _, raw in ops4]
        return _with_pickle(p4, b"".join(parts))

    frame = next(arg for name, arg, _ in ops4 if name == "FRAME")
    gets = [i for i, (name, _, _) in enumerate(ops2) if name == "BINGET"]
    puts = [arg for name, arg, _ in ops2 if name == "BINPUT"]

    def memo(index: int, new: bytes) -> bytes:
        return _with_pickle(p2, b"".join(new if i == index else raw for i, (_, _, raw) in enumerate(ops2)))

    cases = {
        "protocol 4 (torch.save pickle_protocol=4)": p4.raw,
        "FRAME length shorter": framed(frame - 9),
        "FRAME length longer": framed(frame + 9),
        "FRAME length 0": framed(0),
        "FRAME length 2**63": framed(2**63),
        "BINGET of another memo entry": memo(gets[-1], b"h" + bytes([max(puts) - 1])),
        "LONG_BINGET form of BINGET": memo(gets[0], b"j" + struct.pack("<I", ops2[gets[0]][1])),
        "BINPUT again over memo 0": _with_pickle(p2, p2.pickled[:stop2] + b"K\x01q\x00h\x00" + p2.pickled[stop2:]),
        "extra item under the result": _with_pickle(p2, p2.pickled[:2] + b"K\x07" + p2.pickled[2:]),
        "extra item above the result, POPped": _with_pickle(p2, p2.pickled[:stop2] + b"K\x070" + p2.pickled[stop2:]),
        "MARK left open": _with_pickle(p2, p2.pickled[:2] + b"(" + p2.pickled[2:]),
        "DUP then POP": _with_pickle(p2, p2.pickled[:stop2] + b"20" + p2.pickled[stop2:]),
        "SHORT_BINUNICODE key in protocol 2": _with_pickle(
            p2, b"".join(b"\x8c" + bytes([len(arg.encode())]) + arg.encode() if name == "BINUNICODE" else raw
                         for name, arg, raw in ops2)),
        "trailing bytes after STOP": _with_pickle(p2, p2.pickled + b"junk"),
        "PROTO 5 header on a protocol-2 body": _with_pickle(p2, b"\x80\x05" + p2.pickled[2:]),
        "PROTO 6 header on a protocol-2 body": _with_pickle(p2, b"\x80\x06" + p2.pickled[2:]),
        "LONG_BINPUT 2**32 - 1": _with_pickle(p2, p2.pickled[:stop2] + b"r\xff\xff\xff\xff" + p2.pickled[stop2:]),
        "requires_grad 1 (an int)": _first_op(p2, "NEWFALSE", b"K\x01"),
        "requires_grad None": _first_op(p2, "NEWFALSE", b"N"),
        "_rebuild_tensor_v2 with 4 arguments": _without_hooks(p2),
        "_rebuild_tensor (v1) with 6 arguments": _first_op(p2, "GLOBAL", b"ctorch._utils\n_rebuild_tensor\n",
                                                           lambda arg: arg.endswith("_rebuild_tensor_v2")),
        "a key as UNICODE (V)": _first_op(p2, "BINUNICODE", _string_op("f32", "UNICODE"), lambda arg: arg == "f32"),
        "a key as BINUNICODE8": _first_op(p2, "BINUNICODE", _string_op("f32", "BINUNICODE8"), lambda arg: arg == "f32"),
        "a storage offset as INT (I)": _first_op(p2, "BININT1", b"I0\n", lambda arg: arg == 0),
        "a storage offset as LONG (L)": _first_op(p2, "BININT1", b"L0L\n", lambda arg: arg == 0),
        "the dict built with DICT": _with_pickle(p2, b"\x80\x02(d" + p2.pickled[3:]),
    }  # fmt: skip
    return cases


def _first_op(seed: TorchSeed, name: str, new: bytes, where=lambda arg: True) -> bytes:
    """The seed's pickle with its first `name` opcode whose argument passes `where` replaced by `new`."""
    ops = _ops(seed.pickled)
    index = next(i for i, (op, arg, _) in enumerate(ops) if op == name and where(arg))
    return _with_pickle(seed, b"".join(new if i == index else raw for i, (_, _, raw) in enumerate(ops)))


def _without_hooks(seed: TorchSeed) -> bytes:
    """The last _rebuild_tensor_v2 call without its requires_grad and backward_hooks arguments."""
    ops = _ops(seed.pickled)
    start = max(i for i, (op, _, _) in enumerate(ops) if op == "NEWFALSE")
    stop = next(i for i in range(start, len(ops)) if ops[i][0] == "TUPLE")
    return _with_pickle(seed, b"".join(raw for i, (_, _, raw) in enumerate(ops) if not start <= i < stop))


TORCH_CASES |= _pickle_cases()


def _header_cases() -> dict[str, bytes]:
    """Local vs central header fields, ZIP64, CRC, flags."""
    m = _MIXED.members

    def at(suffix: str, **changes) -> bytes:
        return _build_zip([replace(x, **changes) if str(x.name).endswith(suffix) else x for x in m])

    return {
        "ZIP64 extra in local headers": _build_zip(_rebuilt(_MIXED, zip64="local")),
        "ZIP64 extra in central headers": _build_zip(_rebuilt(_MIXED, zip64="central")),
        "ZIP64 everywhere and a ZIP64 end record": _build_zip(_rebuilt(_MIXED, zip64="both"), zip64_end=True),
        "ZIP64 central, local sizes 3": at("data/0", zip64="central", descriptor=False, local={"csize": 3, "usize": 3}),
        "data/0 central compressed size != size": at("data/0", central={"usize": 32}),
        "data/0 central sizes 16 (short)": at("data/0", central={"csize": 16, "usize": 16}),
        "data/0 local sizes 1000": at("data/0", descriptor=False, local={"csize": 1000, "usize": 1000}),
        "data/0 CRC wrong": at("data/0", central={"crc": 1}),
        "data.pkl CRC wrong": at("data.pkl", central={"crc": 1}),
        "data/0 local name differs": at("data/0", local={"name": b"archive/data/X"}),
        "data.pkl local name differs": at("data.pkl", local={"name": b"archive/junk.pk"}),
        "data/0 encrypted flag": at("data/0", local={"flags": 1}, central={"flags": 1}),
        "data/0 method 8 on stored bytes": at("data/0", local={"method": 8}, central={"method": 8}),
        "data/0 method 99": at("data/0", local={"method": 99}, central={"method": 99}),
        ".format_version encrypted flag": at(".format_version", local={"flags": 1}, central={"flags": 1}),
        "data/0 external attributes 0x10 (a DOS directory)": at("data/0", central={"external": 0x10}),
        "byteorder external attributes 0x10 (a DOS directory)": at("byteorder", central={"external": 0x10}),
        ".data/serialization_id method 99": at("serialization_id", local={"method": 99}, central={"method": 99}),
        "version method 99": at("/version", local={"method": 99}, central={"method": 99}),
        "EOCD count 1 too many": _build_zip(m, end={"count": len(m) + 1, "total": len(m) + 1}),
        "EOCD count 1 too few": _build_zip(m, end={"count": len(m) - 1, "total": len(m) - 1}),
        "EOCD multi-disk": _build_zip(m, end={"disk": 1}),
        ".data/serialization_id not UTF-8": _build_zip(_set_record(m, ".data/serialization_id", b"\xaa,\xb7")),
        "ZIP64 end locator pointing elsewhere": _patched(_build_zip(m, zip64_end=True), b"PK\x06\x07", 8, 1000),
        ".format_version local header signature broken": _broken_local(_MIXED.raw, "archive/.format_version"),
        ".data/serialization_id local header signature broken": _broken_local(_MIXED.raw,
                                                                              "archive/.data/serialization_id"),
    }  # fmt: skip


def _patched(raw: bytes, signature: bytes, offset: int, add: int) -> bytes:
    """`raw` with the 8-byte little-endian field `offset` bytes into its last `signature` record increased by `add`."""
    at = raw.rfind(signature) + offset
    (value,) = struct.unpack("<Q", raw[at : at + 8])
    return raw[:at] + struct.pack("<Q", value + add) + raw[at + 8 :]


def _broken_local(raw: bytes, member: str) -> bytes:
    """`raw` with the local header signature of `member` made PX\\3\\4."""
    with zipfile.ZipFile(io.BytesIO(raw)) as archive:
        at = archive.getinfo(member).header_offset
    return raw[: at + 1] + b"X" + raw[at + 2 :]


TORCH_CASES |= _header_cases()


@pytest.mark.parametrize("case", list(TORCH_CASES))
def test_torch_case(tmp_path, case):
    _run(_check_torch, tmp_path / "case.bin", TORCH_CASES[case])


LEGACY_CASES = {
    **{f"legacy {name}": raw for name, raw in LEGACY_SEEDS.items()},
    "legacy, then a zip": LEGACY_SEEDS["mixed"] + _MIXED.raw,
    "legacy, then the same weights as a zip": LEGACY_SEEDS["mixed"] + _MIXED.raw,
    "legacy views, then the 'views' zip": LEGACY_SEEDS["views"] + TORCH_SEEDS["views"].raw,
}


@pytest.mark.parametrize("case", list(LEGACY_CASES))
def test_legacy_case(tmp_path, case):
    _run(_check_torch, tmp_path / "case.bin", LEGACY_CASES[case])


# ----------------------------------------------------------------------------------------------------------
# torch: fuzz targets


@fuzz(150)
@given(seed=st.sampled_from(list(TORCH_SEEDS)), data=st.data())
def test_fuzz_torch_bytes(tmp_path, seed, data):
    """A real torch.save file's bytes overwritten, inserted, cut."""
    raw = TORCH_SEEDS[seed].raw
    _run(_check_torch, tmp_path / "fuzz.bin", _mutate(raw, data.draw(_mutations(len(raw)), label="bytes")))


_RECORD_VALUES = {
    "version": [b"1", b"2", b"3", b"3\n", b" 3", b"+3", b"3abc", b"10", b"0", b"-1", b"11", b"x", b"", b"0x3",
                b"18446744073709551617", b"3\x00"],
    ".data/version": [b"3", b"0", b"99", b"x"],
    "byteorder": [b"little", b"big", b" big ", b"big\n", b"BIG", b"little\n", b"Little", b"", b"\xff", b"little\x00"],
    ".format_version": [b"1", b"0", b"2", b"x", b"", b"\xff"],
    ".storage_alignment": [b"64", b"0", b"-5", b" 64\n", b"1_0", b"x", b"", b"1"],
    ".data/serialization_id": [b"", b"1234"],
    "constants.pkl": [b""],
    "data.debug_pkl": [b"junk"],
}  # fmt: skip
_CASES_OF = [str.upper, str.lower, str.swapcase, str.capitalize]


def _case_variant(data, name: str) -> str:
    folder, _, base = name.rpartition("/")
    how = data.draw(st.sampled_from(_CASES_OF), label="case")
    part = data.draw(st.sampled_from(["all", "folder", "base"]), label="case of")
    if part == "folder" and folder:
        return how(folder) + "/" + base
    if part == "base":
        return (folder + "/" if folder else "") + how(base)
    return how(name)


def _other_name(data, seed: TorchSeed, name: str) -> str:
    base = name[len(seed.prefix) :] if name.startswith(seed.prefix) else name
    return data.draw(st.sampled_from([
        "other/" + base, base, "a/" + name, seed.prefix + "old" + base, seed.prefix + base + ".bak",
        seed.prefix + base + " ", seed.prefix + "data/" + str(data.draw(st.integers(0, 9))), seed.prefix + "data.pkl",
        seed.prefix.rstrip("/") + "2/" + base, _case_variant(data, name), name + "/", "/" + name,
    ]), label="new name")  # fmt: skip


def _edit_members(data, seed: TorchSeed, members: list[Member]) -> list[Member]:
    edit = data.draw(st.sampled_from(["rename", "case", "copy", "remove", "record", "reorder", "header",
                                      "big-endian", "storage bytes"]), label="zip edit")  # fmt: skip
    if not members:
        edit = "record"
    index = data.draw(st.integers(0, max(len(members) - 1, 0)), label="member")
    if edit == "rename":
        members[index] = replace(members[index], name=_other_name(data, seed, str(members[index].name)))
    elif edit == "case":
        members[index] = replace(members[index], name=_case_variant(data, str(members[index].name)))
    elif edit == "copy":
        original = members[index]
        name = data.draw(st.sampled_from([str(original.name), _case_variant(data, str(original.name))]), label="as")
        content = data.draw(st.sampled_from(["same", "reversed", "zeros", "other member", "junk pickle"]), label="with")
        payload = {
            "same": original.data,
            "reversed": original.data[::-1],
            "zeros": bytes(len(original.data)),
            "other member": members[(index + 1) % len(members)].data,
            "junk pickle": _junk_pickle(),
        }[content]
        members.insert(data.draw(st.integers(0, len(members)), label="at"), Member(name, payload))
    elif edit == "remove":
        del members[index]
    elif edit == "record":
        record = data.draw(st.sampled_from(list(_RECORD_VALUES)), label="record")
        value = data.draw(st.one_of(st.sampled_from(_RECORD_VALUES[record]), st.binary(max_size=6)), label="value")
        name = seed.prefix + record
        if data.draw(st.booleans(), label="case variant"):
            name = _case_variant(data, name)
        members = [m for m in members if str(m.name) != name]
        members.insert(data.draw(st.integers(0, len(members)), label="at"), Member(name, value))
    elif edit == "reorder":
        order = data.draw(st.permutations(range(len(members))), label="order")
        members = [members[i] for i in order]
    elif edit == "big-endian":
        members = _big_endian(seed, members)
    elif edit == "storage bytes":
        storages = [i for i, m in enumerate(members) if "/data/" in str(m.name)]
        if storages:
            i = data.draw(st.sampled_from(storages), label="storage")
            payload = _mutate(members[i].data, data.draw(_mutations(len(members[i].data)), label="bytes"))
            members[i] = replace(members[i], data=payload)
    else:
        members[index] = _edit_header(data, members[index])
    return members


def _edit_header(data, member: Member) -> Member:
    what = data.draw(st.sampled_from(["crc", "local name", "local sizes", "central sizes", "zip64", "flags", "method",
                                      "no descriptor", "no alignment", "deflate", "external"]),
                     label="header field")  # fmt: skip
    size = len(member.data)
    sizes = st.sampled_from([0, 1, max(size - 1, 0), size + 1, size * 2, 2**31, 0xFFFFFFFF])
    if what == "crc":
        return replace(member, central={**member.central, "crc": data.draw(st.integers(0, 2**32 - 1))})
    if what == "local name":
        return replace(member, local={**member.local, "name": str(member.name).encode()[:-1] + b"X"})
    if what == "local sizes":
        return replace(member, descriptor=False, local={**member.local, "csize": data.draw(sizes),
                                                         "usize": data.draw(sizes)})  # fmt: skip
    if what == "central sizes":
        return replace(member, central={**member.central, "csize": data.draw(st.just(size) | sizes),
                                        "usize": data.draw(sizes)})  # fmt: skip
    if what == "zip64":
        return replace(member, zip64=data.draw(st.sampled_from(["local", "central", "both"])))
    if what == "flags":
        flags = data.draw(st.sampled_from([0, 1, 8, 0x800, 0x808, 0x41, 0x2000]))
        return replace(member, local={**member.local, "flags": flags}, central={**member.central, "flags": flags})
    if what == "method":
        method = data.draw(st.sampled_from([8, 12, 14, 99, 1]))
        return replace(member, local={**member.local, "method": method}, central={**member.central, "method": method})
    if what == "external":
        attributes = data.draw(st.sampled_from([0x10, 0x20, 0x41ED0010, 0x81A40000, 0xFFFFFFFF]))
        return replace(member, central={**member.central, "external": attributes})
    if what == "no descriptor":
        return replace(member, descriptor=False)
    if what == "no alignment":
        return replace(member, align=0)
    return replace(member, deflate=not member.deflate)


def _around(data, archive: bytes) -> bytes:
    where = data.draw(st.sampled_from(["none"] * 12 + ["junk before", "PK junk before", "legacy before", "zip after",
                                                     "junk after", "legacy after", "npy before"]),
                      label="around")  # fmt: skip
    junk = data.draw(st.binary(min_size=1, max_size=40), label="junk")
    return {"none": archive, "junk before": junk + archive, "PK junk before": b"PK\x03\x04" + junk + archive,
            "legacy before": _LEGACY_OTHER + archive, "zip after": archive + _OTHER, "junk after": archive + junk,
            "legacy after": archive + _LEGACY_OTHER, "npy before": b"\x93NUMPY" + junk + archive}[where]  # fmt: skip


@fuzz(200)
@given(seed=st.sampled_from(_P2), data=st.data())
def test_fuzz_torch_zip_structure(tmp_path, seed, data):
    """Members renamed (case-only too), copied, removed, reordered; records (version, byteorder, ...) added,
    removed, altered; header fields that disagree (local vs central, ZIP64, CRC, flags); bytes around the zip."""
    chosen = TORCH_SEEDS[seed]
    members = [replace(m) for m in chosen.members]
    for _ in range(data.draw(st.integers(1, 3), label="edits")):
        members = _edit_members(data, chosen, members)
    end = data.draw(st.sampled_from([None, {"count": len(members) + 1}, {"cd_size": 0}, {"disk": 1},
                                     {"cd_offset": 0}]), label="end record")  # fmt: skip
    archive = _build_zip(members, end=end if data.draw(st.integers(0, 9), label="edit end") == 0 else None,
                         zip64_end=data.draw(st.integers(0, 9), label="zip64 end") == 0)  # fmt: skip
    _run(_check_torch, tmp_path / "fuzz.bin", _around(data, archive))


_SNIPPETS = [
    b"N0", b"K\x01", b"N", b"(", b"(t", b"1", b"2", b"0", b"\x94", b"q\x00", b"q\x01", b"h\x00", b"h\x01", b"h\x02",
    b"r\xff\xff\xff\x7f", b"j\x00\x00\x00\x00", b"\x95\x00\x00\x00\x00\x00\x00\x00\x00", b")", b"]", b"}", b"(d",
    b"(l", b"\x8c\x01x", b"X\x01\x00\x00\x00x", b"\x88", b"\x89", b"\x80\x02", b"\x80\x04", b"ctorch\nFloatStorage\n",
    b"ccollections\nOrderedDict\n)R", b"}b", b"(K\x01K\x02t", b"\x85", b"\x86", b"\x87", b"s", b"u", b"a", b"e",
    b"R", b"b", b"Q", b".",
]  # fmt: skip
_CONSTANT_OPS = [b"N", b"\x88", b"\x89", b"K\x00", b"K\x01", b"K\x02", b")", b"}", b"]", b"J\xff\xff\xff\xff"]
_STRINGS = ["storage", "0", "1", "2", "cpu", "cuda:0", "", "model", "state_dict", "f32", "i64", "weight", "bias",
            "../0", "DATA", "a\udcff"]  # fmt: skip
_GLOBAL_NAMES = ["torch._utils _rebuild_tensor_v2", "torch._utils _rebuild_tensor", "torch._utils _rebuild_parameter",
                 "collections OrderedDict", "torch FloatStorage", "torch HalfStorage", "torch BFloat16Storage",
                 "torch LongStorage", "torch DoubleStorage", "torch ByteStorage", "torch BoolStorage",
                 "torch IntStorage", "torch._utils _rebuild_tensor_v3", "torch UntypedStorage",
                 "torch._utils _rebuild_parameter_with_state", "collections Counter"]  # fmt: skip


def _edit_pickle(data, ops: list[tuple[str, object, bytes]]) -> list[tuple[str, object, bytes]]:
    edit = data.draw(st.sampled_from(["insert", "delete", "duplicate", "constant", "memo", "string", "int", "global",
                                      "frame", "proto", "tail"]), label="pickle edit")  # fmt: skip
    i = data.draw(st.integers(0, len(ops) - 1), label="at op")
    name, arg, raw = ops[i]
    new = raw
    if edit == "insert":
        snippet = data.draw(st.sampled_from(_SNIPPETS), label="snippet")
        return ops[:i] + [("SNIPPET", None, snippet)] + ops[i:]
    if edit == "delete":
        return ops[:i] + ops[i + 1 :]
    if edit == "duplicate":
        return ops[: i + 1] + ops[i:]
    if edit == "constant":
        new = data.draw(st.sampled_from(_CONSTANT_OPS), label="constant")
    elif edit == "memo":
        targets = [j for j, op in enumerate(ops) if op[0] in ("BINPUT", "BINGET", "LONG_BINPUT", "LONG_BINGET",
                                                               "MEMOIZE")]  # fmt: skip
        if not targets:
            return ops
        i = data.draw(st.sampled_from(targets), label="memo op")
        name, arg, raw = ops[i]
        index = data.draw(st.one_of(st.integers(0, 40), st.sampled_from([255, 256, 2**31 - 1, 2**32 - 1])), label="idx")
        get = name.endswith("GET") if name != "MEMOIZE" else data.draw(st.booleans(), label="get")
        long = index > 255 or data.draw(st.booleans(), label="long form")
        if long:
            new = (b"j" if get else b"r") + struct.pack("<I", index)
        else:
            new = (b"h" if get else b"q") + bytes([index])
    elif edit == "string":
        targets = [j for j, op in enumerate(ops) if isinstance(op[1], str) and op[0] not in ("GLOBAL", "INST")]
        if not targets:
            return ops
        i = data.draw(st.sampled_from(targets), label="string op")
        name, arg, raw = ops[i]
        value = data.draw(st.one_of(st.just(arg), st.sampled_from(_STRINGS), st.text(max_size=4)), label="string")
        form = data.draw(st.sampled_from(["BINUNICODE", "SHORT_BINUNICODE", "BINUNICODE8", "SHORT_BINSTRING",
                                          "SHORT_BINBYTES", "UNICODE"]), label="form")  # fmt: skip
        new = _string_op(value, form)
    elif edit == "int":
        targets = [j for j, op in enumerate(ops) if type(op[1]) is int and op[0] in ("BININT", "BININT1", "BININT2",
                                                                                      "LONG1", "INT")]  # fmt: skip
        if not targets:
            return ops
        i = data.draw(st.sampled_from(targets), label="int op")
        name, arg, raw = ops[i]
        value = data.draw(st.sampled_from([arg, arg + 1, arg - 1, 0, 1, -1, 2**31, 2**62, arg * 2]), label="int")
        new = _int_op(value, data.draw(st.sampled_from(["BININT1", "BININT2", "BININT", "LONG1", "INT"]), label="as"))
    elif edit == "global":
        targets = [j for j, op in enumerate(ops) if op[0] in ("GLOBAL", "STACK_GLOBAL")]
        if not targets:
            return ops
        i = data.draw(st.sampled_from(targets), label="global op")
        module, attribute = data.draw(st.sampled_from(_GLOBAL_NAMES), label="global").split(" ")
        if data.draw(st.booleans(), label="stack global") or ops[i][0] == "STACK_GLOBAL":
            new = _string_op(module, "SHORT_BINUNICODE") + _string_op(attribute, "SHORT_BINUNICODE") + b"\x93"
            if ops[i][0] == "STACK_GLOBAL":  # the two names it would have taken are dropped
                new = b"00" + new
        else:
            new = b"c" + f"{module}\n{attribute}\n".encode()
    elif edit == "frame":
        targets = [j for j, op in enumerate(ops) if op[0] == "FRAME"]
        length = data.draw(st.sampled_from([0, 1, 8, 9, 2**63, 2**64 - 1]) | st.integers(0, 400), label="frame length")
        if not targets:
            return ops[:1] + [("FRAME", length, b"\x95" + struct.pack("<Q", length))] + ops[1:]
        i = data.draw(st.sampled_from(targets), label="frame op")
        new = b"\x95" + struct.pack("<Q", length % 2**64)
    elif edit == "proto":
        if ops[0][0] != "PROTO":
            return [("PROTO", 2, b"\x80\x02"), *ops]
        i, new = 0, data.draw(st.sampled_from([b"", b"\x80\x00", b"\x80\x01", b"\x80\x03", b"\x80\x04", b"\x80\x05",
                                               b"\x80\x06", b"\x80\xff"]), label="proto")  # fmt: skip
    else:
        i = len(ops) - 1
        new = data.draw(st.sampled_from([b"", b".junk", b".\x80\x02N.", b"N."]), label="tail")
    return ops[:i] + [("EDITED", None, new)] + ops[i + 1 :]


@fuzz(200)
@given(seed=st.sampled_from(list(TORCH_SEEDS)), data=st.data())
def test_fuzz_torch_pickle(tmp_path, seed, data):
    """data.pkl edited opcode by opcode (stack items, memo, strings and ints in other forms, globals, frames,
    protocol), inside an otherwise valid zip."""
    chosen = TORCH_SEEDS[seed]
    ops = _ops(chosen.pickled)
    for _ in range(data.draw(st.integers(1, 3), label="edits")):
        ops = _edit_pickle(data, ops)
    _run(_check_torch, tmp_path / "fuzz.bin", _with_pickle(chosen, b"".join(raw for _, _, raw in ops)))


@fuzz(100)
@given(seed=st.sampled_from(list(LEGACY_SEEDS)), data=st.data())
def test_fuzz_torch_legacy(tmp_path, seed, data):
    """Legacy (non-zip) torch.save files, mutated, maybe with a zip after them: ours refuses every one."""
    raw = LEGACY_SEEDS[seed]
    raw = _mutate(raw, data.draw(_mutations(len(raw)), label="bytes"))
    tail = data.draw(st.sampled_from([b"", b"", TORCH_SEEDS[seed].raw, _OTHER, _MIXED.raw]), label="then")
    _run(_check_torch, tmp_path / "fuzz.bin", raw + tail)


# ----------------------------------------------------------------------------------------------------------
# safetensors


def _st_seeds() -> dict[str, bytes]:
    rng = np.random.default_rng(7)
    arrays = {"w": rng.standard_normal((2, 3)).astype(np.float32), "b": np.array([-1, 2], dtype=np.int64),
              "m": np.array([1, 0, 255], dtype=np.uint8), "h": rng.standard_normal(2).astype(np.float16),
              "d": np.array([np.pi]), "z": np.zeros((0, 3), np.float32), "s": np.array(1.5, np.float32),
              "k": np.array([True, False]), "u": np.array([1, 65535], np.uint16)}  # fmt: skip
    generator = torch.Generator().manual_seed(7)
    tensors = {"w": torch.randn(2, 2, generator=generator).bfloat16(), "f": torch.randn(3, generator=generator),
               "i": torch.arange(3, dtype=torch.int32), "e": torch.zeros(0).bfloat16()}  # fmt: skip
    return {"numpy": safetensors.numpy.save(arrays, metadata={"format": "np", "note": "x"}),
            "torch-bf16": safetensors.torch.save(tensors, metadata={"format": "pt"})}  # fmt: skip


ST_SEEDS = _st_seeds()


class Raw(str):
    """JSON text written as it is."""


class Pairs(list):
    """A JSON object as (key, value) pairs: order and duplicates kept."""


def _json(value) -> str:
    if isinstance(value, Raw):
        return str(value)
    if isinstance(value, Pairs):
        return "{" + ",".join(f"{_json(k)}:{_json(v)}" for k, v in value) + "}"
    if isinstance(value, dict):
        return _json(Pairs(value.items()))
    if isinstance(value, list):
        return "[" + ",".join(_json(v) for v in value) + "]"
    return json.dumps(value)


def _st_parts(raw: bytes) -> tuple[Pairs, bytes]:
    (length,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8 : 8 + length], object_pairs_hook=Pairs), raw[8 + length :]


def _st_file(header, data: bytes, encoding: str = "utf-8", length_delta: int = 0) -> bytes:
    text = header if isinstance(header, str) else _json(header)
    raw = text.encode(encoding, "surrogatepass")
    return struct.pack("<Q", max(len(raw) + length_delta, 0)) + raw + data


def _entry(header: Pairs, name: str, default=None):
    return next((v for k, v in header if k == name), default)


def _set_field(entry: Pairs, name: str, value) -> None:
    for i, (k, _) in enumerate(entry):
        if k == name:
            entry[i] = (k, value)


def _st_case(edit, seed: str = "numpy", encoding: str = "utf-8") -> bytes:
    header, data = _st_parts(ST_SEEDS[seed])
    result = edit(header, data)
    if isinstance(result, tuple) and len(result) == 2 and isinstance(result[1], bytes):
        header, data = result
    return _st_file(header, data, encoding)


def _offsets(name: str, token: str, which: int = 1):
    def edit(header, data):
        entry = _entry(header, name)
        offsets = list(_entry(entry, "data_offsets"))
        offsets[which] = Raw(token)
        _set_field(entry, "data_offsets", offsets)

    return edit


def _first_span(header: Pairs) -> tuple[str, list]:
    return min(((k, v) for k, v in header if k != "__metadata__"), key=lambda kv: _entry(kv[1], "data_offsets"))


def _with_empty(shape) -> callable:
    """A new tensor `e0` of `shape` (no bytes) at the end of the data."""

    def edit(header, data):
        header.append(("e0", Pairs([("dtype", "F32"), ("shape", shape), ("data_offsets", [len(data), len(data)])])))

    return edit


def _rename(new: Raw) -> callable:
    def edit(header, data):
        i = next(i for i, (k, _) in enumerate(header) if k == "w")
        header[i] = (new, header[i][1])

    return edit


def _metadata(value) -> callable:
    def edit(header, data):
        i = next(i for i, (k, _) in enumerate(header) if k == "__metadata__")
        header[i] = ("__metadata__", value)

    return edit


def _text_edit(before: str = "", after: str = "") -> callable:
    def edit(header, data):
        return Raw(before + _json(header) + after), data

    return edit


def _duplicate(where: str, changed: bool) -> callable:
    def edit(header, data):
        name, entry = _first_span(header)
        copy = Pairs(entry)
        if changed:  # the copy claims fewer bytes: only one of the two can tile the data
            begin, end = _entry(entry, "data_offsets")
            _set_field(copy, "dtype", "U8")
            _set_field(copy, "shape", [0])
            _set_field(copy, "data_offsets", [begin, begin])
        i = next(i for i, (k, _) in enumerate(header) if k == name)
        header.insert(i if where == "first" else len(header), (name, copy))

    return edit


SAFETENSORS_CASES = {
    "seed numpy": ST_SEEDS["numpy"],
    "seed torch-bf16": ST_SEEDS["torch-bf16"],
    **{f"header in {encoding}": _st_case(lambda h, d: None, encoding=encoding)
       for encoding in ["utf-16-le", "utf-16-be", "utf-16", "utf-32", "utf-32-be", "utf-8-sig"]},
    "UTF-8 BOM then header": _st_case(_text_edit("\ufeff")),
    "name '\\ud800' (lone surrogate escape)": _st_case(_rename(Raw('"\\ud800"'))),
    "name 'w\\udc00' (lone trailing surrogate)": _st_case(_rename(Raw('"w\\udc00"'))),
    "name '\\ud83d\\ude00' (a pair: valid)": _st_case(_rename(Raw('"\\ud83d\\ude00"'))),
    "metadata value '\\ud800'": _st_case(_metadata(Pairs([("format", Raw('"\\ud800"'))]))),
    "metadata key '\\udfff'": _st_case(_metadata(Pairs([(Raw('"\\udfff"'), "x")]))),
    "offset -0": _st_case(lambda h, d: _offsets(_first_span(h)[0], "-0", 0)(h, d)),
    "offset 1.0 form": _st_case(lambda h, d: _offsets(_first_span(h)[0], "0.0", 0)(h, d)),
    "offset 8e0 form": _st_case(lambda h, d: _offsets("w", f"{_entry(_entry(h, 'w'), 'data_offsets')[1]}e0")(h, d)),
    "offset 1e1 form": _st_case(lambda h, d: _offsets("w", "1e1")(h, d)),
    "offset 2**64 + end": _st_case(lambda h, d: _offsets("w", str(2**64 + _entry(_entry(h, "w"), "data_offsets")[1]))(
        h, d)),
    "offset 10**30": _st_case(lambda h, d: _offsets("w", str(10**30))(h, d)),
    "shape dim -0": _st_case(lambda h, d: _set_field(_entry(h, "z"), "shape", [Raw("-0"), 3])),
    "shape dim 3.0": _st_case(lambda h, d: _set_field(_entry(h, "z"), "shape", [0, Raw("3.0")])),
    **{f"shape {shape}": _st_case(_with_empty(list(shape)))
       for shape in [(0, 2**31), (2**31, 0), (0, 2**62), (2**62, 0), (0, 2**63), (0, 2**64), (0, 0)]},
    "duplicate name, same entry, first": _st_case(_duplicate("first", changed=False)),
    "duplicate name, empty entry first": _st_case(_duplicate("first", changed=True)),
    "duplicate name, empty entry last": _st_case(_duplicate("last", changed=True)),
    "duplicate metadata key": _st_case(_metadata(Pairs([("format", "np"), ("format", "pt")]))),
    "duplicate __metadata__": _st_case(lambda h, d: h.append(("__metadata__", Pairs()))),
    "leading spaces": _st_case(_text_edit("   ")),
    "leading newline and tab": _st_case(_text_edit("\n\t")),
    "trailing spaces (safetensors pads so)": _st_case(_text_edit("", "        ")),
    "trailing \\r\\n": _st_case(_text_edit("", "\r\n")),
    "trailing form feed": _st_case(_text_edit("", "\f")),
    "trailing NUL": _st_case(_text_edit("", "\0")),
    "leading NBSP": _st_case(_text_edit("\u00a0")),
    "metadata null": _st_case(_metadata(None)),
    "metadata int value": _st_case(_metadata(Pairs([("format", 1)]))),
    "metadata null value": _st_case(_metadata(Pairs([("format", None)]))),
    "metadata bool value": _st_case(_metadata(Pairs([("format", True)]))),
    "metadata nested value": _st_case(_metadata(Pairs([("format", Pairs([("a", "b")]))]))),
    "metadata list": _st_case(_metadata([])),
    "metadata string": _st_case(_metadata("np")),
    "entry with an extra field": _st_case(lambda h, d: _entry(h, "w").append(("x", 1))),
    "entry with an extra null field": _st_case(lambda h, d: _entry(h, "w").append(("x", None))),
    "dtype lower-case": _st_case(lambda h, d: _set_field(_entry(h, "w"), "dtype", "f32")),
    "dtype F32 read as I32": _st_case(lambda h, d: _set_field(_entry(h, "w"), "dtype", "I32")),
    "dtype F16 read as BF16": _st_case(lambda h, d: _set_field(_entry(h, "h"), "dtype", "BF16")),
    "dtype U16 read as F8_E5M2 x2": _st_case(lambda h, d: (_set_field(_entry(h, "u"), "dtype", "F8_E5M2"),
                                                           _set_field(_entry(h, "u"), "shape", [4]))),
    "header length counts 1 data byte": _st_file(*_st_parts(ST_SEEDS["numpy"]), length_delta=1),
}  # fmt: skip


@pytest.mark.parametrize("case", list(SAFETENSORS_CASES))
def test_safetensors_case(tmp_path, case):
    _run(_check_safetensors, tmp_path / "case.safetensors", SAFETENSORS_CASES[case])


@fuzz(150)
@given(seed=st.sampled_from(list(ST_SEEDS)), data=st.data())
def test_fuzz_safetensors_bytes(tmp_path, seed, data):
    raw = ST_SEEDS[seed]
    _run(_check_safetensors, tmp_path / "fuzz.safetensors", _mutate(raw, data.draw(_mutations(len(raw)))))


_NUMBER_TOKENS = ["-0", "{v}.0", "{v}e0", "{v}E+0", "{v}0e-1", "0{v}", "-{v}", "{v2}", "{big}", "1e1", "1.0", " {v} ",
                  "{v}\n"]  # fmt: skip
_SURROGATES = ["\\ud800", "\\udc00", "\\udbff\\u0041", "\\ud83d\\ude00", "\\u0000", "\\u00e9"]
_WHITESPACE = [" ", "\n", "\t", "\r", "\f", "\v", "\0", "\u00a0", "\ufeff", "\u2028", ""]


def _token(data, value) -> Raw:
    template = data.draw(st.sampled_from(_NUMBER_TOKENS), label="number form")
    big = data.draw(st.sampled_from([2**63, 2**64, 2**64 + (value if type(value) is int else 0), 10**30]), label="big")
    return Raw(template.format(v=value, v2=value * 2 if type(value) is int else 0, big=big))


def _edit_st_header(data, header: Pairs, payload: bytes) -> tuple[Pairs | Raw, bytes, str, int]:
    """One edit; returns (header, data, encoding, header-length delta)."""
    names = [k for k, _ in header if k != "__metadata__" and isinstance(k, str)]
    edit = data.draw(st.sampled_from(["encoding", "surrogate", "number", "duplicate", "whitespace", "shape",
                                      "metadata", "field", "dtype", "length", "data", "drop"]),
                     label="header edit")  # fmt: skip
    encoding, delta = "utf-8", 0
    name = data.draw(st.sampled_from(names), label="tensor") if names else None
    entry = _entry(header, name) if name else None
    entry = entry if isinstance(entry, Pairs) else None  # an earlier edit may have made it something else
    if edit == "encoding":
        encoding = data.draw(st.sampled_from(["utf-16-le", "utf-16-be", "utf-16", "utf-32", "utf-32-le", "utf-8-sig"]))
    elif edit == "surrogate":
        escape = data.draw(st.sampled_from(_SURROGATES), label="escape")
        where = data.draw(st.sampled_from(["name", "metadata key", "metadata value"]), label="where")
        if where == "name" and name:
            i = next(i for i, (k, _) in enumerate(header) if k == name)
            header[i] = (Raw(json.dumps(name)[:-1] + escape + '"'), header[i][1])
        else:
            key, value = (Raw(f'"k{escape}"'), "v") if where == "metadata key" else ("k", Raw(f'"v{escape}"'))
            meta = next((v for k, v in header if k == "__metadata__"), None)
            if isinstance(meta, Pairs):
                meta.append((key, value))
            else:
                header.insert(0, ("__metadata__", Pairs([(key, value)])))
    elif edit == "number" and entry is not None:
        what = data.draw(st.sampled_from(["shape", "data_offsets"]), label="field")
        values = _entry(entry, what)
        values = list(values) if isinstance(values, list) else []
        if values:
            i = data.draw(st.integers(0, len(values) - 1), label="index")
            values[i] = _token(data, values[i])
            _set_field(entry, what, values)
    elif edit == "duplicate" and entry is not None:
        copy = Pairs(entry)
        offsets = _entry(entry, "data_offsets")
        if data.draw(st.booleans(), label="empty copy") and isinstance(offsets, list) and offsets:
            begin = offsets[0]
            copy = Pairs([("dtype", "U8"), ("shape", [0]), ("data_offsets", [begin, begin])])
        header.insert(data.draw(st.integers(0, len(header)), label="at"), (name, copy))
    elif edit == "whitespace":
        before = data.draw(st.sampled_from(_WHITESPACE), label="before") * data.draw(st.integers(0, 3))
        after = data.draw(st.sampled_from(_WHITESPACE), label="after") * data.draw(st.integers(0, 9))
        return Raw(before + _json(header) + after), payload, encoding, delta
    elif edit == "shape":
        dims = data.draw(st.lists(st.sampled_from([0, 1, 3, 2**31, 2**32, 2**62, 2**63, 2**64, 2**65]), min_size=1,
                                  max_size=3), label="dims")  # fmt: skip
        if 0 not in dims:
            dims.append(0)
        dtype = data.draw(st.sampled_from(["F32", "U8", "F64", "BF16", "BOOL"]), label="dtype")
        end = len(payload)
        header.append(("e0", Pairs([("dtype", dtype), ("shape", dims), ("data_offsets", [end, end])])))
    elif edit == "metadata":
        value = data.draw(st.sampled_from([None, 1, "x", [], Pairs(), Pairs([("format", 1)]), Pairs([("f", None)]),
                                           Pairs([("f", True)]), Pairs([("f", Pairs())]),
                                           Pairs([("f", "a"), ("f", "b")]), Pairs([("", "")])]),
                          label="metadata")  # fmt: skip
        header = Pairs([(k, v) for k, v in header if k != "__metadata__"])
        if data.draw(st.booleans(), label="set"):
            header.insert(data.draw(st.integers(0, len(header))), ("__metadata__", value))
    elif edit == "field" and entry is not None:
        if data.draw(st.booleans(), label="add"):
            entry.append((data.draw(st.sampled_from(["x", "dtype", "shape", "data_offsets", "DTYPE"])),
                          data.draw(st.sampled_from([None, 1, "F32", [0, 0], [], Pairs()]))))  # fmt: skip
        elif entry:
            del entry[data.draw(st.integers(0, len(entry) - 1))]
    elif edit == "dtype" and entry is not None:
        _set_field(entry, "dtype", data.draw(st.sampled_from(["F32", "I32", "U32", "F16", "BF16", "I16", "U16", "U8",
                                                              "I8", "BOOL", "F64", "I64", "U64", "f32", "F8_E4M3",
                                                              "F8_E5M2", "C64", "F4", ""])))  # fmt: skip
    elif edit == "length":
        delta = data.draw(st.sampled_from([-2, -1, 1, 2, 8]), label="length delta")
    elif edit == "data":
        payload = _mutate(payload, data.draw(_mutations(len(payload)), label="data bytes"))
    elif edit == "drop" and name:
        header = Pairs([(k, v) for k, v in header if k != name])
    return header, payload, encoding, delta


@fuzz(200)
@given(seed=st.sampled_from(list(ST_SEEDS)), data=st.data())
def test_fuzz_safetensors_header(tmp_path, seed, data):
    """Structured header edits: encodings, surrogate escapes, numbers in other forms, duplicates, whitespace,
    zero-and-huge shapes, metadata of other types, fields added or dropped, dtypes, the length field, data."""
    header, payload = _st_parts(ST_SEEDS[seed])
    encoding, delta = "utf-8", 0
    for _ in range(data.draw(st.integers(1, 3), label="edits")):
        if isinstance(header, Raw):
            break
        header, payload, new_encoding, new_delta = _edit_st_header(data, header, payload)
        encoding, delta = (new_encoding if new_encoding != "utf-8" else encoding), delta + new_delta
    _run(_check_safetensors, tmp_path / "fuzz.safetensors", _st_file(header, payload, encoding, delta))


# ----------------------------------------------------------------------------------------------------------
# .npz


def _npz_bytes(compressed: bool = False, **arrays) -> bytes:
    buffer = io.BytesIO()
    (np.savez_compressed if compressed else np.savez)(buffer, **arrays)
    return buffer.getvalue()


def _npz_seeds() -> dict[str, bytes]:
    rng = np.random.default_rng(11)
    arrays = {"w": rng.standard_normal((2, 3)).astype(np.float32), "v": rng.standard_normal(4).astype(np.float16),
              "d": np.array(np.e), "e": np.zeros((0, 2), np.float32), "b": np.arange(3, dtype=">f4"),
              "f": np.asfortranarray(rng.standard_normal((2, 3)).astype(np.float32)),
              "n": np.frombuffer(b"\x01\x00\xc0\x7f\x00\x00\x80\xff", np.float32)}  # fmt: skip
    return {"savez": _npz_bytes(**arrays), "compressed": _npz_bytes(True, w=arrays["w"], v=arrays["v"])}


NPZ_SEEDS = _npz_seeds()


def _npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


def _npy_parts(raw: bytes) -> tuple[tuple[int, int], str, bytes]:
    """(version, header text, array bytes) of a version 1/2 .npy."""
    version = (raw[6], raw[7])
    width = 2 if version == (1, 0) else 4
    length = int.from_bytes(raw[8 : 8 + width], "little")
    return version, raw[8 + width : 8 + width + length].decode("latin-1"), raw[8 + width + length :]


def _npy_file(version: tuple[int, int], header: str, body: bytes, length_delta: int = 0, pad: bool = True) -> bytes:
    width = 2 if version[0] == 1 else 4
    text = header.rstrip("\n ")
    if pad:
        text += " " * ((-(8 + width + len(text) + 1)) % 64)
    encoded = (text + "\n").encode("utf-8" if version[0] >= 3 else "latin-1", "replace")
    length = max(len(encoded) + length_delta, 0) % 2 ** (8 * width)
    return b"\x93NUMPY" + bytes(version) + length.to_bytes(width, "little") + encoded + body


_W = np.arange(6, dtype=np.float32).reshape(2, 3)


def _npz(members: list[tuple[str, bytes]], **kwargs) -> bytes:
    return _build_zip([Member(name, data, descriptor=False, align=0) for name, data in members], **kwargs)


def _w_header(old: str, new: str, version=(1, 0)) -> bytes:
    _, header, body = _npy_parts(_npy(_W))
    return _npz([("w.npy", _npy_file(version, header.replace(old, new), body))])


NPZ_CASES = {
    **{f"seed {name}": raw for name, raw in NPZ_SEEDS.items()},
    "member without .npy": _npz([("w", _npy(_W))]),
    "w and w.npy": _npz([("w", _npy(_W)), ("w.npy", _npy(_W * 2))]),
    "w.npy and w": _npz([("w.npy", _npy(_W * 2)), ("w", _npy(_W))]),
    "w.npy twice": _npz([("w.npy", _npy(_W)), ("w.npy", _npy(_W * 2))]),
    "W.npy beside w.npy": _npz([("W.npy", _npy(_W)), ("w.npy", _npy(_W * 2))]),
    "w.NPY": _npz([("w.NPY", _npy(_W))]),
    "w.npy and w.npy.npy (np.load's 'w.npy' is the member w.npy)": _npz([("w.npy", _npy(_W)),
                                                                         ("w.npy.npy", _npy(_W[0]))]),
    "dir/w.npy": _npz([("dir/w.npy", _npy(_W))]),
    "a member that is not .npy": _npz([("w.npy", _npy(_W)), ("notes.txt", b"hello")]),
    "big-endian": _npz([("w.npy", _npy(_W.astype(">f4")))]),
    "Fortran order": _npz([("w.npy", _npy(np.asfortranarray(_W)))]),
    "version 2.0": _w_header("", "", (2, 0)),
    "version 3.0": _w_header("", "", (3, 0)),
    "version 1.1": _w_header("", "", (1, 1)),
    "shape (3, 2)": _w_header("(2, 3)", "(3, 2)"),
    "shape (5,) (short)": _w_header("(2, 3)", "(5,)"),
    "shape (0, 2**40)": _w_header("(2, 3)", "(0, 1099511627776)"),
    "shape (True, 6)": _w_header("(2, 3)", "(True, 6)"),
    "shape (-1, 6)": _w_header("(2, 3)", "(-1, 6)"),
    "fortran_order True": _w_header("False", "True"),
    "fortran_order 1": _w_header("False", "1"),
    "descr >f4": _w_header("<f4", ">f4"),
    "descr <f2": _w_header("<f4", "<f2"),
    "descr 'float32'": _w_header("'<f4'", "'float32'"),
    "descr <i4": _w_header("<f4", "<i4"),
    "descr |V4": _w_header("'<f4'", "'|V4'"),
    "descr [('x', '<f4')]": _w_header("'<f4'", "[('x', '<f4')]"),
    "descr ('<f2', (2,))": _w_header("'<f4'", "('<f2', (2,))"),
    "header with an extra key": _w_header("}", "'x': 1, }"),
    "header with an unclosed parenthesis": _w_header("(2, 3)", "(2, 3"),
    "array bytes cut": _npz([("w.npy", _npy(_W)[:-4])]),
    "array bytes trailing": _npz([("w.npy", _npy(_W) + b"junk")]),
    "junk prepended": b"JUNK" + NPZ_SEEDS["savez"],
    ".npy magic prepended": _npy(_W) + NPZ_SEEDS["savez"],
    "PK\\3\\4 junk prepended": b"PK\x03\x04" + bytes(40) + NPZ_SEEDS["savez"],
    "another npz appended": NPZ_SEEDS["savez"] + NPZ_SEEDS["compressed"],
    "data CRC wrong": _build_zip([Member("w.npy", _npy(_W), central={"crc": 1}, descriptor=False)]),
    "central compressed size != size": _build_zip([Member("w.npy", _npy(_W), descriptor=False,
                                                          central={"usize": len(_npy(_W)) + 8})]),  # fmt: skip
    "ZIP64 everywhere": _build_zip([Member("w.npy", _npy(_W), zip64="both", descriptor=False)], zip64_end=True),
    "empty archive": _npz([]),
}  # fmt: skip


@pytest.mark.parametrize("case", list(NPZ_CASES))
def test_npz_case(tmp_path, case):
    _run(_check_npz, tmp_path / "case.npz", NPZ_CASES[case])


@fuzz(150)
@given(seed=st.sampled_from(list(NPZ_SEEDS)), data=st.data())
def test_fuzz_npz_bytes(tmp_path, seed, data):
    raw = NPZ_SEEDS[seed]
    _run(_check_npz, tmp_path / "fuzz.npz", _mutate(raw, data.draw(_mutations(len(raw)))))


_SHAPES = ["()", "(0,)", "(6,)", "(3, 2)", "(2, 3, 1)", "(1, 2, 3)", "(0, 1099511627776)", "(4611686018427387904, 0)",
           "(-1, 6)", "(True, 6)", "(2.0, 3)", "[2, 3]", "(2, 3)"]  # fmt: skip
_DESCRS = ["'<f4'", "'>f4'", "'<f2'", "'>f2'", "'<f8'", "'>f8'", "'|f4'", "'=f4'", "'<i4'", "'|V4'", "'float32'",
           "'e'", "'d'", "'<c8'", "'<f16'", "[('x', '<f4')]", "('<f4', (2,))", "'O'", "'|b1'", "'<M8[s]'",
           "'S4'"]  # fmt: skip


def _edit_npz(data, members: list[Member]) -> list[Member]:
    edit = data.draw(st.sampled_from(["rename", "copy", "remove", "reorder", "npy header", "npy data", "zip header"]),
                     label="npz edit")  # fmt: skip
    if not members:
        return [Member("w.npy", _npy(_W), descriptor=False, align=0)]
    i = data.draw(st.integers(0, len(members) - 1), label="member")
    name = str(members[i].name)
    if edit == "rename":
        new = data.draw(st.sampled_from([name.removesuffix(".npy"), name.upper(), "dir/" + name, name + ".npy",
                                         str(members[(i + 1) % len(members)].name), name.replace(".npy", ".NPY"),
                                         name.removesuffix(".npy") + ".npz", "/" + name, "../" + name]))  # fmt: skip
        members[i] = replace(members[i], name=new)
    elif edit == "copy":
        new = data.draw(st.sampled_from([name, name.removesuffix(".npy"), name.upper()]), label="as")
        members.insert(data.draw(st.integers(0, len(members))), replace(members[i], name=new))
    elif edit == "remove":
        del members[i]
    elif edit == "reorder":
        order = data.draw(st.permutations(range(len(members))), label="order")
        members = [members[j] for j in order]
    elif edit == "npy header" and members[i].data[:6] == b"\x93NUMPY" and members[i].data[6] in (1, 2):
        version, header, body = _npy_parts(members[i].data)
        what = data.draw(st.sampled_from(["shape", "descr", "fortran", "version", "extra key", "length", "padding"]))
        delta, pad = 0, True
        if what == "shape":  # (an earlier edit of the bytes may have broken the header: then it stays)
            shape = data.draw(st.sampled_from(_SHAPES))
            header = re.sub(r"'shape': \([^)]*\)", lambda _: f"'shape': {shape}", header, count=1)
        elif what == "descr":
            descr = data.draw(st.sampled_from(_DESCRS))
            pattern = r"'descr': ('[^']*'|\[[^\]]*\]|\([^)]*\)\))"
            header = re.sub(pattern, lambda _: f"'descr': {descr}", header, count=1)
        elif what == "fortran":
            value = data.draw(st.sampled_from(["True", "False", "1", "0", "None", "'yes'"]))
            header = header.replace("False", value).replace("True", value)
        elif what == "version":
            version = data.draw(st.sampled_from([(1, 0), (2, 0), (3, 0), (1, 1), (0, 0), (255, 0)]))
        elif what == "extra key":
            header = header.replace("}", data.draw(st.sampled_from(["'x': 1, }", "'shape': (1,), }", " }"])))
        elif what == "length":
            delta = data.draw(st.sampled_from([-2, -1, 1, 4, 64]))
        else:
            pad = False
        members[i] = replace(members[i], data=_npy_file(version, header, body, delta, pad))
    elif edit == "npy data":
        members[i] = replace(members[i], data=_mutate(members[i].data, data.draw(_mutations(len(members[i].data)))))
    else:
        members[i] = _edit_header(data, members[i])
    return members


@fuzz(200)
@given(seed=st.sampled_from(list(NPZ_SEEDS)), data=st.data())
def test_fuzz_npz_structure(tmp_path, seed, data):
    """Members renamed, copied, removed, reordered; .npy headers edited (shape, dtype, order, version, length);
    array bytes; zip header fields; bytes around the archive."""
    members = [replace(m, descriptor=False, align=0) for m in _members_of(NPZ_SEEDS[seed])]
    for _ in range(data.draw(st.integers(1, 3), label="edits")):
        members = _edit_npz(data, members)
    archive = _build_zip(members)
    where = data.draw(
        st.sampled_from(["none"] * 8 + ["junk before", "npy before", "junk after", "npz after"]), label="around"
    )
    junk = data.draw(st.binary(min_size=1, max_size=20), label="junk")
    archive = {"none": archive, "junk before": junk + archive, "npy before": _npy(_W) + archive,
               "junk after": archive + junk, "npz after": archive + NPZ_SEEDS["savez"]}[where]  # fmt: skip
    _run(_check_npz, tmp_path / "fuzz.npz", archive)
