"""The inference engine: a loaded image encoder and how it runs, with a small typed face.

    pixels(images)             files or PIL images -> (B, H, W, 3) float32, as the checkpoint preprocesses them
    logits(pixels)             -> (B, classes) float32 (a model without a head: its pooled features)
    features(pixels)           -> (B, num_features) pooled features, or every token
    fingerprint                the weights' sha256, what an index records of its model
    attention(pixels, keep)    -> logits and each block's attention weights (what `keep` keeps of them)
    prepared_batches(paths)    files decoded ahead of the model on a pool of threads, in input order

Classifying (mlx_vit.classify), embedding (mlx_vit.embed), attention maps (mlx_vit.explain) and the library
runs (mlx_vit.runs) are built on these alone. MLX work must stay on the thread that loaded the engine.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten
from PIL import Image

from mlx_vit.config import ViTConfig
from mlx_vit.errors import MlxVitError
from mlx_vit.images import DEFAULT_MAX_PIXELS, checked_limit, open_image, to_rgb
from mlx_vit.inputs import Input
from mlx_vit.loading import LoadedModel
from mlx_vit.model import ViT
from mlx_vit.preprocess import preprocess
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


class Engine:
    """A loaded ViT, its preprocessing and its folder's config (mlx_vit.convert.FolderConfig).

    Image files of more than `max_pixels` pixels are refused before they are decoded (see mlx_vit.images).
    """

    def __init__(self, loaded: LoadedModel, max_pixels: int = DEFAULT_MAX_PIXELS):
        self.max_pixels = checked_limit(max_pixels)
        self.model = loaded.model
        self.config = loaded.config
        self.name = loaded.name
        self.preprocessing = loaded.config.preprocessing
        # Inputs in the weights' dtype, so float16/bfloat16 models compute in half precision on the GPU.
        self.runtime_dtype = loaded.runtime_dtype
        self.dtype = DTYPES[loaded.runtime_dtype]

    @functools.cached_property
    def fingerprint(self) -> str:
        """The weights' sha256 (weights_fingerprint): what an index records of the model that made it."""
        return weights_fingerprint(self.model)

    @property
    def model_config(self) -> ViTConfig:
        """The model as it runs (at --image-size, if given)."""
        return self.model.config

    def pixels(self, images: Sequence[ImageInput]) -> np.ndarray:
        """Files or PIL images -> (B, H, W, 3) float32; raises ImageError on the first bad file."""
        rgb = [to_rgb(i) if isinstance(i, Image.Image) else open_image(i, self.max_pixels) for i in images]
        return np.stack([preprocess(i, self.preprocessing) for i in rgb])

    def logits(self, pixels: np.ndarray) -> np.ndarray:
        """(B, H, W, 3) pixels -> (B, classes) float32 logits."""
        return self._forward(pixels, self.model)

    def features(self, pixels: np.ndarray, all_tokens: bool = False) -> np.ndarray:
        """(B, H, W, 3) pixels -> (B, num_features) float32 pooled features, as timm's forward_head(pre_logits=True)
        gives them; or every token after the final norm, (B, tokens, hidden_size)."""
        return self._forward(pixels, lambda x: self.model.features(x, all_tokens))

    def attention(self, pixels: np.ndarray, keep: Callable | None = None) -> tuple[np.ndarray, list, mx.array | None]:
        """(float32 logits, every block's attention weights (B, heads, T, T) or what `keep(index, weights)` keeps
        of them, the attention pool's (B, heads, 1, patches) or None), through the explicit softmax: the logits
        equal `logits`' up to rounding."""
        logits, layers, pool = self.model.with_attention(mx.array(pixels).astype(self.dtype), keep)
        return np.array(logits.astype(mx.float32)), layers, pool

    def _forward(self, pixels: np.ndarray, function: Callable[[mx.array], mx.array]) -> np.ndarray:
        """`function` (the model, or one of its paths) on (B, H, W, 3) pixels as float32 numpy, in passes of at
        most `max_batch` images."""
        step = self.model.config.max_batch()
        passes = []
        for start in range(0, len(pixels), step):  # each pass evaluated (np.array) before the next is built
            out = function(mx.array(pixels[start : start + step]).astype(self.dtype))
            passes.append(np.array(out.astype(mx.float32)))
        return np.concatenate(passes)

    def prepared_batches(self, paths: Iterable[str | os.PathLike | Input], batch_size: int,
                         workers: int | None = None) -> Iterator[list[tuple[Result, np.ndarray | None]]]:  # fmt: skip
        """Lists of (Result, pixels), in input order, each with `batch_size` decoded images; an input that could
        not be read rides along with its error and pixels None. The last list may be shorter.

        Files are decoded and preprocessed by `workers` threads (default: `decode_workers()`) ahead of the model,
        so that reading images overlaps with inference (MLX and Pillow release the GIL while they compute)."""
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


def weights_fingerprint(model: ViT) -> str:
    """sha256 of a model's parameters, each with its name, dtype and shape, in name order (~0.3 s for ViT-B's
    350 MB): the same weights give the same one however they were loaded (folder, checkpoint, Hub id, random:).

    Half-precision weights are hashed as float32 (the CPU runs them so, a GPU as they are); quantized ones as they
    run, so a GPU and the CPU disagree on those. The position table is left out: --image-size resamples it, and
    the same weights at another size are still the same model."""
    digest = hashlib.sha256()
    for key, value in sorted(tree_flatten(model.parameters()), key=lambda item: item[0]):
        if key == "pos_embed":
            continue
        if mx.issubdtype(value.dtype, mx.floating) and value.dtype != mx.float32:
            value = value.astype(mx.float32)
        digest.update(f"{key} {value.dtype} {tuple(value.shape)}\n".encode())
        digest.update(memoryview(value))
    return digest.hexdigest()


def decode_workers() -> int:
    """Threads that decode images: every core but the one that feeds the model, at most 8 (PIL's decoders and
    resizes release the GIL; past 8 the model, not decoding, is what a ViT waits on)."""
    return max(1, min((os.cpu_count() or 1) - 1, 8))
