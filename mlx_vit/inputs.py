"""Which image files a run reads: files, folders, globs and `-` (paths on stdin), streamed in a fixed order.

Every argument is taken in order. A folder is walked depth first with its entries sorted by name, so the first
batch starts as soon as the first files are found, however large the library; only one folder's listing is held
at a time. Hidden files and folders (a leading dot) are skipped, and so are files whose extension is not an
image format `open_image` reads. A file named on its own is always taken: it is refused, with a reason, when it
turns out not to be an image. A glob (quoted, so that the shell leaves it alone) is walked the same way.

Nothing is opened here. Whatever is not a regular file (a FIFO, socket or device) becomes an `Input` with an
error, which the run reports in one line and moves past.
"""

from __future__ import annotations

import fnmatch
import os
import re
import stat
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from mlx_vit.errors import shown
from mlx_vit.files import os_reason, refusal

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
            # Bytes, decoded as the OS decodes file names: any path a shell can print, whatever the locale.
            for line in stdin if stdin is not None else sys.stdin.buffer:
                line = os.fsdecode(line) if isinstance(line, bytes) else line
                line = line.rstrip("\n").removesuffix("\r")
                if line:
                    yield from _expand(line, seen)
        elif not _MAGIC.search(argument) or os.path.lexists(argument):
            yield from _expand(argument, seen)
        else:
            matched = False
            for path in _glob(argument):
                matched = True
                yield from _expand(path, seen, named=False)
            if not matched:
                yield Input(argument, f"{shown(argument)}: no file matches this pattern")


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
        self.folders: list[str] = []

    def first(self, path: str, named: bool) -> bool:
        key = os.path.abspath(path)
        if key in self.named or self.walked(key):
            return False
        if named:
            self.named.add(key)
        return True

    def walked(self, key: str, folder: bool = False) -> bool:
        """Whether an earlier folder's walk yielded `key` (a file), or walked it (a `folder`)."""
        return any(_inside(key, walked, folder) for walked in self.folders)


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
        seen.folders.append(key)
        found = False
        for item in _walk(path):
            found = True
            # Only a folder given before this one (its parent, named later) or a file named before can repeat.
            key = os.path.abspath(item.path)
            if key not in seen.named and not any(_inside(key, f, False) for f in seen.folders[:earlier]):
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
                with os.scandir(path) as listing:
                    entries = sorted((e.name, e.path, e.is_dir(follow_symlinks=False)) for e in listing
                                     if not e.name.startswith("."))  # fmt: skip
            except OSError as error:
                yield Input(path, f"{shown(path)}: cannot list folder ({os_reason(error)})")
                continue
            stack.append((p, d) for name, p, d in entries if d or is_image_name(name))
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
    anchor = next((i for i, p in enumerate(parts) if _MAGIC.search(p)), len(parts))
    root = os.path.join(*parts[:anchor]) if anchor else os.curdir
    yield from _match(root, list(parts[anchor:]), prefix=bool(anchor))


def _match(folder: str, parts: list[str], prefix: bool) -> Iterator[str]:
    def join(name: str) -> str:
        return os.path.join(folder, name) if prefix else name

    if not parts:
        yield folder
        return
    head, rest = parts[0], parts[1:]
    if not _MAGIC.search(head):
        path = join(head)
        if os.path.lexists(path) and (not rest or os.path.isdir(path)):
            yield from _match(path, rest, True)
        return
    try:
        with os.scandir(folder if prefix else os.curdir) as listing:
            names = sorted((e.name, e.is_dir(follow_symlinks=False)) for e in listing)
    except OSError:
        return
    if head == "**":
        yield from _match(folder, rest, prefix)  # zero folders
        for name, is_dir in names:
            if is_dir and not name.startswith("."):
                yield from _match(join(name), parts, True)
        return
    rule = re.compile(fnmatch.translate(head))
    for name, is_dir in names:
        if name.startswith(".") and not head.startswith("."):
            continue
        if rule.match(name) and (not rest or is_dir):
            yield from _match(join(name), rest, True)
