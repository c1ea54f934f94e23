"""`mlx-vit explain`: the attention map of one image, as a picture (and the numbers behind it)."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated

import typer

from mlx_vit.choice import ModelChoice
from mlx_vit.cli import options
from mlx_vit.cli.options import Arch, ImageSize, Model, Revision, integer
from mlx_vit.errors import shown
from mlx_vit.files import fitted
from mlx_vit.numbers import NumberError, parse_int


class Method(str, Enum):
    rollout = "rollout"
    last = "last"
    cls = "cls"


def explain(
    image: Annotated[Path, typer.Argument(help="The image to explain.", show_default=False)],
    model: Model = options.DEFAULT_MODEL,
    output: Annotated[
        Path | None,
        typer.Option(
            "-o",
            "--output",
            parser=options.output_file,
            help="The PNG to write. " + options.default_is("./IMAGE-METHOD.png"),
        ),
    ] = None,
    method: Annotated[
        Method,
        typer.Option(
            "--method",
            help="rollout: Abnar & Zuidema 2020, the heads of each layer fused by their mean, "
            "0.5·A + 0.5·I, rows renormalised, multiplied over the layers; last: the class token's "
            "attention in the last layer; cls: the same in --layer.",
        ),
    ] = Method.rollout,  # fmt: skip
    layer: Annotated[
        int | None,
        typer.Option("--layer", parser=integer(None), help="With --method cls: the layer, from 0 (-1 is the last)."),
    ] = None,
    head: Annotated[
        str, typer.Option("--head", help="With last or cls: one head's map (from 0), or mean of them all.")
    ] = "mean",
    label: Annotated[
        str | None,
        typer.Option(
            "--label",
            help="Say where LABEL ranks among all the labels, in the legend and here (the map is the same for "
            "every label). One of a label's comma-separated names will do.",
            show_default=False,
        ),
    ] = None,
    save_npy: Annotated[
        Path | None,
        typer.Option(
            "--save-npy",
            parser=options.output_file,
            help="Also write the map as a float32 patch-grid array (heads first with --grid).",
            show_default=False,
        ),
    ] = None,  # fmt: skip
    grid: Annotated[bool, typer.Option("--grid", help="Every head of one layer, side by side.")] = False,
    top_k: Annotated[int, typer.Option("-k", "--top-k", parser=integer(), help="Predictions in the legend.")] = 5,
    force: Annotated[bool, typer.Option("--force", help="Replace an existing output file.")] = False,
    revision: Revision = None,
    max_pixels: options.MaxPixels = options.DEFAULT_MAX_PIXELS,
    image_size: ImageSize = None,
    arch: Arch = None,
) -> None:
    """Show which patches the model attended to: a heatmap over the image as the model saw it, with the top-k
    predictions as a legend. Register and distillation tokens are left out of the map."""
    try:
        head_number = None if head == "mean" else parse_int(head, "", 0)
    except NumberError as error:
        raise typer.BadParameter(f"{error}: give a head number (from 0) or mean", param_hint="--head") from None
    output = output or Path(fitted(image.stem, f"-{method.value}.png"))
    from mlx_vit.explain import write_explanation

    choice = ModelChoice(model=model, revision=revision, max_pixels=max_pixels, image_size=image_size, arch=arch)
    found = write_explanation(choice.load(), image, output=output, method=method.value, layer=layer,
                              head=head_number, grid=grid, top_k=top_k, label=label, save_npy=save_npy,
                              force=force)  # fmt: skip
    if found.label is not None:
        typer.echo(str(found.label), err=True)
    typer.echo(f"wrote {shown(output)}" + (f" and {shown(save_npy)}" if save_npy else ""), err=True)
