"""`mlx-vit tui`: the terminal app."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from mlx_vit.cli.options import DEFAULT_MODEL, Model, integer


def tui(
    path: Annotated[Path, typer.Argument(help="An image (classified at start) or a folder to browse.")] = Path("."),
    model: Model = DEFAULT_MODEL,
    top_k: Annotated[int, typer.Option("-k", "--top-k", parser=integer(1, 20), help="Predictions shown.")] = 5,
    camera: Annotated[
        str | None, typer.Option("--camera", help="Start in webcam mode: a camera index (0) or a video file.")
    ] = None,
    blocks: Annotated[
        bool, typer.Option("--blocks", help="Draw the preview with half blocks even where Sixel/Kitty graphics work.")
    ] = False,
) -> None:
    """Browse, preview and classify images (or camera frames) in the terminal. Keys: ? in the app."""
    from mlx_vit.tui.app import run as run_tui

    run_tui(path, model=model, top_k=top_k, camera=camera, graphics=not blocks)
