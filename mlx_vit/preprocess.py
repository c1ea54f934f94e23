"""RGB image -> pixels, exactly as the checkpoint's Hugging Face image processor would make them (files: images.py).

Semantics follow transformers' PIL-based `ViTImageProcessor` / `DeiTImageProcessor`: resize with PIL and the
configured filter, center crop (zero-padding when the crop is larger), rescale in float64 then cast to float32,
normalize. The output is NHWC float32, the layout the MLX model takes.

Or, for a config made by `from_timm` (crop_mode set), timm's eval transform (`transforms_imagenet_eval`) on a PIL
image: resize to timm's scale size floor(input_size / crop_pct) in one of its crop modes, torchvision's center
crop, then the same rescale and normalize (torchvision's ToTensor and Normalize give identical float32 values).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
from PIL import Image

from mlx_vit.errors import ConfigError, ImageError, shown
from mlx_vit.numbers import is_number

IMAGENET_STANDARD = [0.5, 0.5, 0.5]
IMAGENET_DEFAULT_MEAN = [0.485, 0.456, 0.406]
IMAGENET_DEFAULT_STD = [0.229, 0.224, 0.225]

# Any side a preprocessor config may resize or crop to.
MAX_SIDE = 32_768
# The largest magnitude preprocessing may give a pixel. ImageNet statistics give at most 2.64, no rescale and no
# normalization 255: anything much larger is a wrong rescale_factor or image_std, and overflows a float16 model.
MAX_PIXEL_VALUE = 10_000
FLOAT32_MAX = float(np.finfo(np.float32).max)

# Class defaults of transformers' processors, used where a (legacy) preprocessor_config.json leaves keys out.
# Both default image_mean/image_std to IMAGENET_STANDARD (0.5), DeiT too (not the ImageNet statistics).
_DEFAULTS = {
    "vit": {"size": {"height": 224, "width": 224}, "resample": Image.BILINEAR, "do_center_crop": False},
    "deit": {
        "size": {"height": 256, "width": 256},
        "resample": Image.BICUBIC,
        "do_center_crop": True,
        "crop_size": {"height": 224, "width": 224},
    },
}


# timm's eval transform. Its interpolation names and the PIL filters torchvision resizes PIL images with.
TIMM_INTERPOLATIONS = {"nearest": Image.NEAREST, "lanczos": Image.LANCZOS, "bilinear": Image.BILINEAR,
                       "bicubic": Image.BICUBIC, "box": Image.BOX, "hamming": Image.HAMMING}  # fmt: skip
# center: keep the aspect ratio, cover the scale size, crop; squash: resize to the scale size, crop;
# border: keep the aspect ratio, fit inside the scale size, pad with the mean colour, crop.
CROP_MODES = ("center", "squash", "border")
# timm's largest pretrained crop_pct is 1.15 (VOLO); above 1 the resized image is smaller than the crop and padded.
MAX_CROP_PCT = 2.0
# What timm's resolve_data_config takes where a pretrained_cfg leaves a key out (or null).
_TIMM_DEFAULTS = {"input_size": [3, 224, 224], "interpolation": "bicubic", "mean": IMAGENET_DEFAULT_MEAN,
                  "std": IMAGENET_DEFAULT_STD, "crop_pct": 0.875, "crop_mode": "center"}  # fmt: skip


@dataclass
class PreprocessConfig:
    do_resize: bool = True
    size: dict[str, int] = field(default_factory=lambda: {"height": 224, "width": 224})
    resample: int = Image.BILINEAR
    do_center_crop: bool = False
    crop_size: dict[str, int] | None = None
    do_rescale: bool = True
    rescale_factor: float = 1 / 255
    do_normalize: bool = True
    image_mean: list[float] = field(default_factory=lambda: list(IMAGENET_STANDARD))
    image_std: list[float] = field(default_factory=lambda: list(IMAGENET_STANDARD))
    # None: transformers' semantics. A timm crop mode (CROP_MODES): timm's eval transform, where crop_size is the
    # model input, size is timm's scale size floor(crop_size / crop_pct), and do_resize and do_center_crop are set.
    crop_mode: str | None = None
    crop_pct: float | None = None  # timm's crop_pct (crop_size / size), with crop_mode only

    @classmethod
    def from_hf(cls, values: dict[str, Any], model_type: str = "vit", source: str = "preprocessor_config.json"):
        """Read a Hugging Face preprocessor_config.json (new or legacy feature-extractor style)."""
        kind = str(values.get("image_processor_type") or values.get("feature_extractor_type") or model_type)
        settings: dict[str, Any] = dict(_DEFAULTS["deit" if kind.lower().startswith("deit") else "vit"])
        names = set(cls.__dataclass_fields__) - {"crop_mode", "crop_pct"}  # HF files' crop_pct is not timm's
        settings.update({k: v for k, v in values.items() if k in names and v is not None})
        settings["size"] = _size_dict(settings["size"], source, "size")
        if settings.get("crop_size") is not None:
            settings["crop_size"] = _size_dict(settings["crop_size"], source, "crop_size")
        for key in ("image_mean", "image_std"):
            value = settings.get(key, IMAGENET_STANDARD)
            if _is_number(value):
                value = [value] * 3
            if isinstance(value, list) and all(_is_number(v) for v in value):
                value = [float(v) for v in value]
            settings[key] = value  # anything else: validate() says what is wrong
        if _is_number(settings.get("rescale_factor")):
            settings["rescale_factor"] = float(settings["rescale_factor"])
        return cls.from_dict(settings, source)

    @classmethod
    def from_timm(cls, cfg: dict[str, Any], source: str) -> PreprocessConfig:
        """From a timm pretrained_cfg or data config: the pixels of timm's eval transform,
        `create_transform(**resolve_data_config(pretrained_cfg=cfg))`, on a PIL RGB image.

        Reads input_size, interpolation, mean, std, crop_pct and crop_mode (other keys are ignored: a
        pretrained_cfg has many); absent or null ones take resolve_data_config's defaults. Stricter than timm:
        a crop_pct of 0, an unknown crop_mode or interpolation, or "random" (training only) are refused.
        """

        def fail(message: str) -> None:
            raise ConfigError(f"{source}: {message}")

        if not isinstance(cfg, dict):
            fail(f"a timm config must be an object, got {shown(cfg, quote=True)}")
        values = {key: default if cfg.get(key) is None else cfg[key] for key, default in _TIMM_DEFAULTS.items()}
        input_size = values["input_size"]
        if not (isinstance(input_size, (list, tuple)) and len(input_size) == 3 and all(map(_is_int, input_size))
                and input_size[0] == 3 and all(0 < side <= MAX_SIDE for side in input_size[1:])):  # fmt: skip
            fail(f"input_size must be [3, height, width] with sides from 1 to {MAX_SIDE}, "
                 f"got {shown(input_size, quote=True)}")  # fmt: skip
        interpolation = values["interpolation"]
        if interpolation == "random":
            fail("interpolation 'random' (bilinear or bicubic at random) is for training; evaluation needs one")
        if not isinstance(interpolation, str) or interpolation not in TIMM_INTERPOLATIONS:
            fail(f"unknown interpolation {shown(interpolation, quote=True)} "
                 f"(timm's are {', '.join(TIMM_INTERPOLATIONS)})")  # fmt: skip
        statistics = {}
        for key in ("mean", "std"):
            value = values[key]
            if not (isinstance(value, (list, tuple)) and len(value) in (1, 3) and all(map(_is_number, value))):
                fail(f"{key} must be three finite numbers (or one), got {shown(value, quote=True)}")
            statistics[key] = [float(v) for v in value] * (3 // len(value))  # one value: torch broadcasts it
        crop_pct = values["crop_pct"]
        crop_size = {"height": input_size[1], "width": input_size[2]}
        size = _timm_scale_size(values["crop_mode"], crop_pct, crop_size, fail)
        config = cls(do_resize=True, size=size, resample=TIMM_INTERPOLATIONS[interpolation], do_center_crop=True,
                     crop_size=crop_size, do_rescale=True, rescale_factor=1 / 255, do_normalize=True,
                     image_mean=statistics["mean"], image_std=statistics["std"], crop_mode=values["crop_mode"],
                     crop_pct=float(crop_pct))  # fmt: skip
        config.validate(source)
        return config

    @classmethod
    def from_dict(cls, values: dict[str, Any], source: str = "config.json") -> PreprocessConfig:
        """From `to_dict`'s output (an mlx-vit folder's config.json), every value checked."""
        if not isinstance(values, dict) or set(values) - set(cls.__dataclass_fields__):
            keys = ", ".join(cls.__dataclass_fields__)
            raise ConfigError(f"{source}: preprocessing must be an object with only the keys {keys}")
        config = cls(**values)
        config.validate(source)
        return config

    def validate(self, source: str = "config.json") -> None:
        """ConfigError unless every value has the type and range the processor needs (sides up to MAX_SIDE)."""

        def fail(message: str) -> None:
            raise ConfigError(f"{source}: {message}")

        for name in ("do_resize", "do_center_crop", "do_rescale", "do_normalize"):
            if not isinstance(getattr(self, name), bool):
                fail(f"{name} must be true or false, got {shown(getattr(self, name), quote=True)}")
        for name in ("size", "crop_size"):
            value = getattr(self, name)
            if value is None and name == "crop_size":
                continue
            if not isinstance(value, dict) or set(value) not in ({"height", "width"}, {"shortest_edge"}):
                fail(f"{name} must have height and width, or shortest_edge, got {shown(value, quote=True)}")
            for side in value.values():
                if not _is_int(side) or not 0 < side <= MAX_SIDE:
                    fail(f"{name} {shown(value, quote=True)}: sides must be integers from 1 to {MAX_SIDE}")
        if self.do_center_crop and self.crop_size is None:
            fail("do_center_crop is set but crop_size is missing")
        if self.crop_size is not None and "height" not in self.crop_size:
            fail("crop_size must have height and width")
        if not _is_int(self.resample) or self.resample not in range(6):
            fail(f"unknown resample filter {shown(self.resample, quote=True)}")
        if not _is_number(self.rescale_factor):
            fail(f"rescale_factor must be a finite number, got {shown(self.rescale_factor, quote=True)}")
        for name in ("image_mean", "image_std"):
            value = getattr(self, name)
            if not (isinstance(value, list) and len(value) == 3 and all(_is_number(v) for v in value)):
                fail(f"{name} must be three finite numbers (or one), got {shown(value, quote=True)}")
        if self.do_rescale and not 0 < self.rescale_factor <= 1:
            fail(f"rescale_factor must be above 0 and at most 1 (usually 1/255), got {shown(self.rescale_factor)}")
        if self.do_normalize and not all(s > 0 for s in self.image_std):
            fail(f"image_std must be positive, got {shown(self.image_std)}")
        if any(abs(v) > FLOAT32_MAX for v in (*self.image_mean, *self.image_std)):  # they are applied in float32
            fail(f"image_mean and image_std must fit float32, got {shown([*self.image_mean, *self.image_std])}")
        if self.crop_mode is None and self.crop_pct is not None:
            fail(f"crop_pct {shown(self.crop_pct, quote=True)} needs a timm crop_mode ({', '.join(CROP_MODES)})")
        if self.crop_mode is not None:
            _check_crop_mode(self.crop_mode, fail)
            if not (self.do_resize and self.do_center_crop):
                fail(f"crop_mode {self.crop_mode!r} (timm's eval transform) needs do_resize and do_center_crop")
            scale_size = _timm_scale_size(self.crop_mode, self.crop_pct, self.crop_size, fail)
            if self.size != scale_size:
                fail(f"size must be {scale_size}, floor(crop_size / crop_pct) as timm resizes, "
                     f"got {shown(self.size, quote=True)}")  # fmt: skip
        largest = self.largest_value()
        if largest > MAX_PIXEL_VALUE:
            fail(f"this preprocessing makes pixel values up to {largest:.3g}, over the limit of {MAX_PIXEL_VALUE:,} "
                 "(a wrong rescale_factor or image_std?)")  # fmt: skip

    def largest_value(self) -> float:
        """The largest magnitude a pixel (0-255 in every channel) can have after rescaling and normalizing."""
        top = 255 * self.rescale_factor if self.do_rescale else 255.0
        if not self.do_normalize:
            return top
        return max(max(abs(m), abs(top - m)) / s for m, s in zip(self.image_mean, self.image_std, strict=True))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def at_size(self, size: int) -> PreprocessConfig:
        """The preprocessing for running the same model on size x size inputs (`--image-size`), scaled as the
        reference would: timm-style configs as timm makes them for input_size (3, size, size) (same crop_pct,
        crop_mode and interpolation); transformers-style ones with a center crop get a size x size crop and the
        resize scaled by size / crop (rounded to the nearest pixel), without one a size x size (or shortest-edge
        `size`) resize. fixed_size() is then (size, size), except for a shortest-edge resize without a crop.
        """
        source = f"--image-size {shown(size)}"

        def fail(message: str) -> None:
            raise ConfigError(f"{source}: {message}")

        if not _is_int(size) or not 0 < size <= MAX_SIDE:
            fail(f"the image size must be an integer from 1 to {MAX_SIDE}")
        square = {"height": size, "width": size}
        changes: dict[str, Any] = {"crop_size": square} if self.do_center_crop else {}
        if self.crop_mode is not None:
            changes["size"] = _timm_scale_size(self.crop_mode, self.crop_pct, square, fail)
        elif self.do_resize and self.do_center_crop:
            crop = self.crop_size
            if "shortest_edge" in self.size:
                changes["size"] = {"shortest_edge": _scaled(self.size["shortest_edge"], size, min(crop.values()))}
            else:
                changes["size"] = {k: _scaled(self.size[k], size, crop[k]) for k in ("height", "width")}
        elif self.do_resize:
            changes["size"] = {"shortest_edge": size} if "shortest_edge" in self.size else square
        return PreprocessConfig.from_dict({**self.to_dict(), **changes}, source)

    def fixed_size(self) -> tuple[int, int] | None:
        """(height, width) of every output, or None where it depends on the input image."""
        if self.do_center_crop:
            return self.crop_size["height"], self.crop_size["width"]
        if self.do_resize and "height" in self.size:
            return self.size["height"], self.size["width"]
        return None

    def output_size(self, height: int, width: int) -> tuple[int, int]:
        """(height, width) of the pixels this config makes from an image of the given size."""
        if self.do_center_crop:
            return self.crop_size["height"], self.crop_size["width"]
        if self.do_resize:
            return _resized_shape(height, width, self.size)
        return height, width


def _is_int(value: Any) -> bool:
    return is_number(value, integer=True)


def _is_number(value: Any) -> bool:
    return is_number(value)


def _scaled(side: int, size: int, crop: int) -> int:
    """side * size / crop, rounded to the nearest integer (halves up), at least 1."""
    return max(1, (2 * side * size + crop) // (2 * crop))


def _check_crop_mode(crop_mode: Any, fail) -> None:
    if not isinstance(crop_mode, str) or crop_mode not in CROP_MODES:
        fail(f"unknown crop_mode {shown(crop_mode, quote=True)} (timm's are {', '.join(CROP_MODES)})")


def _timm_scale_size(crop_mode: Any, crop_pct: Any, crop_size: dict[str, int], fail) -> dict[str, int]:
    """timm's resize target for a crop: floor(side / crop_pct) per side (ConfigError through `fail` if invalid)."""
    _check_crop_mode(crop_mode, fail)
    if not _is_number(crop_pct) or not 0 < crop_pct <= MAX_CROP_PCT:
        fail(f"crop_pct must be a number above 0 and at most {MAX_CROP_PCT}, got {shown(crop_pct, quote=True)}")
    sides = {key: crop_size[key] / crop_pct for key in ("height", "width")}
    if not all(1 <= side <= MAX_SIDE for side in sides.values()):
        fail(f"crop_pct {crop_pct} resizes a {crop_size['width']}x{crop_size['height']} crop from "
             f"{sides['width']:.6g}x{sides['height']:.6g} pixels: sides must be from 1 to {MAX_SIDE}")  # fmt: skip
    return {key: math.floor(side) for key, side in sides.items()}


