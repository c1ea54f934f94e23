"""Image file -> pixels, exactly as the checkpoint's Hugging Face image processor would make them.

Semantics follow transformers' PIL-based `ViTImageProcessor` / `DeiTImageProcessor`: resize with PIL and the
configured filter, center crop (zero-padding when the crop is larger), rescale in float64 then cast to float32,
normalize. The output is NHWC float32, the layout the MLX model takes.
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from mlx_vit.errors import ConfigError, ImageError

IMAGENET_STANDARD = [0.5, 0.5, 0.5]

# Pillow's own bomb threshold (2x Image.MAX_IMAGE_PIXELS); larger images are refused, never decoded.
DEFAULT_MAX_PIXELS = 178_956_970

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
            settings[key] = [float(value)] * 3 if isinstance(value, (int, float)) else [float(v) for v in value]
        config = cls(**settings)
        if config.do_center_crop and config.crop_size is None:
            raise ConfigError(f"{source}: do_center_crop is set but crop_size is missing")
        if int(config.resample) not in range(6):
            raise ConfigError(f"{source}: unknown resample filter {config.resample!r}")
        return config

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> PreprocessConfig:
        return cls(**values)

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


def _size_dict(value: Any, source: str, key: str) -> dict[str, int]:
    if isinstance(value, int) and not isinstance(value, bool):
        return {"height": value, "width": value}  # transformers' default_to_square for ViT and DeiT
    if isinstance(value, dict):
        if set(value) >= {"height", "width"}:
            return {"height": int(value["height"]), "width": int(value["width"])}
        if set(value) == {"shortest_edge"}:
            return {"shortest_edge": int(value["shortest_edge"])}
    raise ConfigError(f"{source}: unsupported {key} {value!r} (expected an int, height/width, or shortest_edge)")


def _resized_shape(height: int, width: int, size: dict[str, int]) -> tuple[int, int]:
    if "shortest_edge" in size:
        short, long = (width, height) if width <= height else (height, width)
        new_short, new_long = size["shortest_edge"], int(size["shortest_edge"] * long / short)
        return (new_long, new_short) if width <= height else (new_short, new_long)
    return size["height"], size["width"]


def open_image(path: str | os.PathLike, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Open an image file as RGB: first frame, EXIF orientation applied, transparency composited on white.

    Raises ImageError naming the file for anything that is not a readable image.
    """
    path = Path(path)
    try:
        with Image.open(path) as image:
            width, height = image.size
            if width * height > max_pixels:
                raise ImageError(
                    f"{path}: {width}x{height} pixels is over the limit of {max_pixels:,} (a decompression bomb?)"
                )
            image.seek(0)  # multi-frame TIFF, animated GIF/WebP: the first frame
            image.load()
            image = ImageOps.exif_transpose(image)
            return to_rgb(image)
    except ImageError:
        raise
    except FileNotFoundError:
        raise ImageError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise ImageError(f"{path}: is a folder, not an image") from None
    except UnidentifiedImageError:
        raise ImageError(f"{path}: not an image file Pillow can read") from None
    except Image.DecompressionBombError as error:
        raise ImageError(f"{path}: refused as a decompression bomb ({error})") from None
    except (OSError, SyntaxError, ValueError, EOFError) as error:
        raise ImageError(f"{path}: cannot decode image ({error})") from None


def to_rgb(image: Image.Image) -> Image.Image:
    """Any Pillow mode -> RGB, compositing transparency onto white (as transformers' image processors do)."""
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        image = image.convert("RGBA")
        background = Image.new("RGBA", image.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, image).convert("RGB")
    return image if image.mode == "RGB" else image.convert("RGB")


def preprocess(image: Image.Image, config: PreprocessConfig) -> np.ndarray:
    """An RGB PIL image -> (H, W, 3) float32 pixels."""
    if config.do_resize:
        height, width = _resized_shape(image.height, image.width, config.size)
        image = image.resize((width, height), resample=config.resample)
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
