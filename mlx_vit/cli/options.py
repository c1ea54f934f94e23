"""Options shared by several commands, declared once."""

from __future__ import annotations

import os
from enum import Enum
from functools import partial
from pathlib import Path
from typing import Annotated

import typer

from mlx_vit import numbers
from mlx_vit.choice import DEFAULT_MAX_PIXELS as DEFAULT_MAX_PIXELS  # the defaults, held once in mlx_vit.choice
from mlx_vit.choice import DEFAULT_MODEL as DEFAULT_MODEL
from mlx_vit.errors import shown
from mlx_vit.outputs import FORMATS


def default_is(text: str) -> str:
    """`[default: TEXT]` for a help text, where an option's default value cannot say it (None stands for it): Typer
    reads help as Rich markup, in which an unescaped `[default: ...]` is a style tag and vanishes."""
    return ("\\" if typer.core.HAS_RICH else "") + f"[default: {text}]"


def check_resume(output: Path | None, resume: bool, format: str) -> None:
    """--resume with options it does not go with: a usage error (exit 2), as the command line is wrong whatever
    the disk holds, said before any model loads. What the disk holds (an -o that exists without --resume, a file
    that cannot be resumed) is the library's to refuse, exit 1, as for convert's and explain's outputs."""
    if resume and output is None:
        raise typer.BadParameter("--resume needs -o FILE: the results to continue are read from it",
                                 param_hint="--resume")  # fmt: skip
    if resume and not FORMATS[format].resumable:
        resumable = " or ".join(name for name, kind in FORMATS.items() if kind.resumable)
        raise typer.BadParameter(f"--resume continues {resumable} output, not {format}", param_hint="--resume")


def integer(low: int | None = 1, high: int | None = None):
    """A `parser` for an integer option: mlx_vit.numbers' rules (ASCII digits, bounded, range-checked)."""
    return partial(_parse, numbers.parse_int, low, high)


def decimal(low: float | None = None, high: float | None = None):
    """A `parser` for a number option: finite, ASCII, bounded, range-checked."""
    return partial(_parse, numbers.parse_float, low, high)


def output_file(value):
    """A `parser` for an option naming a file to write: a name ending in a slash names a folder (a Path would drop
    the slash and write a file of the folder's name)."""
    if isinstance(value, str) and value.endswith(("/", os.sep)):
        raise typer.BadParameter(f"{shown(value, 60, quote=True)} names a folder; give a file name")
    if value == "-":  # '-' is stdin among the inputs: '-o -' wrote a file named '-' where stdout was meant
        raise typer.BadParameter("'-' is not a file name here (./- names a file '-')")
    return Path(value) if isinstance(value, str) else value


def _parse(parse, low, high, value):
    if not isinstance(value, str):  # a default
        return value
    try:
        return parse(value, "", low, high)
    except numbers.NumberError as error:  # a ValueError would be quoted whole by the option machinery
        raise typer.BadParameter(str(error)) from None


class DType(str, Enum):
    float32 = "float32"
    float16 = "float16"
    bfloat16 = "bfloat16"


# The output formats' names, as mlx_vit.outputs registers them: a new format is one class there.
Format = Enum("Format", {name: name for name in FORMATS}, type=str)


Model = Annotated[str, typer.Option("-m", "--model", help="MLX folder, checkpoint folder or file, or Hub repo id.")]
Revision = Annotated[str | None, typer.Option("--revision", help="Hub revision (branch, tag, commit).")]
ImageSize = Annotated[
    int | None,
    typer.Option("--image-size", parser=integer(), help="Run at N x N pixels: position embeddings resampled as the "
                 "checkpoint's reference does, preprocessing scaled to match.", show_default=False),
]  # fmt: skip
Arch = Annotated[
    str | None,
    typer.Option("--arch", help="A bare .pth/.safetensors/.npz file's timm architecture, NAME[.TAG] (e.g. "
                 "vit_base_patch16_224.augreg2_in21k_ft_in1k): its layout and preprocessing.", show_default=False),
]  # fmt: skip
Inputs = Annotated[
    list[str] | None,
    typer.Argument(help="Image files, folders (searched recursively; hidden files skipped), quoted globs "
                   "('photos/**/*.jpg'), or - to read paths from stdin, one per line.", show_default=False),
]  # fmt: skip
BatchSize = Annotated[int, typer.Option("--batch-size", parser=integer(), help="Images per forward pass.")]
MaxPixels = Annotated[
    int,
    typer.Option(
        "--max-pixels", parser=integer(), help="Refuse larger images as decompression bombs (never disabled)."
    ),
]
Resume = Annotated[
    bool,
    typer.Option("--resume", help="Continue -o FILE (jsonl or csv; .safetensors/.npy for embed): skip the inputs "
                 "already in it, redo a cut-off last line."),
]  # fmt: skip
Workers = Annotated[
    int | None,
    typer.Option("--workers", parser=integer(), help="Threads decoding images ahead of the model. "
                 + default_is("cores - 1, at most 8"), show_default=False),
]  # fmt: skip
Progress = Annotated[
    bool | None,
    typer.Option("--progress/--no-progress", help="Progress bar on stderr. "
                 + default_is("when stderr is a terminal"),
                 show_default=False),
]  # fmt: skip

Output = Annotated[
    Path | None,
    typer.Option("-o", "--output", parser=output_file, help="Write the results to FILE (its extension picks the "
                 "format) instead of stdout.", show_default=False),
]  # fmt: skip
