"""Errors a user can cause. Each message is one line that names the file (or model) and says what to do."""

from __future__ import annotations

import os
import re
import reprlib


class MlxVitError(Exception):
    """Base class: the CLI prints str(error) on one line and exits 1; anything else is a bug."""


class CheckpointError(MlxVitError):
    """A weights file or model folder that cannot be read safely or does not match its config."""


class ConfigError(MlxVitError):
    """A config.json / preprocessor_config.json that is malformed or describes something unsupported."""


class ImageError(MlxVitError):
    """An image file that cannot be opened or decoded."""


class ModelNotFoundError(MlxVitError):
    """A model name that is neither a folder nor a reachable or cached Hub repository."""


class CameraError(MlxVitError):
    """A camera or video file that cannot be opened or stops delivering frames (see mlx_vit.camera)."""


# What a terminal would act on or a reader would misread: C0 and C1 controls (escape sequences, clear screen,
# OSC titles and clipboard writes all start with one), line and paragraph separators, bidirectional overrides,
# and lone surrogates (the undecodable bytes of a file name).
_UNSAFE = re.compile("[\x00-\x1f\x7f-\x9f\u061c\u200e\u200f\u2028-\u202e\u2066-\u2069\ud800-\udfff]")
_ESCAPES = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}
_repr = reprlib.Repr()
_repr.maxlevel, _repr.maxstring, _repr.maxother = 3, 200, 200


def _escape(match: re.Match) -> str:
    char = match.group()
    if char in _ESCAPES:
        return _ESCAPES[char]
    code = ord(char)
    if 0xDC80 <= code <= 0xDCFF:  # os.fsdecode's stand-in for an undecodable byte: show the byte
        return f"\\x{code - 0xDC00:02x}"
    return f"\\x{code:02x}" if code <= 0xFF else f"\\u{code:04x}"


def shown(value: object, limit: int | None = 120, quote: bool = False) -> str:
    """`value` (from a file, a path, a label: anything untrusted) as text safe to print for a person.

    Every control character is escaped, so the text stays on one line and the terminal acts on none of it;
    strings and paths are shown as they are (in quotes with `quote`), anything else as a bounded repr; with a
    `limit`, longer text is cut to it (file names are usually shown whole: `shown(path, None)`).
    The one helper for every value quoted in a message, a table or the TUI (JSON and csv keep exact strings).
    """
    if isinstance(value, os.PathLike):
        value = os.fspath(value)
    if isinstance(value, bytes):
        value = os.fsdecode(value)
    if isinstance(value, str) and not quote:
        text = value
    elif isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 64:
        text = f"an integer of {value.bit_length()} bits"  # repr would refuse past 4,300 digits
    else:
        try:
            text = _repr.repr(value)
        except Exception:  # a hostile object's repr: say what it is, nothing more
            text = f"<{type(value).__name__}>"
    if limit is not None and len(text) > limit:
        text = text[: max(limit - 3, 0)] + "..."
    text = _UNSAFE.sub(_escape, text)
    if limit is not None and len(text) > limit + 8:  # escapes lengthened it
        text = text[: max(limit - 3, 0)] + "..."
    return text
