"""The public inference API: images in, plain Python predictions out. A Classifier is the inference engine
(mlx_vit.engine) with its head's labels and scoring."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterable, Iterator, Sequence

import numpy as np
from PIL import Image

from mlx_vit.engine import Engine, ImageInput, Prediction, Result
from mlx_vit.errors import MlxVitError, shown
from mlx_vit.images import DEFAULT_MAX_PIXELS
from mlx_vit.inputs import Input
from mlx_vit.loading import DEFAULT_MODEL, LoadedModel, load_model

__all__ = ["Classifier", "Prediction", "Result", "load", "softmax"]  # Prediction and Result: the engine's
log = logging.getLogger("mlx_vit")


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return shifted / shifted.sum(axis=-1, keepdims=True)


class Classifier(Engine):
    """A loaded ViT with its labels and preprocessing. MLX work must stay on the thread that loaded it.

    Image files of more than `max_pixels` pixels are refused before they are decoded (see mlx_vit.images).
    """

    def __init__(self, loaded: LoadedModel, max_pixels: int = DEFAULT_MAX_PIXELS):
        super().__init__(loaded, max_pixels)
        self.labels = dict(enumerate(loaded.config.labels))
        # Same rule as transformers' image-classification pipeline.
        self.regression = loaded.config.regression
        self.multi_label = loaded.config.multi_label

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
        channels = self.model_config.num_channels
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
                       threshold: float | None = None, workers: int | None = None) -> Iterator[Result]:  # fmt: skip
        """Yield a Result per path, in input order; a bad file becomes an error Result (see classify_batches)."""
        for batch in self.classify_batches(paths, top_k, batch_size, threshold, workers):
            yield from batch

    def classify_batches(self, paths: Iterable[str | os.PathLike | Input], top_k: int = 5, batch_size: int = 8,
                         threshold: float | None = None,
                         workers: int | None = None) -> Iterator[list[Result]]:  # fmt: skip
        """Results a batch at a time, in input order: predictions scoring under `threshold` (if given: a regression
        model's scores may be negative) are dropped; files are decoded ahead of the model (prepared_batches)."""
        self.check_classifies()
        for pending in self.prepared_batches(paths, batch_size, workers):
            good = [(result, pixels) for result, pixels in pending if pixels is not None]
            if good:
                predictions = self._predict(np.stack([pixels for _, pixels in good]), top_k)
                for (result, _), found in zip(good, predictions, strict=True):
                    if found is None:
                        result.error = _not_finite(result.path)
                    else:
                        result.predictions = [p for p in found if threshold is None or p.score >= threshold]
            yield [result for result, _ in pending]


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
