"""Which image files a run reads: files, folders, globs and `-` (paths on stdin), streamed in a fixed order.

Every argument is taken in order. A folder is walked depth first with its entries sorted by name, so the first
batch starts as soon as the first files are found, however large the library; only one folder's listing is held
at a time. Hidden files and folders (a leading dot) are skipped, and so are files whose extension is not an
image format `open_image` reads, in any case (`.JPG` as `.jpg`). A file named on its own is always taken: it is
refused, with a reason, when it turns out not to be an image. A glob (quoted, so that the shell leaves it alone)
is walked the same way, and its written extension matches in any case too (`'trips/**/*.jpg'` takes `IMG_1.JPG`).

Nothing is opened here. Whatever is not a regular file (a FIFO, socket or device) becomes an `Input` with an
error, which the run reports in one line and moves past.
"""

from __future__ import annotations

import fnmatch
import itertools
import os
import re
import stat
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from mlx_vit.errors import shown
from mlx_vit.files import MAX_PATH_BYTES, os_reason, refusal

# What folders and globs yield: the extensions of the formats open_image reads (see images.FORMATS), written
# out so that finding files needs no Pillow; tests/test_inputs.py keeps them in step with Pillow's registry.
IMAGE_EXTENSIONS = frozenset(
    ".apng .avif .avifs .bmp .bw .dib .gif .heic .heics .heif .heifs .hif .icb .ico .j2c .j2k .jfif .jp2 .jpc "
    ".jpe .jpeg .jpf .jpg .jpx .pbm .pcx .pfm .pgm .png .pnm .ppm .psd .qoi .rgb .rgba .sgi .tga .tif .tiff .vda "
    ".vst .webp".split()
)
_MAGIC = re.compile(r"[*?[]")


@dataclass(frozen=True)
class Input:
    """One image to read, or the reason it cannot be (then `error` is a line naming it)."""

    path: str
    error: str | None = None


def is_image_name(name: str) -> bool:
    return not name.startswith(".") and os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def find_inputs(arguments: Iterable[str | os.PathLike], stdin: TextIO | None = None) -> Iterator[Input]:
    """Every input of `arguments` in order, each path once. `-` reads one path per line from `stdin`.

    Paths from stdin are taken literally (no glob), and may be folders. An argument that names nothing and is
    not a glob, a glob that matches nothing, or a folder named with no image in it becomes an error Input.
    """
    seen = _Seen()
    for argument in arguments:
        argument = os.fspath(argument)
        if argument == "-":
            for line in _stdin_paths(stdin if stdin is not None else sys.stdin.buffer):
                yield from _expand(line, seen) if isinstance(line, str) else [line]
        elif not _MAGIC.search(argument) or os.path.lexists(argument):
            yield from _expand(argument, seen)
        else:
            matched = False
            for path in _glob(argument):
                matched = True
                yield from _expand(path, seen, named=False)
            if not matched:
                yield Input(argument, f"{shown(argument)}: no file matches this pattern")


def _stdin_paths(stream) -> Iterator[str | Input]:
    """Paths from stdin, one a line, as bytes decoded the way the OS decodes file names (any path a shell can
    print, whatever the locale). No line is held past MAX_PATH_BYTES: a longer one is not a path but binary data
    (`< /dev/zero`), so it is one error Input and stdin is read no further."""
    for number in itertools.count(1):
        line = stream.readline(MAX_PATH_BYTES + 2)
        if not line:
            return
        size = len(line if isinstance(line, bytes) else line.encode("utf-8", "surrogateescape"))
        line = os.fsdecode(line) if isinstance(line, bytes) else line
        if not line.endswith("\n") and size > MAX_PATH_BYTES:
            yield Input("-", f"stdin: line {number} is over {MAX_PATH_BYTES:,} bytes, not a path; "
                        "stopped reading paths from stdin")  # fmt: skip
            return
        line = line.rstrip("\n").removesuffix("\r")
        if line:
            yield line


def count_inputs(arguments: Iterable[str | os.PathLike]) -> int | None:
    """How many inputs `find_inputs` will yield, or None when stdin is one of them (it can be read only once)."""
    arguments = list(arguments)
    if any(os.fspath(a) == "-" for a in arguments):
        return None
    return sum(1 for _ in find_inputs(arguments))


