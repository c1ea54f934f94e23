"""mlx_vit.preprocess against transformers' PIL-based ("slow") ViT / DeiT image processors, on real photos."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import transformers
from checkpoints import DEIT_PREPROCESSOR, VIT_PREPROCESSOR
from PIL import Image, ImageCms, ImageOps
from transformers.image_transforms import convert_to_rgb

from mlx_vit.errors import ImageError
from mlx_vit.images import open_image, to_rgb
from mlx_vit.preprocess import PreprocessConfig, preprocess

IMAGES_DIR = Path(__file__).parent / "data" / "images"
IMAGES = sorted(p for p in IMAGES_DIR.iterdir() if p.is_file() and p.suffix.lower() != ".md")
IMAGE_IDS = [p.name for p in IMAGES]

TOLERANCE = 1e-5

# name -> (model_type for config.json, preprocessor_config.json contents)
CONFIGS: dict[str, tuple[str, dict]] = {
    # google/vit-base-patch16-224, verbatim.
    "vit-legacy": ("vit", VIT_PREPROCESSOR),
    # facebook/deit-*-patch16-224 style legacy feature-extractor file.
    "deit-legacy": ("deit", {**DEIT_PREPROCESSOR, "crop_size": 224, "size": 256}),
    # Modern image-processor file: shortest-edge resize keeps the aspect ratio, then crop.
    "deit-modern": (
        "deit",
        {
            "crop_size": {"height": 224, "width": 224},
            "do_center_crop": True,
            "do_normalize": True,
            "do_resize": True,
            "image_mean": [0.485, 0.456, 0.406],
            "image_processor_type": "DeiTImageProcessor",
            "image_std": [0.229, 0.224, 0.225],
            "resample": 3,
            "size": {"shortest_edge": 256},
        },
    ),
    # Empty files: everything comes from the processor classes' defaults.
    "vit-empty": ("vit", {}),
    "deit-empty": ("deit", {}),
    # Non-square, non-224; the crop is wider than the resized image (by an odd amount), so center_crop
    # zero-pads. Lanczos.
    "odd-lanczos-pad": (
        "vit",
        {
            "size": {"height": 160, "width": 200},
            "do_center_crop": True,
            "crop_size": {"height": 150, "width": 231},
            "resample": 1,
        },
    ),
    # Nearest, shortest-edge resize with a crop taller than landscape results (pads height, odd amount);
    # scalar mean/std and a non-default rescale factor.
    "odd-nearest-pad": (
        "deit",
        {
            "image_processor_type": "DeiTImageProcessor",
            "size": {"shortest_edge": 97},
            "do_center_crop": True,
            "crop_size": {"height": 132, "width": 63},
            "resample": 0,
            "rescale_factor": 0.0025,
            "image_mean": 0.4,
            "image_std": 0.3,
        },
    ),
    # No normalization: the output is just the rescaled resized pixels (box filter).
    "no-normalize-box": (
        "vit",
        {"size": {"height": 57, "width": 91}, "resample": 4, "do_normalize": False},
    ),
}


def _hf_processor(folder: Path, model_type: str, values: dict):
    folder.mkdir()
    (folder / "preprocessor_config.json").write_text(json.dumps(values))
    (folder / "config.json").write_text(json.dumps({"model_type": model_type}))
    return transformers.AutoImageProcessor.from_pretrained(str(folder), backend="pil")


@pytest.fixture(scope="module")
def hf_processors(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("processors")
    return {name: _hf_processor(root / name, mt, values) for name, (mt, values) in CONFIGS.items()}


@pytest.fixture(scope="module")
def opened() -> dict[str, Image.Image]:
    return {p.name: open_image(p) for p in IMAGES}


def _reference(processor, image: Image.Image) -> np.ndarray:
    pixels = processor(images=[image], return_tensors="np")["pixel_values"]
    assert pixels.shape[0] == 1 and pixels.shape[1] == 3
    return np.asarray(pixels[0]).transpose(1, 2, 0)


def test_fixture_images_cover_the_formats():
    modes = {p.name: Image.open(p).mode for p in IMAGES}
    assert len(IMAGES) >= 8
    assert {"RGB", "L", "RGBA", "P"} <= set(modes.values())
    assert {p.suffix.lower() for p in IMAGES} >= {".png", ".jpg", ".tif", ".gif"}
    assert getattr(Image.open(IMAGES_DIR / "multipage.tif"), "n_frames", 1) == 2
    assert getattr(Image.open(IMAGES_DIR / "no_time_for_that_tiny.gif"), "n_frames", 1) > 1


@pytest.mark.parametrize("config_name", list(CONFIGS))
def test_pixel_parity_with_transformers(config_name, hf_processors, opened):
    model_type, values = CONFIGS[config_name]
    processor = hf_processors[config_name]
    assert type(processor).__name__.endswith("Pil"), type(processor).__name__
    config = PreprocessConfig.from_hf(values, model_type)
    worst = 0.0
    for name, image in opened.items():
        ours = preprocess(image, config)
        ref = _reference(processor, image)
        assert ours.dtype == np.float32, name
        assert ours.shape == ref.shape, (name, ours.shape, ref.shape)
        diff = float(np.max(np.abs(ours.astype(np.float64) - ref.astype(np.float64))))
        assert diff <= TOLERANCE, f"{config_name} / {name}: max abs diff {diff}"
        worst = max(worst, diff)
    print(f"{config_name}: max abs diff {worst:g} over {len(opened)} images")


def test_padding_branch_is_exercised(opened):
    """The odd-* configs crop larger than the resized image: padded rows/columns are (0 - mean) / std."""
    config = PreprocessConfig.from_hf(*reversed(CONFIGS["odd-lanczos-pad"]))
    pixels = preprocess(opened["chelsea.png"], config)
    assert pixels.shape == (150, 231, 3)
    # 200 -> 231 wide: 31 zero columns, the extra one on the left (ceil), as transformers does;
    # zeros normalize to (0 - 0.5) / 0.5 = -1.
    np.testing.assert_array_equal(pixels[:, :16], -1.0)
    np.testing.assert_array_equal(pixels[:, -15:], -1.0)
    assert not np.all(pixels[:, 16] == -1.0) and not np.all(pixels[:, -16] == -1.0)

    config = PreprocessConfig.from_hf(*reversed(CONFIGS["odd-nearest-pad"]))
    pixels = preprocess(opened["chelsea.png"], config)  # 451x300 -> 145x97 (w x h), crop 63x131
    assert pixels.shape == (132, 63, 3)
    # 97 -> 132 tall: 18 zero rows on top, 17 below.
    pad = np.float32((0 - 0.4) / 0.3)
    np.testing.assert_allclose(pixels[:18], pad, rtol=0, atol=1e-6)
    np.testing.assert_allclose(pixels[-17:], pad, rtol=0, atol=1e-6)
    assert not np.allclose(pixels[18], pad) and not np.allclose(pixels[-18], pad)


def test_deit_class_defaults_match_transformers(hf_processors):
    """An empty DeiT file means transformers' class defaults, whose mean/std are 0.5 (not ImageNet stats)."""
    processor = hf_processors["deit-empty"]
    config = PreprocessConfig.from_hf({}, "deit")
    assert config.size == dict(processor.size) == {"height": 256, "width": 256}
    assert config.crop_size == dict(processor.crop_size) == {"height": 224, "width": 224}
    assert config.do_center_crop is True and int(processor.resample) == config.resample == Image.BICUBIC
    assert config.image_mean == list(processor.image_mean) == [0.5, 0.5, 0.5]
    assert config.image_std == list(processor.image_std) == [0.5, 0.5, 0.5]


