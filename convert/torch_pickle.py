"""Read a PyTorch `pytorch_model.bin` without torch and without running pickle's code.

A torch checkpoint is a zip of `data.pkl` plus one raw file per storage. `data.pkl` is run by pickle_machine's
`Machine`, never by an unpickler. Storages are read once, each checked against its zip member, and every tensor's
offset, size and stride against its storage before a view is made. Tensors come back as numpy arrays (bfloat16
widened to float32).
"""

from __future__ import annotations

import collections
import io
import logging
import lzma
import math
import re
import zipfile
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np

from mlx_vit.errors import CheckpointError, shown
from mlx_vit.files import open_regular

from .pickle_machine import STORAGE_DTYPES, Machine, Refused, StorageRef, Tensor
from .safetensors_io import bf16_to_f32, check_budget
from .zip_archive import LOCAL_MAGIC, check_archive, folded

log = logging.getLogger(__name__)

# A state dict's data.pkl is ~150 bytes a tensor: a ViT-G/14 (~900 tensors) is ~140 kB. This stops a pickle built
# to exhaust memory or time long before either runs out (pickle_machine.MAX_OPERATIONS bounds its opcodes).
MAX_PICKLE_BYTES = 16 * 2**20
# Tensors (and compressed storages) may add up to at most this many times the file's size: honest checkpoints
# hold each byte once; tied weights view one storage twice.
MAX_INFLATION = 2
_READ_PIECE = 16 * 2**20
# The archive format versions torch 2.14's reader takes (caffe2's kMinSupportedFileFormatVersion and kMax...).
MIN_VERSION, MAX_VERSION = 1, 10
# What reading a crafted zip archive can raise: besides malformed structures, encrypted members, unsupported or
# corrupt compression. Every reader of a zip (this one, jax_npz) turns these into one line.
ARCHIVE_ERRORS = (zipfile.BadZipFile, EOFError, ValueError, TypeError, IndexError, KeyError, AttributeError,
                  RecursionError, MemoryError, OverflowError, RuntimeError, OSError, zlib.error, lzma.LZMAError,
                  NotImplementedError)  # fmt: skip


class _Storages:
    """Reads each storage once, checked against its zip member, within the file's byte budget."""

    def __init__(self, archive: zipfile.ZipFile, record, byteorder: str, budget: int, uses: dict[str, int]):
        self.archive, self.record, self.byteorder, self.budget = archive, record, byteorder, budget
        self.uses = uses  # tensors per storage: a storage only one tensor views is handed over without a copy
        self.arrays: dict[str, np.ndarray] = {}

    def charge(self, nbytes: int) -> None:
        self.budget -= nbytes
        if self.budget < 0:
            raise Refused(
                f"its tensors would take more than {MAX_INFLATION}x the file's size (storages compressed, or "
                "viewed by many tensors)"
            )

    def array(self, ref: StorageRef) -> np.ndarray:
        if ref.key not in self.arrays:
            dtype = np.dtype(STORAGE_DTYPES[ref.type_name]).newbyteorder("<" if self.byteorder == "little" else ">")
            info = self.record(f"data/{ref.key}")
            if info.compress_type != zipfile.ZIP_STORED:  # torch.save never compresses: these bytes are extra
                self.charge(ref.numel * dtype.itemsize)
            array = np.empty(ref.numel, dtype=dtype)  # exactly the declared elements, 1-d
            into = memoryview(array).cast("B")
            with self.archive.open(info) as f:
                # In pieces: a zip member's readinto reads the whole request into a temporary copy first.
                for start in range(0, len(into), _READ_PIECE):
                    piece = into[start : start + _READ_PIECE]
                    if f.readinto(piece) != len(piece):
                        raise Refused(f"storage {shown(ref.key)!r} is shorter than its directory entry says")
            self.arrays[ref.key] = array if dtype.isnative else array.astype(dtype.newbyteorder("="))
        return self.arrays[ref.key]

    def tensor(self, tensor: Tensor) -> np.ndarray:
        data = self.array(tensor.storage)
        size, stride, offset = tensor.size, tensor.stride, tensor.offset
        if 0 in size:
            array = np.zeros(size, dtype=data.dtype)
        else:
            self.charge(math.prod(size) * data.itemsize)
            # Bounds were checked against this very storage (_rebuild_tensor), and `data` is the 1-d array of
            # exactly the `numel` elements persistent_load checked against the archive: the view stays inside it.
            view = np.lib.stride_tricks.as_strided(
                data[offset:], shape=size, strides=[st * data.itemsize for st in stride], writeable=False
            )
            shared = self.uses[tensor.storage.key] > 1
            array = (
                np.array(view) if shared or not view.flags.c_contiguous else data[offset:][: view.size].reshape(size)
            )
        return bf16_to_f32(array) if tensor.storage.type_name == "BFloat16Storage" else array


def _read_member(archive: zipfile.ZipFile, info: zipfile.ZipInfo, limit: int, name: str) -> bytes:
    if info.file_size > limit:
        raise CheckpointError(f"{name}: {shown(info.filename)} is {info.file_size} bytes (limit {limit})")
    with archive.open(info) as f:
        raw = f.read(limit + 1)
    if len(raw) > limit:
        raise CheckpointError(f"{name}: {shown(info.filename)} is over {limit} bytes")
    return raw


# Finds the state dict in what a checkpoint file holds, and says which part it took ("" for the whole file).
Choose = Callable[[object], tuple[object, str]]


def state_dict(state: object) -> tuple[object, str]:
    """The object a checkpoint file must be for transformers (and the choice `read_torch_bin` makes by default):
    a state dict itself, nothing unwrapped. Readers with other rules (timm's) pass their own `choose`."""
    return state, ""