def _size_dict(value: Any, source: str, key: str) -> dict[str, int]:
    if _is_int(value):
        return {"height": value, "width": value}  # transformers' default_to_square for ViT and DeiT
    if isinstance(value, dict):
        if set(value) >= {"height", "width"}:
            return {"height": value["height"], "width": value["width"]}
        if set(value) == {"shortest_edge"}:
            return {"shortest_edge": value["shortest_edge"]}
    raise ConfigError(
        f"{source}: unsupported {key} {shown(value, quote=True)} (expected an int, height/width, or shortest_edge)"
    )


def _resized_shape(height: int, width: int, size: dict[str, int]) -> tuple[int, int]:
    if "shortest_edge" in size:
        short, long = (width, height) if width <= height else (height, width)
        new_short, new_long = size["shortest_edge"], int(size["shortest_edge"] * long / short)
        return (new_long, new_short) if width <= height else (new_short, new_long)
    return size["height"], size["width"]


def _timm_resized_shape(height: int, width: int, size: dict[str, int], crop_mode: str) -> tuple[int, int]:
    """The shape timm's eval transform resizes a height x width image to, for its scale size `size`."""
    target_height, target_width = size["height"], size["width"]
    if crop_mode == "squash":
        return target_height, target_width
    if crop_mode == "center" and target_height == target_width:
        # torchvision's Resize(int): the shorter side to it, the longer truncated, exactly transformers' rule
        return _resized_shape(height, width, {"shortest_edge": target_height})
    # timm's ResizeKeepRatio: one scale for both sides, chosen so the image covers the scale size (center) or fits
    # inside it (border); sides rounded half to even, as Python's round. Never 0 (where timm would fail).
    ratios = (height / target_height, width / target_width)
    ratio = min(ratios) if crop_mode == "center" else max(ratios)
    return max(1, round(height / ratio)), max(1, round(width / ratio))


