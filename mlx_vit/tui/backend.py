"""What the TUI asks of mlx-vit, done on one dedicated thread, answered with plain Python values.

MLX arrays are evaluated lazily on the thread that made them, so every MLX call (loading, converting,
classifying) runs on the backend's single worker thread; the UI only ever sees futures of dataclasses.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from mlx_vit.classify import Prediction, load
from mlx_vit.errors import MlxVitError

MAX_TOP_K = 20  # predictions kept per image; the UI shows the first top-k of them, so changing k needs no rerun


def error_text(error: BaseException) -> str:
    """An exception as the one line the UI shows: users' mistakes are MlxVitError with a one-line message;
    anything else is shown with its type, not raised."""
    return str(error) if isinstance(error, MlxVitError) else f"{type(error).__name__}: {error}"


class Superseded(Exception):
    """A classification that was skipped because a newer one was asked for before it started."""


@dataclass(frozen=True)
class ModelInfo:
    name: str
    dtype: str
    quantization: str  # "not quantized", or e.g. "4-bit/64"
    device: str  # "cpu" or "gpu"
    labels: int


@dataclass(frozen=True)
class Classification:
    predictions: list[Prediction]  # best first, MAX_TOP_K of them (fewer if the model has fewer classes)
    seconds: float  # preprocessing + forward pass
    overlay: Image.Image | None = None  # with attention: the model's view with its rollout map over it
    attention: str = ""  # what the overlay shows


@dataclass(frozen=True)
class CachedModel:
    label: str  # "org/name @ 1a2b3c4d"
    folder: Path


def cached_models(root: Path | None = None) -> list[CachedModel]:
    """Hub models already converted into mlx-vit's cache (cache_dir()/ORG--NAME/COMMIT), by name."""
    from mlx_vit.convert import is_mlx_folder
    from mlx_vit.loading import cache_dir

    root = cache_dir() if root is None else root
    found = []
    for repo in sorted(root.iterdir() if root.is_dir() else [], key=lambda p: p.name.lower()):
        for commit in sorted(repo.iterdir() if repo.is_dir() else []):
            if not commit.name.startswith(".") and is_mlx_folder(commit):
                found.append(CachedModel(f"{repo.name.replace('--', '/', 1)} @ {commit.name[:8]}", commit))
    return found


def quantization_label(quantization: dict[str, Any] | None) -> str:
    if not quantization:
        return "not quantized"
    return f"{quantization.get('bits', '?')}-bit/{quantization.get('group_size', '?')}"


class _OneThread:
    """A single daemon worker thread running submitted calls in order, for the life of the process.

    Not a ThreadPoolExecutor, for two reasons measured with mlx 0.32.4 on Linux: a thread that built MLX modules
    and then exits makes the process abort at exit ("terminate called without an active exception", exit 134),
    and a pool's threads do exit (they are joined at interpreter exit, which would also make quitting wait for
    a long Hub conversion). So the thread never ends; `shutdown` only drops queued work.
    """

    def __init__(self, name: str):
        self._jobs: queue.Queue[tuple[Future, Callable, tuple]] = queue.Queue()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def submit(self, fn: Callable, *args: Any) -> Future:
        future: Future = Future()
        self._jobs.put((future, fn, args))
        return future

    def _run(self) -> None:
        while True:
            future, fn, args = self._jobs.get()
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(fn(*args))
            except BaseException as error:  # handed to whoever waits on the future
                future.set_exception(error)

    def shutdown(self, timeout: float) -> None:
        """Cancel queued jobs and wait up to `timeout` seconds for the running one, so none is mid-way at exit."""
        while True:
            try:
                future, _, _ = self._jobs.get_nowait()
            except queue.Empty:
                break
            future.cancel()
        try:
            self.submit(lambda: None).result(timeout)
        except FutureTimeout:
            pass


class Backend:
    """Loads models and classifies images on one dedicated thread.

    `load_classifier` is `mlx_vit.classify.load` unless a test passes another; `timer` measures inference time.
    """

    def __init__(self, load_classifier: Callable[[str], Any] | None = None,
                 timer: Callable[[], float] = time.perf_counter):  # fmt: skip
        self._load_classifier = load_classifier or load
        self._timer = timer
        self._thread = _OneThread("mlx-vit-backend")
        self._classifier = None  # touched only on the backend thread
        self._newest = 0  # id of the newest classification asked for
        self._lock = threading.Lock()

    def load(self, model: str, label: str | None = None) -> Future[ModelInfo]:
        """Load `model` (folder or Hub id; a Hub id may download and convert). The old model stays until it works."""
        return self._thread.submit(self._load, model, label)

    def classify(self, image: Image.Image | np.ndarray, attention: bool = False) -> Future[Classification]:
        """Classify an RGB PIL image or (H, W, 3) uint8 array with the current model; with `attention`, through
        the attention path, with the rollout map over the model's view of the image (mlx_vit.explain).

        Only the newest request matters: one still queued when a newer one arrives fails with Superseded
        instead of running, so holding down "next" or a fast camera never builds a backlog.
        """
        with self._lock:
            self._newest += 1
            request = self._newest
        return self._thread.submit(self._classify, request, image, attention)

    def close(self, timeout: float = 2.0) -> None:
        self._thread.shutdown(timeout)

    def device(self) -> str:
        """The MLX device that runs the model (called on the backend thread)."""
        import mlx.core as mx

        return mx.default_device().type.name

    # Everything below runs on the backend thread.

    def _load(self, model: str, label: str | None) -> ModelInfo:
        classifier = self._load_classifier(model)
        config = classifier.config
        self._classifier = classifier
        dtype = config.dtype
        if classifier.runtime_dtype != dtype:  # e.g. expanded for the CPU on load
            dtype = f"{dtype} (runs as {classifier.runtime_dtype})"
        return ModelInfo(name=label or classifier.name, dtype=dtype,
                         quantization=quantization_label(config.quantization), device=self.device(),
                         labels=len(classifier.labels))  # fmt: skip

    def _classify(self, request: int, image: Image.Image | np.ndarray, attention: bool) -> Classification:
        if request != self._newest:
            raise Superseded
        if self._classifier is None:
            raise MlxVitError("no model loaded: choose one with m")
        if isinstance(image, np.ndarray):
            image = Image.fromarray(image, "RGB")
        start = self._timer()
        if not attention:
            top = self._classifier.classify([image], top_k=MAX_TOP_K)[0]
            return Classification(top, self._timer() - start)
        from mlx_vit.explain import explain, overlay

        self._classifier.check_classifies()
        found = explain(self._classifier, image, "rollout", top_k=MAX_TOP_K)
        seconds = self._timer() - start
        return Classification(found.predictions, seconds, overlay(found.view, found.maps[0]), found.what)
