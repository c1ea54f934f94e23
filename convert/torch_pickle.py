"""Read a PyTorch `pytorch_model.bin` without torch and without running pickle's code.

A torch checkpoint is a zip of `data.pkl` plus one raw file per storage. Unpickling is what runs code, so we
unpickle with an allowlist: the only globals that resolve are stand-ins of our own for torch's tensor-rebuild
functions and storage types (plus `collections.OrderedDict`); anything else is refused, naming the file and the
global, before it is imported. Tensors come back as numpy arrays (bfloat16 widened to float32).
"""

from __future__ import annotations

import collections
import copyreg
import io
import lzma
import math
import pickle
import pickletools
import re
import warnings
import zipfile
import zlib
from pathlib import Path

import numpy as np

from mlx_vit.errors import CheckpointError

from .safetensors_io import bf16_to_f32

# A state dict's data.pkl is kilobytes (one small record per tensor); this only stops a zip bomb.
MAX_PICKLE_BYTES = 100 * 1024 * 1024

STORAGE_DTYPES = {
    "FloatStorage": np.float32, "DoubleStorage": np.float64, "HalfStorage": np.float16,
    "BFloat16Storage": np.uint16, "LongStorage": np.int64, "IntStorage": np.int32,
    "ShortStorage": np.int16, "CharStorage": np.int8, "ByteStorage": np.uint8, "BoolStorage": np.bool_,
}  # fmt: skip


def shown(value: object, limit: int = 120) -> str:
    """A name from an untrusted file, safe for a one-line message: control characters escaped, length capped."""
    text = re.sub(r"[\x00-\x1f\x7f-\x9f]", lambda m: repr(m.group())[1:-1], str(value))
    return text if len(text) <= limit else text[: limit - 3] + "..."


class _Refuses:
    """Allowlisted objects are shared by every load: a pickle's BUILD must not change them for later files."""

    def __setstate__(self, state):
        raise pickle.UnpicklingError(f"refusing to modify {self!r}")


class _StorageType(_Refuses):
    def __init__(self, name: str):
        self.name = name
        self.dtype = np.dtype(STORAGE_DTYPES[name])

    def __repr__(self) -> str:
        return f"torch.{self.name}"


class _Callable(_Refuses):
    """An allowlisted global: calls `function`; BUILD on it is refused (a plain function's attributes could be
    set by a pickle)."""

    def __init__(self, name: str, function):
        self.name, self.function = name, function

    def __call__(self, *args):
        return self.function(*args)

    def __repr__(self) -> str:
        return self.name


class _Storage:
    def __init__(self, type_name: str, array: np.ndarray):
        self.type_name = type_name
        self.array = array


def _rebuild_tensor(storage, offset, size, stride, *_ignored) -> np.ndarray:
    """torch._utils._rebuild_tensor_v2's job on our storages, with every index checked."""
    if not isinstance(storage, _Storage):
        raise pickle.UnpicklingError("tensor rebuilt from something that is not a storage")
    if not (isinstance(size, (tuple, list)) and isinstance(stride, (tuple, list))):
        raise pickle.UnpicklingError("tensor with an invalid offset, size or stride")
    ints = (offset, *size, *stride)
    if not all(type(v) is int for v in ints) or offset < 0 or len(size) != len(stride):
        raise pickle.UnpicklingError("tensor with an invalid offset, size or stride")
    if any(s < 0 for s in size) or any(st < 0 for st in stride):
        raise pickle.UnpicklingError("tensor with a negative size or stride")
    if len(size) > 32:  # numpy 1.x's limit
        raise pickle.UnpicklingError(f"tensor with {len(size)} dimensions")
    data = storage.array
    if 0 in size:
        array = np.zeros(size, dtype=data.dtype)  # a ValueError for shapes numpy cannot make
    else:
        if math.prod(size) > data.size:  # stride-0 tricks: a tiny file must not ask for gigabytes
            raise pickle.UnpicklingError(f"tensor of {math.prod(size)} elements from a storage of {data.size}")
        last = offset + sum((n - 1) * st for n, st in zip(size, stride, strict=True))
        if last >= data.size:
            raise pickle.UnpicklingError(f"tensor reaches element {last} of a storage of {data.size}")
        view = np.lib.stride_tricks.as_strided(
            data[offset:], shape=size, strides=[st * data.itemsize for st in stride], writeable=False
        )
        array = np.array(view)
    return bf16_to_f32(array) if storage.type_name == "BFloat16Storage" else array


def _rebuild_parameter(data, *_ignored):
    return data


_ALLOWED = {
    ("torch._utils", "_rebuild_tensor_v2"): _Callable("torch._utils._rebuild_tensor_v2", _rebuild_tensor),
    ("torch._utils", "_rebuild_tensor"): _Callable("torch._utils._rebuild_tensor", _rebuild_tensor),
    ("torch._utils", "_rebuild_parameter"): _Callable("torch._utils._rebuild_parameter", _rebuild_parameter),
    ("collections", "OrderedDict"): _Callable("collections.OrderedDict", collections.OrderedDict),
    **{("torch", name): _StorageType(name) for name in STORAGE_DTYPES},
}

_EXTENSION_OPCODES = {"EXT1", "EXT2", "EXT4"}


