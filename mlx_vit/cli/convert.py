"""`mlx-vit convert`: a checkpoint into an MLX folder."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from mlx_vit.cli.errors import echo
from mlx_vit.cli.options import Arch, DType, ImageSize, Revision, default_is, integer
from mlx_vit.errors import MlxVitError, shown


def convert(
    src: Annotated[
        str, typer.Argument(help="Hub repo id (e.g. google/vit-base-patch16-224), a checkpoint folder, or a file.")
    ],
    mlx_path: Annotated[
        Path | None, typer.Option("-o", "--mlx-path", help="Output folder. " + default_is("./NAME-mlx"))
    ] = None,
    force: Annotated[bool, typer.Option("--force", help="Replace an existing output folder.")] = False,
    revision: Revision = None,
    quantize: Annotated[bool, typer.Option("-q", "--quantize", help="Quantize the linear layers' weights.")] = False,
    q_bits: Annotated[
        int | None,
        typer.Option(
            "--q-bits", parser=integer(), help="Bits per weight with -q: 2, 3, 4, 5, 6 or 8. " + default_is("4")
        ),
    ] = None,
    q_group_size: Annotated[
        int | None,
        typer.Option(
            "--q-group-size", parser=integer(), help="Weights sharing a scale: 32, 64, 128. " + default_is("64")
        ),
    ] = None,
    q_mode: Annotated[
        str | None,
        typer.Option(
            "--q-mode",
            help="affine (default), or MLX's microscaling floats: mxfp4 (4 bits, groups of "
            "32), nvfp4 (4 bits, 16), mxfp8 (8 bits, 32).",
            show_default=False,
        ),
    ] = None,  # fmt: skip
    quant_predicate: Annotated[
        str | None,
        typer.Option(
            "--quant-predicate",
            help="A mixed recipe, as mlx-lm's: attn8_mlp4 (attention at 8 bits, the MLP at 4).",
            show_default=False,
        ),
    ] = None,  # fmt: skip
    dtype: Annotated[DType, typer.Option("--dtype", help="Type of the tensors that are not quantized.")] = (
        DType.float32
    ),
    image_size: ImageSize = None,
    arch: Arch = None,
) -> None:
    """Convert a ViT checkpoint to MLX: transformers ViT/DeiT/DINOv2, timm (Hub folder, or a .pth/.safetensors
    file with --arch) or a JAX .npz with --arch. Weights are read without running code."""
    from mlx_vit.convert import Quantize
    from mlx_vit.convert import convert as convert_checkpoint

    options = None
    if quantize:
        try:
            options = Quantize.of(q_bits, q_group_size, q_mode or "affine", quant_predicate)
        except MlxVitError as error:
            raise typer.BadParameter(str(error), param_hint="--q-bits/--q-group-size/--q-mode") from None
    elif any(v is not None for v in (q_bits, q_group_size, q_mode, quant_predicate)):
        raise typer.BadParameter("--q-bits, --q-group-size, --q-mode and --quant-predicate go with -q/--quantize",
                                 param_hint="-q")  # fmt: skip
    folder = convert_checkpoint(src, mlx_path=mlx_path, force=force, revision=revision, quantize=options,
                                dtype=dtype.value, arch=arch, image_size=image_size)  # fmt: skip
    size = sum(p.stat().st_size for p in folder.iterdir())
    amount = f"{size / 1e6:.1f} MB" if size >= 1e5 else f"{size / 1e3:.0f} kB"
    echo(f"wrote {shown(str(folder))} ({amount})")