@pytest.mark.parametrize("path", IMAGES, ids=IMAGE_IDS)
def test_open_image_matches_transformers_rgb_conversion(path):
    ours = open_image(path)
    assert ours.mode == "RGB"
    with Image.open(path) as raw:
        expected = convert_to_rgb(ImageOps.exif_transpose(raw), return_numpy=True)
    got = np.asarray(ours)
    assert got.dtype == np.uint8 and got.shape == expected.shape
    np.testing.assert_array_equal(got, expected)


def test_transparency_is_composited_on_white(tmp_path):
    # The fixture RGBA photos are (almost) opaque, so make files with real transparency.
    rgba = np.zeros((20, 30, 4), dtype=np.uint8)
    rgba[..., :3] = (200, 30, 60)  # hidden colour under the transparent half
    rgba[:, 15:, 3] = 255
    rgba[:, 15:, :3] = (1, 2, 3)
    rgba[0, 0] = (0, 0, 255, 128)  # half-transparent blue
    Image.fromarray(rgba, "RGBA").save(tmp_path / "alpha.png")
    got = np.asarray(open_image(tmp_path / "alpha.png"))
    assert (got[1:, :15] == 255).all() and (got[0, 1:15] == 255).all()
    assert (got[:, 15:] == (1, 2, 3)).all()
    assert tuple(got[0, 0]) == (127, 127, 255)

    # Palette image with a transparent index (GIF-style): that index is white, not its palette colour.
    palette = Image.fromarray((np.arange(20 * 30) % 4).reshape(20, 30).astype(np.uint8), "P")
    palette.putpalette([0, 0, 0, 255, 0, 0, 0, 255, 0, 0, 0, 255])
    palette.save(tmp_path / "palette.gif", transparency=0)
    got = np.asarray(open_image(tmp_path / "palette.gif"))
    index = np.asarray(palette)
    assert (got[index == 0] == 255).all()
    assert (got[index == 1] == (255, 0, 0)).all() and (got[index == 3] == (0, 0, 255)).all()


