"""Attention maps: which patches a ViT looked at, as numbers on the patch grid and as a picture.

The weights come from `ViT.with_attention`, a separate forward pass with an explicit softmax (the inference path's
fused attention never forms them). Methods:
- `last`: the class token's attention to the patches in the last layer, the heads averaged (or one head);
- `cls`: the same in layer `--layer`;
- `rollout` (Abnar & Zuidema 2020): in every layer the heads are averaged, the residual added as 0.5·A + 0.5·I
  and the rows renormalised; the layers are multiplied from the first to the last, and the class token's row read.

Register and distillation tokens are left out of the map (their columns dropped). A model with SigLIP's attention
pool reads its pool's query instead of a class token; a model with neither averages the patch tokens' rows.
"""

from __future__ import annotations

import textwrap
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from mlx_vit.errors import MlxVitError, shown

if TYPE_CHECKING:
    from mlx_vit.classify import Classifier

METHODS = ("rollout", "last", "cls")
# Dark to bright (black, purple, red, orange, pale yellow): brightness rises with attention, so the map reads in
# grey too, and every step is told apart by people with the common colour-vision deficiencies.
_ANCHORS = np.array([(0, 0, 4), (87, 16, 110), (188, 55, 84), (249, 142, 9), (252, 255, 164)], np.float64)
COLORS = np.stack([np.interp(np.linspace(0, 1, 256), np.linspace(0, 1, len(_ANCHORS)), _ANCHORS[:, c])
                   for c in range(3)], axis=1).round().astype(np.uint8)  # fmt: skip


@dataclass
class Explanation:
    """One image's attention map: `maps` (maps, grid_h, grid_w) float32 (one map, or one per head with `grid`),
    the model's view of the image (H, W, 3) uint8, its predictions and what the map shows."""

    maps: np.ndarray
    view: np.ndarray
    predictions: list
    what: str
    titles: list[str]


def check_options(method: str, layer: int | None, head: int | None, grid: bool, depth: int) -> None:
    if method not in METHODS:
        raise MlxVitError(f"--method {shown(method, 40)}: choose from {', '.join(METHODS)}")
    if method == "rollout" and (head is not None or grid):
        raise MlxVitError("rollout averages the heads of every layer; --head and --grid go with --method last or cls")
    if method == "rollout" and layer is not None:
        raise MlxVitError("rollout multiplies every layer; --layer goes with --method cls")
    if grid and head is not None:
        raise MlxVitError("--grid shows every head of the layer; leave out --head")
    if layer is not None and not -depth <= layer < depth:
        raise MlxVitError(f"--layer {layer}: the model has layers 0..{depth - 1} (or -1 for the last)")


def rollout(layers: list[np.ndarray]) -> np.ndarray:
    """(T, T) joint attention of (heads, T, T) layers (heads may be fused already: (1, T, T)): heads averaged,
    0.5·A + 0.5·I, rows renormalised, the product from the first layer to the last."""
    joint = np.eye(layers[0].shape[-1])
    for weights in layers:
        mixed = 0.5 * weights.mean(axis=0) + 0.5 * np.eye(weights.shape[-1])
        joint = (mixed / mixed.sum(axis=-1, keepdims=True)) @ joint
    return joint


