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
from mlx_vit.errors import MlxVitError, shown

DEFAULT_MODEL = "google/vit-base-patch16-224"  # kept in step with mlx_vit.loading.DEFAULT_MODEL by a test

app = typer.Typer(
    help="Vision Transformers on Apple's MLX: classify images, convert Hugging Face checkpoints.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
_state = {"debug": False}


class DType(str, Enum):
    float32 = "float32"
    float16 = "float16"
    bfloat16 = "bfloat16"


class Format(str, Enum):
    table = "table"
    json = "json"
    jsonl = "jsonl"


def _fail(message: str) -> None:
    typer.echo(f"error: {shown(message, None)}", err=True)


def _cell(value: object):
    """Text from a file, a path or a label, for a rich table: no markup, emoji code or control character acts."""
    from rich.text import Text

    return Text(shown(value, None))


class _OneLine(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return shown(super().format(record), None)


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
    handler.setFormatter(_OneLine("mlx-vit: %(message)s"))
    logger = logging.getLogger("mlx_vit")
    logger.handlers[:] = [handler]
    logger.setLevel(logging.DEBUG if debug else logging.INFO)


# Shared by classify and convert.
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


@app.command()
def classify(
    images: Annotated[
        list[Path] | None,
        typer.Argument(
            help="Image files (JPEG, PNG, TIFF, GIF, WebP, ...); with --camera, INDEX or VIDEO.", show_default=False
        ),
    ] = None,
    model: Annotated[
        str, typer.Option("-m", "--model", help="MLX folder, checkpoint folder or file, or Hub repo id.")
    ] = DEFAULT_MODEL,
    top_k: Annotated[int, typer.Option("-k", "--top-k", min=1, help="Predictions per image.")] = 5,
    format: Annotated[Format, typer.Option("--format", help="table, json (one array), jsonl (a line each).")] = (
        Format.table
    ),
    batch_size: Annotated[int, typer.Option("--batch-size", min=1, help="Images per forward pass.")] = 8,
    revision: Annotated[str | None, typer.Option("--revision", help="Hub revision (branch, tag, commit).")] = None,
    max_pixels: Annotated[
        int,
        typer.Option("--max-pixels", min=1, help="Refuse larger images as decompression bombs (never disabled)."),
    ] = 128_000_000,  # mlx_vit.images.DEFAULT_MAX_PIXELS: a test keeps them equal (Pillow loads only to classify)
    # A flag, not an option with an optional value (Typer has none): `--camera`, `--camera 1`, `--camera clip.avi`
    # all parse, the argument naming the source.
    camera: Annotated[
        bool,
        typer.Option("--camera", help="Classify frames instead: the argument is a camera index (default 0) or video."),
    ] = False,
    frames: Annotated[int | None, typer.Option("--frames", min=1, help="--camera: stop after N frames.")] = None,
    fps: Annotated[
        float | None, typer.Option("--fps", min=0.01, help="--camera: classify at most F frames per second.")
    ] = None,
    image_size: ImageSize = None,
    arch: Arch = None,
) -> None:
    """Classify images, or camera/video frames with --camera. Exit code 0 when all were classified, 1 when any
    failed (the rest still are)."""
    from mlx_vit.classify import load

    if camera:
        if images and len(images) > 1:
            raise typer.BadParameter("--camera takes one camera index or video file", param_hint="--camera")
        if format is Format.json:
            raise typer.BadParameter("--camera prints table or jsonl (one line per frame)", param_hint="--format")
        classifier = _run(load, model, revision, image_size=image_size, arch=arch)
        _classify_camera(str(images[0]) if images else "0", classifier, top_k, format, frames, fps)
        return
    if not images:
        raise typer.BadParameter("give image files to classify (or --camera)", param_hint="IMAGES")
    if frames is not None or fps is not None:
        raise typer.BadParameter("--frames and --fps go with --camera", param_hint="--frames/--fps")
    classifier = _run(load, model, revision, max_pixels, image_size, arch)
    results = []
    _run(_classify_into, results, classifier, images, top_k, batch_size, format)
    if format is Format.json:
        typer.echo(json.dumps([_as_json(r) for r in results], indent=2, allow_nan=False))
    elif format is Format.table:
        _print_table(results, classifier.name)
    raise typer.Exit(1 if any(r.error for r in results) else 0)


def _classify_into(results: list, classifier, images: list[Path], top_k: int, batch_size: int, format: Format) -> None:
    classifier.check_classifies()  # before any output: a feature extractor has no labels to print
    for result in classifier.classify_files(images, top_k=top_k, batch_size=batch_size):
        if result.error:
            _fail(result.error)
        if format is Format.jsonl:
            typer.echo(json.dumps(_as_json(result), allow_nan=False))
        results.append(result)


def _as_json(result) -> dict:
    if result.error:
        return {"path": result.path, "error": result.error}
    return {"path": result.path, "predictions": [vars(p) for p in result.predictions]}


def _print_table(results, model_name: str) -> None:
    from rich.console import Console
    from rich.table import Table

    # File names and labels are data, not markup ("cat [edited].png") and not terminal commands (a label that
    # clears the screen or writes the clipboard).
    table = Table(title=_cell(f"mlx-vit · {model_name}"), title_justify="left")
    table.add_column("image")
    table.add_column("#", justify="right")
    table.add_column("label")
    table.add_column("score", justify="right")
    table.add_column("class", justify="right")
    for result in results:
        if result.error:
            table.add_row(_cell(result.path), "", "[red]failed (see above)[/red]", "", "", end_section=True)
            continue
        for rank, p in enumerate(result.predictions, 1):
            last = rank == len(result.predictions)
            table.add_row(_cell(result.path) if rank == 1 else "", str(rank), _cell(p.label), f"{p.score:.4f}",
                          str(p.class_id),
                          end_section=last)  # fmt: skip
    Console().print(table)


def _classify_camera(camera: str, classifier, top_k: int, format: Format, frames: int | None,
                     fps: float | None) -> None:  # fmt: skip
    """--camera: classify frames as they come; Ctrl-C, --frames N or the end of a file stops with a summary."""
    from itertools import islice

    from mlx_vit.camera import FrameSource, classify_frames, is_live, source_from_arg

    spec = source_from_arg(camera)
    # Files: every frame in order. Cameras and streams: always the newest frame, so the view never lags.
    source = FrameSource(spec, keep_all=not is_live(spec))
    stats = _StreamStats(source.name)
    stopped = "end of stream"
    try:
        with source:
            results = islice(classify_frames(classifier, source, top_k, fps), frames)
            if format is Format.jsonl:
                for result in results:
                    stats.add(result)
                    typer.echo(json.dumps(_frame_json(result), allow_nan=False))
            else:
                _live_table(results, stats, classifier.name)
        if frames is not None and stats.count == frames:
            stopped = f"--frames {frames}"
    except KeyboardInterrupt:
        stopped = "Ctrl-C"
    except MlxVitError as error:
        if _state["debug"]:
            raise
        _fail(str(error))
        if stats.count:
            typer.echo(shown(stats.summary("the error above"), None), err=True)
        raise typer.Exit(1) from None
    typer.echo(shown(stats.summary(stopped), None), err=True)


def _frame_json(result) -> dict:
    predictions = [vars(p) for p in result.predictions]
    return {"frame": result.frame.index, "timestamp": round(result.frame.timestamp, 6), "predictions": predictions,
            "latency_ms": round(result.latency_ms, 3)}  # fmt: skip


class _StreamStats:
    """Counts for the live view and the summary line: classified frames, their rate, latency, skipped frames."""

    def __init__(self, name: str):
        self.name = name
        self.count = 0
        self.skipped = 0
        self.latency_total = 0.0
        self.started = 0.0
        self.recent: list[float] = []  # wall-clock times of the last classifications, for the current rate
        self.last = None

    def add(self, result) -> None:
        import time

        now = time.monotonic()
        if self.count == 0:
            self.started = now
        elif result.frame.index > self.last.frame.index + 1:
            self.skipped += result.frame.index - self.last.frame.index - 1
        self.count += 1
        self.latency_total += result.latency_ms
        self.recent = [*self.recent[-29:], now]
        self.last = result

    def rate(self) -> float:
        """Classified frames per second over the last 30."""
        span = self.recent[-1] - self.recent[0] if len(self.recent) > 1 else 0.0
        return (len(self.recent) - 1) / span if span > 0 else 0.0

    def summary(self, stopped: str) -> str:
        import time

        elapsed = time.monotonic() - self.started if self.count else 0.0
        rate = (self.count - 1) / elapsed if self.count > 1 and elapsed > 0 else 0.0
        latency = self.latency_total / self.count if self.count else 0.0
        skipped = f", {self.skipped} frames skipped" if self.skipped else ""
        return (f"{self.name}: {self.count} frames classified in {elapsed:.1f} s ({rate:.1f} fps, mean latency "
                f"{latency:.1f} ms{skipped}); stopped by {stopped}")  # fmt: skip


def _live_table(results, stats: _StreamStats, model_name: str) -> None:
    """A table that redraws in place for each classified frame (printed once at the end when not a terminal)."""
    from rich.console import Console
    from rich.live import Live
    from rich.table import Table

    def render(result) -> Table:
        frame = result.frame
        table = Table(title=_cell(f"mlx-vit · {model_name} · {stats.name}"), title_justify="left",
                      caption=f"frame {frame.index} at {frame.timestamp:.2f} s · {stats.rate():.1f} fps · "
                              f"latency {result.latency_ms:.1f} ms", caption_justify="left")  # fmt: skip
        table.add_column("#", justify="right")
        table.add_column("label")
        table.add_column("score", justify="right")
        table.add_column("class", justify="right")
        for rank, p in enumerate(result.predictions, 1):
            table.add_row(str(rank), _cell(p.label), f"{p.score:.4f}", str(p.class_id))
        return table

    with Live(console=Console(), auto_refresh=False) as live:
        for result in results:
            stats.add(result)
            live.update(render(result), refresh=True)


@app.command()
def convert(
    src: Annotated[
        str, typer.Argument(help="Hub repo id (e.g. google/vit-base-patch16-224), a checkpoint folder, or a file.")
    ],
    mlx_path: Annotated[
        Path | None, typer.Option("-o", "--mlx-path", help="Output folder [default: ./NAME-mlx].")
    ] = None,
    force: Annotated[bool, typer.Option("--force", help="Replace an existing output folder.")] = False,
    revision: Annotated[str | None, typer.Option("--revision", help="Hub revision (branch, tag, commit).")] = None,
    quantize: Annotated[bool, typer.Option("-q", "--quantize", help="Quantize the linear layers' weights.")] = False,
    q_bits: Annotated[
        int | None, typer.Option("--q-bits", help="Bits per weight with -q: 2, 3, 4, 5, 6 or 8.  [default: 4]")
    ] = None,
    q_group_size: Annotated[
        int | None, typer.Option("--q-group-size", help="Weights sharing a scale: 32, 64, 128.  [default: 64]")
    ] = None,
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
            options = Quantize(q_bits or 4, q_group_size or 64)
        except MlxVitError as error:
            raise typer.BadParameter(str(error), param_hint="--q-bits/--q-group-size") from None
    elif q_bits is not None or q_group_size is not None:
        raise typer.BadParameter("--q-bits and --q-group-size go with -q/--quantize", param_hint="-q")
    folder = _run(
        convert_checkpoint, src, mlx_path, force=force, revision=revision, quantize=options, dtype=dtype.value,
        arch=arch, image_size=image_size,
    )  # fmt: skip
    size = sum(p.stat().st_size for p in folder.iterdir())
    amount = f"{size / 1e6:.1f} MB" if size >= 1e5 else f"{size / 1e3:.0f} kB"
    typer.echo(f"wrote {shown(str(folder), None)} ({amount})")


@app.command()
def tui(
    path: Annotated[Path, typer.Argument(help="An image (classified at start) or a folder to browse.")] = Path("."),
    model: Annotated[
        str, typer.Option("-m", "--model", help="MLX folder, checkpoint folder or file, or Hub repo id.")
    ] = DEFAULT_MODEL,
    top_k: Annotated[int, typer.Option("-k", "--top-k", min=1, max=20, help="Predictions shown.")] = 5,
    camera: Annotated[
        str | None, typer.Option("--camera", help="Start in webcam mode: a camera index (0) or a video file.")
    ] = None,
    blocks: Annotated[
        bool, typer.Option("--blocks", help="Draw the preview with half blocks even where Sixel/Kitty graphics work.")
    ] = False,
) -> None:
    """Browse, preview and classify images (or camera frames) in the terminal. Keys: ? in the app."""
    from mlx_vit.tui.app import run

    _run(run, path, model, top_k=top_k, camera=camera, graphics=not blocks)


class BenchFormat(str, Enum):
    table = "table"
    json = "json"


@app.command()
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
        typer.Option("--compare", help="torch, onnxruntime, both comma-separated, or none [default: those installed]."),
    ] = None,
    runs: Annotated[int, typer.Option("--runs", min=1, help="Timed runs per batch size and runtime.")] = 5,
    warmup: Annotated[int, typer.Option("--warmup", min=0, help="Untimed runs first.")] = 1,
    format: Annotated[BenchFormat, typer.Option("--format", help="table or json.")] = BenchFormat.table,
) -> None:
    """Time mlx-vit against PyTorch and ONNX Runtime on the same random input: images/s, latency, peak memory."""
    from mlx_vit.bench import parse_batch_sizes, run_bench, to_table

    try:
        sizes = parse_batch_sizes(batch_sizes)
    except ValueError as error:
        raise typer.BadParameter(str(error), param_hint="--batch-sizes") from None
    others = None if compare is None else [n.strip() for n in compare.split(",") if n.strip() not in ("", "none")]
    report = _run(run_bench, model, sizes, dtype.value, others, runs=runs, warmup=warmup)
    if format is BenchFormat.json:
        typer.echo(json.dumps(report.to_dict(), indent=2, allow_nan=False))
    else:
        from rich.console import Console

        Console().print(to_table(report))


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:
        _fail("interrupted")
        sys.exit(130)