class _Seen:
    """Drops repeats: a path named twice, a file inside a folder given earlier, a folder inside another.

    Only named paths and walked folders are remembered (a walk yields each of its paths once), so memory grows
    with the command line and stdin, not with the size of the folders.
    """

    def __init__(self):
        self.named: set[str] = set()
        self.folders: dict[str, int] = {}  # each walked folder (absolute), numbered in the order walked

    def first(self, path: str, named: bool) -> bool:
        key = os.path.abspath(path)
        if key in self.named or self.walked(key):
            return False
        if named:
            self.named.add(key)
        return True

    def walked(self, key: str, folder: bool = False, before: int | None = None) -> bool:
        """Whether a folder walked earlier (numbered below `before`) yielded `key` (a file), or walked it (a
        `folder`). Only `key`'s own ancestors can have: a lookup each, however many folders were walked."""
        parent = os.path.dirname(key)
        while True:
            number = self.folders.get(parent)
            if number is not None and (before is None or number < before) and _inside(key, parent, folder):
                return True
            if os.path.dirname(parent) == parent:
                return False
            parent = os.path.dirname(parent)


def _expand(path: str, seen: _Seen, named: bool = True) -> Iterator[Input]:
    """A path as inputs: a folder's images, or the file itself (a named file is taken whatever its extension)."""
    if "\0" in path:
        yield Input(path, f"{shown(path)}: not a path (it holds a NUL byte)")
        return
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        if seen.first(path, True):
            yield Input(path, f"{shown(path)}: no such file or folder")
        return
    except OSError as error:
        if seen.first(path, True):
            yield Input(path, f"{shown(path)}: cannot read ({os_reason(error)})")
        return
    if stat.S_ISDIR(mode):
        key = os.path.abspath(path)
        if seen.walked(key, folder=True):
            return
        earlier = len(seen.folders)
        seen.folders.setdefault(key, earlier)
        found = False
        for item in _walk(path):
            found = True
            # Only a folder given before this one (its parent, named later) or a file named before can repeat.
            key = os.path.abspath(item.path)
            if key not in seen.named and not seen.walked(key, before=earlier):
                yield item
        if not found and named:
            yield Input(path, f"{shown(path)}: holds no image files (of the formats mlx-vit reads)")
    elif named or is_image_name(os.path.basename(path)):
        if seen.first(path, True):
            yield Input(path) if stat.S_ISREG(mode) else Input(path, refusal(path, mode, "an image file"))


def _inside(key: str, folder: str, is_folder: bool) -> bool:
    """Whether a walk of `folder` reaches `key` (both absolute): below it, through no hidden name and no
    symlinked folder (a walk follows neither), and, for a file, with an image's extension (it takes no other)."""
    inside = os.path.relpath(key, folder)
    parts = inside.split(os.sep)
    if inside == "." or parts[0] == ".." or any(p.startswith(".") for p in parts):
        return False
    if not is_folder and not is_image_name(parts[-1]):
        return False
    folders = parts if is_folder else parts[:-1]
    return not any(os.path.islink(os.path.join(folder, *parts[: i + 1])) for i in range(len(folders)))


def folder_listing(folder: str | os.PathLike) -> list[tuple[str, str, bool]]:
    """What a walk takes from one folder, in its order: (name, path, whether it is a folder to walk), sorted by
    name (code point order, `B` before `a`); hidden names left out, files only with an image's extension, and a
    symlinked folder is no folder (a walk does not follow it: a link back up would loop). Raises OSError."""
    with os.scandir(folder) as listing:
        entries = sorted(
            (e.name, e.path, e.is_dir(follow_symlinks=False)) for e in listing if not e.name.startswith(".")
        )
    return [(name, path, is_dir) for name, path, is_dir in entries if is_dir or is_image_name(name)]


