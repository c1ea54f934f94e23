"""Image files, hostile and broken: each is refused before it is decoded where its size or work is over a limit,
or with a one-line ImageError naming the file; every mode becomes the RGB transformers would make; a batch of photos
mixed with broken files still classifies every good photo. Memory is measured in fresh interpreters.
"""

from __future__ import annotations

import io
import json
import os
import struct
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
from checkpoints import IMAGES, one_line_error, peak_mb, run_cli
from PIL import IcoImagePlugin, Image, ImageFile, ImageOps

from mlx_vit import images
from mlx_vit.classify import load
from mlx_vit.errors import ImageError, shown
from mlx_vit.images import DEFAULT_MAX_PIXELS, MAX_JPEG_SCANS, checked_limit, open_image, to_rgb
from mlx_vit.preprocess import PreprocessConfig, preprocess


def _png_header_only(path: Path, width: int, height: int, mode_bytes: bytes = b"\x08\x02") -> Path:
    """A PNG that declares width x height (8-bit RGB) and holds one tiny, incomplete IDAT."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">II", width, height) + mode_bytes + b"\x00\x00\x00"
    idat = zlib.compress(b"\x00" * 64)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b""))
    return path


def _patched(source: bytes, offset: int, fmt: str, *values) -> bytes:
    raw = bytearray(source)
    struct.pack_into(fmt, raw, offset, *values)
    return bytes(raw)


def _saved(image: Image.Image, format: str, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format, **kwargs)
    return buffer.getvalue()


SMALL = Image.open(IMAGES / "chelsea.png").convert("RGB").resize((40, 30))


def _bombs() -> dict[str, bytes]:
    jpeg = _saved(SMALL, "JPEG")
    sof = jpeg.index(b"\xff\xc0")
    gif = _saved(SMALL.convert("P"), "GIF")
    bmp = _saved(SMALL, "BMP")
    tiff = _saved(SMALL, "TIFF")
    webp = _saved(SMALL, "WEBP", lossless=True)
    return {
        "gif 65535x65535": _patched(gif, 6, "<HH", 65535, 65535),
        "jpeg 65500x65500": _patched(jpeg, sof + 5, ">HH", 65500, 65500),
        "bmp 100000x100000": _patched(bmp, 18, "<ii", 100_000, 100_000),
        "tiff 30000x30000": tiff.replace(
            struct.pack("<HHII", 256, 4, 1, 40), struct.pack("<HHII", 256, 4, 1, 30000)
        ).replace(struct.pack("<HHII", 257, 4, 1, 30), struct.pack("<HHII", 257, 4, 1, 30000)),
        "webp 16383x16383 (VP8L)": webp[:21] + _vp8l_size(webp[21:25], 16383, 16383) + webp[25:],
    }


def _vp8l_size(bits: bytes, width: int, height: int) -> bytes:
    value = int.from_bytes(bits, "little")
    value = (value & ~((1 << 28) - 1)) | (width - 1) | ((height - 1) << 14)
    return value.to_bytes(4, "little")


@pytest.mark.parametrize("bomb", list(_bombs()))
def test_decompression_bombs_are_refused_before_decoding(tmp_path, monkeypatch, bomb):
    raw = _bombs()[bomb]
    path = tmp_path / f"bomb.{bomb.split()[0]}"
    path.write_bytes(raw)
    with monkeypatch.context() as unlimited:
        unlimited.setattr(Image, "MAX_IMAGE_PIXELS", None)
        with Image.open(path) as declared:  # the file really declares those dimensions
            assert declared.width * declared.height > DEFAULT_MAX_PIXELS, declared.size
    assert len(raw) < 20_000
    message = one_line_error(ImageError, open_image, path, names=path)
    assert f"over the limit of {DEFAULT_MAX_PIXELS:,}" in message or "decompression bomb" in message, message


def test_pixel_limit_is_configurable_never_disabled(tmp_path, monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", Image.MAX_IMAGE_PIXELS)  # restored afterwards
    big = _png_header_only(tmp_path / "200mp.png", 20_000, 10_000)  # 2e8: over Pillow's own threshold
    message = one_line_error(ImageError, open_image, big)  # Pillow's own check says it first, in its words
    assert "refused as a decompression bomb (Image size (200000000 pixels) exceeds limit of 178956970" in message
    # A higher limit lets it through the size check (and Pillow's) to the decoder, which finds it truncated.
    message = one_line_error(ImageError, open_image, big, max_pixels=250_000_000, names=big)
    assert "cannot decode its PNG data" in message and "over the limit" not in message
    # Lower limits refuse smaller images; the limit is inclusive.
    photo = IMAGES / "chelsea.png"  # 451 x 300
    assert "451x300 pixels is over the limit of 135,299" in one_line_error(ImageError, open_image, photo,
                                                                            max_pixels=135_299)  # fmt: skip
    assert open_image(photo, max_pixels=135_300).size == (451, 300)
    for disabled in (0, -1, None, 1.5, True):
        with pytest.raises(ValueError):
            checked_limit(disabled)
    for disabled in (0, -1, 2.0):
        with pytest.raises(ValueError):
            open_image(photo, max_pixels=disabled)
    assert open_image(photo).size == (451, 300)


def test_pixel_limit_goes_with_the_classifier_not_the_process(vit_folder):
    photo = IMAGES / "chelsea.png"  # 135,300 pixels
    strict, default = load(str(vit_folder), max_pixels=100_000), load(str(vit_folder))
    assert "over the limit of 100,000" in one_line_error(ImageError, strict.classify, [photo], names=photo)
    [result] = strict.classify_files([photo])
    assert "over the limit of 100,000" in result.error
    assert default.classify([photo])[0] and open_image(photo).size == (451, 300)  # nothing global changed


def _icon(path: Path, image: bytes, declared: int = 16) -> Path:
    """An ICO file of one entry whose directory says declared x declared, holding `image` (a PNG, or a DIB with
    its height doubled for the mask that follows, as icons store them) of whatever size that image has."""
    directory = struct.pack("<HHH", 0, 1, 1) + struct.pack("<BBBBHHII", declared, declared, 0, 0, 1, 32, len(image), 22)
    path.write_bytes(directory + image)
    return path


def _icons(tmp_path: Path) -> dict[str, Path]:
    dib = _saved(Image.new("RGB", (300, 400), (200, 10, 30)), "DIB")  # 300x200, then 200 rows of mask
    return {
        "png": _icon(tmp_path / "png.ico", _saved(Image.new("RGB", (300, 200), (10, 200, 30)), "PNG")),
        "dib": _icon(tmp_path / "dib.ico", dib[:4] + struct.pack("<ii", 300, 400) + dib[12:]),
    }


@pytest.mark.parametrize("kind", ["png", "dib"])
def test_an_icons_image_over_the_limit_is_refused_before_it_is_decoded(tmp_path, monkeypatch, kind):
    """An ICO's directory says 16x16 (256 pixels) while the image it holds is 300x200: Pillow's ICO reader decodes
    that image inside Image.open, so its size is read from the image's own header first, and nothing decoded."""
    path = _icons(tmp_path)[kind]
    assert path.read_bytes()[6:8] == bytes([16, 16])
    assert open_image(path).size == (300, 200)  # a real icon, which Pillow decodes to its image's size
    decoded = []
    real_load = ImageFile.ImageFile.load
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda image: decoded.append(image) or real_load(image))
    message = one_line_error(ImageError, open_image, path, max_pixels=10_000, names=path)
    assert "300x200 pixels is over the limit of 10,000" in message, message
    assert decoded == []
    assert open_image(path, max_pixels=60_000).size == (300, 200) and decoded  # the limit is inclusive


