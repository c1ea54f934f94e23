"""`mlx-vit classify`: images, folders and whole libraries (or camera frames) to predictions."""

from __future__ import annotations

from typing import Annotated

import typer

from mlx_vit.choice import ModelChoice
from mlx_vit.cli import options
from mlx_vit.cli.options import Arch, Format, ImageSize, Inputs, Model, Revision, decimal, integer


def classify(
    images: Inputs = None,
    model: Model = options.DEFAULT_MODEL,
    top_k: Annotated[int, typer.Option("-k", "--top-k", parser=integer(), help="Predictions per image.")] = 5,
    output: options.Output = None,
    format: Annotated[
        Format | None,
        typer.Option(
            "--format",
            help="table, json (one array), jsonl (a line each) or csv (a row per image and "
            "rank). " + options.default_is("-o's extension, else table"),
            show_default=False,
        ),
    ] = None,  # fmt: skip
    threshold: Annotated[
        float | None,
        typer.Option(
            "--threshold",
            parser=decimal(0.0),
            help="Drop predictions scoring below P: a probability, 0 to 1 (any P for a regression model's raw scores).",
            metavar="P",
            show_default=False,
        ),
    ] = None,
    resume: options.Resume = False,
    batch_size: options.BatchSize = 8,
    workers: options.Workers = None,
    progress: options.Progress = None,
    revision: Revision = None,
    max_pixels: options.MaxPixels = options.DEFAULT_MAX_PIXELS,
    # A flag, not an option with an optional value (Typer has none): `--camera`, `--camera 1`, `--camera clip.avi`
    # all parse, the argument naming the source.
    camera: Annotated[
        bool,
        typer.Option("--camera", help="Classify frames instead: the argument is a camera index (default 0) or video."),
    ] = False,
    frames: Annotated[
        int | None, typer.Option("--frames", parser=integer(), help="--camera: stop after N frames.")
    ] = None,
    fps: Annotated[
        float | None,
        typer.Option("--fps", parser=decimal(0.01), help="--camera: classify at most F frames per second."),
    ] = None,
    image_size: ImageSize = None,
    arch: Arch = None,
) -> None:
    """Classify images, folders and globs, or camera/video frames with --camera. Results are written as each
    batch finishes. Exit code 0 when all were classified, 1 when any failed (the rest still are)."""
    from mlx_vit.errors import OutputError
    from mlx_vit.outputs import format_for

    try:
        chosen = format_for(output, format.value if format else None)
    except OutputError as error:  # the two options disagree: a usage error
        raise typer.BadParameter(str(error), param_hint="--format") from None
    choice = ModelChoice(model=model, revision=revision, max_pixels=max_pixels, image_size=image_size, arch=arch)
    if camera:
        from mlx_vit.cli.camera import classify_camera

        if images and len(images) > 1:
            raise typer.BadParameter("--camera takes one camera index or video file", param_hint="--camera")
        if chosen not in ("table", "jsonl") or output is not None or resume:
            raise typer.BadParameter("--camera prints table or jsonl (one line per frame) to stdout",
                                     param_hint="--format")  # fmt: skip
        classify_camera(images[0] if images else "0", choice.load(), top_k=top_k, format=Format(chosen),
                        frames=frames, fps=fps)  # fmt: skip
        return
    if not images:
        raise typer.BadParameter("give images, folders or globs to classify (or --camera)", param_hint="IMAGES")
    if frames is not None or fps is not None:
        raise typer.BadParameter("--frames and --fps go with --camera", param_hint="--frames/--fps")
    options.check_resume(output, resume, chosen)
    classifier = choice.load()
    # Probabilities never pass 1, so such a threshold drops every prediction; a regression model's scores are its
    # raw outputs (an age, a price), which a threshold above 1 can rightly cut.
    if threshold is not None and threshold > 1 and not classifier.regression:
        raise typer.BadParameter(f"{threshold!r} can never match: this model's scores are probabilities, from 0 to 1",
                                 param_hint="--threshold")  # fmt: skip
    from mlx_vit.runs import classify_library

    stats = classify_library(classifier, images, output=output, format=chosen, top_k=top_k, threshold=threshold,
                             resume=resume, batch_size=batch_size, workers=workers, progress=progress)  # fmt: skip
    raise typer.Exit(1 if stats.failed or stats.failed_before else 0)  # a resumed file's failures, as its first run
