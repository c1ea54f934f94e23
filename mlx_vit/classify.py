"""The public inference API: images in, plain Python predictions out."""

from __future__ import annotations

import logging
import os
import time
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import mlx.core as mx
import numpy as np
from PIL import Image

from mlx_vit.errors import MlxVitError, shown
from mlx_vit.images import DEFAULT_MAX_PIXELS, checked_limit, open_image, to_rgb
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


# MLX's CPU allocator keeps only 32 MB of freed buffers for reuse; a ViT-B/16 forward pass cycles through more,
# and every buffer allocated afresh is paid again in page faults. See _raise_cache_limit's callers.
CPU_CACHE_LIMIT = 1 << 30


def _raise_cache_limit(limit: int) -> None:
    previous = mx.set_cache_limit(limit)
    if previous > limit:
        mx.set_cache_limit(previous)


class Classifier:
    """A loaded ViT with its labels and preprocessing. MLX work must stay on the thread that loaded it.

    Image files of more than `max_pixels` pixels are refused before they are decoded (see mlx_vit.images).
    """

    def __init__(self, loaded: LoadedModel, max_pixels: int = DEFAULT_MAX_PIXELS):
        self.max_pixels = checked_limit(max_pixels)
        self.model = loaded.model
        self.config = loaded.config
        if mx.default_device() == mx.cpu:
            _raise_cache_limit(CPU_CACHE_LIMIT)
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
        """(B, H, W, 3) pixels -> (B, classes) float32 logits, in forward passes of at most `max_batch` images."""
        step = self.model.config.max_batch()
        passes = []
        for start in range(0, len(pixels), step):  # each pass evaluated (np.array) before the next is built
            logits = self.model(mx.array(pixels[start : start + step]).astype(self.dtype))
            passes.append(np.array(logits.astype(mx.float32)))
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
        logits = self.logits(pixels)
        with np.errstate(over="ignore"):  # exp overflowing to inf is the sigmoid's 0, not an error
            scores = self.scores(logits)
        finite = np.isfinite(logits).all(axis=-1) & np.isfinite(scores).all(axis=-1)
        return [self.top_k(s, top_k) if ok else None for s, ok in zip(scores, finite, strict=True)]

    def classify_files(self, paths: Iterable[str | os.PathLike], top_k: int = 5,
                       batch_size: int = 8) -> Iterator[Result]:  # fmt: skip
        """Yield a Result per path, in input order, batch by batch; a bad file becomes an error Result.

        Files are decoded and preprocessed on a worker thread up to two batches ahead, so that reading images
        overlaps with the model (MLX releases the GIL while it computes).
        """
        pending: list[tuple[Result, np.ndarray | None]] = []
        waited = computed = 0.0
        count = 0
        prepared = self._prepared(paths, ahead=2 * batch_size)
        while True:
            start = time.perf_counter()
            item = next(prepared, None)
            waited += time.perf_counter() - start
            if item is not None:
                pending.append(item)
                count += 1
            if pending and (item is None or sum(p is not None for _, p in pending) == batch_size):
                start = time.perf_counter()
                self._finish(pending, top_k)
                computed += time.perf_counter() - start
                yield from (result for result, _ in pending)
                pending = []
            if item is None:
                break
        log.debug("%d images: %.2f s waiting for decoding, %.2f s in the model", count, waited, computed)

    def _prepared(self, paths: Iterable[str | os.PathLike], ahead: int) -> Iterator[tuple[Result, np.ndarray | None]]:
        """(Result, pixels or None on error) per path, in order, decoded on one worker thread `ahead` files ahead.

        One worker: BLAS already uses every core while the model runs; decoding fills the gaps between matmuls.
        """

        def prepare(path: str | os.PathLike) -> tuple[Result, np.ndarray | None]:
            result = Result(str(path))
            try:
                return result, preprocess(open_image(path, self.max_pixels), self.preprocessing)
            except MlxVitError as error:
                result.error = str(error)
                return result, None

        pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mlx-vit-decode")
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

    def _finish(self, pending: list[tuple[Result, np.ndarray | None]], top_k: int) -> None:
        good = [(result, pixels) for result, pixels in pending if pixels is not None]
        if good:
            batch = np.stack([pixels for _, pixels in good])
            for (result, _), predictions in zip(good, self._predict(batch, top_k), strict=True):
                result.predictions = predictions
                if predictions is None:
                    result.error = _not_finite(result.path)


def _not_finite(path: str | os.PathLike) -> str:
    return (f"{shown(path, None)}: the model computed NaN or infinite scores (its weights or preprocessing "
            "overflow float32?)")  # fmt: skip


def load(model: str = DEFAULT_MODEL, revision: str | None = None, max_pixels: int = DEFAULT_MAX_PIXELS,
         image_size: int | None = None, arch: str | None = None) -> Classifier:  # fmt: skip
    """Load a classifier from an MLX folder, a checkpoint folder, a weight file named by `arch` (a timm name) or
    a Hub repo id; `image_size` runs it at another square input size."""
    start = time.perf_counter()
    classifier = Classifier(load_model(model, revision, image_size, arch), max_pixels)
    log.debug("loaded %s in %.2f s", classifier.name, time.perf_counter() - start)
    return classifier