def _walk(folder: str) -> Iterator[Input]:
    """A folder's images, depth first in name order; hidden entries skipped, symlinked folders not followed (a
    link back up would loop). Holds one sorted listing per level. A folder that cannot be listed is an error."""
    stack = [iter([(folder, True)])]
    while stack:
        entry = next(stack[-1], None)
        if entry is None:
            stack.pop()
            continue
        path, is_dir = entry
        if is_dir:
            try:
                entries = folder_listing(path)
            except OSError as error:
                yield Input(path, f"{shown(path)}: cannot list folder ({os_reason(error)})")
                continue
            stack.append((p, d) for _, p, d in entries)
            continue
        try:
            mode = os.stat(path).st_mode  # follows a symlinked file to what it names
        except OSError as error:
            yield Input(path, f"{shown(path)}: cannot read ({os_reason(error)})")
            continue
        yield Input(path) if stat.S_ISREG(mode) else Input(path, refusal(path, mode, "an image file"))


def _glob(pattern: str) -> Iterator[str]:
    """Paths matching `pattern`, walked in sorted order one folder at a time; `**` matches any depth. Hidden
    names match only a part that starts with a dot itself, as in the shell."""
    parts = Path(pattern).parts
    # `**/**` is `**`, as in the shell: each more one multiplied the steps by the tree's depth (a 1,500-deep
    # tree took minutes for 'deep/**/**/*.jpg' where 'deep/**/*.jpg' takes 0.3 s) and matched a file again
    parts = tuple(p for i, p in enumerate(parts) if not (p == "**" and i and parts[i - 1] == "**"))
    anchor = next((i for i, p in enumerate(parts) if _MAGIC.search(p)), len(parts))
    root = os.path.join(*parts[:anchor]) if anchor else os.curdir
    yield from _match(root, list(parts[anchor:]), prefix=bool(anchor))


def _match(root: str, parts: list[str], prefix: bool) -> Iterator[str]:
    """What `parts` match from `root`, depth first in name order: a stack of one step per level, never recursion
    (a `**` over a tree thousands of folders deep is as deep as the stack gets)."""
    stack = [iter([(root, parts, prefix)])]
    while stack:
        step = next(stack[-1], None)
        if step is None:
            stack.pop()
        elif not step[1]:
            yield step[0]
        else:
            stack.append(_steps(*step))


def _steps(folder: str, parts: list[str], prefix: bool) -> Iterator[tuple[str, list[str], bool]]:
    """The (folder, parts left, prefix) that matching the first of `parts` in `folder` leads to, in order."""

    def join(name: str) -> str:
        return os.path.join(folder, name) if prefix else name

    head, rest = parts[0], parts[1:]
    if not _MAGIC.search(head):
        path = join(head)
        if os.path.lexists(path) and (not rest or os.path.isdir(path)):
            yield path, rest, True
        return
    try:
        with os.scandir(folder if prefix else os.curdir) as listing:
            names = sorted((e.name, e.is_dir(follow_symlinks=False)) for e in listing)
    except OSError:
        return
    if head == "**":
        yield folder, rest, prefix  # zero folders
        for name, is_dir in names:
            if is_dir and not name.startswith("."):
                yield join(name), parts, True
        return
    # A folder matches as written: 'photos/*.jpg' walks no folder named album.JPG (its .png files and all)
    any_case, as_written = _name_rule(head, last=not rest), _name_rule(head, last=False)
    for name, is_dir in names:
        if name.startswith(".") and not head.startswith("."):
            continue
        if (as_written if is_dir else any_case)(name) and (not rest or is_dir):
            yield join(name), rest, True


def _name_rule(part: str, last: bool):
    """Whether a name matches one part of a glob. In the last part a written extension (`*.jpg`) matches in any
    case, as a folder walk takes `IMG_1234.JPG`; the rest of the name and the folders match as written, as in the
    shell, since the file system tells `Trips` from `trips`."""
    stem, extension = os.path.splitext(part)
    if not last or not extension or _MAGIC.search(extension) or not stem:
        return re.compile(fnmatch.translate(part)).match
    rule = re.compile(fnmatch.translate(stem)).match

    def matches(name: str) -> bool:
        name_stem, name_extension = os.path.splitext(name)
        return name_extension.lower() == extension.lower() and rule(name_stem) is not None

    return matches
