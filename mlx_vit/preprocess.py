"""Image file -> pixels, exactly as the checkpoint's Hugging Face image processor would make them.

Semantics follow transformers' PIL-based `ViTImageProcessor` / `DeiTImageProcessor`: resize with PIL and the
configured filter, center crop (zero-padding when the crop is larger), rescale in float64 then cast to float32,
normalize. The output is NHWC float32, the layout the MLX model takes.
"""

from __future__ import annotations

import math
import os
import re
import struct
import threading
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

from mlx_vit.errors import ConfigError, ImageError

IMAGENET_STANDARD = [0.5, 0.5, 0.5]

# Pillow's own bomb threshold (2x Image.MAX_IMAGE_PIXELS); larger images are refused, never decoded.
DEFAULT_MAX_PIXELS = 178_956_970
# Any side a preprocessor config may resize or crop to.
MAX_SIDE = 32_768

# The formats opened at all; any other file is refused before a decoder sees it. Pillow reads more, some
# through code we do not want to reach from a folder of photos: EPS, for one, is rendered by running Ghostscript.
FORMATS = ("JPEG", "PNG", "GIF", "TIFF", "WEBP", "BMP", "DIB", "ICO", "PPM", "TGA", "JPEG2000", "AVIF", "QOI",
           "PCX", "SGI", "PSD", "HEIF")  # fmt: skip

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
                fail(f"{name} must be true or false, got {_short(getattr(self, name))}")
        for name in ("size", "crop_size"):
            value = getattr(self, name)
            if value is None and name == "crop_size":
                continue
            if not isinstance(value, dict) or set(value) not in ({"height", "width"}, {"shortest_edge"}):
                fail(f"{name} must have height and width, or shortest_edge, got {_short(value)}")
            for side in value.values():
                if not _is_int(side) or not 0 < side <= MAX_SIDE:
                    fail(f"{name} {_short(value)}: sides must be integers from 1 to {MAX_SIDE}")
        if self.do_center_crop and self.crop_size is None:
            fail("do_center_crop is set but crop_size is missing")
        if self.crop_size is not None and "height" not in self.crop_size:
            fail("crop_size must have height and width")
        if not _is_int(self.resample) or self.resample not in range(6):
            fail(f"unknown resample filter {_short(self.resample)}")
        if not _is_number(self.rescale_factor):
            fail(f"rescale_factor must be a finite number, got {_short(self.rescale_factor)}")
        for name in ("image_mean", "image_std"):
            value = getattr(self, name)
            if not (isinstance(value, list) and len(value) == 3 and all(_is_number(v) for v in value)):
                fail(f"{name} must be three finite numbers (or one), got {_short(value)}")
        if 0 in self.image_std:
            fail("image_std must not be zero")

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


def _short(value: Any) -> str:
    """A value from an untrusted file, short and on one line."""
    if isinstance(value, int) and value.bit_length() > 64:
        return f"an integer of {value.bit_length()} bits"
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _size_dict(value: Any, source: str, key: str) -> dict[str, int]:
    if _is_int(value):
        return {"height": value, "width": value}  # transformers' default_to_square for ViT and DeiT
    if isinstance(value, dict):
        if set(value) >= {"height", "width"}:
            return {"height": value["height"], "width": value["width"]}
        if set(value) == {"shortest_edge"}:
            return {"shortest_edge": value["shortest_edge"]}
    raise ConfigError(f"{source}: unsupported {key} {_short(value)} (expected an int, height/width, or shortest_edge)")


def _resized_shape(height: int, width: int, size: dict[str, int]) -> tuple[int, int]:
    if "shortest_edge" in size:
        short, long = (width, height) if width <= height else (height, width)
        new_short, new_long = size["shortest_edge"], int(size["shortest_edge"] * long / short)
        return (new_long, new_short) if width <= height else (new_short, new_long)
    return size["height"], size["width"]


_max_pixels = DEFAULT_MAX_PIXELS
_pillow_limit = threading.Lock()


def set_max_pixels(limit: int) -> None:
    """The pixel limit `open_image` applies when the call gives none (the CLI's --max-pixels). Never disabled."""
    global _max_pixels
    _max_pixels = _checked_limit(limit)


