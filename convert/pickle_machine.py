"""The stack machine that reads a torch `data.pkl` without Python's unpickler (see torch_pickle for the file).

Python's unpickler runs whatever a pickle names, and even with an allowlist it leaves doors open (copyreg's
extension cache, BUILD on the objects it hands out, memo indices that allocate, integers it parses differently
from pickletools). So no unpickler ever sees the file: `pickletools.genops` parses it (a pickle it cannot parse
is refused), and `Machine` runs only the opcodes torch.load's weights-only reader reads (protocol 2's, which
torch.save writes; no framing, no short forms, no STACK_GLOBAL: torch.load refuses those). Its only globals are
stand-ins of our own for torch's tensor-rebuild functions and storage types (plus `collections.OrderedDict`);
every object it builds is a plain value or frozen; it stops after MAX_OPERATIONS opcodes, and every tensor's
offset, size and stride is checked against its storage's declared size.
"""

from __future__ import annotations

import collections
import copyreg
import math
import pickle
import pickletools
import struct
import warnings
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from mlx_vit.errors import shown

# A state dict's data.pkl is ~25 opcodes a tensor: a ViT-G/14 (~900 tensors) is ~25,000. This stops a pickle
# built to exhaust memory or time long before either runs out.
MAX_OPERATIONS = 1_000_000

STORAGE_DTYPES = {
    "FloatStorage": np.float32, "DoubleStorage": np.float64, "HalfStorage": np.float16,
    "BFloat16Storage": np.uint16, "LongStorage": np.int64, "IntStorage": np.int32,
    "ShortStorage": np.int16, "CharStorage": np.int8, "ByteStorage": np.uint8, "BoolStorage": np.bool_,
}  # fmt: skip


_FLOATING = {"FloatStorage", "DoubleStorage", "HalfStorage", "BFloat16Storage"}


class Refused(Exception):
    """The pickle does something a state dict does not; the message says what."""


@dataclass(frozen=True, eq=False)
class _StorageType:
    name: str

    def __repr__(self) -> str:
        return f"torch.{self.name}"


@dataclass(frozen=True, eq=False)
class _Global:
    """An allowlisted global: REDUCE calls `function` with the pickle's arguments."""

    name: str
    function: Any

    def __repr__(self) -> str:
        return self.name


@dataclass(frozen=True, eq=False)
class StorageRef:
    """A storage named by a persistent id: its zip member is checked at once, read only when a tensor needs it."""

    type_name: str
    key: str
    numel: int


@dataclass(frozen=True, eq=False)
class Tensor:
    """A tensor as torch pickles it: a checked view (offset, size, stride in elements) of a storage."""

    storage: StorageRef
    offset: int
    size: tuple[int, ...]
    stride: tuple[int, ...]


def rebuild_tensor(storage, offset=None, size=None, stride=None, *rest) -> Tensor:
    """torch._utils._rebuild_tensor's arguments (exactly four), every index checked against the storage."""
    if rest or not (isinstance(size, tuple) and isinstance(stride, tuple)):
        raise Refused("tensor with an invalid offset, size or stride")
    if not isinstance(storage, StorageRef):
        raise Refused("tensor rebuilt from something that is not a storage")
    if len(size) > 32:  # numpy 1.x's limit
        raise Refused(f"tensor with {len(size)} dimensions")
    if not all(type(v) is int for v in (offset, *size, *stride)) or offset < 0 or len(size) != len(stride):
        raise Refused("tensor with an invalid offset, size or stride")
    if any(v.bit_length() > 62 for v in (offset, *size, *stride)):  # before any arithmetic: a 16 MB int squares slowly
        raise Refused("tensor with an offset, size or stride past 2**62")
    if any(n < 0 for n in size) or any(st < 0 for st in stride):
        raise Refused("tensor with a negative size or stride")
    if 0 not in size:
        if math.prod(size) > storage.numel:  # stride-0 tricks: a tiny file must not ask for gigabytes
            raise Refused(f"tensor of {math.prod(size)} elements from a storage of {storage.numel}")
        last = offset + sum((n - 1) * st for n, st in zip(size, stride, strict=True))
        if last >= storage.numel:
            raise Refused(f"tensor reaches element {last} of a storage of {storage.numel}")
    return Tensor(storage, offset, size, stride)


