"""The safe file primitives: every file a user or an attacker may have made is read and written through here.

Reading. A FIFO blocks `open` forever, `/dev/zero` never ends and a sparse file claims gigabytes it does not hold,
so every file mlx-vit reads (configs, manifests, weights, images, indexes, outputs being resumed, spools, stdin)
comes through `open_regular` (a regular file only, checked on the open descriptor; links not followed for the
files mlx-vit keeps beside an output) and is read with a bound (`read_limited`, `lines`). JSON, a file's or a
line's, comes through `parse_json`: strict UTF-8, bounded size and depth, no NaN; `path_string` checks the paths
in it.

Writing. Nothing is written in place of a file mlx-vit did not make: a file beside an output is created with
O_EXCL | O_NOFOLLOW (`create_beside`: a link, FIFO or file planted there is refused, never followed), reopened on
--resume without following links (`open_beside`), and whole files are written to a temporary beside their target
and renamed into place (`replace_together`). Names that would pass the file system's 255-byte limit are
shortened (`beside`). Every OSError becomes one line naming the file (`os_reason`, `failing`).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import secrets
import stat
import warnings
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, BinaryIO

from mlx_vit.errors import ConfigError, MlxVitError, shown

# Real config files are kilobytes; the largest we know of is a timm or transformers config naming ImageNet-21k's
# 21,843 classes (~1 MB). A safetensors header is ~100 bytes a tensor.
MAX_JSON_BYTES = 16 * 2**20
# json.loads makes ~40-100 bytes of Python objects per value; a file of a million values is already absurd.
MAX_JSON_VALUES = 1_000_000
# Linux's PATH_MAX (macOS's is 1,024): a longer line on stdin or in a list of paths is not a path.
MAX_PATH_BYTES = 4096
# NAME_MAX on Linux and macOS: one component of a path.
MAX_NAME_BYTES = 255

_KINDS = {stat.S_IFIFO: "a FIFO (named pipe)", stat.S_IFSOCK: "a socket", stat.S_IFCHR: "a character device",
          stat.S_IFBLK: "a block device", stat.S_IFDIR: "a folder", stat.S_IFLNK: "a symbolic link"}  # fmt: skip
_NONBLOCKING = getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOCTTY", 0) | getattr(os, "O_BINARY", 0)
_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)


def refusal(path: str | os.PathLike, mode: int, wanted: str = "a file") -> str:
    """The line for a path that is not a regular file: what it is instead (a FIFO, a device, ...)."""
    return f"{shown(path)}: is {_KINDS.get(stat.S_IFMT(mode), 'not a regular file')}, not {wanted}"


def os_reason(error: OSError) -> str:
    """A short reason for an OSError, without the path (messages name the file themselves)."""
    if error.errno == errno.ENAMETOOLONG:
        return "file name too long"
    if error.errno == errno.ELOOP:
        return "a symbolic link, which mlx-vit does not follow here"
    return shown(error.strerror or str(error) or type(error).__name__, 200)


@contextlib.contextmanager
def failing(path: str | os.PathLike, error: type[MlxVitError] = MlxVitError, doing: str = "cannot write it"):
    """Turn an OSError inside the block (a full disk, a name too long, permission) into one line naming `path`."""
    try:
        yield
    except OSError as failure:
        raise error(f"{shown(path)}: {doing} ({os_reason(failure)})") from None


def _regular(fd: int, path, error: type[MlxVitError]) -> None:
    """Refuse what an open descriptor shows is not a regular file; blocking again from here on."""
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        raise error(refusal(path, mode))
    if hasattr(os, "set_blocking"):
        os.set_blocking(fd, True)


def open_regular(path: str | os.PathLike, error: type[MlxVitError] = MlxVitError, follow: bool = True) -> BinaryIO:
    """Open `path` for reading if it is a regular file; raise `error` naming it otherwise.

    `follow=False` (the files mlx-vit keeps beside an output) refuses a symbolic link instead of reading what it
    names. The kind is checked before opening (a device is never opened) and again on the open descriptor (the
    file cannot be swapped for a FIFO in between: the open itself does not block).
    """
    path = Path(path)
    name = shown(path)
    try:
        mode = (os.stat if follow else os.lstat)(path).st_mode
        if not stat.S_ISREG(mode):
            raise error(refusal(path, mode))
        fd = os.open(path, os.O_RDONLY | _NONBLOCKING | (0 if follow else _NOFOLLOW))
    except FileNotFoundError:
        raise error(f"{name}: no such file") from None
    except PermissionError:
        raise error(f"{name}: permission denied") from None
    except (OSError, ValueError) as failure:  # ENAMETOOLONG, ELOOP, ENOTDIR, EIO; a NUL in the name
        reason = os_reason(failure) if isinstance(failure, OSError) else "not a file name"
        raise error(f"{name}: cannot open ({reason})") from None
    try:
        _regular(fd, path, error)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def read_limited(
    path: str | os.PathLike, limit: int, error: type[MlxVitError] = MlxVitError, what: str = "file",
    follow: bool = True,
) -> bytes:  # fmt: skip
    """The bytes of a regular file of at most `limit` bytes; never reads (or allocates) more than limit + 1.
    `follow=False`: a link is refused (see open_regular)."""
    with open_regular(path, error, follow) as f, failing(path, error, "cannot read it"):
        raw = f.read(limit + 1)
    if len(raw) > limit:
        raise error(f"{shown(path)}: over {limit:,} bytes, too large for a {what}")
    return raw


def lines(file: BinaryIO, limit: int, source: str, error: type[MlxVitError] = MlxVitError) -> Iterator[bytes]:
    """The lines of an open binary file, each with its b"\\n" (the last may lack it), none over `limit` bytes:
    a longer one raises `error` after reading at most limit + 1 of its bytes (a sparse file, /dev/zero)."""
    number = 0
    while True:
        try:
            line = file.readline(limit + 1)
        except OSError as failure:
            raise error(f"{source}: cannot read it ({os_reason(failure)})") from None
        if not line:
            return
        number += 1
        if len(line) > limit:
            raise error(f"{source}: line {number} is over {limit:,} bytes, longer than any record mlx-vit writes")
        yield line


def _no_constant(name: str) -> None:
    raise ValueError(f"{name} is not a JSON number")


def parse_json(raw: bytes, source: str, error: type[MlxVitError] = ConfigError, object_pairs_hook=None,
               parse_int=None) -> Any:  # fmt: skip
    """JSON from untrusted bytes: strict UTF-8 (no BOM, no UTF-16/32 guessing), at most MAX_JSON_VALUES values,
    nesting as deep as the parser allows, no NaN or Infinity; every failure is `error`, one line naming `source`."""
    # Every value but the first follows a comma, a colon or an opening bracket (more if some are inside strings).
    values = raw.count(b",") + raw.count(b":") + raw.count(b"[") + raw.count(b"{")
    if values > MAX_JSON_VALUES:
        raise error(f"{source}: holds over {MAX_JSON_VALUES:,} JSON values, too many for a config")
    try:
        return json.loads(raw.decode("utf-8"), parse_constant=_no_constant, object_pairs_hook=object_pairs_hook,
                          parse_int=parse_int)  # fmt: skip
    except (ValueError, RecursionError) as failure:  # UnicodeDecodeError, a BOM, over-long ints, deep nesting
        reason = "nested too deeply" if isinstance(failure, RecursionError) else str(failure)
        raise error(f"{source}: not valid JSON ({shown(reason or type(failure).__name__, 200)})") from None


def path_string(value: Any, opened: bool = True) -> str | None:
    """`value` if it is a path as mlx-vit writes one, else None: a str that names file system bytes (lone
    surrogates only as os.fsdecode makes them for undecodable bytes). A path that was `opened` (a result's) also
    holds no NUL and at most MAX_PATH_BYTES; one that failed (an error's) is whatever was given."""
    if not isinstance(value, str) or not value or (opened and ("\0" in value or len(value) > MAX_PATH_BYTES)):
        return None
    try:
        encoded = value.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:  # "\ud800": no byte sequence makes it
        return None
    return value if not opened or len(encoded) <= MAX_PATH_BYTES else None


def npy_header(file: BinaryIO, source: str, error: type[MlxVitError]) -> tuple[tuple[int, ...], bool, Any]:
    """(shape, fortran order, dtype) of the .npy header at the file's position, its data next. numpy's parser
    (a bounded header, literal_eval) raises a dozen kinds of error on crafted bytes: each is `error`, one line.
    Every side is an int within MLX's 32-bit shapes."""
    import numpy as np

    try:
        version = np.lib.format.read_magic(file)
        readers = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}
        if version not in readers:
            raise ValueError(f".npy format version {version} is not supported")
        with warnings.catch_warnings():  # a Python 2 header's warning would be two lines on stderr
            warnings.simplefilter("ignore")
            shape, fortran, dtype = readers[version](file)
    except Exception as failure:  # numpy's own parser on hostile bytes: whatever it raises
        raise error(f"{source}: not a .npy array ({shown(str(failure) or type(failure).__name__, 120)})") from None
    if not (isinstance(shape, tuple) and all(type(side) is int and 0 <= side < 2**31 for side in shape)):
        raise error(f"{source}: its header's shape {shown(shape, 60)} is not a shape")
    return shape, fortran, dtype


def read_json(path: str | os.PathLike, error: type[MlxVitError] = ConfigError, limit: int | None = None,
              follow: bool = True) -> dict[str, Any]:  # fmt: skip
    """A JSON object from a regular file of at most `limit` bytes (MAX_JSON_BYTES); `error` otherwise."""
    source = shown(path)
    limit = MAX_JSON_BYTES if limit is None else limit
    value = parse_json(read_limited(path, limit, error, "config file", follow), source, error)
    if not isinstance(value, dict):
        raise error(f"{source}: expected a JSON object")
    return value


def is_dir(path: str | os.PathLike) -> bool:
    """Path.is_dir without the OSError a name over 255 bytes raises (ENAMETOOLONG)."""
    try:
        return Path(path).is_dir()
    except (OSError, ValueError):
        return False


def exists(path: str | os.PathLike) -> bool:
    """Path.exists (a dangling symlink counts): MlxVitError for a name too long to look up, False where the system
    cannot look it up otherwise (a NUL in it, a file where a folder should be)."""
    try:
        os.lstat(path)
        return True
    except OSError as failure:
        if failure.errno == errno.ENAMETOOLONG:
            raise MlxVitError(f"{shown(path)}: file name too long") from None
        return False
    except ValueError:
        return False


def fitted(start: str, end: str) -> str:
    """The file name `start + end`, shortened to fit the file system where it would pass 255 bytes: then it keeps
    the start's first characters, a hash of the whole start (so that other starts stay other names), and `end`."""
    name = start + end
    if len(os.fsencode(name)) <= MAX_NAME_BYTES:
        return name
    digest = hashlib.blake2b(os.fsencode(start), digest_size=8).hexdigest()
    room = MAX_NAME_BYTES - len(os.fsencode(f"~{digest}{end}"))
    kept = os.fsencode(start)[: max(room, 0)].decode("utf-8", "ignore")  # whole characters only
    return f"{kept}~{digest}{end}"


def beside(path: str | os.PathLike, suffix: str, prefix: str = ".") -> Path:
    """`PREFIX + NAME + SUFFIX` beside `path` (a spool, a temporary file), `fitted` to the file system."""
    path = Path(path)
    return path.with_name(fitted(prefix + path.name, suffix))


def plain_name(name: Any) -> bool:
    """Whether `name` (from a file: a manifest, an index's metadata) names a file in the same folder and nothing
    else: not empty, no separator, no NUL, not `.` or `..`, within 255 bytes."""
    return (isinstance(name, str) and name not in ("", ".", "..") and not set("/\\\0") & set(name)
            and path_string(name) is not None and len(os.fsencode(name)) <= MAX_NAME_BYTES)  # fmt: skip


def write_new(path: Path, data: bytes, error: type[MlxVitError] = MlxVitError) -> None:
    """`data` as a new file at `path` (see `create_beside`: nothing there is overwritten or followed); a write that
    fails (on close too: a full disk) leaves no file."""
    fd = create_beside(path, error)
    try:
        with failing(path, error), os.fdopen(fd, "wb") as f:
            f.write(data)
    except BaseException:
        path.unlink(missing_ok=True)
        raise


def sync(path: Path) -> None:
    """Force a file (or a folder's entries) to the disk."""
    fd = os.open(path, os.O_RDONLY | _NOFOLLOW)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def create_beside(path: Path, error: type[MlxVitError] = MlxVitError) -> int:
    """A new, empty file at `path` for writing (its descriptor), created with O_EXCL | O_NOFOLLOW: whatever is
    there already (a file, a link, even a dangling one, a FIFO) is refused, never followed or opened."""
    try:
        return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _NOFOLLOW, 0o666)
    except FileExistsError:
        raise error(f"{shown(path)}: already exists; mlx-vit writes only files it creates here") from None
    except OSError as failure:
        raise error(f"{shown(path)}: cannot create it ({os_reason(failure)})") from None


