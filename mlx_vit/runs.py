"""A run over a photo library: find the inputs, skip the finished ones, take this rank's share, write every batch
as it finishes, show progress, and end with one summary line.

Under `mlx.launch`, input i belongs to rank i % size, and ranks send their results to rank 0, the only one that
writes: after each batch every rank hands its finished records to an all-gather, and rank 0 merges them
round-robin, which restores the input order. So the output equals what one process writes, and it needs no
shared disk across Macs, only the same input paths on every host. For --resume, rank 0 reads the output and
sends every rank the list of finished paths.
"""

from __future__ import annotations

import itertools
import json
import os
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, TextIO

import numpy as np

from mlx_vit import distributed
from mlx_vit.blas import warn_if_slow
from mlx_vit.embed import FINGERPRINT, Embedded, embedded_batches
from mlx_vit.errors import MlxVitError, line
from mlx_vit.inputs import Input, count_inputs, find_inputs
from mlx_vit.outputs import RESULTS, Output, ResultWriter
from mlx_vit.resume import Done

if TYPE_CHECKING:
    from mlx_vit.classify import Classifier
    from mlx_vit.config import ViTConfig
    from mlx_vit.engine import Engine


@dataclass
class Stats:
    """What a run did, for the progress bar and the summary line."""

    done: int = 0
    failed: int = 0
    skipped: int = 0
    failed_before: int = 0  # failures a resumed output already holds (not retried: their inputs are skipped)
    started: float = field(default_factory=time.monotonic)
    total: int | None = None

    @property
    def seconds(self) -> float:
        return time.monotonic() - self.started

    def rate(self) -> float:
        """Images classified (or embedded) a second: a failure is not a result, so it is not counted."""
        return (self.done - self.failed) / self.seconds if self.seconds > 0 else 0.0

    def summary(self, what: str = "classified") -> str:
        """The run's last line; it gives a rate only when some image was classified (or embedded)."""
        skipped = f", {self.skipped} skipped (already in the output)" if self.skipped else ""
        skipped += f", {self.failed_before} failed before (in the output, not retried)" if self.failed_before else ""
        seconds = self.seconds
        rate = (
            f" ({(self.done - self.failed) / seconds:.1f} images/s)" if self.done > self.failed and seconds > 0 else ""
        )
        return f"{self.done - self.failed} {what}, {self.failed} failed{skipped} in {seconds:.1f} s{rate}"


def pending(arguments: Iterable[str | os.PathLike], stdin: TextIO | None, finished: Done, stats: Stats,
            rank: int = 0, size: int = 1) -> Iterator[Input]:  # fmt: skip
    """This rank's inputs still to do: every size-th one from `rank` of those not `finished`."""

    def todo(item: Input) -> bool:
        if len(finished) and item.path in finished:
            stats.skipped += 1
            return False
        return True

    return distributed.mine(filter(todo, find_inputs(arguments, stdin)), rank, size)


FEW_IMAGES = 8  # a run of more images than this first warns if the BLAS is slow: at 0.7 images/s it takes minutes


def warned_if_long(items: Iterator[Input]) -> Iterator[Input]:
    """`items` unchanged; when they are more than FEW_IMAGES, a slow BLAS has been warned about (once a process,
    with how to fix it; see mlx_vit.blas.warn_if_slow) before the first of them is handed on."""
    first = list(itertools.islice(items, FEW_IMAGES + 1))
    if len(first) > FEW_IMAGES:
        warn_if_slow()
    return itertools.chain(first, items)


