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

import difflib
import functools
import logging
import os
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from mlx_vit.errors import MlxVitError, shown

if TYPE_CHECKING:
    from mlx_vit.classify import Classifier

log = logging.getLogger("mlx_vit")
METHODS = ("rollout", "last", "cls")
# Dark to bright (black, purple, red, orange, pale yellow): brightness rises with attention, so the map reads in
# grey too, and every step is told apart by people with the common colour-vision deficiencies.
_ANCHORS = np.array([(0, 0, 4), (87, 16, 110), (188, 55, 84), (249, 142, 9), (252, 255, 164)], np.float64)
COLORS = np.stack([np.interp(np.linspace(0, 1, 256), np.linspace(0, 1, len(_ANCHORS)), _ANCHORS[:, c])
                   for c in range(3)], axis=1).round().astype(np.uint8)  # fmt: skip


@dataclass(frozen=True)
class LabelRank:
    """Where one label ranks among all the model's labels for an image (1 is the top prediction)."""

    label: str
    rank: int
    of: int
    score: float

    def __str__(self) -> str:
        return f"label {shown(self.label, quote=True)} ranks {ordinal(self.rank)} of {self.of} (score {self.score:.4g})"


@dataclass
class Explanation:
    """One image's attention map: `maps` (maps, grid_h, grid_w) float32 (one map, or one per head with `grid`),
    the model's view of the image (H, W, 3) uint8, its predictions and what the map shows; `image`, the file's
    name ("" for an image given as pixels); `label`, where the label asked about ranks."""

    maps: np.ndarray
    view: np.ndarray
    predictions: list
    what: str
    titles: list[str]
    image: str = ""
    label: LabelRank | None = None


def ordinal(n: int) -> str:
    """1st, 2nd, 3rd, 4th, ..., 11th, 12th, 13th, ..., 21st."""
    suffix = "th" if 10 <= n % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
    return f"{n}{suffix}"


def label_indexes(classifier: Classifier, label: str) -> list[int]:
    """The indexes of `label` among the model's labels (a name may be there twice: ImageNet has two "crane"s): the
    label itself, or the one label that lists it among its comma-separated names (ImageNet's "tabby, tabby cat" for
    "tabby"). An unknown label is refused in one line that suggests the nearest names."""
    if not classifier.labels:
        raise MlxVitError(f"--label: {shown(classifier.name)} has no classification head, so no labels to rank")
    wholes, parts = {}, {}  # a name -> the indexes of the labels it names
    for index, whole in classifier.labels.items():
        wholes.setdefault(whole, []).append(index)
        for part in whole.split(","):
            parts.setdefault(part.strip(), []).append(index)
    if label in wholes:
        return wholes[label]
    if len(parts.get(label, ())) == 1:
        return parts[label]
    if label in parts:  # a name of several labels (ImageNet's "grass snake"): it is one of them, but which?
        found = parts[label]
        named = ", ".join(shown(classifier.labels[i], 60, quote=True) for i in found[:3]) + (", ..." * (len(found) > 3))
        raise MlxVitError(f"--label {shown(label, 60, quote=True)}: a name of {len(found)} of the model's labels "
                          f"({named}); give the whole label")  # fmt: skip
    first = {name: found[0] for name, found in (parts | wholes).items()}
    close = difflib.get_close_matches(label, list(first), n=12)
    nearest = list(dict.fromkeys(first[name] for name in close))[:3]
    quoted = ", ".join(shown(classifier.labels[i], 60, quote=True) for i in nearest)
    raise MlxVitError(f"--label {shown(label, 60, quote=True)}: not one of the model's {len(classifier.labels)} "
                      f"labels; " + (f"the nearest: {quoted}" if quoted else "none is close"))  # fmt: skip


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
            grid: bool = False, top_k: int = 5, label: str | None = None) -> Explanation:  # fmt: skip
    """The attention map of one image (a path or a PIL image) under `classifier`, with its top-k predictions, and
    where `label` ranks among all the labels (the map itself is the same whatever the label: attention does not
    depend on the class)."""
    import mlx.core as mx

    config = classifier.model_config
    check_options(method, layer, head, grid, config.num_hidden_layers)
    asked = None if label is None else label_indexes(classifier, label)
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
    ranked = None
    if asked is not None:
        with np.errstate(over="ignore", invalid="ignore"):
            scores = classifier.scores(np.asarray(logits)[0])
        order = np.argsort(-scores, kind="stable")  # the order top_k gives
        rank, best = min((int(np.flatnonzero(order == i)[0]), i) for i in asked)  # the best of a repeated name
        ranked = LabelRank(classifier.labels[best], rank + 1, len(scores), float(scores[best]))
    titles = [f"head {h}" for h in range(len(maps))] if grid else [""]
    name = "" if isinstance(image, Image.Image) else Path(image).name
    view = model_view(pixels[0], classifier.preprocessing)
    return Explanation(maps, view, predictions, what, titles, name, ranked)


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


