"""RGB image -> pixels, exactly as the checkpoint's Hugging Face image processor would make them (files: images.py).

Semantics follow transformers' PIL-based `ViTImageProcessor` / `DeiTImageProcessor`: resize with PIL and the
configured filter, center crop (zero-padding when the crop is larger), rescale in float64 then cast to float32,
normalize. The output is NHWC float32, the layout the MLX model takes.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
from PIL import Image

from mlx_vit.errors import ConfigError, ImageError, shown

IMAGENET_STANDARD = [0.5, 0.5, 0.5]

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

    @classmethod
    def from_hf(cls, values: dict[str, Any], model_type: str = "vit", source: str = "preprocessor_config.json"):
        """Read a Hugging Face preprocessor_config.json (new or legacy feature-extractor style)."""
        kind = str(values.get("image_processor_type") or values.get("feature_extractor_type") or model_type)
        settings: dict[str, Any] = dict(_DEFAULTS["deit" if kind.lower().startswith("deit") else "vit"])
        names = {f for f in cls.__dataclass_fields__}
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
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


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


def preprocess(image: Image.Image, config: PreprocessConfig) -> np.ndarray:
    """An RGB PIL image -> (H, W, 3) float32 pixels."""
    if config.do_resize:
        height, width = _resized_shape(image.height, image.width, config.size)
        image = _resize(image, height, width, config)
    pixels = np.asarray(image)
    if config.do_center_crop:
        pixels = center_crop(pixels, config.crop_size["height"], config.crop_size["width"])
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
    top, rows = ((height - crop_height) // 2, crop_height) if height >= crop_height else (0, height)
    left, columns = ((width - crop_width) // 2, crop_width) if width >= crop_width else (0, width)
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