def test_a_size_a_reader_picks_when_loading_is_checked_again(tmp_path, monkeypatch):
    """A reader may choose its image, and so its size, only in load() (Pillow's ICNS reader does): what load()
    makes is checked too. Simulated with the crafted icon, its ICO reader made to wait for load() before reading
    the image, and the check of the icon's own header (the test above) taken away."""
    path = _icons(tmp_path)["png"]
    real_open = IcoImagePlugin.IcoImageFile._open

    def open_without_loading(image):
        image.load = lambda: None  # Pillow's _open ends in self.load(): not yet
        try:
            real_open(image)
        finally:
            del image.load
        image._mode = "RGBA"  # as a lazy reader says before loading (Pillow's ICNS reader does)

    monkeypatch.setattr(IcoImagePlugin.IcoImageFile, "_open", open_without_loading)
    monkeypatch.setattr(images, "_check_icon", lambda f, limit, name: None)
    with Image.open(path) as lazy:
        assert lazy.size == (16, 16)  # the directory's size, until loaded
        with pytest.warns(UserWarning, match="not the expected size"):
            lazy.load()
        assert lazy.size == (300, 200)
    message = one_line_error(ImageError, open_image, path, max_pixels=10_000, names=path)
    assert "300x200 pixels is over the limit of 10,000" in message, message


