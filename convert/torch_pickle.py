"""Read a PyTorch `pytorch_model.bin` without torch and without running pickle's code.

A torch checkpoint is a zip of `data.pkl` plus one raw file per storage. `data.pkl` is run by pickle_machine's
`Machine`, never by an unpickler. Storages are read once, each checked against its zip member, and every tensor's
offset, size and stride against its storage before a view is made. Tensors come back as numpy arrays (bfloat16
widened to float32).
"""

from __future__ import annotations

import collections
import io
import lzma
import math
import zipfile
import zlib
from pathlib import Path

import numpy as np

from mlx_vit.errors import CheckpointError, shown
from mlx_vit.files import open_regular

from .pickle_machine import STORAGE_DTYPES, Machine, Refused, StorageRef, Tensor
from .safetensors_io import bf16_to_f32

# A state dict's data.pkl is ~150 bytes a tensor: a ViT-G/14 (~900 tensors) is ~140 kB. This stops a pickle built
# to exhaust memory or time long before either runs out (pickle_machine.MAX_OPERATIONS bounds its opcodes).
MAX_PICKLE_BYTES = 16 * 2**20
# Tensors (and compressed storages) may add up to at most this many times the file's size: honest checkpoints
# hold each byte once; tied weights view one storage twice.
MAX_INFLATION = 2
_READ_PIECE = 16 * 2**20
# What reading a crafted zip archive can raise: besides malformed structures, encrypted members, unsupported or
# corrupt compression. Every reader of a zip (this one, jax_npz) turns these into one line.
ARCHIVE_ERRORS = (zipfile.BadZipFile, EOFError, ValueError, TypeError, IndexError, KeyError, AttributeError,
                  RecursionError, MemoryError, OverflowError, RuntimeError, OSError, zlib.error, lzma.LZMAError,
                  NotImplementedError)  # fmt: skip


class _Storages:
    """Reads each storage once, checked against its zip member, within the file's byte budget."""

    def __init__(self, archive: zipfile.ZipFile, prefix: str, byteorder: str, budget: int, uses: dict[str, int]):
        self.archive, self.prefix, self.byteorder, self.budget = archive, prefix, byteorder, budget
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
            info = self.archive.getinfo(f"{self.prefix}data/{ref.key}")
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


def _read_member(archive: zipfile.ZipFile, member: str, limit: int, name: str) -> bytes:
    info = archive.getinfo(member)
    if info.file_size > limit:
        raise CheckpointError(f"{name}: {shown(member)} is {info.file_size} bytes (limit {limit})")
    with archive.open(info) as f:
        raw = f.read(limit + 1)
    if len(raw) > limit:
        raise CheckpointError(f"{name}: {shown(member)} is over {limit} bytes")
    return raw


def _state_dict(state: object) -> dict[str, Tensor] | None:
    for key in ("model", "state_dict"):  # a training checkpoint's weights (DeiT's releases hold {"model": ...})
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if isinstance(state, dict) and all(isinstance(k, str) and isinstance(v, Tensor) for k, v in state.items()):
        return state
    return None


def read_torch_bin(path: str | Path) -> dict[str, np.ndarray]:
    """Tensors of a torch.save()d state dict (zip format), as numpy arrays. Never imports torch."""
    path = Path(path)
    name = shown(path)
    with open_regular(path, CheckpointError) as file:
        size = file.seek(0, io.SEEK_END)
        try:
            is_zip = zipfile.is_zipfile(file)
        except zipfile.BadZipFile as error:  # is_zipfile raises this for some end records (multi-disk) itself
            raise CheckpointError(f"{name}: malformed PyTorch checkpoint (BadZipFile: {shown(error)})") from None
        if not is_zip:
            raise CheckpointError(
                f"{name}: not a zip-format PyTorch checkpoint (the legacy format is refused: it cannot be read "
                "without running its pickle); re-save it with torch>=1.6 or convert it to safetensors"
            )
        try:
            with zipfile.ZipFile(file) as archive:
                return _read_archive(archive, name, size)
        except Refused as error:
            raise CheckpointError(f"{name}: unsafe or malformed pickle: {error}") from None
        except ARCHIVE_ERRORS as error:
            reason = shown(f"{type(error).__name__}: {error}", 200)
            raise CheckpointError(f"{name}: malformed PyTorch checkpoint ({reason})") from None


def check_members(archive: zipfile.ZipFile, name: str) -> None:
    """Refuse an archive holding one member name twice: torch and numpy read the first, zipfile the last."""
    counts = collections.Counter(archive.namelist())
    twice = next((member for member, count in counts.items() if count > 1), None)
    if twice is not None:
        raise CheckpointError(f"{name}: the archive holds '{shown(twice, 80)}' twice")


def _read_archive(archive: zipfile.ZipFile, name: str, size: int) -> dict[str, np.ndarray]:
    check_members(archive, name)
    pickles = [n for n in archive.namelist() if n.endswith("data.pkl") and n.count("/") == 1]
    if len(pickles) != 1:
        raise CheckpointError(f"{name}: expected one data.pkl in the archive, found {len(pickles)}")
    prefix = pickles[0][: -len("data.pkl")]
    byteorder = "little"
    if f"{prefix}byteorder" in archive.namelist():
        byteorder = _read_member(archive, f"{prefix}byteorder", 16, name).decode(errors="replace").strip()
    if byteorder not in ("little", "big"):
        raise CheckpointError(f"{name}: unknown byte order {shown(byteorder)!r}")
    pickled = _read_member(archive, pickles[0], MAX_PICKLE_BYTES, name)
    state = _state_dict(Machine(archive, prefix).run(pickled))
    if state is None:
        raise CheckpointError(f"{name}: does not hold a state dict of named tensors")
    uses = collections.Counter(tensor.storage.key for tensor in state.values())
    storages = _Storages(archive, prefix, byteorder, MAX_INFLATION * size, uses)
    return {key: storages.tensor(tensor) for key, tensor in state.items()}
