"""Exact nearest-neighbour search by cosine similarity over an index from `mlx-vit embed`.

The index is read in chunks from its memory map, so memory stays flat; each chunk costs a (queries x rows)
matrix product in float64, so that an image found in the index scores 1.0 against itself, not 0.99999994.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np

from mlx_vit.embed import IndexFileError, features, read_embeddings
from mlx_vit.errors import shown
from mlx_vit.inputs import find_inputs

CHUNK_ROWS = 65536


@dataclass
class Answer:
    """One query's matches, (path, similarity) best first, or the one-line error that stopped it."""

    query: str
    matches: list[tuple[str, float]] = field(default_factory=list)
    error: str | None = None

    def to_json(self) -> dict:
        if self.error:
            return {"query": self.query, "error": self.error}
        return {"query": self.query, "matches": [{"path": p, "similarity": s} for p, s in self.matches]}


def unit(vectors: np.ndarray) -> np.ndarray:
    """Rows scaled to unit L2 norm, in float64 (a zero row stays zero)."""
    vectors = np.asarray(vectors, np.float64)
    return vectors / np.maximum(np.linalg.norm(vectors, axis=-1, keepdims=True), 1e-300)


def nearest(queries: np.ndarray, index: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(rows, similarities), each (queries, min(k, rows)): the k index rows most like each query, best first;
    equal similarities in index order."""
    queries = unit(queries)
    k = min(k, len(index))
    best_rows = np.zeros((len(queries), 0), np.int64)
    best = np.zeros((len(queries), 0))
    for start in range(0, len(index), CHUNK_ROWS):
        chunk = unit(index[start : start + CHUNK_ROWS])
        rows = np.concatenate(
            [best_rows, np.broadcast_to(np.arange(start, start + len(chunk)), (len(queries), len(chunk)))], 1
        )
        similarities = np.concatenate([best, np.clip(queries @ chunk.T, -1.0, 1.0)], axis=1)
        # Rows are in index order, so a stable sort on -similarity keeps ties in index order.
        order = np.argsort(-similarities, axis=1, kind="stable")[:, :k]
        best_rows = np.take_along_axis(rows, order, axis=1)
        best = np.take_along_axis(similarities, order, axis=1)
    return best_rows, best


def search_index(queries: Iterable[str | os.PathLike], index: str | os.PathLike, top_k: int = 10,
                 model: str | None = None, revision: str | None = None,
                 max_pixels: int | None = None) -> list[Answer]:  # fmt: skip
    """Embed each query image with `model` (by default the one that made the index) and find its nearest rows."""
    from mlx_vit.classify import load
    from mlx_vit.images import DEFAULT_MAX_PIXELS

    vectors, paths, made_by = read_embeddings(index)
    name = shown(index, None)
    if vectors.ndim != 2:
        raise IndexFileError(f"{name}: holds every token (--all-tokens); search needs one vector an image")
    if model is None and made_by is None:
        raise IndexFileError(f"{name}: a .npy index does not record its model; name it with -m")
    classifier = load(model or made_by, revision, max_pixels or DEFAULT_MAX_PIXELS)
    width = classifier.model.config.num_features
    if width != vectors.shape[1]:
        raise IndexFileError(f"{name}: holds {vectors.shape[1]}-wide vectors, {classifier.name} makes {width}-wide "
                             "ones; search with the index's model")  # fmt: skip
    answers: list[Answer] = []
    for batch in classifier.prepared_batches(find_inputs(list(queries)), batch_size=8):
        good = [(result, pixels) for result, pixels in batch if pixels is not None]
        found: list[Answer] = [Answer(result.path, error=result.error) for result, _ in batch]
        if good:
            embedded, finite = features(classifier, np.stack([p for _, p in good]))
            rows, similarities = nearest(embedded, vectors, top_k)
            ready = iter(zip(rows, similarities, finite, strict=True))
            for answer in found:
                if answer.error is None:
                    r, s, ok = next(ready)
                    if ok:
                        answer.matches = [(paths[i], float(v)) for i, v in zip(r, s, strict=True)]
                    else:
                        answer.error = f"{shown(answer.query, None)}: the model computed NaN or infinite features"
        answers.extend(found)
    return answers