def _gradient(tensor: Tensor, requires_grad) -> None:
    """torch sets requires_grad on what it rebuilds: only a bool, and True only on floating-point storage."""
    if type(requires_grad) is not bool:
        raise Refused("tensor with a requires_grad that is not true or false")
    if requires_grad and tensor.storage.type_name not in _FLOATING:
        raise Refused(f"a {tensor.storage.type_name} tensor that requires gradients (torch refuses it)")


def rebuild_tensor_v2(storage, offset, size, stride, requires_grad, backward_hooks, metadata=None) -> Tensor:
    """torch._utils._rebuild_tensor_v2's arguments: a tensor, without hooks or metadata (torch.save writes an empty
    OrderedDict and none; metadata would set flags on the tensor that no stand-in models)."""
    tensor = rebuild_tensor(storage, offset, size, stride)
    _gradient(tensor, requires_grad)
    _no_hooks(backward_hooks)
    if metadata not in (None, {}):
        raise Refused("tensor with metadata")
    return tensor


def _no_hooks(backward_hooks) -> None:
    if not (isinstance(backward_hooks, dict) and not backward_hooks):
        raise Refused("tensor with backward hooks")


def _rebuild_parameter(data, requires_grad, backward_hooks) -> Tensor:
    if not isinstance(data, Tensor):
        raise Refused("parameter rebuilt from something that is not a tensor")
    _gradient(data, requires_grad)
    _no_hooks(backward_hooks)
    return data


def _ordered_dict(*args) -> collections.OrderedDict:
    if args:
        raise Refused("OrderedDict called with arguments")
    return collections.OrderedDict()


_ALLOWED = {
    ("torch._utils", "_rebuild_tensor_v2"): _Global("torch._utils._rebuild_tensor_v2", rebuild_tensor_v2),
    ("torch._utils", "_rebuild_tensor"): _Global("torch._utils._rebuild_tensor", rebuild_tensor),
    ("torch._utils", "_rebuild_parameter"): _Global("torch._utils._rebuild_parameter", _rebuild_parameter),
    ("collections", "OrderedDict"): _Global("collections.OrderedDict", _ordered_dict),
    **{("torch", name): _StorageType(name) for name in STORAGE_DTYPES},
}

# Dictionary keys and set members are hashed and compared: only flat values, never a (deeply nested) tuple, and
# only values whose hashes a pickle cannot make collide (str and bytes hashes are keyed per process; an int below
# 2**61 - 1 is its own hash): keys that all hash alike make each insert scan all the others.
_KEY_TYPES = (str, int, bool, bytes, type(None))
_HASH_MODULUS = 2**61 - 1
# Opcodes that push a value as pickletools reads it: all, to name the globals a pickle spells with STACK_GLOBAL;
# the ones torch.load's weights-only reader reads (and the machine runs).
_PUSH = {"INT", "BININT", "BININT1", "BININT2", "LONG", "LONG1", "LONG4", "FLOAT", "BINFLOAT", "UNICODE",
         "BINUNICODE", "SHORT_BINUNICODE", "BINUNICODE8", "BINBYTES", "SHORT_BINBYTES", "BINBYTES8"}  # fmt: skip
_PUSH_VALUES = {"BININT", "BININT1", "BININT2", "LONG1", "BINFLOAT", "BINUNICODE"}
_CONSTANTS = {"NONE": None, "NEWTRUE": True, "NEWFALSE": False}
_TUPLES = {"TUPLE1": 1, "TUPLE2": 2, "TUPLE3": 3}
_MEMO_GETS = {"BINGET", "LONG_BINGET"}
_MEMO_PUTS = {"BINPUT", "LONG_BINPUT"}