def _checked_limit(limit: Any) -> int:
    if not _is_int(limit) or limit <= 0:
        raise ValueError(f"a pixel limit must be a positive integer, got {limit!r}")
    # Pillow also refuses images over 2 * MAX_IMAGE_PIXELS, process-wide: raise (never remove) that to ours.
    with _pillow_limit:
        if Image.MAX_IMAGE_PIXELS is not None and limit > 2 * Image.MAX_IMAGE_PIXELS:
            Image.MAX_IMAGE_PIXELS = -(-limit // 2)
    return limit


def _one_line(text: str) -> str:
    return re.sub(r"[\x00-\x1f\x7f]", lambda m: repr(m.group())[1:-1], text)


def open_image(path: str | os.PathLike, max_pixels: int | None = None) -> Image.Image:
    """Open an image file as 8-bit RGB: first frame, EXIF orientation applied, then `to_rgb`.

    Images of more than `max_pixels` pixels (default: `set_max_pixels`, else Pillow's bomb threshold) are refused
    before they are decoded. Raises ImageError, one line naming the file, for anything that is not a readable
    image in one of FORMATS.
    """
    path = Path(path)
    limit = _max_pixels if max_pixels is None else _checked_limit(max_pixels)
    name = _one_line(str(path))
    try:
        with open(path, "rb") as f:
            if _is_heif(f.read(64)):
                _enable_heif(name)
            f.seek(0)
            with warnings.catch_warnings():
                # Pillow warns from half its own threshold; our limit, checked right after, is the rule. And
                # it warns of corrupt EXIF, which we ignore (the pixels are shown as stored).
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                warnings.filterwarnings("ignore", category=UserWarning, module=r"PIL\.")
                image = Image.open(f, formats=_available_formats())
                _check_pixels(image.size, limit, name)
                image.seek(0)  # multi-frame TIFF, animated GIF/WebP/PNG: the first frame
                image.load()
                _check_pixels(image.size, limit, name)  # ICO and ICNS pick their size only when loading
                rgb = to_rgb(_apply_orientation(image))
            # A plain in-memory image, never the file-backed one (its file closes here).
            return image.copy() if rgb is image else rgb
    except ImageError:
        raise
    except FileNotFoundError:
        raise ImageError(f"{name}: no such file") from None
    except IsADirectoryError:
        raise ImageError(f"{name}: is a folder, not an image") from None
    except PermissionError:
        raise ImageError(f"{name}: permission denied") from None
    except UnidentifiedImageError:
        raise ImageError(f"{name}: not an image in a format mlx-vit reads (JPEG, PNG, GIF, TIFF, WebP, ...)") from None
    except Image.DecompressionBombError as error:
        raise ImageError(f"{name}: refused as a decompression bomb ({_one_line(str(error))})") from None
    except MemoryError:
        raise ImageError(f"{name}: too large to decode in the memory available") from None
    except (OSError, SyntaxError, ValueError, EOFError, struct.error) as error:
        reason = _one_line(str(error) or type(error).__name__)[:200]
        raise ImageError(f"{name}: cannot decode image ({reason})") from None


def _available_formats() -> list[str]:
    Image.init()  # loads Pillow's plugins the first time; naming a format Pillow lacks is an error
    return [name for name in FORMATS if name in Image.OPEN]


def _check_pixels(size: tuple[int, int], limit: int, name: str) -> None:
    width, height = size
    if width * height > limit:
        raise ImageError(f"{name}: {width}x{height} pixels is over the limit of {limit:,} (a decompression bomb?)")


# HEIC/HEIF files start with an ISO-BMFF `ftyp` box naming their brands; AVIF shares the box (and mif1).
_HEVC_BRANDS = {b"heic", b"heix", b"hevc", b"hevx", b"heim", b"heis", b"hevm", b"hevs"}
_heif_ready = False


def _is_heif(head: bytes) -> bool:
    if len(head) < 16 or head[4:8] != b"ftyp":
        return False
    end = min(int.from_bytes(head[:4], "big"), len(head))
    brands = {head[8:12]} | {head[i : i + 4] for i in range(16, end - 3, 4)}  # major, then compatible brands
    generic = brands & {b"mif1", b"msf1"} and not brands & {b"avif", b"avis"}
    return bool(brands & _HEVC_BRANDS or generic)


def _enable_heif(name: str) -> None:
    global _heif_ready
    if _heif_ready:
        return
    try:
        import pillow_heif
    except ImportError:
        raise ImageError(
            f"{name}: is a HEIC/HEIF image, which needs the optional pillow-heif (pip install 'mlx-vit[heif]')"
        ) from None
    pillow_heif.register_heif_opener()
    _heif_ready = True


_TRANSPOSE = {  # EXIF orientation -> the transpose that displays the image upright (as ImageOps.exif_transpose)
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}


def _apply_orientation(image: Image.Image) -> Image.Image:
    try:
        orientation = image.getexif().get(0x0112)
    except (OSError, SyntaxError, ValueError, EOFError, struct.error, KeyError, IndexError, TypeError):
        orientation = None  # unreadable EXIF: show the pixels as stored, as browsers do
    method = _TRANSPOSE.get(orientation) if _is_int(orientation) else None
    return image.transpose(method) if method is not None else image


_ALPHA_MODES = {"LA", "PA", "RGBA", "RGBa"}  # not LAB: its "A" band is a colour axis
_SIXTEEN_BIT_MODES = {"I;16", "I;16L", "I;16B", "I;16N"}


def to_rgb(image: Image.Image) -> Image.Image:
    """Any Pillow mode -> 8-bit RGB.

    Transparency (an alpha band, or a palette / colour marked transparent) is composited onto white, as
    transformers' image processors do. 16-bit grayscale is scaled to 8 bits (v / 257, rounded), where Pillow's
    convert -- and so transformers' convert_to_rgb -- clips every value above 255 to white. CMYK, 1-bit, LAB,
    YCbCr and the rest convert as Pillow converts them, which is also what transformers does.
    """
    if image.mode in _SIXTEEN_BIT_MODES:
        image = _sixteen_to_eight(image)
    elif image.mode == "La":  # premultiplied, which Pillow cannot convert: on white, each value is v + 255 - alpha
        values = np.asarray(image).astype(np.int32)
        gray = np.clip(values[..., 0] + 255 - values[..., 1], 0, 255).astype(np.uint8)
        return Image.fromarray(gray).convert("RGB")
    if image.mode in _ALPHA_MODES or image.info.get("transparency") is not None:
        image = image.convert("RGBA")
        background = Image.new("RGBA", image.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, image).convert("RGB")
    return image if image.mode == "RGB" else image.convert("RGB")


def _sixteen_to_eight(image: Image.Image) -> Image.Image:
    values = np.asarray(image).astype(np.uint32)
    gray = Image.fromarray(((values * 255 + 32767) // 65535).astype(np.uint8))
    transparent = image.info.get("transparency")
    if _is_int(transparent):  # a PNG tRNS chunk: pixels of exactly this 16-bit value are transparent
        alpha = Image.fromarray(np.where(values == transparent, 0, 255).astype(np.uint8))
        return Image.merge("LA", (gray, alpha))
    return gray


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
