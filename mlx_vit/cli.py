"""The `mlx-vit` command line. Each command is a thin shell over one library function.

Heavy modules (mlx, PIL, huggingface_hub) are imported inside the commands so `mlx-vit --help` stays fast.
"""

from __future__ import annotations

import json
import logging
import sys
from enum import Enum
from pathlib import Path
from typing import Annotated

import typer

from mlx_vit import __version__
from mlx_vit.errors import MlxVitError

DEFAULT_MODEL = "google/vit-base-patch16-224"  # kept in step with mlx_vit.loading.DEFAULT_MODEL by a test

app = typer.Typer(
    help="Vision Transformers on Apple's MLX: classify images, convert Hugging Face checkpoints.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
_state = {"debug": False}


class Format(str, Enum):
    table = "table"
    json = "json"
    jsonl = "jsonl"


def _fail(message: str) -> None:
    typer.echo(f"error: {message}", err=True)


def _run(fn, *args, **kwargs):
    """Run a library call; a user error becomes one line on stderr and exit code 1 (--debug: traceback)."""
    try:
        return fn(*args, **kwargs)
    except MlxVitError as error:
        if _state["debug"]:
            raise
        _fail(str(error))
        raise typer.Exit(1) from None


def _version_line() -> str:
    import mlx.core as mx

    from mlx_vit.blas import blas_info

    blas = blas_info()
    where = f" ({blas.path})" if blas.path else ""
    note = f"; {blas.note}" if blas.note else ""
    return (f"mlx-vit {__version__} (mlx {mx.__version__}, device {mx.default_device()}, "
            f"BLAS {blas.name}{where}{note})")  # fmt: skip


def _version(value: bool) -> None:
    if value:
        typer.echo(_version_line())
        raise typer.Exit()


@app.callback()
def main_options(
    version: Annotated[
        bool,
        typer.Option("--version", callback=_version, is_eager=True, help="Show versions, device and BLAS."),
    ] = False,
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks instead of one-line errors.")] = False,
) -> None:
    _state["debug"] = debug
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("mlx-vit: %(message)s"))
    logger = logging.getLogger("mlx_vit")
    logger.handlers[:] = [handler]
    logger.setLevel(logging.DEBUG if debug else logging.INFO)


@app.command()
def classify(
    images: Annotated[list[Path], typer.Argument(help="Image files (JPEG, PNG, TIFF, GIF, WebP, ...).")],
    model: Annotated[
        str, typer.Option("-m", "--model", help="MLX folder, Hugging Face folder, or Hub repo id.")
    ] = DEFAULT_MODEL,
    top_k: Annotated[int, typer.Option("-k", "--top-k", min=1, help="Predictions per image.")] = 5,
    format: Annotated[Format, typer.Option("--format", help="table, json (one array), jsonl (a line each).")] = (
        Format.table
    ),
    batch_size: Annotated[int, typer.Option("--batch-size", min=1, help="Images per forward pass.")] = 8,
    revision: Annotated[str | None, typer.Option("--revision", help="Hub revision (branch, tag, commit).")] = None,
) -> None:
    """Classify images. Exit code 0 when all were classified, 1 when any failed (the rest still are)."""
    from mlx_vit.classify import load

    classifier = _run(load, model, revision)
    results = []
    for result in classifier.classify_files(images, top_k=top_k, batch_size=batch_size):
        if result.error:
            _fail(result.error)
        if format is Format.jsonl:
            typer.echo(json.dumps(_as_json(result)))
        results.append(result)
    if format is Format.json:
        typer.echo(json.dumps([_as_json(r) for r in results], indent=2))
    elif format is Format.table:
        _print_table(results, classifier.name)
    raise typer.Exit(1 if any(r.error for r in results) else 0)


def _as_json(result) -> dict:
    if result.error:
        return {"path": result.path, "error": result.error}
    return {"path": result.path, "predictions": [vars(p) for p in result.predictions]}


def _print_table(results, model_name: str) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"mlx-vit · {model_name}", title_justify="left")
    table.add_column("image")
    table.add_column("#", justify="right")
    table.add_column("label")
    table.add_column("score", justify="right")
    table.add_column("class", justify="right")
    for result in results:
        if result.error:
            table.add_row(result.path, "", "[red]failed (see above)[/red]", "", "", end_section=True)
            continue
        for rank, p in enumerate(result.predictions, 1):
            last = rank == len(result.predictions)
            table.add_row(result.path if rank == 1 else "", str(rank), p.label, f"{p.score:.4f}", str(p.class_id),
                          end_section=last)  # fmt: skip
    Console().print(table)


@app.command()
def convert(
    src: Annotated[str, typer.Argument(help="Hub repo id (e.g. google/vit-base-patch16-224) or an HF folder.")],
    mlx_path: Annotated[
        Path | None, typer.Option("-o", "--mlx-path", help="Output folder [default: ./NAME-mlx].")
    ] = None,
    force: Annotated[bool, typer.Option("--force", help="Replace an existing output folder.")] = False,
    revision: Annotated[str | None, typer.Option("--revision", help="Hub revision (branch, tag, commit).")] = None,
) -> None:
    """Convert a ViT/DeiT checkpoint (safetensors or pytorch_model.bin, read without running code) to MLX."""
    from mlx_vit.convert import convert as convert_checkpoint

    folder = _run(convert_checkpoint, src, mlx_path, force=force, revision=revision)
    typer.echo(f"wrote {folder}")


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:
        _fail("interrupted")
        sys.exit(130)