def _parse(pickled: bytes) -> tuple[list[tuple[str, Any]], str | None]:
    """(opcode name, argument) for each opcode as pickletools reads them, and why it stopped early (or None).

    One parser decides what the opcodes are: the C unpickler reads some arguments differently (an integer
    written `I0x1`, for one), so a pickle that pickletools cannot read to its end is refused, never handed on.
    """
    operations: list[tuple[str, Any]] = []
    try:
        with warnings.catch_warnings():  # genops decodes STRING arguments, warning on odd escapes
            warnings.simplefilter("ignore", DeprecationWarning)
            for opcode, arg, _ in pickletools.genops(pickled):
                if len(operations) >= MAX_OPERATIONS:
                    return operations, f"over {MAX_OPERATIONS:,} operations, far more than a state dict needs"
                operations.append((opcode.name, arg))
    except (ValueError, EOFError, OverflowError, struct.error) as error:  # UnicodeDecodeError is a ValueError
        return operations, f"cannot be parsed ({shown(str(error) or type(error).__name__, 120)})"
    return operations, None


class Machine:
    """Runs a parsed pickle's opcodes on a stack of plain values and our frozen stand-ins."""

    def __init__(self, record: Callable[[str], zipfile.ZipInfo | None]):
        self.record = record  # the archive's member for a record name ("data/0"), as torch's reader finds it
        self.storages: dict[str, StorageRef] = {}
        self.stack: list = []
        self.marks: list[int] = []
        self.memo: dict[int, object] = {}

    def run(self, pickled: bytes) -> object:
        operations, unreadable = _parse(pickled)
        self.check_globals(operations)
        if unreadable:
            raise Refused(unreadable)
        for name, arg in operations:
            if name == "STOP":
                if len(self.stack) != 1 or self.marks:
                    raise Refused("the pickle ends with a malformed stack")
                return self.stack.pop()
            self.step(name, arg)
        raise Refused("the pickle has no STOP")  # _parse refuses that first

    def check_globals(self, operations: list[tuple[str, Any]]) -> None:
        """Refuse a global named anywhere in the pickle before anything runs (the run checks them again)."""
        strings: list = []  # the last values pushed, for STACK_GLOBAL's two names as pickle writes them
        for name, arg in operations:
            if name in ("GLOBAL", "INST"):
                self.find_global(*arg.partition(" ")[::2])
            elif name == "STACK_GLOBAL" and len(strings) == 2 and all(isinstance(v, str) for v in strings):
                self.find_global(*strings)
            if name not in ("PUT", "BINPUT", "LONG_BINPUT", "MEMOIZE"):
                strings = [*strings[-1:], arg if name in _PUSH else None]

    def pop(self):
        if not self.stack or (self.marks and len(self.stack) <= self.marks[-1]):
            raise Refused("malformed pickle: an operation found too few values")
        return self.stack.pop()

    def pop_mark(self) -> list:
        if not self.marks:
            raise Refused("malformed pickle: no MARK")
        start = self.marks.pop()
        items = self.stack[start:]
        del self.stack[start:]
        return items

    def top(self, kind: type | tuple[type, ...], what: str):
        if not self.stack or (self.marks and len(self.stack) <= self.marks[-1]):
            raise Refused("malformed pickle: an operation found too few values")
        value = self.stack[-1]
        if not isinstance(value, kind):
            raise Refused(f"malformed pickle: {what} on a {type(value).__name__}")
        return value

    def keys(self, items: list) -> list:
        for key in items:
            if not isinstance(key, _KEY_TYPES) or (type(key) is int and not -_HASH_MODULUS < key < _HASH_MODULUS):
                raise Refused(f"dictionary key or set member of type {type(key).__name__} ({shown(key, 40)})")
        return items

    def set_items(self, target: dict, items: list) -> None:
        if len(items) % 2:
            raise Refused("malformed pickle: a key without a value")
        target.update(zip(self.keys(items[::2]), items[1::2], strict=True))

    def step(self, name: str, arg) -> None:
        """One opcode, of those torch.load's weights-only reader reads (what torch.save writes); others refused."""
        stack = self.stack
        if name in _PUSH_VALUES:
            stack.append(arg)
        elif name in _CONSTANTS:
            stack.append(_CONSTANTS[name])
        elif name == "PROTO":
            if arg > pickle.HIGHEST_PROTOCOL:
                raise Refused(f"pickle protocol {arg}, which Python does not read")
        elif name == "MARK":
            self.marks.append(len(stack))
        elif name == "EMPTY_TUPLE":
            stack.append(())
        elif name == "TUPLE":
            stack.append(tuple(self.pop_mark()))
        elif name in _TUPLES:
            items = [self.pop() for _ in range(_TUPLES[name])]
            stack.append(tuple(reversed(items)))
        elif name == "EMPTY_LIST":
            stack.append([])
        elif name == "APPEND":
            value = self.pop()
            self.top(list, "APPEND").append(value)
        elif name == "APPENDS":
            items = self.pop_mark()
            self.top(list, "APPENDS").extend(items)
        elif name == "EMPTY_SET":
            stack.append(set())
        elif name == "EMPTY_DICT":
            stack.append({})
        elif name == "SETITEM":
            value, key = self.pop(), self.pop()
            self.set_items(self.top(dict, "SETITEM"), [key, value])
        elif name == "SETITEMS":
            items = self.pop_mark()
            self.set_items(self.top(dict, "SETITEMS"), items)
        elif name in _MEMO_GETS:
            if arg not in self.memo:
                raise Refused(f"malformed pickle: memo entry {shown(arg)} was never stored")
            stack.append(self.memo[arg])
        elif name in _MEMO_PUTS:
            if not 0 <= arg < MAX_OPERATIONS:  # each entry is an object made before: no pickle needs more
                raise Refused(f"malformed pickle: memo entry {shown(arg)}")
            self.memo[arg] = self.top(object, name)
        elif name == "GLOBAL":
            module, _, attribute = arg.partition(" ")
            stack.append(self.find_global(module, attribute))
        elif name == "REDUCE":
            args, function = self.pop(), self.pop()
            if not isinstance(function, _Global):
                raise Refused(f"refusing to call {shown(function, 80)} (only tensor rebuilds are called)")
            if not isinstance(args, tuple):
                raise Refused(f"malformed pickle: {function.name} called without an argument tuple")
            stack.append(function.function(*args))
        elif name == "BUILD":
            state, target = self.pop(), self.top(object, "BUILD")
            # torch pickles a module's state dict as an OrderedDict carrying `_metadata`; nothing reads it.
            if not (type(target) is collections.OrderedDict and isinstance(state, dict)):
                raise Refused(f"refusing to modify {shown(target, 80)}")
        elif name == "BINPERSID":
            stack.append(self.persistent_load(self.pop()))
        elif name in ("EXT1", "EXT2", "EXT4"):
            module, attribute = copyreg._inverted_registry.get(arg, ("?", f"extension code {arg}"))
            raise Refused(f"refusing global {shown(module)}.{shown(attribute)} (copyreg extension {arg})")
        elif name == "INST":
            module, _, attribute = arg.partition(" ")
            self.find_global(module, attribute)
            raise Refused(f"refusing to construct {module}.{attribute} (INST)")
        else:  # protocol 4's framing and short forms, OBJ, NEWOBJ, py2 strings, ...: torch.load refuses them too
            raise Refused(f"opcode {name}, which torch.load's weights-only reader does not read")

    def find_global(self, module: str, name: str):
        try:
            return _ALLOWED[(module, name)]
        except KeyError:
            raise Refused(
                f"refusing global {shown(module)}.{shown(name)} (not part of a tensor checkpoint; "
                "nothing was imported or run)"
            ) from None

    def persistent_load(self, pid) -> StorageRef:
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
            raise Refused(f"unexpected persistent id {shown(pid, 80)}")
        _, storage_type, key, _location, numel = pid
        if not isinstance(storage_type, _StorageType) or not isinstance(key, str) or type(numel) is not int:
            raise Refused("malformed storage reference")
        ref = self.storages.get(key)
        if ref is not None:
            if (ref.type_name, ref.numel) != (storage_type.name, numel):
                raise Refused(f"storage {shown(key)!r} is declared twice, with different types or sizes")
            return ref
        info = self.record(f"data/{key}")
        if info is None:
            raise Refused(f"storage {shown(key)!r} is missing from the archive")
        # Checked against the archive's directory before reading: a huge numel reads nothing. torch.load wants
        # the record to hold exactly the declared elements.
        itemsize = np.dtype(STORAGE_DTYPES[storage_type.name]).itemsize
        if numel < 0 or numel * itemsize != info.file_size:
            raise Refused(f"storage {shown(key)!r} has {info.file_size} bytes, {shown(numel, 40)} elements declared")
        self.storages[key] = ref = StorageRef(storage_type.name, key, numel)
        return ref
