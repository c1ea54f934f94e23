"""The one parser for numbers from outside: command-line options, environment variables and config values.

Python's own parsers are too generous for values an attacker may write: `int()` takes any Unicode digit ('٣' is
3, while '²' passes `str.isdigit()` and then fails), refuses past 4,300 digits with a message that quotes them
all, and `float()` takes 'nan', 'inf' and '1e999'. A JSON integer of 401 digits overflows `math.isfinite` and
every float operation. Here a number is ASCII only and at most MAX_CHARACTERS long, its range is checked before
any arithmetic, and a float is finite; every failure is one short line (`NumberError`) that quotes the value
bounded.
"""

from __future__ import annotations

import math
import os
import re
from typing import Any

from mlx_vit.errors import MlxVitError, shown

# The longest number any option, variable or config value needs: a 64-bit integer has 20 digits, a float
# written out in full ~25 characters.
MAX_CHARACTERS = 40
_INTEGER = re.compile(r"[+-]?[0-9]+")
_FLOAT = re.compile(r"[+-]?([0-9]+\.?[0-9]*|\.[0-9]+)([eE][+-]?[0-9]+)?")


class NumberError(MlxVitError, ValueError):
    """A value that is not a number of the kind and range asked for."""


def _named(what: str, text: str) -> str:
    return f"{what}: {text}" if what else text


def _range(low: float | None, high: float | None) -> str:
    if low is not None and high is not None:
        return f"from {low} to {high}"
    return f"at least {low}" if low is not None else f"at most {high}"


def _checked(number: int | float, what: str, low: float | None, high: float | None, kind: str) -> Any:
    if (low is not None and number < low) or (high is not None and number > high):
        raise NumberError(_named(what, f"{shown(number, 40)} is out of range ({kind} {_range(low, high)})"))
    return number


def parse_int(text: str, what: str, low: int | None = None, high: int | None = None) -> int:
    """`text` as an integer of ASCII digits (optionally signed) from `low` to `high`; NumberError otherwise."""
    text = text.strip() if isinstance(text, str) else text
    if not isinstance(text, str) or len(text) > MAX_CHARACTERS or not _INTEGER.fullmatch(text):
        raise NumberError(_named(what, f"{shown(text, 40, quote=True)} is not an integer (ASCII digits)"))
    return _checked(int(text), what, low, high, "an integer")


def parse_float(text: str, what: str, low: float | None = None, high: float | None = None) -> float:
    """`text` as a finite decimal number (ASCII, no nan or inf) from `low` to `high`; NumberError otherwise."""
    text = text.strip() if isinstance(text, str) else text
    if not isinstance(text, str) or len(text) > MAX_CHARACTERS or not _FLOAT.fullmatch(text):
        raise NumberError(_named(what, f"{shown(text, 40, quote=True)} is not a number"))
    number = float(text)
    if not math.isfinite(number):
        raise NumberError(_named(what, f"{shown(text, 40, quote=True)} is too large"))
    return _checked(number, what, low, high, "a number")


def is_number(value: Any, integer: bool = False) -> bool:
    """Whether a config value (as JSON parsed it) is a finite number (an int when `integer`), never a bool.

    An int is checked by its size before anything converts it: math.isfinite(10**400) raises OverflowError."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    if isinstance(value, int):
        return value.bit_length() <= 64
    return not integer and math.isfinite(value)


def number(value: Any, what: str, low: float | None = None, high: float | None = None, integer: bool = False):
    """A config value checked to be a number (see `is_number`) from `low` to `high`; NumberError otherwise."""
    if not is_number(value, integer):
        kind = "an integer" if integer else "a finite number"
        raise NumberError(f"{what} must be {kind}, got {shown(value, 40, quote=True)}")
    return _checked(value, what, low, high, "an integer" if integer else "a number")


def environment_int(name: str, low: int | None = None, high: int | None = None) -> int | None:
    """The environment variable `name` as an integer from `low` to `high`, or None when it is unset or empty."""
    text = os.environ.get(name, "").strip()
    return parse_int(text, name, low, high) if text else None