def attention_maps(config, layers: list[np.ndarray], pool: np.ndarray | None, method: str, layer: int | None = None,
                   head: int | None = None, grid: bool = False) -> tuple[np.ndarray, str]:  # fmt: skip
    """The patch-grid maps (maps, grid_h, grid_w) of one image's weights (layers: (heads, T, T) each, or None
    where the method does not read that layer: see `needed`; pool: (heads, 1, patches) or None), and a line
    saying what they show."""
    prefix = config.num_prefix_tokens
    side = config.image_size // config.patch_size
    if config.class_token:
        reader, source = (lambda rows: rows[..., 0, :]), "the class token's attention"
    else:
        reader, source = (lambda rows: rows[..., prefix:, :].mean(axis=-2)), "the patch tokens' mean attention"
    if pool is not None:
        source = "the attention pool's attention (no class token)"
    if method == "rollout":
        joint = rollout(layers)
        if pool is not None:
            maps = pool.mean(axis=0) @ joint[prefix:, prefix:]
        else:
            maps = reader(joint)[None, prefix:]
        what = f"attention rollout over {len(layers)} layers (heads averaged), {source}"
    else:
        index = len(layers) - 1 if method == "last" or layer is None else layer % len(layers)
        if pool is not None and index == len(layers) - 1:
            per_head = pool[:, 0, :]
        else:
            per_head = reader(layers[index])[:, prefix:]  # (heads, patches)
            if pool is not None:
                source = "the patch tokens' mean attention (no class token)"
        maps = per_head if grid else per_head[[head]] if head is not None else per_head.mean(axis=0, keepdims=True)
        heads = "every head" if grid else f"head {head}" if head is not None else f"mean of {len(per_head)} heads"
        where = "the attention pool" if pool is not None and index == len(layers) - 1 else f"layer {index}"
        what = f"{source}, {where}, {heads}"
    return np.asarray(maps, np.float32).reshape(-1, side, side), what


def explain(classifier: Classifier, image, method: str = "rollout", layer: int | None = None, head: int | None = None,
            grid: bool = False, top_k: int = 5) -> Explanation:  # fmt: skip
    """The attention map of one image (a path or a PIL image) under `classifier`, with its top-k predictions."""
    import mlx.core as mx

    config = classifier.model_config
    check_options(method, layer, head, grid, config.num_hidden_layers)
    if head is not None and not 0 <= head < config.num_attention_heads:
        raise MlxVitError(f"--head {head}: the model has heads 0..{config.num_attention_heads - 1}, or mean")
    pixels = classifier.pixels([image])
    depth = config.num_hidden_layers
    read = depth - 1 if method == "last" or layer is None else layer % depth

    def keep(index: int, weights: mx.array) -> mx.array | None:  # what the method reads: one layer, or head means
        if method == "rollout":
            return weights.astype(mx.float32).mean(axis=1, keepdims=True)
        return weights if index == read else None

    logits, layers, pool = classifier.attention(pixels, keep)
    to_numpy = lambda a: None if a is None else np.array(a[0].astype(mx.float32), np.float64)  # noqa: E731
    maps, what = attention_maps(config, [to_numpy(w) for w in layers], to_numpy(pool), method, layer, head, grid)
    if not np.isfinite(maps).all():
        raise MlxVitError(f"{shown(image)}: the model computed NaN or infinite attention")
    predictions = classifier.predictions_of(logits, top_k)[0] if classifier.labels else []
    if predictions is None:
        raise MlxVitError(f"{shown(image)}: the model computed NaN or infinite scores")
    titles = [f"head {h}" for h in range(len(maps))] if grid else [""]
    return Explanation(maps, model_view(pixels[0], classifier.preprocessing), predictions, what, titles)


def model_view(pixels: np.ndarray, preprocessing) -> np.ndarray:
    """Normalised (H, W, 3) pixels back to the uint8 image the model saw (resized and cropped)."""
    x = pixels.astype(np.float64)
    if preprocessing.do_normalize:
        x = x * np.asarray(preprocessing.image_std) + np.asarray(preprocessing.image_mean)
    if preprocessing.do_rescale:
        x = x / preprocessing.rescale_factor
    return np.clip(np.round(x), 0, 255).astype(np.uint8)


def overlay(view: np.ndarray, heat: np.ndarray, alpha: float = 0.55) -> Image.Image:
    """`heat` (grid_h, grid_w), scaled to 0..1 and upsampled smoothly to the view, coloured, blended on it."""
    low, high = float(heat.min()), float(heat.max())
    scaled = (heat - low) / (high - low) if high > low else np.zeros_like(heat)
    big = Image.fromarray(scaled.astype(np.float32), mode="F").resize(view.shape[1::-1], Image.BILINEAR)
    colors = COLORS[np.clip(np.asarray(big) * 255, 0, 255).round().astype(np.uint8)]
    blended = (1 - alpha) * view.astype(np.float64) + alpha * colors
    return Image.fromarray(np.clip(blended.round(), 0, 255).astype(np.uint8))


