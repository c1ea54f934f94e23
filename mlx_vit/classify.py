"""The public inference API: images in, plain Python predictions out."""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import numpy as np
from PIL import Image

from mlx_vit.errors import MlxVitError
from mlx_vit.loading import DEFAULT_MODEL, LoadedModel, load_model
from mlx_vit.preprocess import PreprocessConfig, open_image, preprocess

ImageInput = str | os.PathLike | Image.Image


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
    """A loaded ViT with its labels and preprocessing. MLX work must stay on the thread that loaded it."""

    def __init__(self, loaded: LoadedModel):
        self.model = loaded.model
        self.config = loaded.config
        self.name = loaded.name
        self.preprocessing = PreprocessConfig.from_dict(loaded.config["preprocessing"])
        self.labels = {int(k): v for k, v in loaded.config["id2label"].items()}
        # Same rule as transformers' image-classification pipeline.
        self.multi_label = loaded.config.get("problem_type") == "multi_label_classification" or len(self.labels) == 1

    def pixels(self, images: Sequence[ImageInput]) -> np.ndarray:
        """Files or PIL images -> (B, H, W, 3) float32; raises ImageError on the first bad file."""
        rgb = [open_image(i) if not isinstance(i, Image.Image) else i for i in images]
        return np.stack([preprocess(i, self.preprocessing) for i in rgb])

    def logits(self, pixels: np.ndarray) -> np.ndarray:
        out = self.model(mx.array(pixels))
        return np.array(out.astype(mx.float32))

    def scores(self, logits: np.ndarray) -> np.ndarray:
        return 1 / (1 + np.exp(-logits)) if self.multi_label else softmax(logits)

    def top_k(self, scores: np.ndarray, k: int) -> list[Prediction]:
        order = np.argsort(-scores, kind="stable")[:k]
        return [Prediction(self.labels[int(i)], float(scores[i]), int(i)) for i in order]

    def classify(self, images: Sequence[ImageInput], top_k: int = 5) -> list[list[Prediction]]:
        """Top-k predictions for each image, in order. Raises ImageError if any file can't be read."""
        if not images:
            return []
        if not self.labels:
            raise MlxVitError(f"{self.name}: has no classification head (a feature extractor)")
        scores = self.scores(self.logits(self.pixels(images)))
        return [self.top_k(s, top_k) for s in scores]

    def classify_files(self, paths: Iterable[str | os.PathLike], top_k: int = 5,
                       batch_size: int = 8) -> Iterator[Result]:  # fmt: skip
        """Yield a Result per path, in input order, batch by batch; a bad file becomes an error Result."""
        pending: list[tuple[Result, Image.Image | None]] = []
        for path in paths:
            result = Result(str(path))
            try:
                pending.append((result, open_image(Path(path))))
            except MlxVitError as error:
                result.error = str(error)
                pending.append((result, None))
            if sum(image is not None for _, image in pending) == batch_size:
                yield from self._finish(pending, top_k)
                pending = []
        yield from self._finish(pending, top_k)

    def _finish(self, pending: list[tuple[Result, Image.Image | None]], top_k: int) -> Iterator[Result]:
        good = [(r, image) for r, image in pending if image is not None]
        if good:
            for (result, _), predictions in zip(good, self.classify([image for _, image in good], top_k), strict=True):
                result.predictions = predictions
        for result, _ in pending:
            yield result


def load(model: str = DEFAULT_MODEL, revision: str | None = None) -> Classifier:
    """Load a classifier from an MLX folder, an HF-layout folder or a Hub repo id."""
    return Classifier(load_model(model, revision))