def chosen(state: object, choose: Choose, kind: type, name: str) -> dict:
    """The state dict `choose` finds in what a file holds, checked to map names to tensors (`kind`: the machine's
    stand-ins, or arrays); which part of the file it took is logged where it was not the whole."""
    state, taken = choose(state)
    if not (isinstance(state, dict) and all(isinstance(k, str) and isinstance(v, kind) for k, v in state.items())):
        raise CheckpointError(f"{name}: does not hold a state dict of named tensors")
    if taken:
        log.info("%s: read its %s, as the checkpoint's own loader would", name, taken)
    return state


def read_torch_bin(path: str | Path, choose: Choose = state_dict, budget: int | None = None
                   ) -> dict[str, np.ndarray]:  # fmt: skip
    """Tensors of a torch.save()d state dict (zip format), as numpy arrays, exactly as torch.load reads them, or
    CheckpointError. Never imports torch. `choose` picks the state dict in what the file holds (a training
    checkpoint's), as the reference reader for the format does, and says which it took ("" for the whole); its
    storages may take at most `budget` bytes together (checked before any is read)."""
    path = Path(path)
    name = shown(path)
    with open_regular(path, CheckpointError) as file:
        size = file.seek(0, io.SEEK_END)
        file.seek(0)
        if file.read(4) != LOCAL_MAGIC:  # torch.load's own test: anything else is its legacy format
            raise CheckpointError(
                f"{name}: not a zip-format PyTorch checkpoint (the legacy format is refused: it cannot be read "
                "without running its pickle); re-save it with torch>=1.6 or convert it to safetensors"
            )
        try:
            with zipfile.ZipFile(file) as archive:
                members = check_archive(file, archive, size, name)
                return _read_archive(archive, members, name, size, choose, budget)
        except Refused as error:
            raise CheckpointError(f"{name}: unsafe or malformed pickle: {error}") from None
        except ARCHIVE_ERRORS as error:
            reason = shown(f"{type(error).__name__}: {error}", 200)
            raise CheckpointError(f"{name}: malformed PyTorch checkpoint ({reason})") from None


def _read_archive(archive: zipfile.ZipFile, members: dict[str, zipfile.ZipInfo], name: str, size: int,
                  choose, budget: int | None) -> dict[str, np.ndarray]:  # fmt: skip
    """torch's reader: records live in the folder of the directory's first member, found without regard to case;
    `version` (`.data/version` first) must be a version it reads, `byteorder` exactly little or big."""
    first = archive.infolist()[0].filename
    if "/" not in first:
        raise CheckpointError(f"{name}: its first member '{shown(first, 80)}' is not in a folder (not torch.save's)")
    folder = first[: first.index("/") + 1]
    outside = next((info.filename for info in archive.infolist() if not info.filename.startswith(folder)), None)
    if outside is not None:
        raise CheckpointError(f"{name}: member '{shown(outside, 80)}' is outside its folder {shown(folder, 60)}")
    if folder + "constants.pkl" in archive.namelist():
        raise CheckpointError(f"{name}: is a TorchScript archive, not a torch.save state dict")

    def record(member: str) -> zipfile.ZipInfo | None:
        return members.get(folded(folder + member))

    version = record(".data/version") or record("version")
    if version is None:
        raise CheckpointError(f"{name}: has no version record (not torch.save's)")
    number = _version(_read_member(archive, version, 64, name))
    if number is None or not MIN_VERSION <= number <= MAX_VERSION:
        raise CheckpointError(f"{name}: its format version is not one torch {MIN_VERSION}..{MAX_VERSION} reads")
    byteorder = "little"
    if (order := record("byteorder")) is not None:
        byteorder = _read_member(archive, order, 16, name).decode("ascii", "replace")
    if byteorder not in ("little", "big"):
        raise CheckpointError(f"{name}: unknown byte order {shown(byteorder, 40, quote=True)}")
    if (identity := record(".data/serialization_id")) is not None:
        try:
            _read_member(archive, identity, 1024, name).decode("utf-8")  # torch.load decodes it, and fails so
        except UnicodeDecodeError:
            raise CheckpointError(f"{name}: its .data/serialization_id is not text") from None
    if (alignment := record(".storage_alignment")) is not None:
        try:
            int(_read_member(archive, alignment, 64, name))  # torch.load reads it so, and refuses what fails
        except ValueError:
            raise CheckpointError(f"{name}: its .storage_alignment is not a number") from None
    pickled = record("data.pkl")
    if pickled is None:
        raise CheckpointError(f"{name}: has no {shown(folder, 60)}data.pkl (not torch.save's)")
    state = chosen(Machine(record).run(_read_member(archive, pickled, MAX_PICKLE_BYTES, name)), choose, Tensor, name)
    used = {tensor.storage.key: tensor.storage for tensor in state.values()}
    check_budget(sum(ref.numel * np.dtype(STORAGE_DTYPES[ref.type_name]).itemsize for ref in used.values()), budget,
                 name)  # fmt: skip
    uses = collections.Counter(tensor.storage.key for tensor in state.values())
    storages = _Storages(archive, record, byteorder, MAX_INFLATION * size, uses)
    return {key: storages.tensor(tensor) for key, tensor in state.items()}


def _version(raw: bytes) -> int | None:
    """A version record as torch's reader parses it (C++ stoull): leading spaces, digits, anything after them
    ignored; None where it finds no digits, or a sign (stoull wraps "-1" to 2**64 - 1)."""
    digits = re.match(rb"[ \t\n\v\f\r]*\+?([0-9]+)", raw)  # the record is at most 64 bytes (_read_member)
    number = int(digits.group(1)) if digits else None
    return number if number is not None and number < 2**64 else None  # stoull's out_of_range
