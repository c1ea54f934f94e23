"""mlx-vit: Vision Transformers on Apple's MLX.

    >>> import mlx_vit
    >>> classifier = mlx_vit.load("google/vit-base-patch16-224")
    >>> classifier.classify(["cat.jpg"], top_k=3)

Importing this package first loads a fast BLAS on Linux (see `mlx_vit.blas`); that has to happen before
`mlx.core` is imported, which is why the heavier modules are imported lazily.
"""

from mlx_vit.blas import load_blas

__version__ = "0.1.0"

load_blas()

__all__ = ["load", "Classifier", "Prediction", "__version__"]


def __getattr__(name: str):
    if name in ("load", "Classifier", "Prediction"):
        from mlx_vit import classify

        return getattr(classify, name)
    raise AttributeError(f"module 'mlx_vit' has no attribute {name!r}")
