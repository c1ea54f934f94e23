"""Options shared by several commands, declared once."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated

import typer

DEFAULT_MODEL = "google/vit-base-patch16-224"  # kept in step with mlx_vit.loading.DEFAULT_MODEL by a test


class DType(str, Enum):
    float32 = "float32"
    float16 = "float16"
    bfloat16 = "bfloat16"


class Format(str, Enum):
    table = "table"
    json = "json"
    jsonl = "jsonl"
    csv = "csv"


Model = Annotated[str, typer.Option("-m", "--model", help="MLX folder, checkpoint folder or file, or Hub repo id.")]
Revision = Annotated[str | None, typer.Option("--revision", help="Hub revision (branch, tag, commit).")]
ImageSize = Annotated[
    int | None,
    typer.Option("--image-size", min=1, help="Run at N x N pixels: position embeddings resampled as the checkpoint's "
                 "reference does, preprocessing scaled to match.", show_default=False),
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
BatchSize = Annotated[int, typer.Option("--batch-size", min=1, help="Images per forward pass.")]
MaxPixels = Annotated[
    int, typer.Option("--max-pixels", min=1, help="Refuse larger images as decompression bombs (never disabled).")
]
DEFAULT_MAX_PIXELS = 128_000_000  # mlx_vit.images.DEFAULT_MAX_PIXELS: a test keeps them equal
Resume = Annotated[
    bool,
    typer.Option("--resume", help="Continue -o FILE (jsonl or csv; .safetensors/.npy for embed): skip the inputs "
                 "already in it, redo a cut-off last line."),
]  # fmt: skip
Workers = Annotated[
    int | None,
    typer.Option("--workers", min=1, help="Threads decoding images ahead of the model [default: cores - 1, at most "
                 "8].", show_default=False),
]  # fmt: skip
Progress = Annotated[
    bool | None,
    typer.Option("--progress/--no-progress", help="Progress bar on stderr [default: when stderr is a terminal].",
                 show_default=False),
]  # fmt: skip

Output = Annotated[
    Path | None,
    typer.Option("-o", "--output", help="Write the results to FILE (its extension picks the format) instead of "
                 "stdout.", show_default=False),
]  # fmt: skip
