"""Resample a ViT's learned absolute position embeddings to another patch grid, in numpy.

`resample_grid` reproduces `torch.nn.functional.interpolate(x, size=..., mode=..., align_corners=False,
antialias=...)` on CPU for "bicubic" and "bilinear", so each reference's setting gives its numbers:

- timm's `checkpoint_filter_fn` (`resample_abs_pos_embed`): bicubic, antialias=True;
- timm's `_load_weights` for JAX .npz checkpoints: bilinear, antialias=False;
- transformers' ViT / DeiT / DINOv2 `interpolate_pos_encoding`: bicubic, antialias=False.

Each axis is resampled by an (out, in) weight matrix: the plain path is OpenCV's (Keys cubic with A=-0.75, or linear;
taps past a border repeat the edge), the antialiased path is PIL's (the kernel is stretched by the scale when
downsampling, A=-0.5 for cubic, taps past a border are dropped and each row renormalised).
"""

from __future__ import annotations

import math

import numpy as np

INTERPOLATIONS = ("bicubic", "bilinear")


def _cubic(x: np.ndarray, a: float) -> np.ndarray:
    """Keys' cubic convolution kernel, zero for |x| >= 2."""
    x = np.abs(x)
    near = ((a + 2) * x - (a + 3)) * x * x + 1
    far = a * (((x - 5) * x + 8) * x - 4)
    return np.where(x < 1, near, np.where(x < 2, far, 0.0))


def _linear(x: np.ndarray) -> np.ndarray:
    """The triangle kernel, zero for |x| >= 1."""
    return np.maximum(1 - np.abs(x), 0.0)


def _weights(n_in: int, n_out: int, interpolation: str, antialias: bool) -> np.ndarray:
    """(n_out, n_in) float64 matrix taking one axis of n_in samples to n_out (align_corners=False)."""
    scale = n_in / n_out
    out = np.arange(n_out, dtype=np.float64)
    if antialias:
        # Output pixel i covers input [scale * i, scale * (i + 1)); input pixel j sits at j + 0.5. Downsampling
        # stretches the kernel by `scale`; its support keeps the sum to pixels inside the input, then renormalises.
        stretch = max(scale, 1.0)
        kernel = (lambda x: _cubic(x, -0.5)) if interpolation == "bicubic" else _linear
        centre = scale * (out + 0.5)  # (n_out,)
        w = kernel((np.arange(n_in) + 0.5 - centre[:, None]) / stretch)  # (n_out, n_in)
        return w / w.sum(axis=1, keepdims=True)

    src = scale * (out + 0.5) - 0.5  # (n_out,) source coordinate of each output pixel
    if interpolation == "bilinear":
        src = np.maximum(src, 0.0)  # torch clamps this for linear modes only
        taps, kernel = np.arange(2), _linear  # offsets from floor(src): 0, 1
    else:
        taps, kernel = np.arange(-1, 3), lambda x: _cubic(x, -0.75)  # -1, 0, 1, 2
    base = np.floor(src)
    index = base[:, None] + taps  # (n_out, taps)
    w = kernel(src[:, None] - index)  # (n_out, taps)
    m = np.zeros((n_out, n_in))
    rows = np.broadcast_to(np.arange(n_out)[:, None], index.shape)
    np.add.at(m, (rows, np.clip(index, 0, n_in - 1).astype(np.int64)), w)  # taps past a border land on the edge
    return m


def resample_grid(grid: np.ndarray, size: tuple[int, int], interpolation: str, antialias: bool) -> np.ndarray:
    """Resample an (H, W, D) grid to (h, w, D) float32, as torch's F.interpolate does (align_corners=False)."""
    if interpolation not in INTERPOLATIONS:
        raise ValueError(f"interpolation must be one of {INTERPOLATIONS}, not {interpolation!r}")
    if grid.ndim != 3 or min(grid.shape[:2]) < 1:
        raise ValueError(f"grid must be (H, W, D) with H, W >= 1, got shape {grid.shape}")
    h, w = size
    if h < 1 or w < 1:
        raise ValueError(f"the new grid size must be at least 1x1, got {h}x{w}")
    wy = _weights(grid.shape[0], h, interpolation, antialias)  # (h, H)
    wx = _weights(grid.shape[1], w, interpolation, antialias)  # (w, W)
    x = np.einsum("yY,YXd->yXd", wy, grid.astype(np.float64))  # (h, W, D)
    x = np.einsum("xX,yXd->yxd", wx, x)  # (h, w, D)
    return x.astype(np.float32)


def resample_pos_embed(
    pos_embed: np.ndarray,
    grid: tuple[int, int],
    num_prefix_tokens: int,
    interpolation: str = "bicubic",
    antialias: bool = True,
    old_grid: tuple[int, int] | None = None,
) -> np.ndarray:
    """(1, prefix + H*W, D) position embeddings -> (1, prefix + h*w, D) for a `grid` of (h, w) patches.

    The prefix (class, distillation, register) rows are kept as they are; the old grid is taken to be square
    unless `old_grid` is given. The result has pos_embed's dtype; pos_embed itself comes back if nothing changes.
    """
    if pos_embed.ndim != 3 or pos_embed.shape[0] != 1:
        raise ValueError(f"pos_embed must be (1, tokens, dim), got shape {pos_embed.shape}")
    tokens, dim = pos_embed.shape[1:]
    patches = tokens - num_prefix_tokens
    if num_prefix_tokens < 0 or patches < 1:
        raise ValueError(f"{tokens} position embeddings cannot hold {num_prefix_tokens} prefix tokens and a grid")
    if old_grid is None:
        side = math.isqrt(patches)
        if side * side != patches:
            raise ValueError(
                f"{tokens} position embeddings are not {num_prefix_tokens} prefix tokens and a square grid "
                f"({patches} is not a square); pass old_grid"
            )
        old_grid = (side, side)
    old_h, old_w = old_grid
    if old_h < 1 or old_w < 1 or old_h * old_w != patches:
        raise ValueError(f"old grid {old_h}x{old_w} does not match {patches} patch position embeddings")
    h, w = grid
    if h < 1 or w < 1:
        raise ValueError(f"the new grid size must be at least 1x1, got {h}x{w}")
    if (old_h, old_w) == (h, w):
        return pos_embed

    prefix = pos_embed[:, :num_prefix_tokens]  # (1, prefix, D)
    old = pos_embed[0, num_prefix_tokens:].reshape(old_h, old_w, dim)  # (H, W, D)
    new = resample_grid(old, (h, w), interpolation, antialias).reshape(1, h * w, dim)  # (1, h*w, D)
    return np.concatenate([prefix, new.astype(pos_embed.dtype)], axis=1)