def _broken_files(tmp_path: Path) -> dict[str, Path]:
    """Real broken files of every kind, written to tmp_path."""
    files = {}

    def write(name: str, raw: bytes) -> None:
        files[name] = tmp_path / name
        files[name].write_bytes(raw)

    for name, raw in {
        "png": (IMAGES / "chelsea.png").read_bytes(),
        "jpg": (IMAGES / "rocket.jpg").read_bytes(),
        "gif": _saved(SMALL.convert("P"), "GIF"),
        "tif": _saved(SMALL, "TIFF"),
        "webp": _saved(SMALL, "WEBP"),
        "bmp": _saved(SMALL, "BMP"),
    }.items():
        write(f"truncated-half.{name}", raw[: len(raw) // 2])
        write(f"truncated-header.{name}", raw[:20])
    write("empty.jpg", b"")
    write("text.png", b"just some text\nwith lines\n")
    write("random.jpg", np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    write("html.jpg", b"<!DOCTYPE html><html><body>404 not found</body></html>")
    write("svg.svg", b'<svg xmlns="http://www.w3.org/2000/svg" width="10" height="10"/>')
    write("ghostscript.eps", b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n(x) print\nshowpage\n")
    write("pdf.pdf", b"%PDF-1.4\n1 0 obj<<>>endobj\ntrailer<<>>\n%%EOF\n")
    png = bytearray((IMAGES / "chelsea.png").read_bytes())
    png[40:48] = b"\x00" * 8  # inside IHDR / the first chunk: bad CRC
    write("bad-crc.png", bytes(png))
    write("zero-size.png", _png_header_only(tmp_path / "z.png", 0, 0).read_bytes())
    files["missing.png"] = tmp_path / "missing.png"
    files["folder.jpg"] = tmp_path / "folder.jpg"
    files["folder.jpg"].mkdir()
    files["fifo.png"] = tmp_path / "fifo.png"  # open() would block until a writer came: never opened
    os.mkfifo(files["fifo.png"])
    files["dev-zero.png"] = tmp_path / "dev-zero.png"  # endless: never read
    files["dev-zero.png"].symlink_to("/dev/zero")
    files["long-name.png"] = tmp_path / ("x" * 300 + ".png")  # a name the system cannot look up (ENAMETOOLONG)
    return files


def test_broken_files_are_one_line_errors_naming_the_file(tmp_path):
    for name, path in _broken_files(tmp_path).items():
        message = one_line_error(ImageError, open_image, path, names=path)
        assert message.startswith(f"{shown(path)}: "), (name, message)
    eps = tmp_path / "ghostscript.eps"
    assert "not an image in a format mlx-vit reads" in one_line_error(ImageError, open_image, eps)


def test_empty_and_damaged_files_say_which_they_are(tmp_path):
    """A 0-byte file is empty; a file with a format's signature whose data is damaged says which format and how;
    only a file with no signature mlx-vit reads is 'not an image'."""
    png = (IMAGES / "chelsea.png").read_bytes()
    files = {
        "empty.png": (b"", "is empty (0 bytes)"),
        "bad-crc.png": (png[:29] + b"\0\0\0\0" + png[33:], "cannot decode its PNG data (broken PNG file (bad header "
                        "checksum in b'IHDR'))"),
        "cut-in-header.png": (png[:8], "cannot decode its PNG data (the file ends too soon)"),
        "cut-in-chunk.png": (png[:200], "cannot decode its PNG data (Truncated File Read)"),
        "cut-in-pixels.png": (png[: len(png) // 2], "cannot decode its PNG data (image file is truncated"),
        "gif.gif": (b"GIF89a\0\0\0", "cannot decode its GIF data (the file ends too soon)"),
        "notes.png": (b"hello, not an image\n", "not an image in a format mlx-vit reads"),
    }  # fmt: skip
    for name, (data, says) in files.items():
        (tmp_path / name).write_bytes(data)
        message = one_line_error(ImageError, open_image, tmp_path / name, names=tmp_path / name)
        assert message.startswith(f"{shown(tmp_path / name)}: {says}"), (name, message)


def test_file_names_with_control_characters_stay_on_one_line(tmp_path):
    path = tmp_path / "evil\nerror: fake.png"
    path.write_bytes(b"not an image")
    message = one_line_error(ImageError, open_image, path)
    assert "evil\\nerror: fake.png" in message


def test_special_files_are_refused_by_kind_at_once(tmp_path):
    files = _broken_files(tmp_path)
    assert "is a FIFO (named pipe), not a file" in one_line_error(ImageError, open_image, files["fifo.png"])
    assert "is a character device, not a file" in one_line_error(ImageError, open_image, files["dev-zero.png"])
    assert "file name too long" in one_line_error(ImageError, open_image, files["long-name.png"])


def _flat_progressive_jpeg(path: Path, size: tuple[int, int], scans: int, format: str = "JPEG") -> Path:
    """A progressive JPEG (or MPO, a JPEG with more pictures after it) of one flat colour, its first picture
    with `scans` scans: its last scan (an AC refinement of a few bytes) repeated, each repeat one more pass
    of the decoder over the whole image."""
    more = {"save_all": True, "append_images": [SMALL]} if format == "MPO" else {}
    raw = _saved(Image.new("RGB", size, (120, 130, 140)), format, progressive=True, **more)
    first, end = raw.index(b"\xff\xda"), raw.index(b"\xff\xd9")  # the first picture's scans
    own = raw[first:end].split(b"\xff\xda")[1:]
    assert len(own) < scans, len(own)
    path.write_bytes(raw[:end] + (b"\xff\xda" + own[-1]) * (scans - len(own)) + raw[end:])
    with Image.open(path) as written:
        assert written.format == format, written.format
    return path


@pytest.mark.parametrize("format", ["JPEG", "MPO"])
def test_progressive_jpeg_scans_are_bounded(tmp_path, format):
    ok = _flat_progressive_jpeg(tmp_path / "ok.jpg", (64, 48), MAX_JPEG_SCANS, format)
    assert open_image(ok).getpixel((3, 3)) == pytest.approx((120, 130, 140), abs=2)
    # 12 MP and 3,000 scans: a 150 kB file that took Pillow 20 s to decode; refused before the first scan.
    bomb = _flat_progressive_jpeg(tmp_path / "scans.jpg", (4000, 3000), 3000, format)
    assert bomb.stat().st_size < 300_000
    start = time.perf_counter()
    message = one_line_error(ImageError, open_image, bomb, names=bomb)
    assert time.perf_counter() - start < 1
    assert f"a progressive JPEG of over {MAX_JPEG_SCANS} scans" in message
    # Without an end marker, libjpeg read on to the end of the file for another scan: 21 GB of a sparse file.
    endless = _write_bytes(tmp_path / "endless.jpg", _saved(SMALL, "JPEG", progressive=True)[:-2])
    with open(endless, "r+b") as f:
        f.truncate(2**31)
    assert "far more than a 40x30 progressive JPEG holds" in one_line_error(ImageError, open_image, endless)
    # Scans are counted as the decoder finds them: not inside a segment (a comment, an EXIF thumbnail).
    commented = _write_bytes(tmp_path / "c.jpg", _saved(SMALL, "JPEG", progressive=True, comment=b"\xff\xda" * 500))
    assert open_image(commented).size == SMALL.size
    baseline = _saved(SMALL, "JPEG")  # not progressive: never counted
    assert b"\xff\xda" in baseline and open_image(_write_bytes(tmp_path / "base.jpg", baseline)).size == SMALL.size


def _write_bytes(path: Path, raw: bytes) -> Path:
    path.write_bytes(raw)
    return path


def _every_mode() -> dict[str, Image.Image]:
    """One image of each mode to_rgb converts, 37 x 23 (odd sizes: strips do not divide it)."""
    rng = np.random.default_rng(0)
    rgba = Image.fromarray(rng.integers(0, 256, (23, 37, 4), dtype=np.uint8), "RGBA")
    sixteen = Image.fromarray(rng.integers(0, 65536, (23, 37), dtype=np.uint16))
    marked = sixteen.copy()
    marked.info["transparency"] = int(np.asarray(sixteen)[5, 5])
    palette = rgba.convert("RGB").convert("P")
    palette.info["transparency"] = 7
    modes = {mode: rgba.convert(mode) for mode in ("1", "L", "P", "LA", "PA", "CMYK", "YCbCr", "LAB", "I", "F",
                                                    "RGBa", "La", "HSV")}  # fmt: skip
    return {**modes, "RGBA": rgba, "I;16": sixteen, "I;16 transparent": marked, "P transparent": palette}


def test_to_rgb_in_strips_gives_the_same_pixels(monkeypatch):
    whole = {name: np.asarray(to_rgb(image)) for name, image in _every_mode().items()}
    monkeypatch.setattr(images, "STRIP_PIXELS", 37 * 4)  # strips of 4 rows, the last of 3
    for name, image in _every_mode().items():
        got = to_rgb(image)
        assert got.mode == "RGB" and got.size == image.size, name
        np.testing.assert_array_equal(np.asarray(got), whole[name], err_msg=name)


def _memory_over_baseline(path: Path) -> float:
    """Peak MB of opening `path` as RGB in a fresh interpreter, over the peak of opening a tiny image."""
    code = "import sys; from mlx_vit.images import open_image; open_image(sys.argv[1], 10**9)"
    runs = []
    for target in (IMAGES / "no_time_for_that_tiny.gif", path):
        done, peak = peak_mb(code.replace("sys.argv[1]", repr(str(target))))
        assert done.returncode == 0, done.stderr
        runs.append(peak)
    return runs[1] - runs[0]


@pytest.mark.parametrize(
    ("kind", "bytes_per_pixel"),
    [("16-bit PNG with a transparent value", 10), ("WebP with alpha", 20), ("RGBA PNG", 11)],
)
def test_decoding_memory_is_a_few_bytes_a_pixel(tmp_path, kind, bytes_per_pixel):
    """Decoding holds the decoded image and the RGB result, never several full-size copies (each mode
    converted to RGB in strips). Before, a 16-bit PNG with transparency took 18 bytes a pixel, WebP 28."""
    width, height = 4000, 3000
    ramp = np.arange(width * height, dtype=np.uint32).reshape(height, width)
    path = tmp_path / "big.png"
    if kind.startswith("16-bit"):
        Image.fromarray((ramp % 65536).astype(np.uint16)).save(path, transparency=1234, compress_level=1)
    else:
        rgba = np.stack([ramp % 251, ramp % 241, ramp % 239, ramp % 256], axis=-1).astype(np.uint8)
        if kind.startswith("WebP"):
            path = tmp_path / "big.webp"
            Image.fromarray(rgba, "RGBA").save(path, lossless=True, quality=0, method=0)
        else:
            Image.fromarray(rgba, "RGBA").save(path, compress_level=1)
    extra = _memory_over_baseline(path)
    assert extra < bytes_per_pixel * width * height / 2**20, f"{extra:.0f} MB for {width * height / 1e6:.0f} MP"


# ---- every mode to correct RGB, from real files


def _write(path: Path, image: Image.Image, **kwargs) -> Path:
    image.save(path, **kwargs)
    return path


def test_cmyk_files(tmp_path):
    cmyk = np.zeros((6, 8, 4), dtype=np.uint8)
    cmyk[..., 0] = np.arange(8) * 30  # cyan ramp
    cmyk[..., 3] = np.arange(6)[:, None] * 40  # black ramp
    cmyk[0, 0] = (0, 255, 255, 0)  # red
    image = Image.frombytes("CMYK", (8, 6), cmyk.tobytes())
    for path in (_write(tmp_path / "cmyk.tif", image), _write(tmp_path / "cmyk.jpg", image, quality=100)):
        with Image.open(path) as raw:
            assert raw.mode == "CMYK", path
            stored = np.asarray(raw).astype(np.float64)
        got = np.asarray(open_image(path)).astype(np.float64)
        # (1 - C)(1 - K) per channel, the naive conversion transformers' processors also use
        c, k = stored[..., :3], stored[..., 3:]
        expected = (255 - c) * (255 - k) / 255
        assert np.abs(got - expected).max() <= 1, path
    assert tuple(open_image(tmp_path / "cmyk.tif").getpixel((0, 0))) == (255, 0, 0)


@pytest.mark.parametrize("suffix", ["png", "tif"])
def test_16_bit_grayscale_files_are_scaled(tmp_path, suffix):
    values = (np.arange(64 * 16).reshape(16, 64) * 64).astype(np.uint16)  # 0 .. 65472
    path = _write(tmp_path / f"gray16.{suffix}", Image.fromarray(values))
    with Image.open(path) as raw:
        assert raw.mode.startswith("I;16"), raw.mode
    got = np.asarray(open_image(path))
    expected = np.round(values / 257).astype(np.uint8)
    np.testing.assert_array_equal(got, np.repeat(expected[..., None], 3, axis=2))
    assert got.max() == 255 and got.min() == 0 and len(np.unique(got)) == 256  # scaled, not clipped


def test_16_bit_grayscale_with_a_transparent_value(tmp_path):
    values = np.array([[0, 1000, 30000, 65535]], dtype=np.uint16)
    path = _write(tmp_path / "trns16.png", Image.fromarray(values), transparency=30000)
    with Image.open(path) as raw:
        assert raw.mode == "I;16" and raw.info["transparency"] == 30000
    got = np.asarray(open_image(path))[0, :, 0]
    assert got.tolist() == [0, 4, 255, 255]  # the transparent pixel is white; 65535 is white anyway


def test_bitonal_la_and_palette_files(tmp_path):
    bits = np.zeros((5, 9), dtype=bool)
    bits[::2, 1::3] = True
    for suffix in ("png", "bmp", "tif"):
        path = _write(tmp_path / f"bits.{suffix}", Image.fromarray(bits))
        with Image.open(path) as raw:
            assert raw.mode == "1", (suffix, raw.mode)
        np.testing.assert_array_equal(np.asarray(open_image(path))[..., 1], np.where(bits, 255, 0))
    gray = np.arange(12, dtype=np.uint8).reshape(3, 4) * 20
    alpha = np.array([[0, 64, 128, 255]] * 3, dtype=np.uint8)
    path = _write(tmp_path / "la.png", Image.merge("LA", [Image.fromarray(gray), Image.fromarray(alpha)]))
    expected = gray * (alpha / 255) + 255 * (1 - alpha / 255)  # over white
    assert np.abs(np.asarray(open_image(path))[..., 0] - expected).max() <= 1
    # A palette PNG whose tRNS gives partial alpha per index
    palette = Image.fromarray(np.array([[0, 1, 2]], dtype=np.uint8), "P")
    palette.putpalette([255, 0, 0, 0, 0, 255, 10, 20, 30])
    path = _write(tmp_path / "trns.png", palette, transparency=bytes([0, 128, 255]))
    got = np.asarray(open_image(path))[0].astype(int)
    assert got[0].tolist() == [255, 255, 255] and got[2].tolist() == [10, 20, 30]
    assert np.abs(got[1] - [127, 127, 255]).max() <= 1


@pytest.mark.parametrize("orientation", range(1, 9))
@pytest.mark.parametrize("suffix", ["jpg", "png", "webp", "tif"])
def test_every_exif_orientation_in_every_format(tmp_path, orientation, suffix):
    source = Image.fromarray(np.random.default_rng(orientation).integers(0, 256, (6, 10, 3), dtype=np.uint8))
    exif = Image.Exif()
    exif[0x0112] = orientation
    options = {"jpg": dict(quality=100, subsampling=0), "webp": dict(lossless=True)}.get(suffix, {})
    path = _write(tmp_path / f"o{orientation}.{suffix}", source, exif=exif, **options)
    with Image.open(path) as raw:
        assert raw.getexif().get(0x0112) == orientation
        expected = np.asarray(ImageOps.exif_transpose(raw).convert("RGB"))
    got = np.asarray(open_image(path))
    np.testing.assert_array_equal(got, expected)
    assert got.shape[:2] == ((10, 6) if orientation >= 5 else (6, 10))
    if suffix != "jpg":  # lossless: compare with the hand-made transform of the source too
        turns = {1: lambda a: a, 2: np.fliplr, 3: lambda a: np.rot90(a, 2), 4: np.flipud,
                 5: lambda a: np.transpose(a, (1, 0, 2)), 6: lambda a: np.rot90(a, -1),
                 7: lambda a: np.rot90(np.transpose(a, (1, 0, 2)), 2), 8: lambda a: np.rot90(a, 1)}  # fmt: skip
        np.testing.assert_array_equal(got, turns[orientation](np.asarray(source)))


def test_corrupt_exif_shows_the_image_as_stored(tmp_path):
    good = _saved(SMALL, "JPEG", quality=95)
    exif_segment = b"\xff\xe1" + struct.pack(">H", 2 + 6 + 8) + b"Exif\x00\x00" + b"II*\x00\xff\xff\xff\x7f"
    path = tmp_path / "bad-exif.jpg"
    path.write_bytes(good[:2] + exif_segment + good[2:])  # an IFD offset far past the end
    with Image.open(io.BytesIO(good)) as stored:
        expected = np.asarray(stored.convert("RGB"))
    np.testing.assert_array_equal(np.asarray(open_image(path)), expected)


def test_first_frame_of_animations_and_multipage_files(tmp_path):
    colors = [(250, 0, 0), (0, 250, 0), (0, 0, 250)]
    frames = [Image.new("RGB", (8, 6), c) for c in colors]
    for suffix, options in {"gif": {}, "webp": {"lossless": True}, "png": {}, "tif": {}}.items():
        path = _write(tmp_path / f"anim.{suffix}", frames[0], save_all=True, append_images=frames[1:], **options)
        with Image.open(path) as raw:
            assert getattr(raw, "n_frames", 1) == 3, suffix
        got = np.asarray(open_image(path)).reshape(-1, 3)
        assert np.abs(got.astype(int) - colors[0]).max() <= 2, (suffix, got[0])
    with Image.open(IMAGES / "multipage.tif") as raw:
        first = np.asarray(raw.convert("RGB"))
    np.testing.assert_array_equal(np.asarray(open_image(IMAGES / "multipage.tif")), first)


def test_a_psd_file_is_its_composite_image(tmp_path):
    """Pillow numbers a PSD's images from 1 (the composite image, then its layers): seeking to frame 0 refused
    every PSD file. Made by hand (Pillow writes none): raw 8-bit RGB planes, no layers."""
    planes = np.arange(3 * 6 * 8, dtype=np.uint8).reshape(3, 6, 8) * 2
    header = b"8BPS" + struct.pack(">H6xHIIHH", 1, 3, 6, 8, 8, 3) + struct.pack(">III", 0, 0, 0)
    path = tmp_path / "flat.psd"
    path.write_bytes(header + struct.pack(">H", 0) + planes.tobytes())
    with Image.open(path) as raw:
        assert (raw.format, raw.size, raw.mode) == ("PSD", (8, 6), "RGB")
    np.testing.assert_array_equal(np.asarray(open_image(path)), planes.transpose(1, 2, 0))


def test_lab_tiff_is_not_read_as_transparent(tmp_path):
    lab = Image.new("LAB", (4, 4), (136, 208, 195))  # sRGB red, in 8-bit CIELAB
    path = _write(tmp_path / "lab.tif", lab)
    with Image.open(path) as raw:
        assert raw.mode == "LAB"
    got = np.asarray(open_image(path)).astype(int)
    assert np.abs(got - (255, 0, 0)).max() <= 12  # not composited on white by its "A" (a*) band


def test_heic_decodes_with_pillow_heif(tmp_path):
    pillow_heif = pytest.importorskip("pillow_heif")
    source = SMALL.resize((64, 48))
    path = tmp_path / "photo.heic"
    pillow_heif.from_pillow(source).save(path, quality=95)
    assert path.read_bytes()[4:12] == b"ftypheic"
    got = np.asarray(open_image(path)).astype(int)
    assert got.shape == (48, 64, 3) and np.abs(got - np.asarray(source)).mean() < 4  # lossy HEVC


def test_heic_without_pillow_heif_says_how_to_get_it(tmp_path, monkeypatch):
    header = b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00mif1heic" + b"\x00" * 64
    path = tmp_path / "IMG_0001.HEIC"
    path.write_bytes(header)
    monkeypatch.setitem(sys.modules, "pillow_heif", None)  # as if it were not installed
    monkeypatch.setattr(images, "_heif_ready", False)
    message = one_line_error(ImageError, open_image, path, names=path)
    assert "HEIC/HEIF image" in message and "pip install 'mlx-vit[heif]'" in message
    # AVIF shares the box (and the mif1 brand) but Pillow reads it: no hint, a real decode.
    avif = _write(tmp_path / "x.avif", SMALL)
    assert open_image(avif).size == SMALL.size


def test_extreme_aspect_ratio_resizes_only_the_crop_window(monkeypatch):
    """A 1-pixel strip under a shortest-edge resize would become gigapixels: only the crop window is resized.

    (Pillow's resize of a window is not bit-identical to cropping its full resize, so this path is only taken
    past RESIZE_WINDOW_ABOVE pixels, which no photo reaches under a real preprocessor config.)"""
    from mlx_vit import preprocess as module

    config = PreprocessConfig.from_hf({"size": {"shortest_edge": 64}, "do_center_crop": True,
                                       "crop_size": {"height": 56, "width": 48}, "resample": 3}, "deit")  # fmt: skip
    line = Image.new("RGB", (2_000_000, 1), (9, 99, 199))  # would resize to 128,000,000 x 64
    pixels = preprocess(line, config)
    expected = (np.array([9, 99, 199]) / 255 - 0.5) / 0.5
    assert pixels.shape == (56, 48, 3) and np.abs(pixels - expected).max() < 1e-6
    # On a smooth image the window gives (nearly) the pixels of the full resize.
    ramp = np.linspace(0, 255, 900)[None, :, None] * np.ones((7, 1, 3))
    strip = Image.fromarray(ramp.astype(np.uint8))
    full = preprocess(strip, config)  # 8228 x 64, the ordinary way
    monkeypatch.setattr(module, "RESIZE_WINDOW_ABOVE", 1000)
    assert np.abs(preprocess(strip, config) - full).max() <= 2 / 127.5


def test_to_rgb_keeps_ordinary_rgb_images():
    assert to_rgb(SMALL) is SMALL


# ==========================================================================================================
# 2. Images through the CLI: good photos classified, every bad file reported, exit 1


def test_batch_with_broken_files(vit_folder, tmp_path, isolated):
    good = [IMAGES / "chelsea.png", IMAGES / "rocket.jpg", IMAGES / "camera.png", IMAGES / "horse.png"]
    broken = _broken_files(tmp_path)
    bomb = tmp_path / "bomb.gif"
    bomb.write_bytes(_bombs()["gif 65535x65535"])
    bad = [*broken.values(), bomb]
    inputs = [good[0], *bad[: len(bad) // 2], good[1], good[2], *bad[len(bad) // 2 :], good[3]]
    done = run_cli("classify", *inputs, "-m", vit_folder, "--format", "json", "--batch-size", "2", env=isolated)
    assert done.returncode == 1, done.stderr
    results = json.loads(done.stdout)
    assert [r["path"] for r in results] == [str(p) for p in inputs]
    errors = [line for line in done.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == len(bad) and "Traceback" not in done.stderr
    for path, line in zip([p for p in inputs if p in bad], errors, strict=True):
        assert line.startswith(f"error: {shown(path)}: "), line
    alone = run_cli("classify", *good, "-m", vit_folder, "--format", "json", env=isolated)
    assert alone.returncode == 0
    expected = {r["path"]: r["predictions"] for r in json.loads(alone.stdout)}
    for result in results:
        if Path(result["path"]) in good:  # batches of a different size: equal up to float rounding
            ours, alone_ = result["predictions"], expected[result["path"]]
            assert [p["class_id"] for p in ours] == [p["class_id"] for p in alone_]
            assert np.allclose([p["score"] for p in ours], [p["score"] for p in alone_], atol=1e-5)
        else:
            assert result["error"].startswith(f"{shown(result['path'])}: ")


def test_max_pixels_option(vit_folder, isolated):
    tiny, cat = IMAGES / "no_time_for_that_tiny.gif", IMAGES / "chelsea.png"  # 350 and 135,300 pixels
    done = run_cli("classify", tiny, cat, "-m", vit_folder, "--max-pixels", "100000", "--format", "jsonl",
                   env=isolated)  # fmt: skip
    assert done.returncode == 1
    error, summary = done.stderr.splitlines()
    assert error == f"error: {cat}: 451x300 pixels is over the limit of 100,000 (a decompression bomb?)"
    assert summary.startswith("1 classified, 1 failed in ")
    assert "predictions" in json.loads(done.stdout.splitlines()[0])
    assert run_cli("classify", cat, "-m", vit_folder, "--max-pixels", "0", env=isolated).returncode == 2


def test_the_default_pixel_limit_is_the_one_that_refuses():
    assert DEFAULT_MAX_PIXELS < 2 * Image.MAX_IMAGE_PIXELS  # not Pillow's bomb error, which names no limit