@pytest.mark.parametrize("mode", ["LA", "PA", "P-transparency", "I", "F", "CMYK", "1", "YCbCr"])
def test_to_rgb_matches_transformers_on_other_modes(mode):
    rng = np.random.default_rng(0)
    base = Image.fromarray(rng.integers(0, 256, (13, 17, 4), dtype=np.uint8), "RGBA")
    if mode == "P-transparency":
        image = base.convert("RGB").convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
        image.info["transparency"] = 3
    elif mode in ("I", "F"):  # 32-bit int and float grayscale: clipped to 0..255, as Pillow and transformers do
        image = Image.fromarray(rng.integers(0, 60000, (13, 17)).astype(np.uint16)).convert(mode)
    else:
        image = base.convert(mode)
    np.testing.assert_array_equal(np.asarray(to_rgb(image)), convert_to_rgb(image, return_numpy=True))


def test_lab_and_premultiplied_alpha_where_transformers_differs():
    """transformers takes any band named "A" for alpha: LAB's a* axis too, and misses premultiplied "a"."""
    red = Image.new("LAB", (4, 3), (136, 208, 195))  # L* 53.2, a* 80, b* 67: sRGB red
    reference = ImageCms.applyTransform(
        red, ImageCms.buildTransform(ImageCms.createProfile("LAB"), ImageCms.createProfile("sRGB"), "LAB", "RGB")
    )
    got = np.asarray(to_rgb(red)).astype(int)
    assert np.abs(got - np.asarray(reference)).max() <= 1
    assert np.abs(got[0, 0] - (255, 0, 0)).max() <= 12
    # premultiplied RGBa on white: each channel is value + 255 - alpha
    rgba = np.array([[[200, 100, 0, 255], [100, 50, 0, 128], [0, 0, 0, 0]]], dtype=np.uint8)
    premultiplied = Image.fromarray(rgba).convert("RGBa")
    stored = np.asarray(premultiplied).astype(int)
    expected = np.clip(stored[..., :3] + 255 - stored[..., 3:], 0, 255)
    assert np.abs(np.asarray(to_rgb(premultiplied)).astype(int) - expected).max() <= 1
    la = Image.merge("La", [Image.fromarray(stored[..., 0].astype(np.uint8)), Image.fromarray(rgba[..., 3])])
    np.testing.assert_array_equal(np.asarray(to_rgb(la))[..., 0], np.clip(stored[..., 0] + 255 - rgba[..., 3], 0, 255))


@pytest.mark.parametrize("mode", ["I;16", "I;16B"])
def test_16_bit_grayscale_is_scaled_not_clipped(mode):
    """Intentionally unlike transformers' convert_to_rgb, which (through Pillow's convert) clips values over 255:
    a 16-bit photo would come out nearly all white. Values are scaled by 255/65535 and rounded."""
    values = np.array([[0, 128, 129, 257, 1000, 32767, 32768, 65278, 65535]], dtype=np.uint16)
    image = Image.frombytes(mode, (values.shape[1], 1), values.astype("<u2" if mode == "I;16" else ">u2").tobytes())
    got = np.asarray(to_rgb(image))
    expected = np.array([0, 0, 1, 1, 4, 127, 128, 254, 255], dtype=np.uint8)
    np.testing.assert_array_equal(got, np.repeat(expected[None, :, None], 3, axis=2))
    np.testing.assert_array_equal(expected, np.round(values[0] / 257).astype(np.uint8))  # the hand formula
    # transformers' conversion clips instead: everything from 255 up is white
    assert convert_to_rgb(image, return_numpy=True)[0, 4:, 0].tolist() == [255] * 5