def open_beside(path: Path, error: type[MlxVitError] = MlxVitError) -> int:
    """An existing regular file beside an output, to go on writing it (--resume): a link is not followed, a FIFO
    or device not waited on."""
    try:
        fd = os.open(path, os.O_WRONLY | _NOFOLLOW | _NONBLOCKING)
    except OSError as failure:
        if failure.errno == errno.ENXIO:  # a FIFO with no reader
            raise error(refusal(path, stat.S_IFIFO)) from None
        raise error(f"{shown(path)}: cannot open it ({os_reason(failure)})") from None
    try:
        _regular(fd, path, error)
        if os.fstat(fd).st_nlink != 1:  # a hard link planted there: writing it would write another file too
            raise error(f"{shown(path)}: has other hard links; mlx-vit writes only files it created here")
        return fd
    except BaseException:
        os.close(fd)
        raise


def temporary_beside(path: Path) -> tuple[int, Path]:
    """A new, empty file `.NAME.XXXXXXXX.partial` beside `path`, for a write that is renamed into place when it is
    complete; created with the permissions a plain open gives (tempfile's are private to the user)."""
    while True:
        candidate = beside(path, f".{secrets.token_hex(4)}.partial")
        with contextlib.suppress(FileExistsError):
            return os.open(candidate, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _NOFOLLOW, 0o666), candidate


def replace_together(files: list[tuple[Path, Iterable[bytes]]], error: type[MlxVitError] = MlxVitError) -> None:
    """Write each (path, pieces) to a temporary file beside it, synced to the disk, and only when every one is
    complete rename them all into place, one right after the other: a failure leaves none of them, and no
    temporary file. An OSError becomes `error`, naming the file."""
    written: list[tuple[Path, Path]] = []
    for target, _ in files:  # a rename that is bound to fail must fail before any other is made
        if is_dir(target) and not os.path.islink(target):
            raise error(f"{shown(target)}: is a folder, not a file to replace")
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
            with contextlib.suppress(OSError):
                temporary.unlink(missing_ok=True)
