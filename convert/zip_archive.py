"""Zip archives (torch.save's files, numpy's .npz) checked so that every reader sees the same members.

Python's zipfile, torch's reader (miniz) and numpy disagree at the edges: zipfile finds the end record anywhere
and shifts every offset past data in front of the archive, torch takes a file for a zip only when it begins with
`PK\\x03\\x04` and finds its members without regard to (ASCII) case, miniz counts the members its end record
declares. So an archive is read only when those edges do not arise: it starts with a member, ends with its
end record (no comment, no trailing bytes, the ZIP64 record agreeing), holds the members its end record counts,
every member's bytes lie apart from the others', and no two names are equal ignoring case.
"""

from __future__ import annotations

import string
import struct
import zipfile
from typing import BinaryIO

from mlx_vit.errors import CheckpointError, shown

LOCAL_MAGIC = b"PK\x03\x04"
METHODS = (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED)
UNREADABLE = 0x1 | 0x20 | 0x40 | 0x2000  # flags: encrypted, patched data, strong encryption, masked headers
_END = struct.Struct("<4s4H2LH")  # signature, disks (2), entries here, entries, directory size, offset, comment
_LOCATOR = struct.Struct("<4sLQL")  # signature, disk, ZIP64 end record's offset, disks
_END64 = struct.Struct("<4sQ2H2L4Q")  # signature, size, versions (2), disks (2), entries (2), size, offset
_LOCAL = struct.Struct("<4s5H3L2H")  # signature, versions, flags, method, time, date, crc, sizes, name, extra
_ASCII_LOWER = str.maketrans(string.ascii_uppercase, string.ascii_lowercase)


def folded(name: str) -> str:
    """A member name as torch's reader compares it: ASCII letters in either case are the same (miniz's tolower)."""
    return name.translate(_ASCII_LOWER)


def check_archive(file: BinaryIO, archive: zipfile.ZipFile, size: int, name: str) -> dict[str, zipfile.ZipInfo]:
    """Refuse an archive whose members two readers could see differently; its members by `folded` name."""

    def refuse(why: str) -> None:
        raise CheckpointError(f"{name}: {why}; refusing an archive other readers could read otherwise")

    file.seek(0)
    if file.read(4) != LOCAL_MAGIC:
        refuse("does not begin with a zip member")
    directory = _directory(file, size, refuse)
    members = archive.infolist()
    if archive.start_dir != directory["offset"]:
        refuse("holds data in front of the archive")
    if len(members) != directory["entries"]:
        refuse(f"its end record counts {directory['entries']} members, its directory holds {len(members)}")
    by_name: dict[str, zipfile.ZipInfo] = {}
    for info in members:
        if folded(info.filename) in by_name:
            refuse(f"it holds '{shown(info.filename, 80)}' twice (ignoring case)")
        # miniz reads neither encrypted members nor methods but these, takes a DOS folder bit for a folder, and
        # calls a stored member corrupt whose two sizes differ (or any member of no bytes holding some).
        stored = info.compress_type == zipfile.ZIP_STORED
        if info.flag_bits & UNREADABLE or info.compress_type not in METHODS or info.external_attr & 0x10 or info.volume:
            refuse(f"member '{shown(info.filename, 80)}' is encrypted, compressed otherwise, on another disk, or "
                   "marked a folder")  # fmt: skip
        if (stored and info.compress_size != info.file_size) or (info.file_size and not info.compress_size):
            refuse(f"member '{shown(info.filename, 80)}' has sizes that disagree")
        by_name[folded(info.filename)] = info
    end = 0
    for info in sorted(members, key=lambda i: i.header_offset):
        if info.header_offset < end:
            refuse(f"member '{shown(info.filename, 80)}' overlaps the one before it")
        file.seek(info.header_offset)
        local = file.read(_LOCAL.size)
        if len(local) < _LOCAL.size or local[:4] != LOCAL_MAGIC:
            refuse(f"member '{shown(info.filename, 80)}' has no local header where the directory says")
        *_, name_length, extra_length = _LOCAL.unpack(local)
        end = info.header_offset + _LOCAL.size + name_length + extra_length + info.compress_size
    if end > directory["offset"]:
        refuse("its last member runs into its directory")
    return by_name


def _directory(file: BinaryIO, size: int, refuse) -> dict[str, int]:
    """The end record's (ZIP64's where there is one) entries, directory size and offset; it must end the file."""
    if size < _END.size:
        refuse("too short for a zip archive")
    file.seek(size - _END.size)
    signature, disk, start_disk, here, entries, length, offset, comment = _END.unpack(file.read(_END.size))
    if signature != b"PK\x05\x06" or comment or here != entries or disk or start_disk:
        refuse("does not end with a zip end record of one disk")
    found = {"entries": entries, "length": length, "offset": offset}
    end = size - _END.size
    if size >= _END.size + _LOCATOR.size:
        file.seek(end - _LOCATOR.size)
        locator = _LOCATOR.unpack(file.read(_LOCATOR.size))
        if locator[0] == b"PK\x06\x07":
            if locator[1] or locator[3] != 1:
                refuse("its ZIP64 locator names other disks")
            file.seek(locator[2])
            record = file.read(_END64.size)
            if len(record) < _END64.size:
                refuse("its ZIP64 end record lies outside the file")
            signature, record_size, _, _, disk64, start64, here64, entries64, length64, offset64 = _END64.unpack(record)
            if signature != b"PK\x06\x06" or locator[2] + 12 + record_size != end - _LOCATOR.size or disk64 or start64:
                refuse("its ZIP64 end record is not where its locator says")
            wide = {"entries": entries64, "length": length64, "offset": offset64}
            if here64 != entries64 or any(found[k] not in (wide[k], 0xFFFF, 0xFFFFFFFF) for k in found):
                refuse("its ZIP64 end record disagrees with its end record")
            found, end = wide, locator[2]
    if found["offset"] + found["length"] != end:
        refuse("its directory does not end where its end record begins")
    return found
