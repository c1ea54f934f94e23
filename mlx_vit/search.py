"""Exact nearest-neighbour search by cosine similarity over an index from `mlx-vit embed`.

The index is read in chunks from its memory map, so memory stays flat. Each chunk costs a (queries x rows) matrix
product in float32; the best candidates are scored again in float64, so that an image found in the index scores
1.0 against itself, not 0.99999994.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np

from mlx_vit.embed import FINGERPRINT, IndexFileError, embedded_batches, read_index
from mlx_vit.errors import MlxVitError, shown
from mlx_vit.inputs import find_inputs

CHUNK_ROWS = 65536
SPARE = 16  # candidates kept past k in each chunk, for float32's rounding to be undone by float64


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


class NotFiniteRow(ValueError):
    """An index row holding NaN or infinity (an index mlx-vit wrote has none): its number."""


def nearest(queries: np.ndarray, index: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(rows, similarities), each (queries, min(k, rows)): the k index rows most like each query, best first;
    equal similarities in index order.

    Each chunk is scored in float32 and keeps its best k + SPARE rows per query; those candidates are then scored
    again in float64, which orders and reports them.
    """
    k = min(k, len(index))
    exact = unit(queries)
    rough = exact.astype(np.float32)
    candidates = [np.zeros((len(queries), 0), np.int64)]
    for start in range(0, len(index), CHUNK_ROWS):
        chunk = np.asarray(index[start : start + CHUNK_ROWS], np.float32)
        broken = ~np.isfinite(chunk).all(axis=1)
        if broken.any():
            raise NotFiniteRow(start + int(broken.argmax()))
        similarities = (rough @ chunk.T) / np.maximum(np.linalg.norm(chunk, axis=1), 1e-30)
        keep = min(k + SPARE, len(chunk))
        candidates.append(start + np.argpartition(-similarities, keep - 1, axis=1)[:, :keep])
    candidates = np.concatenate(candidates, axis=1)
    best_rows = np.zeros((len(queries), k), np.int64)
    best = np.zeros((len(queries), k))
    for q, rows in enumerate(candidates):
        rows = np.unique(rows)  # sorted, so that a stable sort keeps equal similarities in index order
        similarities = np.clip(unit(index[rows]) @ exact[q], -1.0, 1.0)
        order = np.argsort(-similarities, kind="stable")[:k]
        best_rows[q], best[q] = rows[order], similarities[order]
    return best_rows, best


def search_index(queries: Iterable[str | os.PathLike], index: str | os.PathLike, top_k: int = 10,
                 model: str | None = None, revision: str | None = None,
                 max_pixels: int | None = None) -> list[Answer]:  # fmt: skip
    """Embed each query image with `model` (by default the one that made the index) and find its nearest rows.

    An index that records its weights' fingerprint (Engine.fingerprint) refuses a model with other weights;
    an older or .npy index, only one whose vectors have another width."""
    from mlx_vit.classify import load
    from mlx_vit.images import DEFAULT_MAX_PIXELS

    vectors, paths, settings = read_index(index)
    made_by = settings.get("model")
    name = shown(index)
    if vectors.ndim != 2:
        raise IndexFileError(f"{name}: holds every token (--all-tokens); search needs one vector an image")
    if model is None and made_by is None:
        raise IndexFileError(f"{name}: a .npy index does not record its model; name it with -m")
    try:
        engine = load(model=model or made_by, revision=revision, max_pixels=max_pixels or DEFAULT_MAX_PIXELS)
    except MlxVitError as error:
        if model is not None:
            raise
        # the model the index names: the line says where its name came from, which the user never typed
        raise type(error)(f"{name}: its model cannot be loaded ({error}); name one with -m") from None
    made_with = settings.get(FINGERPRINT)
    if made_with and (ours := engine.fingerprint) != made_with:
        raise IndexFileError(f"{name}: was made by {shown(made_by)} (weights {shown(made_with[:12])}), and "
                             f"{shown(engine.name)} has other weights ({ours[:12]}); search with the index's "
                             "model")  # fmt: skip
    width = engine.model_config.num_features
    if width != vectors.shape[1]:
        raise IndexFileError(f"{name}: holds {vectors.shape[1]}-wide vectors, {engine.name} makes {width}-wide "
                             "ones; search with the index's model")  # fmt: skip
    answers: list[Answer] = []
    for records in embedded_batches(engine, find_inputs(list(queries))):
        found = [r for r in records if r.error is None]
        if found:
            try:
                rows, similarities = nearest(np.stack([r.vector for r in found]), vectors, top_k)
            except NotFiniteRow as error:
                row = error.args[0]
                raise IndexFileError(f"{name}: row {row} ({shown(paths[row])}) holds NaN or infinite values; "
                                     "embed it again") from None  # fmt: skip
            matches = iter(zip(rows, similarities, strict=True))
        for record in records:
            answer = Answer(record.path, error=record.error)
            if record.error is None:
                r, s = next(matches)
                answer.matches = [(paths[i], float(v)) for i, v in zip(r, s, strict=True)]
            answers.append(answer)
    return answers
