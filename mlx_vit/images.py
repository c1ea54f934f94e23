"""Image file -> 8-bit RGB, the way transformers' `convert_to_rgb` makes it, with bounded time and memory.

Every file is opened only if it is a regular file, checked against a pixel limit before it is decoded, and
(for progressive JPEGs) against a scan limit, since a decoder's work grows with both. Conversion to RGB runs in
strips, so that an image costs its decoded size plus a few megabytes, never several copies of itself.
"""

from __future__ import annotations

import mmap
import os
import re
import struct
import threading
import warnings
from pathlib import Path
from typing import Any

import numpy as np
from PIL import BmpImagePlugin, IcoImagePlugin, Image, JpegImagePlugin, PngImagePlugin, UnidentifiedImageError

from mlx_vit.choice import DEFAULT_MAX_PIXELS
from mlx_vit.errors import ImageError, shown
from mlx_vit.files import open_regular

# A progressive JPEG is decoded in one pass over the whole image per scan. Encoders write about 10 (libjpeg's
# default script for colour has 10), a crafted file thousands: 3,000 scans of a flat 12 MP image are a 150 kB
# file that takes 20 s. At most 100 keeps a photo at the pixel limit to a few seconds.
MAX_JPEG_SCANS = 100
# A JPEG at quality 100 without chroma subsampling takes under 8 bytes a pixel; metadata and MPO's extra
# pictures fit in the 64 MiB allowed on top.
MAX_JPEG_BYTES_PER_PIXEL = 16

# The formats opened at all; any other file is refused before a decoder sees it. Pillow reads more, some
# through code we do not want to reach from a folder of photos: EPS, for one, is rendered by running Ghostscript.
FORMATS = ("JPEG", "PNG", "GIF", "TIFF", "WEBP", "BMP", "DIB", "ICO", "PPM", "TGA", "JPEG2000", "AVIF", "QOI",
           "PCX", "SGI", "PSD", "HEIF")  # fmt: skip

# Pixels converted to RGB at a time.
STRIP_PIXELS = 2**20

_pillow_limit = threading.Lock()