@pytest.mark.parametrize("orientation", [3, 6, 8])
def test_exif_orientation_is_applied(tmp_path, orientation):
    with Image.open(IMAGES_DIR / "rocket.jpg") as src:
        source = src.convert("RGB")
    exif = Image.Exif()
    exif[0x0112] = orientation
    path = tmp_path / f"oriented-{orientation}.jpg"
    source.save(path, "JPEG", exif=exif, quality=90)

    with Image.open(path) as raw:
        assert raw.getexif()[0x0112] == orientation
        stored_size = raw.size
        expected = np.asarray(ImageOps.exif_transpose(raw).convert("RGB"))

    image = open_image(path)
    width, height = stored_size
    assert stored_size == source.size == (640, 427)
    if orientation in (6, 8):  # 90-degree rotations swap width and height
        assert image.size == (height, width)
    else:
        assert image.size == (width, height)
    np.testing.assert_array_equal(np.asarray(image), expected)
    # And it really moved pixels: the result is not just the stored image.
    if orientation == 3:
        with Image.open(path) as raw:
            assert not np.array_equal(np.asarray(image), np.asarray(raw.convert("RGB")))


def _assert_image_error(path, **kwargs) -> str:
    with pytest.raises(ImageError) as info:
        open_image(path, **kwargs)
    message = str(info.value)
    assert str(path) in message, message
    assert "\n" not in message and "\r" not in message, repr(message)
    return message


def test_error_missing_file(tmp_path):
    _assert_image_error(tmp_path / "nope.png")


def test_error_folder(tmp_path):
    folder = tmp_path / "a-folder.png"
    folder.mkdir()
    _assert_image_error(folder)


def test_error_empty_file(tmp_path):
    path = tmp_path / "empty.png"
    path.write_bytes(b"")
    _assert_image_error(path)


def test_error_text_file_named_jpg(tmp_path):
    path = tmp_path / "x.jpg"
    path.write_text("this is not a JPEG\nsecond line\n")
    _assert_image_error(path)


def test_error_truncated_png(tmp_path):
    data = (IMAGES_DIR / "chelsea.png").read_bytes()
    path = tmp_path / "truncated.png"
    path.write_bytes(data[: len(data) // 2])
    _assert_image_error(path)


def test_error_too_many_pixels():
    path = IMAGES_DIR / "chelsea.png"  # 451 x 300 = 135,300 pixels
    message = _assert_image_error(path, max_pixels=100_000)
    assert "451x300" in message
    # At exactly the limit it opens.
    assert open_image(path, max_pixels=451 * 300).size == (451, 300)


OUTPUT_SIZE_CONFIGS = {
    "fixed": {"size": {"height": 224, "width": 224}},
    "fixed-rect": {"size": {"height": 61, "width": 150}},
    "shortest-edge": {"size": {"shortest_edge": 100}},
    "shortest-edge-crop": {
        "size": {"shortest_edge": 90},
        "do_center_crop": True,
        "crop_size": {"height": 70, "width": 120},
    },
    "no-resize": {"do_resize": False},
    "no-resize-crop": {"do_resize": False, "do_center_crop": True, "crop_size": {"height": 20, "width": 600}},
}


@pytest.mark.parametrize("config_name", list(OUTPUT_SIZE_CONFIGS))
@pytest.mark.parametrize("size", [(451, 300), (300, 451), (17, 17), (10, 15), (640, 427)], ids=str)
def test_output_size_matches_preprocess(config_name, size):
    config = PreprocessConfig.from_hf(OUTPUT_SIZE_CONFIGS[config_name], "vit")
    width, height = size
    image = Image.new("RGB", (width, height), (10, 200, 30))
    pixels = preprocess(image, config)
    assert pixels.shape == (*config.output_size(height, width), 3)


def test_output_size_values():
    config = PreprocessConfig.from_hf({"size": {"shortest_edge": 100}}, "vit")
    assert config.output_size(300, 451) == (100, 150)  # int(100 * 451 / 300) = 150
    assert config.output_size(451, 300) == (150, 100)
    deit = PreprocessConfig.from_hf(CONFIGS["deit-modern"][1], "deit")
    assert deit.output_size(300, 451) == (224, 224)
