"""The public inference API: images in, plain Python predictions out."""

from __future__ import annotations

import logging
import os
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import mlx.core as mx
import numpy as np
from PIL import Image

from mlx_vit.errors import MlxVitError, shown
from mlx_vit.images import DEFAULT_MAX_PIXELS, checked_limit, open_image, to_rgb
from mlx_vit.inputs import Input
from mlx_vit.loading import DEFAULT_MODEL, LoadedModel, load_model
from mlx_vit.preprocess import PreprocessConfig, preprocess
from mlx_vit.quantize import DTYPES

ImageInput = str | os.PathLike | Image.Image
log = logging.getLogger("mlx_vit")


@dataclass(frozen=True)
class Prediction:
    label: str
    score: float
    class_id: int


@dataclass
class Result:
    """One input of a batch: its predictions, or the one-line error that stopped it."""

    path: str
    predictions: list[Prediction] | None = None
    error: str | None = None


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return shifted / shifted.sum(axis=-1, keepdims=True)


class Classifier:
    """A loaded ViT with its labels and preprocessing. MLX work must stay on the thread that loaded it.

    Image files of more than `max_pixels` pixels are refused before they are decoded (see mlx_vit.images).
    """

    def __init__(self, loaded: LoadedModel, max_pixels: int = DEFAULT_MAX_PIXELS):
        self.max_pixels = checked_limit(max_pixels)
        self.model = loaded.model
        self.config = loaded.config
        self.name = loaded.name
        # Inputs in the weights' dtype, so float16/bfloat16 models compute in half precision on the GPU.
        self.runtime_dtype = loaded.runtime_dtype
        self.dtype = DTYPES[loaded.runtime_dtype]
        # The loader checked the config (mlx_folder.check_config): ids 0..N-1, one label each.
        self.preprocessing = PreprocessConfig.from_dict(loaded.config["preprocessing"], f"{loaded.name}/config.json")
        self.labels = {int(k): v for k, v in loaded.config["id2label"].items()}
        # Same rule as transformers' image-classification pipeline.
        problem = loaded.config.get("problem_type")
        self.regression = problem == "regression"
        self.multi_label = problem == "multi_label_classification" or len(self.labels) == 1

    def pixels(self, images: Sequence[ImageInput]) -> np.ndarray:
        """Files or PIL images -> (B, H, W, 3) float32; raises ImageError on the first bad file."""
        rgb = [to_rgb(i) if isinstance(i, Image.Image) else open_image(i, self.max_pixels) for i in images]
        return np.stack([preprocess(i, self.preprocessing) for i in rgb])

    def logits(self, pixels: np.ndarray) -> np.ndarray:
        """(B, H, W, 3) pixels -> (B, classes) float32 logits."""
        return self.forward(pixels, self.model)

    def forward(self, pixels: np.ndarray, function: Callable[[mx.array], mx.array]) -> np.ndarray:
        """`function` (the model, or one of its paths) on (B, H, W, 3) pixels as float32 numpy, in passes of at
        most `max_batch` images."""
        step = self.model.config.max_batch()
        passes = []
        for start in range(0, len(pixels), step):  # each pass evaluated (np.array) before the next is built
            out = function(mx.array(pixels[start : start + step]).astype(self.dtype))
            passes.append(np.array(out.astype(mx.float32)))
        return np.concatenate(passes)

    def scores(self, logits: np.ndarray) -> np.ndarray:
        if self.regression:
            return logits
        return 1 / (1 + np.exp(-logits)) if self.multi_label else softmax(logits)

    def top_k(self, scores: np.ndarray, k: int) -> list[Prediction]:
        order = np.argsort(-scores, kind="stable")[:k]
        return [Prediction(self.labels[int(i)], float(scores[i]), int(i)) for i in order]

    def classify(self, images: Sequence[ImageInput], top_k: int = 5) -> list[list[Prediction]]:
        """Top-k predictions for each image, in order. Raises ImageError if any file can't be read."""
        if not images:
            return []
        predictions = self._predict(self.pixels(images), top_k)
        for image, prediction in zip(images, predictions, strict=True):
            if prediction is None:
                raise MlxVitError(_not_finite(image if not isinstance(image, Image.Image) else "an image"))
        return predictions

    def check_classifies(self) -> None:
        """MlxVitError unless this model can classify RGB images."""
        if not self.labels:
            raise MlxVitError(f"{self.name}: has no classification head (a feature extractor); pick a classifier")
        channels = self.model.config.num_channels
        if channels != 3:
            raise MlxVitError(f"{self.name}: takes {channels}-channel input, not RGB images")

    def _predict(self, pixels: np.ndarray, top_k: int) -> list[list[Prediction] | None]:
        """Top-k per image; None for an image whose scores are not finite numbers."""
        self.check_classifies()
        return self.predictions_of(self.logits(pixels), top_k)

    def predictions_of(self, logits: np.ndarray, top_k: int) -> list[list[Prediction] | None]:
        """(B, classes) logits -> top-k per image; None for an image whose scores are not finite numbers."""
        # exp overflowing to inf is the sigmoid's 0, not an error; infinite logits make NaN, refused just below
        with np.errstate(over="ignore", invalid="ignore"):
            scores = self.scores(logits)
        finite = np.isfinite(logits).all(axis=-1) & np.isfinite(scores).all(axis=-1)
        return [self.top_k(s, top_k) if ok else None for s, ok in zip(scores, finite, strict=True)]

    def classify_files(self, paths: Iterable[str | os.PathLike | Input], top_k: int = 5, batch_size: int = 8,
                       threshold: float = 0.0, workers: int | None = None) -> Iterator[Result]:  # fmt: skip
        """Yield a Result per path, in input order; a bad file becomes an error Result (see classify_batches)."""
        for batch in self.classify_batches(paths, top_k, batch_size, threshold, workers):
            yield from batch

    def classify_batches(self, paths: Iterable[str | os.PathLike | Input], top_k: int = 5, batch_size: int = 8,
                         threshold: float = 0.0, workers: int | None = None) -> Iterator[list[Result]]:  # fmt: skip
        """Results a batch at a time, in input order: predictions scoring under `threshold` are dropped.

        Files are decoded and preprocessed by `workers` threads (default: `decode_workers()`) ahead of the model,
        so that reading images overlaps with inference (MLX and Pillow release the GIL while they compute).
        """
        self.check_classifies()
        for pending in self.prepared_batches(paths, batch_size, workers):
            good = [(result, pixels) for result, pixels in pending if pixels is not None]
            if good:
                predictions = self._predict(np.stack([pixels for _, pixels in good]), top_k)
                for (result, _), found in zip(good, predictions, strict=True):
                    if found is None:
                        result.error = _not_finite(result.path)
                    else:
                        result.predictions = [p for p in found if p.score >= threshold]
            yield [result for result, _ in pending]

    def prepared_batches(self, paths: Iterable[str | os.PathLike | Input], batch_size: int,
                         workers: int | None = None) -> Iterator[list[tuple[Result, np.ndarray | None]]]:  # fmt: skip
        """Lists of (Result, pixels), in input order, each with `batch_size` decoded images; an input that could
        not be read rides along with its error and pixels None. The last list may be shorter."""
        workers = workers or decode_workers()
        pending: list[tuple[Result, np.ndarray | None]] = []
        good = 0
        waited = time.perf_counter()
        for item in self._prepared(paths, workers, ahead=max(2 * batch_size, 2 * workers)):
            pending.append(item)
            good += item[1] is not None
            if good == batch_size:
                yield pending
                pending, good = [], 0
        if pending:
            yield pending
        log.debug("decoding on %d threads; %.2f s in all", workers, time.perf_counter() - waited)

    def _prepared(self, paths: Iterable[str | os.PathLike | Input], workers: int,
                  ahead: int) -> Iterator[tuple[Result, np.ndarray | None]]:  # fmt: skip
        """(Result, pixels or None on error) per path, in order, decoded by `workers` threads `ahead` files ahead."""

        def prepare(item: str | os.PathLike | Input) -> tuple[Result, np.ndarray | None]:
            if isinstance(item, Input):
                result = Result(item.path, error=item.error)
                if item.error:
                    return result, None
            else:
                result = Result(str(item))
            try:
                return result, preprocess(open_image(result.path, self.max_pixels), self.preprocessing)
            except MlxVitError as error:
                result.error = str(error)
                return result, None

        pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="mlx-vit-decode")
        queue: deque[Future] = deque()
        try:
            for path in paths:
                queue.append(pool.submit(prepare, path))
                if len(queue) > ahead:
                    yield queue.popleft().result()
            while queue:
                yield queue.popleft().result()
        finally:
            pool.shutdown(wait=True, cancel_futures=True)


def decode_workers() -> int:
    """Threads that decode images: every core but the one that feeds the model, at most 8 (PIL's decoders and
    resizes release the GIL; past 8 the model, not decoding, is what a ViT waits on)."""
    return max(1, min((os.cpu_count() or 1) - 1, 8))


def _not_finite(path: str | os.PathLike) -> str:
    return (f"{shown(path)}: the model computed NaN or infinite scores (its weights or preprocessing "
            "overflow float32?)")  # fmt: skip


def load(model: str = DEFAULT_MODEL, revision: str | None = None, max_pixels: int = DEFAULT_MAX_PIXELS,
         image_size: int | None = None, arch: str | None = None) -> Classifier:  # fmt: skip
    """Load a classifier from an MLX folder, a checkpoint folder, a weight file named by `arch` (a timm name) or
    a Hub repo id; `image_size` runs it at another square input size."""
    start = time.perf_counter()
    classifier = Classifier(load_model(model, revision, image_size, arch), max_pixels)
    log.debug("loaded %s in %.2f s", classifier.name, time.perf_counter() - start)
    return classifier