def checked_limit(limit: Any) -> int:
    """A positive pixel limit, with Pillow's process-wide bomb check raised (never removed) to allow it."""
    if not isinstance(limit, int) or isinstance(limit, bool) or limit <= 0:
        raise ValueError(f"a pixel limit must be a positive integer, got {shown(limit, quote=True)}")
    # Pillow refuses images over 2 * MAX_IMAGE_PIXELS by itself.
    with _pillow_limit:
        if Image.MAX_IMAGE_PIXELS is not None and limit > 2 * Image.MAX_IMAGE_PIXELS:
            Image.MAX_IMAGE_PIXELS = -(-limit // 2)
    return limit


def open_image(path: str | os.PathLike, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Open an image file as 8-bit RGB: first frame, EXIF orientation applied, then `to_rgb`.

    Images of more than `max_pixels` pixels, and progressive JPEGs of more than MAX_JPEG_SCANS scans, are refused
    before they are decoded. Raises ImageError, one line naming the file, for anything that is not a readable
    image in one of FORMATS.
    """
    path = Path(path)
    limit = checked_limit(max_pixels)
    name = shown(path)
    try:
        with open_regular(path, ImageError) as f:
            head = f.read(64)
            if not head:
                raise ImageError(f"{name}: is empty (0 bytes)")
            if _is_heif(head):
                _enable_heif(name)
            if head.startswith(ICO_MAGIC):
                _check_icon(f, limit, name)
            f.seek(0)
            with warnings.catch_warnings():
                # Pillow warns from half its own threshold; our limit, checked right after, is the rule. And
                # it warns of corrupt EXIF, which we ignore (the pixels are shown as stored).
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                warnings.filterwarnings("ignore", category=UserWarning, module=r"PIL\.")
                try:
                    image = Image.open(f, formats=_available_formats())
                except (OSError, SyntaxError, ValueError, EOFError, struct.error) as error:  # a reader's, or none
                    raise _unidentified(f, path, head, name, error) from None
                _check_pixels(image.size, limit, name)
                if isinstance(image, JpegImagePlugin.JpegImageFile) and image.info.get("progressive"):  # MPO too
                    _check_scans(f, image.size, name)
                # Not seek(0): Image.open leaves every reader at its first image (multi-frame TIFF, animated GIF,
                # WebP and PNG at frame 0), and a PSD's, its composite, is frame 1 (its layers are 1..n).
                try:
                    image.load()
                except (OSError, SyntaxError, ValueError, EOFError, struct.error) as error:
                    raise ImageError(f"{name}: cannot decode its {image.format} data ({_reason(error)})") from None
                _check_pixels(image.size, limit, name)  # a reader may pick its image, and so its size, in load()
                rgb = to_rgb(_apply_orientation(image))
            # A plain in-memory image, never the file-backed one (its file closes here).
            return image.copy() if rgb is image else rgb
    except ImageError:
        raise
    except IsADirectoryError:
        raise ImageError(f"{name}: is a folder, not an image") from None
    except Image.DecompressionBombError as error:
        raise ImageError(f"{name}: refused as a decompression bomb ({shown(str(error), 200)})") from None
    except MemoryError:
        raise ImageError(f"{name}: too large to decode in the memory available") from None
    except (OSError, SyntaxError, ValueError, EOFError, struct.error) as error:
        raise ImageError(f"{name}: cannot decode image ({_reason(error)})") from None


def _reason(error: BaseException) -> str:
    """A reader's error in words: struct's and EOF's (which Pillow wraps in a SyntaxError) mean the bytes ran out
    before the reader was done."""
    wrapped = error.args[0] if error.args and isinstance(error.args[0], BaseException) else error
    if isinstance(wrapped, (struct.error, EOFError)):
        return "the file ends too soon"
    return shown(str(error) or type(error).__name__, 200)


def _unidentified(f, path: Path, head: bytes, name: str, error: BaseException) -> ImageError:
    """Why Pillow opened no image: a file that starts with a format's signature (a PNG's, say) whose reader then
    failed is damaged, and its reader's own words say how; anything else is not in a format read here."""
    for format in _available_formats():
        factory, accept = Image.OPEN[format]
        claimed = accept is not None and accept(head[:16])  # TGA has no signature: it would claim any file
        if not claimed or isinstance(claimed, str):
            continue
        try:
            f.seek(0)
            factory(f, os.fspath(path))  # what Image.open tried: its headers only, never the pixels
        except (OSError, SyntaxError, ValueError, EOFError, IndexError, TypeError, struct.error) as failure:
            return ImageError(f"{name}: cannot decode its {format} data ({_reason(failure)})")
    if not isinstance(error, UnidentifiedImageError):  # no signature, yet a reader failed: say its words
        return ImageError(f"{name}: cannot decode image ({_reason(error)})")
    return ImageError(f"{name}: not an image in a format mlx-vit reads (JPEG, PNG, GIF, TIFF, WebP, ...)")


def _available_formats() -> list[str]:
    Image.init()  # loads Pillow's plugins the first time; naming a format Pillow lacks is an error
    return [name for name in FORMATS if name in Image.OPEN]


def _check_pixels(size: tuple[int, int], limit: int, name: str) -> None:
    width, height = size
    if width * height > limit:
        raise ImageError(f"{name}: {width}x{height} pixels is over the limit of {limit:,} (a decompression bomb?)")


ICO_MAGIC = b"\x00\x00\x01\x00"


def _check_icon(f, limit: int, name: str) -> None:
    """Refuse an ICO file whose image over `limit` pixels Pillow would decode while opening it (its ICO reader
    loads the largest entry in Image.open, before its size can be checked), from that image's own header: a PNG,
    or a DIB whose mask's rows follow the image's. Not the icon directory's size, which the image need not have."""
    try:
        f.seek(0)
        entry = IcoImagePlugin.IcoFile(f).entry[0]  # the one Image.open decodes: the largest the directory names
        f.seek(entry.offset)
        png = f.read(8) == b"\x89PNG\r\n\x1a\n"
        f.seek(entry.offset)
        if png:
            width, height = PngImagePlugin.PngImageFile(f).size
        else:
            width, height = BmpImagePlugin.DibImageFile(f).size
            height //= 2
    except (OSError, SyntaxError, ValueError, EOFError, IndexError, TypeError, struct.error):
        return  # Pillow's reader fails on the same bytes, and says so in its own words
    _check_pixels((width, height), limit, name)


def _check_scans(f, size: tuple[int, int], name: str) -> None:
    """Refuse a progressive JPEG of more than MAX_JPEG_SCANS scans, counted before any is decoded, or far larger
    than its pixels: past its last scan the decoder reads on to the end of the file, looking for the next."""
    length = os.fstat(f.fileno()).st_size
    if length > MAX_JPEG_BYTES_PER_PIXEL * size[0] * size[1] + 2**26:
        raise ImageError(f"{name}: {length:,} bytes is far more than a {size[0]}x{size[1]} progressive JPEG holds")
    with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
        if _count_scans(data, MAX_JPEG_SCANS) > MAX_JPEG_SCANS:
            raise ImageError(f"{name}: a progressive JPEG of over {MAX_JPEG_SCANS} scans (each one decodes the "
                             "whole image again), refused")  # fmt: skip


# A marker: FF, then anything but 00 (a stuffed FF inside entropy-coded data) or FF (fill before a marker).
_MARKER = re.compile(rb"\xff[^\x00\xff]")


def _count_scans(data, limit: int) -> int:
    """Start-of-scan markers of the first picture, as libjpeg finds them: segments skipped by their length (an
    EXIF thumbnail inside APP1 is not counted), bytes between markers skipped, up to the first end-of-image (an
    MPO's later pictures are not decoded). Stops counting past `limit`."""
    scans, at = 0, 2  # after SOI
    while scans <= limit and (found := _MARKER.search(data, at)):
        at, marker = found.start(), data[found.start() + 1]
        if marker == 0xD9:  # EOI
            break
        if 0xD0 <= marker <= 0xD7 or marker == 0x01:  # RSTn and TEM stand alone
            at += 2
            continue
        at += 2 + int.from_bytes(data[at + 2 : at + 4], "big")  # the segment; after an SOS, its data follows
        scans += marker == 0xDA
    return scans


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
    method = _TRANSPOSE.get(orientation) if isinstance(orientation, int) else None
    return image.transpose(method) if method is not None else image


_ALPHA_MODES = {"LA", "PA", "RGBA", "RGBa"}  # not LAB: its "A" band is a colour axis
_SIXTEEN_BIT_MODES = {"I;16", "I;16L", "I;16B", "I;16N"}


def to_rgb(image: Image.Image) -> Image.Image:
    """Any Pillow mode -> 8-bit RGB, STRIP_PIXELS at a time (the result and one strip's temporaries in memory).

    Transparency (an alpha band, or a palette / colour marked transparent) is composited onto white, as
    transformers' image processors do. 16-bit grayscale is scaled to 8 bits (v / 257, rounded), where Pillow's
    convert -- and so transformers' convert_to_rgb -- clips every value above 255 to white. CMYK, 1-bit, LAB,
    YCbCr and the rest convert as Pillow converts them, which is also what transformers does. Every one of these
    is a per-pixel operation, so converting in strips gives the same pixels.
    """
    if image.mode == "RGB":
        return image
    rows = max(STRIP_PIXELS // max(image.width, 1), 1)
    if rows >= image.height:
        return _strip_to_rgb(image)
    rgb = Image.new("RGB", image.size)
    for top in range(0, image.height, rows):
        rgb.paste(_strip_to_rgb(image.crop((0, top, image.width, min(top + rows, image.height)))), (0, top))
    return rgb


def _strip_to_rgb(image: Image.Image) -> Image.Image:
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
    if isinstance(transparent, int):  # a PNG tRNS chunk: pixels of exactly this 16-bit value are transparent
        alpha = Image.fromarray(np.where(values == transparent, 0, 255).astype(np.uint8))
        return Image.merge("LA", (gray, alpha))
    return gray