class Progress:
    """A progress bar on stderr when it is a terminal (done/total, images/s, ETA, failures); silent otherwise.

    The total is counted on a thread while the run starts, when the inputs can be walked twice (not stdin).
    """

    def __init__(self, stats: Stats, arguments: list, enabled: bool | None = None):
        self.stats = stats
        self.bar = None
        if not (sys.stderr.isatty() if enabled is None else enabled):
            return
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeRemainingColumn
        from rich.progress import Progress as Bar

        self.bar = Bar(TextColumn("mlx-vit"), BarColumn(), MofNCompleteColumn(),
                       TextColumn("{task.fields[rate]:.1f} images/s"), TimeRemainingColumn(),
                       TextColumn("{task.fields[failed]}"), console=Console(stderr=True))  # fmt: skip
        self.task = self.bar.add_task("", total=None, rate=0.0, failed="")
        if "-" not in [os.fspath(a) for a in arguments]:
            threading.Thread(target=self._count, args=(list(arguments),), daemon=True).start()

    def _count(self, arguments: list) -> None:
        try:
            self.stats.total = count_inputs(arguments)
        except (OSError, MlxVitError):
            return
        self.bar.update(self.task, total=self.stats.total)

    def error(self, message: str) -> None:
        """An error line, above the bar (or plainly without one)."""
        text = line(f"error: {message}")
        if self.bar is not None:
            self.bar.console.print(text, markup=False, highlight=False, emoji=False, soft_wrap=True)
        else:
            print(text, file=sys.stderr, flush=True)

    def update(self) -> None:
        if self.bar is not None:
            failed = f"{self.stats.failed} failed" if self.stats.failed else ""
            self.bar.update(self.task, completed=self.stats.done + self.stats.skipped, rate=self.stats.rate(),
                            failed=failed)  # fmt: skip

    def __enter__(self) -> Progress:
        if self.bar is not None:
            self.bar.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.bar is not None:
            self.bar.stop()


class Sink(Protocol):
    """Where rank 0 writes a run's records (objects with .path and .error), a batch at a time."""

    done: Done  # the paths already in the output (resume skips them)
    resumable: bool  # whether what it finished stays for --resume

    def write(self, records: list[Any]) -> None: ...
    def close(self) -> None: ...
    def abort(self) -> None: ...


def run_library(arguments: list[str | os.PathLike], batches: Callable[[Iterator[Input]], Iterator[list[Any]]],
                sink: Sink | None, codec: distributed.Codec, stdin: TextIO | None = None,
                progress: bool | None = None, what: str = "classified") -> Stats:  # fmt: skip
    """Run `batches` (inputs -> lists of records) over the inputs; rank 0 writes each batch to `sink`.

    `sink` is rank 0's (None on the others); `codec` turns records into bytes and back, to send them to rank 0
    under several ranks. Errors print as one line each and the run goes on; the summary line goes to stderr at
    the end. On a failure the sink is aborted: what it finished stays, nothing half-written does.
    """
    rank, size = distributed.world()
    if size > 1 and any(os.fspath(a) == "-" for a in arguments):
        raise MlxVitError("- (paths on stdin) reaches rank 0 only under mlx.launch; list the inputs as arguments")
    stats = Stats()
    finished = sink.done if sink is not None else Done()
    stats.failed_before = finished.failed
    if size > 1:
        finished = Done(distributed.broadcast_hashes(finished.hashes))
    bar = Progress(stats, arguments, progress if rank == 0 else False)
    try:
        mine = pending(arguments, stdin, finished, stats, rank, size)
        if rank == 0:
            mine = warned_if_long(mine)  # before the bar starts, which a log line would cut through
        with bar:
            local = batches(mine)
            for batch in local if size == 1 else distributed.gathered(local, codec):
                for record in batch:
                    if record.error:
                        stats.failed += 1
                        bar.error(record.error)
                stats.done += len(batch)
                if sink is not None:
                    sink.write(batch)
                bar.update()
        if sink is not None:
            sink.close()
    except BaseException as error:
        if sink is not None:
            sink.abort()
        if rank == 0 and isinstance(error, KeyboardInterrupt):  # what was finished, and how to go on
            after = "; --resume goes on from there" if sink is not None and sink.resumable else ""
            print(line(f"{stats.summary(what)}, then interrupted{after}"), file=sys.stderr, flush=True)
        raise
    if rank == 0:
        print(line(stats.summary(what)), file=sys.stderr, flush=True)
    return stats