FONT_SIZE = 14
# Pillow's default font (a subset of Aileron) draws ASCII only: 'Über-katze' came out as '▯ber-katze'. A legend
# with more is drawn in the first of these system fonts (looked up in the platform's font folders, never the current
# one) that has every character, and a character no font has becomes a '?', said once in a log line. No font is
# shipped: one that covers every label (Chinese, Japanese) is tens of MB, and a '?' that says so beats a box that
# does not.
FONT_FILES = ("DejaVuSans.ttf", "NotoSans-Regular.ttf", "Arial Unicode.ttf", "Arial.ttf")
_NOT_A_CHARACTER = "\U0010ffff"  # mapped by no font: it draws the font's missing-glyph box


def _drawn(font, text: str) -> tuple[tuple[int, int], bytes] | None:
    """The pixels `font` draws for `text` (None where it cannot draw it at all)."""
    try:
        left, top, right, bottom = font.getbbox(text)
        picture = Image.new("L", (max(1, right - left), max(1, bottom - top)))
        ImageDraw.Draw(picture).text((-left, -top), text, fill=255, font=font)
    except (UnicodeError, ValueError, OSError):  # the bitmap font Pillow falls back to without FreeType: latin-1
        return None
    return picture.size, picture.tobytes()


def missing_glyphs(font, text: str) -> set[str]:
    """The characters of `text` that `font` has no glyph for (it would draw its missing-glyph box, or nothing)."""
    box = _drawn(font, _NOT_A_CHARACTER)
    return {c for c in set(text) if not c.isspace() and _drawn(font, c) in (box, None)}


def font_folders() -> list[Path]:
    """The platform's font folders, as Pillow's truetype(NAME) searches them, absolute ones only. Pillow first opens
    NAME itself, relative to the current folder: a 'DejaVuSans.ttf' planted in a folder of downloaded photos was
    parsed by FreeType and drawn. A relative XDG_DATA_DIRS entry (an empty one is the current folder) is left out."""
    if sys.platform == "win32":
        folders = [os.path.join(os.environ["WINDIR"], "fonts")] if os.environ.get("WINDIR") else []
    elif sys.platform == "darwin":
        folders = ["/Library/Fonts", "/System/Library/Fonts", os.path.expanduser("~/Library/Fonts")]
    else:
        data = [os.environ.get("XDG_DATA_HOME") or os.path.expanduser("~/.local/share")]
        data += (os.environ.get("XDG_DATA_DIRS") or "/usr/local/share:/usr/share").split(":")
        folders = [os.path.join(folder, "fonts") for folder in data if folder]
    return [Path(folder) for folder in folders if os.path.isabs(folder)]


@functools.cache
def _system_font(name: str):
    for folder in font_folders():
        for root, _, files in os.walk(folder):  # symlinked folders not followed, as in Pillow
            if name in files:
                try:
                    return ImageFont.truetype(os.path.join(root, name), FONT_SIZE)
                except (OSError, ImportError):  # damaged, or Pillow without FreeType
                    return None
    return None  # not on this system


def legend_font(text: str) -> tuple[ImageFont.ImageFont | ImageFont.FreeTypeFont, set[str]]:
    """The font to draw `text` in: Pillow's default where it has every character, else the first system font of
    FONT_FILES that does, else the one that misses fewest; with the characters it misses."""
    best = None
    for font in (ImageFont.load_default(size=FONT_SIZE), *(_system_font(n) for n in FONT_FILES)):
        if font is None:
            continue
        missing = missing_glyphs(font, text)
        if not missing:
            return font, missing
        if best is None or len(missing) < len(best[1]):
            best = (font, missing)
    return best