def _crop_start(side: int, crop: int, torchvision: bool) -> int:
    """Where a center crop starts along a side at least as long: transformers floors, torchvision (timm) rounds
    half to even."""
    return round((side - crop) / 2) if torchvision else (side - crop) // 2


def preprocess(image: Image.Image, config: PreprocessConfig) -> np.ndarray:
    """An RGB PIL image -> (H, W, 3) float32 pixels."""
    if config.do_resize:
        if config.crop_mode is None:
            height, width = _resized_shape(image.height, image.width, config.size)
        else:
            height, width = _timm_resized_shape(image.height, image.width, config.size, config.crop_mode)
        image = _resize(image, height, width, config)
    pixels = np.asarray(image)
    if config.do_center_crop:
        crop_height, crop_width = config.crop_size["height"], config.crop_size["width"]
        if config.crop_mode is None:
            pixels = center_crop(pixels, crop_height, crop_width)
        else:
            # timm's border mode pads with the mean colour (clipped to 0..255 as PIL does), the others with 0
            fill = [min(255, max(0, round(255 * m))) for m in config.image_mean] if config.crop_mode == "border" else 0
            pixels = torchvision_center_crop(pixels, crop_height, crop_width, fill)
    if config.do_rescale:
        pixels = (pixels.astype(np.float64) * config.rescale_factor).astype(np.float32)
    pixels = pixels.astype(np.float32, copy=False)
    if config.do_normalize:
        mean = np.asarray(config.image_mean, dtype=np.float32)
        std = np.asarray(config.image_std, dtype=np.float32)
        pixels = (pixels - mean) / std
    return pixels


