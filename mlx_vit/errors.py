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


class OutputError(MlxVitError):
    """An output file that cannot be written, or cannot be resumed."""


class CameraError(MlxVitError):
    """A camera or video file that cannot be opened or stops delivering frames (see mlx_vit.camera)."""


# What a terminal would act on or a reader would misread: C0 and C1 controls (escape sequences, clear screen,
# OSC titles and clipboard writes all start with one), line and paragraph separators, bidirectional overrides,
# and lone surrogates (the undecodable bytes of a file name).
_UNSAFE = re.compile("[\x00-\x1f\x7f-\x9f\u061c\u200e\u200f\u2028-\u202e\u2066-\u2069\ud800-\udfff]")
_ESCAPES = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}
_repr = reprlib.Repr()
_repr.maxlevel, _repr.maxstring, _repr.maxother = 3, 200, 200
# A path or value quoted in a message: a longer one keeps its start and its end (the file name), the middle
# elided. Whole lines are cut to LINE_LIMIT where they are printed (an `error:` line is at most ~300 characters).
NAME_LIMIT = 160
LINE_LIMIT = 300


def _escape(match: re.Match) -> str:
    char = match.group()
    if char in _ESCAPES:
        return _ESCAPES[char]
    code = ord(char)
    if 0xDC80 <= code <= 0xDCFF:  # os.fsdecode's stand-in for an undecodable byte: show the byte
        return f"\\x{code - 0xDC00:02x}"
    return f"\\x{code:02x}" if code <= 0xFF else f"\\u{code:04x}"


def shown(value: object, limit: int = NAME_LIMIT, quote: bool = False) -> str:
    """`value` (from a file, a path, a label: anything untrusted) as text safe to print for a person.

    Every control character is escaped, so the text stays on one line and the terminal acts on none of it;
    strings and paths are shown as they are (in quotes with `quote`), anything else as a bounded repr. Text
    longer than `limit` keeps its start and its end with `...` between them: every value from outside is
    bounded, so a 100 kB path or a 5,000-digit number makes a short line. The one helper for every value quoted
    in a message, a table or the TUI (JSON and csv keep exact strings).
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
    limit = max(limit, 5)
    if len(text) > 4 * limit:  # the middle goes anyway: escape no more than can be shown
        text = text[: 2 * limit] + text[-2 * limit :]
    text = _UNSAFE.sub(_escape, text)
    if len(text) > limit:
        head = (limit - 3) // 2
        text = f"{text[:head]}...{text[len(text) - (limit - 3 - head) :]}"
    return text


def line(message: str) -> str:
    """A whole message as one printable line of at most LINE_LIMIT characters."""
    return shown(message, LINE_LIMIT)
