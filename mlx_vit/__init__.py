"""mlx-vit: Vision Transformers on Apple's MLX.

    >>> import mlx_vit
    >>> classifier = mlx_vit.load("google/vit-base-patch16-224")
    >>> classifier.classify(["cat.jpg"], top_k=3)
    >>> mlx_vit.classify_library(classifier, ["photos/"], "labels.jsonl", format="jsonl", resume=True)

Importing this package first loads a fast BLAS on Linux (see `mlx_vit.blas`); that has to happen before
`mlx.core` is imported, which is why the heavier modules are imported lazily.
"""

from mlx_vit.blas import load_blas

__version__ = "0.1.0"

load_blas()

# name -> the module that defines it, imported on first use
_EXPORTS = {
    "load": "classify", "Classifier": "classify", "Prediction": "classify",
    "find_inputs": "inputs",  # files, folders, globs: what a library run reads
    "classify_library": "runs", "embed_library": "runs",  # whole libraries to a file, resumable
    "read_embeddings": "embed", "search_index": "search",
}  # fmt: skip
__all__ = [*_EXPORTS, "__version__"]


def __getattr__(name: str):
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(f"mlx_vit.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'mlx_vit' has no attribute {name!r}")
