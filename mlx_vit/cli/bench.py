"""`mlx-vit bench`: mlx-vit against PyTorch and ONNX Runtime."""

from __future__ import annotations

import json
from enum import Enum
from typing import Annotated

import typer

from mlx_vit.cli.errors import echo, print_rich
from mlx_vit.cli.options import DType, default_is, integer


class BenchFormat(str, Enum):
    table = "table"
    json = "json"


def bench(
    model: Annotated[
        str,
        typer.Option(
            "-m",
            "--model",
            help="random:vit-{tiny,small,base,large}-patch16-224 (no download), a folder or a Hub repo id.",
        ),
    ] = "random:vit-base-patch16-224",
    batch_sizes: Annotated[str, typer.Option("--batch-sizes", help="Comma-separated batch sizes.")] = "1,8,32",
    dtype: Annotated[DType, typer.Option("--dtype", help="Compute type (half precision is slow on a CPU).")] = (
        DType.float32
    ),
    compare: Annotated[
        str | None,
        typer.Option(
            "--compare", help="torch, onnxruntime, both comma-separated, or none. " + default_is("those installed")
        ),
    ] = None,
    runs: Annotated[int, typer.Option("--runs", parser=integer(), help="Timed runs per batch size and runtime.")] = 5,
    warmup: Annotated[int, typer.Option("--warmup", parser=integer(0), help="Untimed runs first.")] = 1,
    format: Annotated[BenchFormat, typer.Option("--format", help="table or json.")] = BenchFormat.table,
) -> None:
    """Time mlx-vit against PyTorch and ONNX Runtime on the same random input: images/s, latency, peak memory."""
    from mlx_vit.bench import parse_batch_sizes, run_bench, to_table

    try:
        sizes = parse_batch_sizes(batch_sizes)
    except ValueError as error:
        raise typer.BadParameter(str(error), param_hint="--batch-sizes") from None
    others = None if compare is None else [n.strip() for n in compare.split(",") if n.strip() not in ("", "none")]
    report = run_bench(model=model, batch_sizes=sizes, dtype=dtype.value, compare=others, runs=runs, warmup=warmup)
    if format is BenchFormat.json:
        echo(json.dumps(report.to_dict(), indent=2, allow_nan=False))
    else:
        print_rich(to_table(report))