def classify_library(classifier: Classifier, inputs: list[str | os.PathLike], output: str | os.PathLike | None = None,
                     format: str = "table", top_k: int = 5, threshold: float | None = None, resume: bool = False,
                     batch_size: int = 8, workers: int | None = None, progress: bool | None = None,
                     stdin: TextIO | None = None) -> Stats:  # fmt: skip
    """Classify every input into `output` (stdout when None) in `format`; see the module docstring."""
    classifier.check_classifies()  # before any output: a feature extractor has no labels to print
    rank, _ = distributed.world()
    classes = classifier.model_config.num_labels
    sink = ResultWriter(Output(output, format, resume), classifier.name, top_k, classes) if rank == 0 else None

    def batches(items: Iterator[Input]) -> Iterator[list[Any]]:
        return classifier.classify_batches(items, top_k, batch_size, threshold, workers)

    return run_library(inputs, batches, sink, RESULTS, stdin, progress)


class EmbeddedCodec:
    """Embedded records as bytes between ranks: a JSON line of paths and errors, then the vectors, raw."""

    @staticmethod
    def encode(records: list[Embedded]) -> bytes:
        good = [r.vector for r in records if r.error is None]
        head = {"records": [[r.path, r.error] for r in records], "shape": list(good[0].shape) if good else []}
        rows = np.stack(good).astype(np.float32).tobytes() if good else b""
        return json.dumps(head).encode("utf-8", "surrogateescape") + b"\n" + rows

    @staticmethod
    def decode(data: bytes) -> list[Embedded]:
        head, _, rows = data.partition(b"\n")
        header = json.loads(head.decode("utf-8", "surrogateescape"))
        vectors = iter(np.frombuffer(rows, np.float32).reshape(-1, *header["shape"]) if rows else [])
        return [Embedded(path, None, error) if error else Embedded(path, next(vectors)) for path, error in
                header["records"]]  # fmt: skip


def row_shape(config: ViTConfig, all_tokens: bool) -> tuple[int, ...]:
    """The shape of one image's features: pooled (what the head reads), or every token after the final norm."""
    if all_tokens or config.global_pool == "":
        return (config.num_prefix_tokens + config.num_patches, config.hidden_size)
    return (config.num_features,)


def embed_library(engine: Engine, inputs: list[str | os.PathLike], output: str | os.PathLike,
                  all_tokens: bool = False, normalize: bool = False, resume: bool = False, batch_size: int = 8,
                  workers: int | None = None, progress: bool | None = None,
                  stdin: TextIO | None = None) -> Stats:  # fmt: skip
    """Embed every input into `output` (.safetensors or .npy), spooled as it goes (see mlx_vit.spool)."""
    from mlx_vit.spool import EmbeddingSpool

    rank, _ = distributed.world()
    config = engine.model_config
    shape = row_shape(config, all_tokens)
    # A local model by its absolute path, so that `search` finds it from any folder.
    model = os.path.abspath(engine.name) if os.path.exists(engine.name) else engine.name
    settings = {"normalize": str(normalize).lower(), "all_tokens": str(all_tokens).lower(),
                "image_size": str(config.image_size), FINGERPRINT: engine.fingerprint}  # fmt: skip
    sink = EmbeddingSpool(output, model, shape, resume, settings) if rank == 0 else None
    listed = Path(output).suffix.lower() == ".npy"  # its paths go one per line in FILE.paths.txt

    def batches(items: Iterator[Input]) -> Iterator[list[Embedded]]:
        return embedded_batches(engine, items, batch_size, workers, all_tokens, normalize, listed)

    return run_library(inputs, batches, sink, EmbeddedCodec(), stdin, progress, what="embedded")
