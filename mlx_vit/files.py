"""Opening and reading files that may be hostile: only regular files, every read bounded before it allocates.

A FIFO blocks `open` forever, `/dev/zero` never ends and a sparse file claims gigabytes it does not hold, so every
file mlx-vit reads (configs, manifests, weights, images) comes through `open_regular`, and every JSON file through
`read_json`, which caps its size and the number of values it may hold.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import secrets
import stat
from collections.abc import Iterable
from pathlib import Path
from typing import Any, BinaryIO

from mlx_vit.errors import ConfigError, MlxVitError, shown

# Real config files are kilobytes; the largest we know of is a timm or transformers config naming ImageNet-21k's
# 21,843 classes (~1 MB). A safetensors header is ~100 bytes a tensor.
MAX_JSON_BYTES = 16 * 2**20
# json.loads makes ~40-100 bytes of Python objects per value; a file of a million values is already absurd.
MAX_JSON_VALUES = 1_000_000

_KINDS = {stat.S_IFIFO: "a FIFO (named pipe)", stat.S_IFSOCK: "a socket", stat.S_IFCHR: "a character device",
          stat.S_IFBLK: "a block device", stat.S_IFDIR: "a folder"}  # fmt: skip


def refusal(path: str | os.PathLike, mode: int, wanted: str = "a file") -> str:
    """The line for a path that is not a regular file: what it is instead (a FIFO, a device, ...)."""
    return f"{shown(path)}: is {_KINDS.get(stat.S_IFMT(mode), 'not a regular file')}, not {wanted}"


def os_reason(error: OSError) -> str:
    """A short reason for an OSError, without the path (messages name the file themselves)."""
    if error.errno == errno.ENAMETOOLONG:
        return "file name too long"
    return shown(error.strerror or str(error) or type(error).__name__, 200)


def open_regular(path: str | os.PathLike, error: type[MlxVitError] = MlxVitError) -> BinaryIO:
    """Open `path` for reading if it is a regular file (after symlinks); raise `error` naming it otherwise.

    The kind is checked before opening (a device is never opened) and again on the open descriptor (the file
    cannot be swapped for a FIFO in between: the open itself does not block).
    """
    path = Path(path)
    name = shown(path)
    try:
        mode = os.stat(path).st_mode
        if not stat.S_ISREG(mode):
            raise error(refusal(path, mode))
        flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOCTTY", 0) | getattr(os, "O_BINARY", 0)
        fd = os.open(path, flags)
    except FileNotFoundError:
        raise error(f"{name}: no such file") from None
    except PermissionError:
        raise error(f"{name}: permission denied") from None
    except OSError as failure:  # ENAMETOOLONG, ELOOP, ENOTDIR, EIO ...
        raise error(f"{name}: cannot open ({os_reason(failure)})") from None
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise error(refusal(path, mode))
        if hasattr(os, "set_blocking"):
            os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def read_limited(
    path: str | os.PathLike, limit: int, error: type[MlxVitError] = MlxVitError, what: str = "file"
) -> bytes:
    """The bytes of a regular file of at most `limit` bytes; never reads (or allocates) more than limit + 1."""
    with open_regular(path, error) as f:
        try:
            raw = f.read(limit + 1)
        except OSError as failure:
            raise error(f"{shown(path)}: cannot read ({os_reason(failure)})") from None
    if len(raw) > limit:
        raise error(f"{shown(path)}: over {limit // 2**20} MiB, too large for a {what}")
    return raw


def _no_constant(name: str) -> None:
    raise ValueError(f"{name} is not a JSON number")


def parse_json(raw: bytes, source: str, error: type[MlxVitError] = ConfigError, object_pairs_hook=None) -> Any:
    """JSON from untrusted bytes: at most MAX_JSON_VALUES values, no NaN or Infinity, errors one line."""
    # Every value but the first follows a comma, a colon or an opening bracket (more if some are inside strings).
    values = raw.count(b",") + raw.count(b":") + raw.count(b"[") + raw.count(b"{")
    if values > MAX_JSON_VALUES:
        raise error(f"{source}: holds over {MAX_JSON_VALUES:,} JSON values, too many for a config")
    try:
        return json.loads(raw, parse_constant=_no_constant, object_pairs_hook=object_pairs_hook)
    except (ValueError, RecursionError) as failure:  # also UnicodeDecodeError, over-long ints, deep nesting
        raise error(f"{source}: not valid JSON ({shown(str(failure) or type(failure).__name__, 200)})") from None


def read_json(path: str | os.PathLike, error: type[MlxVitError] = ConfigError) -> dict[str, Any]:
    """A JSON object from a regular file of at most MAX_JSON_BYTES; `error` (one line naming it) otherwise."""
    source = shown(path)
    value = parse_json(read_limited(path, MAX_JSON_BYTES, error, "config file"), source, error)
    if not isinstance(value, dict):
        raise error(f"{source}: expected a JSON object")
    return value


def is_dir(path: str | os.PathLike) -> bool:
    """Path.is_dir without the OSError a name over 255 bytes raises (ENAMETOOLONG)."""
    try:
        return Path(path).is_dir()
    except OSError:
        return False


def exists(path: str | os.PathLike) -> bool:
    """Path.exists (a dangling symlink counts) without raising for names the system cannot look up."""
    try:
        return Path(path).exists() or Path(path).is_symlink()
    except OSError as failure:
        if failure.errno == errno.ENAMETOOLONG:
            raise MlxVitError(f"{shown(str(path))}: file name too long") from None
        return False


def temporary_beside(path: Path) -> tuple[int, Path]:
    """A new, empty file `.NAME.XXXXXXXX.partial` beside `path`, for a write that is renamed into place when it is
    complete; created with the permissions a plain open gives (tempfile's are private to the user)."""
    while True:
        candidate = path.with_name(f".{path.name}.{secrets.token_hex(4)}.partial")
        with contextlib.suppress(FileExistsError):
            return os.open(candidate, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666), candidate


def replace_together(files: list[tuple[Path, Iterable[bytes]]], error: type[MlxVitError] = MlxVitError) -> None:
    """Write each (path, pieces) to a temporary file beside it, synced to the disk, and only when every one is
    complete rename them all into place, one right after the other: a failure leaves none of them, and no
    temporary file. An OSError becomes `error`, naming the file."""
    written: list[tuple[Path, Path]] = []
    target = files[0][0]
    try:
        for target, pieces in files:
            fd, temporary = temporary_beside(target)
            written.append((temporary, target))
            with os.fdopen(fd, "wb") as f:
                for piece in pieces:
                    f.write(piece)
                f.flush()
                os.fsync(f.fileno())
        for temporary, target in written:
            os.replace(temporary, target)
    except OSError as failure:
        raise error(f"{shown(target)}: cannot write it ({os_reason(failure)})") from None
    finally:
        for temporary, _ in written:
            temporary.unlink(missing_ok=True)