def _wrapped(line: str, font, width: int) -> list[str]:
    """`line` in parts that fit `width` pixels in `font`, broken at spaces where it can be."""
    columns = max(10, int(width // max(1.0, font.getlength("i"))))
    while True:
        parts = textwrap.wrap(line, columns) or [""]
        if columns <= 10 or all(font.getlength(part) <= width for part in parts):
            return parts
        columns -= max(1, columns // 10)


def legend(explanation: Explanation, model_name: str) -> list[str]:
    """The legend's lines, before wrapping: the model, the image's file name, what the map shows, the predictions
    and where the label asked about ranks."""
    lines = [f"mlx-vit explain: {model_name}"]
    if explanation.image:
        lines.append(f"image: {explanation.image}")
    lines.append(explanation.what)
    for rank, p in enumerate(explanation.predictions, 1):
        lines.append(f"{rank}. {p.label}  {p.score:.4f}")
    if explanation.label is not None:
        lines.append(str(explanation.label))
    return [shown(line, 300) for line in lines]


def render(explanation: Explanation, model_name: str, scale: int | None = None) -> Image.Image:
    """The picture: each map overlaid on the model's view (side by side with --grid); beneath it a colour bar
    (each map is scaled from its lowest attention to its highest) and the legend."""
    view = explanation.view
    if scale is None:
        scale = max(1, 448 // max(view.shape[:2]))
    if scale > 1:
        size = (view.shape[1] * scale, view.shape[0] * scale)
        view = np.asarray(Image.fromarray(view).resize(size, Image.BICUBIC))
    tiles = [overlay(view, m) for m in explanation.maps]
    lines, ends = legend(explanation, model_name), ("low", "high attention")
    font, missing = legend_font("".join([*lines, *explanation.titles, *ends]))
    if missing:
        shown_missing = ", ".join(shown(c, quote=True) for c in sorted(missing)[:5])
        log.info(f"no font found here draws {shown_missing}{' ...' if len(missing) > 5 else ''}: the picture "
                 f"shows '?' for it (looked for Pillow's default and {', '.join(FONT_FILES)})")  # fmt: skip
    plain = lambda text: text.translate({ord(c): "?" for c in missing})  # noqa: E731
    width = max(sum(t.width for t in tiles) + 4 * (len(tiles) - 1), 360)
    lines = [part for line in lines for part in _wrapped(plain(line), font, width - 12)]
    title = 18 if len(tiles) > 1 else 0
    top = title + tiles[0].height + 8
    picture = Image.new("RGB", (width, top + 18 + 18 * len(lines) + 8), "white")
    draw = ImageDraw.Draw(picture)
    x = 0
    for tile, name in zip(tiles, explanation.titles, strict=True):
        picture.paste(tile, (x, title))
        if title:
            draw.text((x + 4, 2), plain(name), fill="black", font=font)
        x += tile.width + 4
    low, high = (font.getlength(end) for end in ends)
    bar = int(min(256, width - 12 - low - high - 12))
    start = 6 + int(low) + 6
    draw.text((6, top), ends[0], fill="black", font=font)
    colors = COLORS[np.linspace(0, 255, bar).round().astype(np.intp)]
    picture.paste(Image.fromarray(np.repeat(colors[None], 12, axis=0)), (start, top + 2))
    draw.text((start + bar + 6, top), ends[1], fill="black", font=font)
    y = top + 18
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
    explanation = explain(classifier, image, method, layer, head, grid, top_k, label)
    png = io.BytesIO()
    render(explanation, classifier.name).save(png, format="PNG")
    contents = [png.getvalue()]
    if save_npy is not None:
        npy = io.BytesIO()
        np.save(npy, explanation.maps if grid else explanation.maps[0], allow_pickle=False)
        contents.append(npy.getvalue())
    replace_together([(target, [data]) for target, data in zip(targets, contents, strict=True)])
    return explanation
