"""`mlx-vit classify --camera`: frames from a camera, a video file or a stream, classified as they come."""

from __future__ import annotations

import json

import typer

from mlx_vit.cli.errors import echo
from mlx_vit.cli.options import Format
from mlx_vit.errors import MlxVitError, line
from mlx_vit.tables import cell


def classify_camera(camera: str, classifier, *, top_k: int, format: Format, frames: int | None,
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
                    echo(json.dumps(_frame_json(result), allow_nan=False))
            else:
                _live_table(results, stats, classifier.name)
        if frames is not None and stats.count == frames:
            stopped = f"--frames {frames}"
    except KeyboardInterrupt:
        stopped = "Ctrl-C"
    except MlxVitError as error:  # its line is printed where every error's is (cli.errors), this summary after it
        if stats.count:
            error.__notes__ = [*getattr(error, "__notes__", ()), stats.summary("the error above")]
        raise
    typer.echo(line(stats.summary(stopped)), err=True)


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
        table = Table(title=cell(f"mlx-vit · {model_name} · {stats.name}"), title_justify="left",
                      caption=f"frame {frame.index} at {frame.timestamp:.2f} s · {stats.rate():.1f} fps · "
                              f"latency {result.latency_ms:.1f} ms", caption_justify="left")  # fmt: skip
        table.add_column("#", justify="right")
        table.add_column("label")
        table.add_column("score", justify="right")
        table.add_column("class", justify="right")
        for rank, p in enumerate(result.predictions, 1):
            table.add_row(str(rank), cell(p.label), f"{p.score:.4f}", str(p.class_id))
        return table

    with Live(console=Console(), auto_refresh=False) as live:
        for result in results:
            stats.add(result)
            live.update(render(result), refresh=True)