# Resized images larger than this are resized only where the center crop will look, which gives the same
# pixels: under a shortest-edge resize, a 1-pixel-high strip of a photo would otherwise become gigapixels.
RESIZE_WINDOW_ABOVE = 2**24


def _resize(image: Image.Image, height: int, width: int, config: PreprocessConfig) -> Image.Image:
    if height * width <= RESIZE_WINDOW_ABOVE:
        return image.resize((width, height), resample=config.resample)
    if not config.do_center_crop:
        raise ImageError(f"resizing a {image.width}x{image.height} image to {width}x{height} is over the limit of "
                         f"{RESIZE_WINDOW_ABOVE:,} pixels")  # fmt: skip
    crop_height, crop_width = config.crop_size["height"], config.crop_size["width"]
    timm = config.crop_mode is not None
    top, rows = (_crop_start(height, crop_height, timm), crop_height) if height >= crop_height else (0, height)
    left, columns = (_crop_start(width, crop_width, timm), crop_width) if width >= crop_width else (0, width)
    sy, sx = image.height / height, image.width / width
    box = (left * sx, top * sy, (left + columns) * sx, (top + rows) * sy)
    return image.resize((columns, rows), resample=config.resample, box=box)


def center_crop(pixels: np.ndarray, height: int, width: int) -> np.ndarray:
    """Crop (H, W, C) to height x width around the center; zero-pad first where the image is smaller."""
    h, w = pixels.shape[:2]
    if h < height or w < width:
        padded = np.zeros((max(h, height), max(w, width), *pixels.shape[2:]), dtype=pixels.dtype)
        top, left = math.ceil((padded.shape[0] - h) / 2), math.ceil((padded.shape[1] - w) / 2)
        padded[top : top + h, left : left + w] = pixels
        pixels, h, w = padded, padded.shape[0], padded.shape[1]
    top, left = (h - height) // 2, (w - width) // 2
    return pixels[top : top + height, left : left + width]


def torchvision_center_crop(pixels: np.ndarray, height: int, width: int, fill: int | list[int] = 0) -> np.ndarray:
    """Crop (H, W, C) uint8 to height x width as torchvision's CenterCrop (and timm's CenterCropOrPad) crops a PIL
    image: first pad with `fill` where the image is smaller, the odd pixel at the bottom / right (transformers puts
    it at the top / left), then crop from int(round((h - height) / 2)), rounding halves to even."""
    h, w = pixels.shape[:2]
    top = _crop_start(h, height, True) if h > height else 0
    left = _crop_start(w, width, True) if w > width else 0
    cropped = pixels[top : top + height, left : left + width]
    if cropped.shape[:2] == (height, width):
        return cropped
    padded = np.empty((height, width, *pixels.shape[2:]), dtype=pixels.dtype)
    padded[...] = np.asarray(fill, dtype=pixels.dtype)
    top, left = (height - cropped.shape[0]) // 2, (width - cropped.shape[1]) // 2
    padded[top : top + cropped.shape[0], left : left + cropped.shape[1]] = cropped
    return padded