def _refuse_extensions(pickled: bytes) -> None:
    """Refuse copyreg extension codes before unpickling.

    The C unpickler resolves an extension code through find_class, except when copyreg's process-wide cache
    already holds the object: that would bypass the allowlist, so these opcodes (which torch never writes)
    are refused outright.
    """
    try:
        with warnings.catch_warnings():  # genops decodes STRING arguments, warning on odd escapes
            warnings.simplefilter("ignore", DeprecationWarning)
            for opcode, code, _ in pickletools.genops(pickled):
                if opcode.name in _EXTENSION_OPCODES:
                    module, name = copyreg._inverted_registry.get(code, ("?", f"extension code {code}"))
                    raise pickle.UnpicklingError(
                        f"refusing global {shown(module)}.{shown(name)} (copyreg extension {code})"
                    )
    except ValueError:
        pass  # malformed from here on: the unpickler stops here too, after refusing any global before it


class _RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, file, archive: zipfile.ZipFile, prefix: str, byteorder: str):
        super().__init__(file)
        self.archive, self.prefix, self.byteorder = archive, prefix, byteorder
        self.storages: dict[str, _Storage] = {}

    def find_class(self, module: str, name: str):
        try:
            return _ALLOWED[(module, name)]
        except (KeyError, TypeError):
            raise pickle.UnpicklingError(
                f"refusing global {shown(module)}.{shown(name)} (not part of a tensor checkpoint; "
                "nothing was imported or run)"
            ) from None

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
            raise pickle.UnpicklingError(f"unexpected persistent id {shown(repr(pid), 80)}")
        _, storage_type, key, _location, numel = pid
        if not isinstance(storage_type, _StorageType) or not isinstance(key, str) or type(numel) is not int:
            raise pickle.UnpicklingError("malformed storage reference")
        if key not in self.storages:
            member = f"{self.prefix}data/{key}"
            try:
                info = self.archive.getinfo(member)
            except KeyError:
                raise pickle.UnpicklingError(f"storage {shown(key)!r} is missing from the archive") from None
            dtype = storage_type.dtype.newbyteorder("<" if self.byteorder == "little" else ">")
            # Checked against the archive's directory before reading: a huge numel reads nothing.
            if numel < 0 or numel * dtype.itemsize > info.file_size:
                raise pickle.UnpicklingError(
                    f"storage {shown(key)!r} has {info.file_size} bytes, {numel} elements declared"
                )
            with self.archive.open(info) as f:
                raw = f.read(numel * dtype.itemsize)
            if len(raw) != numel * dtype.itemsize:
                raise pickle.UnpicklingError(f"storage {shown(key)!r} is shorter than its directory entry says")
            array = np.frombuffer(raw, dtype=dtype, count=numel).astype(dtype.newbyteorder("="))
            self.storages[key] = _Storage(storage_type.name, array)
        return self.storages[key]


def _read_member(archive: zipfile.ZipFile, name: str, limit: int) -> bytes:
    info = archive.getinfo(name)
    if info.file_size > limit:
        raise CheckpointError(f"{archive.filename}: {shown(name)} is {info.file_size} bytes (limit {limit})")
    with archive.open(info) as f:
        return f.read(limit + 1)


def read_torch_bin(path: str | Path) -> dict[str, np.ndarray]:
    """Tensors of a torch.save()d state dict (zip format), as numpy arrays. Never imports torch."""
    path = Path(path)
    try:
        is_zip = zipfile.is_zipfile(path)
    except zipfile.BadZipFile as error:  # is_zipfile raises this for some end records (multi-disk) itself
        raise CheckpointError(f"{path}: malformed PyTorch checkpoint (BadZipFile: {error})") from None
    if not is_zip:
        raise CheckpointError(
            f"{path}: not a zip-format PyTorch checkpoint (the legacy format is refused: it cannot be read "
            "without running its pickle); re-save it with torch>=1.6 or convert it to safetensors"
        )
    try:
        with zipfile.ZipFile(path) as archive:
            pickles = [n for n in archive.namelist() if n.endswith("data.pkl") and n.count("/") == 1]
            if len(pickles) != 1:
                raise CheckpointError(f"{path}: expected one data.pkl in the archive, found {len(pickles)}")
            prefix = pickles[0][: -len("data.pkl")]
            byteorder = "little"
            if f"{prefix}byteorder" in archive.namelist():
                byteorder = _read_member(archive, f"{prefix}byteorder", 16).decode().strip()
            if byteorder not in ("little", "big"):
                raise CheckpointError(f"{path}: unknown byte order {shown(byteorder)!r}")
            pickled = _read_member(archive, pickles[0], MAX_PICKLE_BYTES)
            _refuse_extensions(pickled)
            state = _RestrictedUnpickler(io.BytesIO(pickled), archive, prefix, byteorder).load()
    except pickle.UnpicklingError as error:
        raise CheckpointError(f"{path}: unsafe or malformed pickle: {error}") from None
    except (zipfile.BadZipFile, EOFError, ValueError, TypeError, IndexError, KeyError, AttributeError,
            RecursionError, MemoryError, OverflowError,  # then: encrypted, unsupported or corrupt compression
            RuntimeError, OSError, zlib.error, lzma.LZMAError) as error:  # fmt: skip
        reason = shown(f"{type(error).__name__}: {error}", 200)
        raise CheckpointError(f"{path}: malformed PyTorch checkpoint ({reason})") from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(
        isinstance(k, str) and isinstance(v, np.ndarray) for k, v in state.items()
    ):
        raise CheckpointError(f"{path}: does not hold a state dict of named tensors")
    return dict(state)