def render(
    explanation: Explanation, model_name: str, label: str | None = None, scale: int | None = None
) -> Image.Image:
    """The picture: each map overlaid on the model's view (side by side with --grid), the legend beneath."""
    view = explanation.view
    if scale is None:
        scale = max(1, 448 // max(view.shape[:2]))
    if scale > 1:
        size = (view.shape[1] * scale, view.shape[0] * scale)
        view = np.asarray(Image.fromarray(view).resize(size, Image.BICUBIC))
    tiles = [overlay(view, m) for m in explanation.maps]
    font = ImageFont.load_default(size=14)
    lines = [f"mlx-vit explain · {model_name}", explanation.what]
    for rank, p in enumerate(explanation.predictions, 1):
        lines.append(f"{rank}. {p.label}  {p.score:.4f}")
    if label is not None:
        found = [(r, p) for r, p in enumerate(explanation.predictions, 1) if p.label == label]
        lines.append(f"--label {label}: " + (f"rank {found[0][0]}, {found[0][1].score:.4f}" if found else
                                            "not in the top-k"))  # fmt: skip
    width = max(sum(t.width for t in tiles) + 4 * (len(tiles) - 1), 360)
    columns = max(20, (width - 12) // 8)  # the default font at 14 px is under 8 px a character
    lines = [part for line in lines for part in textwrap.wrap(shown(line, 300), columns) or [""]]
    title = 18 if len(tiles) > 1 else 0
    picture = Image.new("RGB", (width, title + tiles[0].height + 8 + 18 * len(lines) + 8), "white")
    draw = ImageDraw.Draw(picture)
    x = 0
    for tile, name in zip(tiles, explanation.titles, strict=True):
        picture.paste(tile, (x, title))
        if title:
            draw.text((x + 4, 2), name, fill="black", font=font)
        x += tile.width + 4
    y = title + tiles[0].height + 8
    for line in lines:
        draw.text((6, y), line, fill="black", font=font)
        y += 18
    return picture


def write_explanation(classifier: Classifier, image, output, method: str = "rollout", layer: int | None = None,
                      head: int | None = None, grid: bool = False, top_k: int = 5, label: str | None = None,
                      save_npy=None, force: bool = False) -> Explanation:  # fmt: skip
    """`mlx-vit explain`: the PNG at `output` (and the maps at `save_npy`): both are written in full before either
    is renamed into place, so a failure leaves neither; an existing file is replaced only with `force`."""
    import io
    from pathlib import Path

    from mlx_vit.files import exists, failing, replace_together

    targets = [Path(p) for p in (output, save_npy) if p is not None]
    if targets[0].suffix.lower() != ".png":
        raise MlxVitError(f"{shown(targets[0])}: explain writes a PNG; name it .png")
    with failing(targets[0], MlxVitError, "cannot write it"):  # a name too long to resolve
        if save_npy is not None and targets[0].resolve() == targets[1].resolve():
            raise MlxVitError(f"{shown(targets[0])}: -o and --save-npy name the same file")
    for target in targets:
        if exists(target) and not force:
            raise MlxVitError(f"{shown(target)}: already exists (--force replaces it)")
    explanation = explain(classifier, image, method, layer, head, grid, top_k)
    png = io.BytesIO()
    render(explanation, classifier.name, label).save(png, format="PNG")
    contents = [png.getvalue()]
    if save_npy is not None:
        npy = io.BytesIO()
        np.save(npy, explanation.maps if grid else explanation.maps[0], allow_pickle=False)
        contents.append(npy.getvalue())
    replace_together([(target, [data]) for target, data in zip(targets, contents, strict=True)])
    return explanation
