"""`mlx-vit embed`: images, folders and whole libraries to feature vectors, for search or your own use."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from mlx_vit.choice import ModelChoice
from mlx_vit.cli import options
from mlx_vit.cli.options import Arch, ImageSize, Inputs, Model, Revision


def embed(
    images: Inputs = None,
    output: Annotated[
        Path,
        typer.Option(
            "-o",
            "--output",
            parser=options.output_file,
            help="FILE.safetensors (paths in its metadata) or FILE.npy (paths in FILE.paths.txt).",
            show_default=False,
        ),
    ] = ...,  # fmt: skip
    model: Model = options.DEFAULT_MODEL,
    all_tokens: Annotated[
        bool, typer.Option("--all-tokens", help="Every token after the final norm, not the pooled features.")
    ] = False,
    normalize: Annotated[bool, typer.Option("--normalize", help="L2-normalise each vector.")] = False,
    resume: options.Resume = False,
    batch_size: options.BatchSize = 8,
    workers: options.Workers = None,
    progress: options.Progress = None,
    revision: Revision = None,
    max_pixels: options.MaxPixels = options.DEFAULT_MAX_PIXELS,
    image_size: ImageSize = None,
    arch: Arch = None,
) -> None:
    """Write the features the head reads (the class token after the final norm, or the model's avg/map pool) as
    float32, one row per image in input order. Exit code 1 when any image failed (the rest are written)."""
    if not images:
        raise typer.BadParameter("give images, folders or globs to embed", param_hint="IMAGES")
    from mlx_vit.runs import embed_library
    from mlx_vit.spool import check_index_path

    check_index_path(output)  # before the model loads
    choice = ModelChoice(model=model, revision=revision, max_pixels=max_pixels, image_size=image_size, arch=arch)
    stats = embed_library(choice.load(), images, output=output, all_tokens=all_tokens, normalize=normalize,
                          resume=resume, batch_size=batch_size, workers=workers, progress=progress)  # fmt: skip
    raise typer.Exit(1 if stats.failed else 0)
