"""`mlx-vit search`: the indexed images nearest to each query image."""

from __future__ import annotations

import json
from enum import Enum
from pathlib import Path
from typing import Annotated

import typer

from mlx_vit.cli import options
from mlx_vit.cli.errors import echo, fail, print_rich
from mlx_vit.cli.options import Inputs, Revision, integer


class SearchFormat(str, Enum):
    table = "table"
    json = "json"


def search(
    queries: Inputs = None,
    index: Annotated[
        Path, typer.Option("--index", help="An index from `mlx-vit embed` (.safetensors or .npy).", show_default=False)
    ] = ...,
    top_k: Annotated[int, typer.Option("-k", "--top-k", parser=integer(), help="Matches per query.")] = 10,
    format: Annotated[SearchFormat, typer.Option("--format", help="table or json.")] = SearchFormat.table,
    model: Annotated[
        str | None,
        typer.Option(
            "-m",
            "--model",
            help="The model that embeds the queries. " + options.default_is("the index's own"),
            show_default=False,
        ),
    ] = None,  # fmt: skip
    revision: Revision = None,
    max_pixels: options.MaxPixels = options.DEFAULT_MAX_PIXELS,
) -> None:
    """Find the indexed images most like each query, by cosine similarity (exact search). Exit code 1 when a
    query could not be read (the others are still answered)."""
    if not queries:
        raise typer.BadParameter("give query images", param_hint="QUERIES")
    from mlx_vit.search import search_index
    from mlx_vit.tables import cell, path_cell

    answers = search_index(queries, index=index, top_k=top_k, model=model, revision=revision, max_pixels=max_pixels)
    for answer in answers:
        if answer.error:
            fail(answer.error)
    if format is SearchFormat.json:
        echo(json.dumps([a.to_json() for a in answers], indent=2, allow_nan=False))
    else:
        from rich.table import Table

        table = Table(title=cell(f"mlx-vit search · {index}"), title_justify="left")
        for name, justify in (("query", "left"), ("#", "right"), ("match", "left"), ("similarity", "right")):
            table.add_column(name, justify=justify)
        for answer in answers:
            if answer.error:
                table.add_row(path_cell(answer.query), "", "[red]failed (see above)[/red]", "", end_section=True)
            for rank, (path, similarity) in enumerate(answer.matches, 1):
                query = path_cell(answer.query) if rank == 1 else ""
                table.add_row(query, str(rank), path_cell(path), f"{similarity:.4f}",
                              end_section=rank == len(answer.matches))  # fmt: skip
        print_rich(table)
    raise typer.Exit(1 if any(a.error for a in answers) else 0)
