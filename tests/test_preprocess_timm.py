"""mlx_vit.preprocess against timm's eval transform (from_timm), and at_size against timm and transformers."""

from __future__ import annotations

import json

import numpy as np
import pytest
import timm.data
import torch
import torchvision.transforms.functional as TF
import transformers
from checkpoints import DEIT_PREPROCESSOR, PHOTOS, VIT_PREPROCESSOR
from PIL import Image
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

import mlx_vit.preprocess as preprocess_module
from mlx_vit.errors import ConfigError
from mlx_vit.images import open_image
from mlx_vit.preprocess import MAX_SIDE, PreprocessConfig, preprocess, torchvision_center_crop

TOLERANCE = 1e-5
INCEPTION = {"mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5)}
CLIP = {"mean": OPENAI_CLIP_MEAN, "std": OPENAI_CLIP_STD}
IMAGENET = {"mean": IMAGENET_DEFAULT_MEAN, "std": IMAGENET_DEFAULT_STD}


def _cfg(height=224, width=224, **values) -> dict:
    return {"input_size": (3, height, width), **values}


# name -> timm pretrained_cfg. The photos are 512x512, 451x300, 400x328, 500x500, 640x427, 10x15 and 14x25.
TIMM_CONFIGS: dict[str, dict] = {
    # Only input_size: resolve_data_config's defaults (bicubic, crop_pct 0.875, center, ImageNet statistics).
    "defaults": _cfg(),
    "center-0.875-bilinear": _cfg(crop_pct=0.875, interpolation="bilinear", **IMAGENET),
    "center-0.9-bicubic-inception": _cfg(crop_pct=0.9, interpolation="bicubic", crop_mode="center", **INCEPTION),
    "center-0.95-bicubic-clip": _cfg(crop_pct=0.95, interpolation="bicubic", **CLIP),
    "center-1.0-lanczos": _cfg(crop_pct=1.0, interpolation="lanczos", **IMAGENET),
    # crop_pct above 1: the resized image (203 px) is smaller than the crop, zero-padded by an odd 21 pixels.
    "center-1.1-pads-hamming": _cfg(crop_pct=1.1, interpolation="hamming", **INCEPTION),
    # Non-square input: scale size (219, 292) is non-square, so timm's ResizeKeepRatio (rounded), not Resize(int).
    "center-non-square": _cfg(192, 256, crop_pct=0.875, **IMAGENET),
    # Non-square input whose scale size floor(224 / 2), floor(225 / 2) = 112 is square: Resize(int), then pad.
    "center-square-scale-non-square-crop": _cfg(224, 225, crop_pct=2.0, interpolation="bilinear"),
    "squash-1.0-bicubic-clip": _cfg(crop_pct=1.0, crop_mode="squash", **CLIP),
    "squash-0.9-nearest": _cfg(crop_pct=0.9, crop_mode="squash", interpolation="nearest", **INCEPTION),
    "squash-non-square-box": _cfg(160, 288, crop_pct=0.95, crop_mode="squash", interpolation="box"),
    "border-1.0-clip": _cfg(crop_pct=1.0, crop_mode="border", **CLIP),
    "border-0.9-bilinear": _cfg(crop_pct=0.9, crop_mode="border", interpolation="bilinear", **IMAGENET),
    "border-non-square-clip": _cfg(256, 192, crop_pct=0.95, crop_mode="border", **CLIP),
    # The border fill is round(255 * mean), which PIL clips to 0..255 here (-26 and 306).
    "border-fill-clipped": _cfg(225, 224, crop_pct=1.15, crop_mode="border", mean=(-0.1, 0.5, 1.2), std=(0.25,) * 3),
    # timm's own pretrained_cfgs (every key of them, most ignored): crop_pct 0.9 and 0.95; a 448 squash.
    "timm-vit-augreg2": timm.models.get_pretrained_cfg("vit_base_patch16_224.augreg2_in21k_ft_in1k").to_dict(),
    "timm-clip": timm.models.get_pretrained_cfg("vit_base_patch16_clip_224.openai_ft_in12k_in1k").to_dict(),
    "timm-eva02-448": timm.models.get_pretrained_cfg("eva02_base_patch14_448.mim_in22k_ft_in22k_in1k").to_dict(),
}


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """timm's ToTensor and Normalize on a 224x224 image: 2 ms on one thread, 20 times that when OpenMP's threads
    compete with other work for the cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def photos() -> dict[str, Image.Image]:
    return {p.name: open_image(p) for p in PHOTOS}


def _timm_pixels(cfg: dict, image: Image.Image) -> np.ndarray:
    transform = timm.data.create_transform(**timm.data.resolve_data_config(pretrained_cfg=cfg), is_training=False)
    return transform(image).numpy().transpose(1, 2, 0)


def _worst(config: PreprocessConfig, reference, photos: dict[str, Image.Image], label: str) -> float:
    worst = 0.0
    for name, image in photos.items():
        ours, ref = preprocess(image, config), reference(image)
        assert ours.dtype == np.float32, name
        assert ours.shape == ref.shape, (label, name, ours.shape, ref.shape)
        diff = float(np.max(np.abs(ours.astype(np.float64) - ref.astype(np.float64))))
        assert diff <= TOLERANCE, f"{label} / {name}: max abs diff {diff}"
        worst = max(worst, diff)
    print(f"{label}: max abs diff {worst:g} over {len(photos)} images")
    return worst


def test_photos_cover_square_landscape_portrait_and_tiny():
    sizes = {open_image(p).size for p in PHOTOS}
    assert len(PHOTOS) >= 8
    assert any(w > h for w, h in sizes) and any(w < h for w, h in sizes) and any(w == h for w, h in sizes)
    assert any(max(size) < 32 for size in sizes)


@pytest.mark.parametrize("name", list(TIMM_CONFIGS))
def test_pixel_parity_with_timm(name, photos):
    cfg = TIMM_CONFIGS[name]
    config = PreprocessConfig.from_timm(cfg, "timm")
    _worst(config, lambda image: _timm_pixels(cfg, image), photos, name)


def test_config_values():
    config = PreprocessConfig.from_timm(TIMM_CONFIGS["defaults"], "timm")
    assert config.crop_mode == "center" and config.crop_pct == 0.875 and config.resample == Image.BICUBIC
    assert config.size == {"height": 256, "width": 256} and config.crop_size == {"height": 224, "width": 224}
    assert config.image_mean == list(IMAGENET_DEFAULT_MEAN) and config.image_std == list(IMAGENET_DEFAULT_STD)
    assert config.fixed_size() == (224, 224) and config.output_size(300, 451) == (224, 224)
    config = PreprocessConfig.from_timm(TIMM_CONFIGS["timm-vit-augreg2"], "timm")
    assert config.size == {"height": 248, "width": 248} and config.image_mean == [0.5] * 3  # floor(224 / 0.9)
    config = PreprocessConfig.from_timm(TIMM_CONFIGS["squash-non-square-box"], "timm")
    assert (config.size, config.resample) == ({"height": 168, "width": 303}, Image.BOX)
    # One mean / std value is torch's broadcast; nulls (as in a pretrained_cfg) are timm's defaults.
    config = PreprocessConfig.from_timm({"mean": [0.3], "std": (0.2,), "crop_pct": None, "interpolation": None}, "t")
    assert config.image_mean == [0.3] * 3 and config.image_std == [0.2] * 3 and config.crop_pct == 0.875
    assert config.crop_size == {"height": 224, "width": 224} and config.resample == Image.BICUBIC


def test_crop_offsets_and_padding_are_torchvisions():
    """Unlike transformers, torchvision rounds the crop offset half to even and puts the odd padding bottom/right."""
    rng = np.random.default_rng(0)
    for h, w in [(7, 7), (12, 9), (9, 12), (30, 31), (5, 40), (41, 3)]:
        image = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        for height, width in [(4, 4), (3, 8), (8, 3), (10, 10), (1, 29), (33, 2)]:
            expected = np.asarray(TF.center_crop(image, [height, width]))
            np.testing.assert_array_equal(torchvision_center_crop(np.asarray(image), height, width), expected)
            fill = [3, 140, 255]
            expected = np.asarray(timm.data.transforms.CenterCropOrPad((height, width), fill=fill)(image))
            np.testing.assert_array_equal(torchvision_center_crop(np.asarray(image), height, width, fill), expected)
    # 11 -> 8 rows: torchvision starts at round(1.5) = 2, transformers at 1.
    column = np.arange(11, dtype=np.uint8)[:, None, None].repeat(3, axis=2)
    assert torchvision_center_crop(column, 8, 1)[0, 0, 0] == 2
    assert preprocess_module.center_crop(column, 8, 1)[0, 0, 0] == 1


@pytest.mark.parametrize("size", [(257, 1), (1, 300)], ids=str)
def test_windowed_resize_of_a_strip(size):
    """A 1-pixel strip resizes (center mode) to over RESIZE_WINDOW_ABOVE pixels: only the crop is resized."""
    rng = np.random.default_rng(1)
    width, height = size
    image = Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
    cfg = _cfg(crop_pct=0.875, **IMAGENET)
    config = PreprocessConfig.from_timm(cfg, "timm")
    resized = preprocess_module._timm_resized_shape(height, width, config.size, "center")
    assert resized[0] * resized[1] > preprocess_module.RESIZE_WINDOW_ABOVE
    diff = np.abs(preprocess(image, config) - _timm_pixels(cfg, image)).max()
    assert diff <= TOLERANCE, diff


# ----------------------------------------------------------------------------------------------------------
# at_size


AT_SIZE_CONFIGS = ["center-0.9-bicubic-inception", "squash-1.0-bicubic-clip", "border-0.9-bilinear",
                   "center-non-square"]  # fmt: skip


@pytest.mark.parametrize("size", [384, 160])
@pytest.mark.parametrize("name", AT_SIZE_CONFIGS)
def test_at_size_matches_timm_at_the_new_input_size(name, size, photos):
    cfg = TIMM_CONFIGS[name]
    config = PreprocessConfig.from_timm(cfg, "timm").at_size(size)
    assert config.fixed_size() == (size, size)
    resized = {**cfg, "input_size": (3, size, size)}
    assert config == PreprocessConfig.from_timm(resized, "timm")
    _worst(config, lambda image: _timm_pixels(resized, image), photos, f"{name} at {size}")


def test_at_size_timm_values():
    config = PreprocessConfig.from_timm(TIMM_CONFIGS["center-0.9-bicubic-inception"], "timm")
    assert config.at_size(384).size == {"height": 426, "width": 426}  # floor(384 / 0.9), not 248 * 384 / 224
    assert config.at_size(160).size == {"height": 177, "width": 177}
    assert config.at_size(224) == config
    assert config.at_size(384).crop_pct == 0.9 and config.at_size(384).crop_mode == "center"


# name -> (model_type, preprocessor_config.json, image size, expected size, expected crop_size or None)
HF_AT_SIZE = {
    "vit-legacy-384": ("vit", VIT_PREPROCESSOR, 384, {"height": 384, "width": 384}, None),
    "vit-legacy-160": ("vit", VIT_PREPROCESSOR, 160, {"height": 160, "width": 160}, None),
    # 256 * 384 / 224 = 438.86 -> 439; 256 * 160 / 224 = 182.86 -> 183
    "deit-legacy-384": ("deit", {**DEIT_PREPROCESSOR, "size": 256, "crop_size": 224}, 384,
                        {"height": 439, "width": 439}, {"height": 384, "width": 384}),
    "deit-modern-160": ("deit", {**DEIT_PREPROCESSOR, "size": {"shortest_edge": 256}, "crop_size": 224}, 160,
                        {"shortest_edge": 183}, {"height": 160, "width": 160}),
    # A non-square crop: each side of the resize scales with its own crop side (70 * 96 / 56 = 120).
    "deit-non-square-96": ("deit", {**DEIT_PREPROCESSOR, "size": {"height": 70, "width": 90},
                                    "crop_size": {"height": 56, "width": 80}}, 96,
                           {"height": 120, "width": 108}, {"height": 96, "width": 96}),
}  # fmt: skip


@pytest.mark.parametrize("name", list(HF_AT_SIZE))
def test_at_size_matches_transformers_with_the_scaled_sizes(name, photos):
    model_type, values, size, expected_size, expected_crop = HF_AT_SIZE[name]
    config = PreprocessConfig.from_hf(values, model_type).at_size(size)
    assert config.size == expected_size
    assert config.fixed_size() == (size, size)
    settings = dict(size=expected_size, resample=config.resample, image_mean=config.image_mean,
                    image_std=config.image_std)  # fmt: skip
    if expected_crop is None:
        assert not config.do_center_crop
        processor = transformers.ViTImageProcessorPil(**settings)
    else:
        assert config.crop_size == expected_crop
        processor = transformers.DeiTImageProcessorPil(**settings, crop_size=expected_crop, do_center_crop=True)

    def reference(image):
        return processor(images=[image], return_tensors="np")["pixel_values"][0].transpose(1, 2, 0)

    _worst(config, reference, photos, name)


def test_at_size_transformers_without_a_crop_or_a_resize():
    shortest = PreprocessConfig.from_hf({"size": {"shortest_edge": 100}}, "vit")
    assert shortest.at_size(384).size == {"shortest_edge": 384}
    assert shortest.at_size(384).fixed_size() is None  # the output still follows the image's aspect ratio
    unchanged = PreprocessConfig.from_hf({"do_resize": False}, "vit")
    assert unchanged.at_size(384) == unchanged
    cropped = PreprocessConfig.from_hf({"do_resize": False, "do_center_crop": True, "crop_size": 32}, "vit")
    assert cropped.at_size(48).fixed_size() == (48, 48)


@pytest.mark.parametrize("size", [0, -1, 1.5, True, "384", None, MAX_SIDE + 1])
def test_at_size_refuses_bad_sizes(size):
    with pytest.raises(ConfigError) as info:
        PreprocessConfig().at_size(size)
    assert str(info.value).startswith("--image-size ") and "\n" not in str(info.value)


def test_at_size_refuses_scaled_sizes_over_the_limit():
    deit = PreprocessConfig.from_hf({**DEIT_PREPROCESSOR, "size": 256, "crop_size": 224}, "deit")
    timm_config = PreprocessConfig.from_timm(_cfg(crop_pct=0.5), "timm")
    for config in (deit, timm_config):
        assert config.at_size(MAX_SIDE // 2).fixed_size() == (MAX_SIDE // 2, MAX_SIDE // 2)
        with pytest.raises(ConfigError) as info:
            config.at_size(MAX_SIDE)
        assert str(info.value).startswith(f"--image-size {MAX_SIDE}: ") and "\n" not in str(info.value)


# ----------------------------------------------------------------------------------------------------------
# config.json round trip and validation


@pytest.mark.parametrize("name", list(TIMM_CONFIGS))
def test_round_trip(name):
    config = PreprocessConfig.from_timm(TIMM_CONFIGS[name], "timm")
    values = json.loads(json.dumps(config.to_dict()))
    assert PreprocessConfig.from_dict(values) == config
    assert values["crop_mode"] in ("center", "squash", "border") and isinstance(values["crop_pct"], float)


def test_old_folders_without_the_new_keys_still_load():
    for values, model_type in ((VIT_PREPROCESSOR, "vit"), (DEIT_PREPROCESSOR, "deit")):
        config = PreprocessConfig.from_hf(values, model_type)
        saved = config.to_dict()
        assert saved["crop_mode"] is None and saved["crop_pct"] is None
        old = {k: v for k, v in saved.items() if k not in ("crop_mode", "crop_pct")}
        assert PreprocessConfig.from_dict(old) == config


def test_hf_crop_pct_is_not_timms():
    """ConvNeXt-style preprocessor_config.json files have a crop_pct of their own; from_hf keeps ignoring it."""
    config = PreprocessConfig.from_hf({**DEIT_PREPROCESSOR, "crop_pct": 0.875, "crop_mode": "squash"}, "deit")
    assert config.crop_mode is None and config.crop_pct is None
    assert config == PreprocessConfig.from_hf(DEIT_PREPROCESSOR, "deit")


def _config_error(make, source: str) -> str:
    with pytest.raises(ConfigError) as info:
        make()
    message = str(info.value)
    assert message.startswith(f"{source}: ") and "\n" not in message and "\r" not in message, repr(message)
    return message


@pytest.mark.parametrize(
    "changes, needle",
    [
        ({"crop_mode": "centre"}, "unknown crop_mode 'centre'"),
        ({"crop_mode": "random\n"}, "unknown crop_mode"),
        ({"crop_mode": ["center"]}, "unknown crop_mode"),
        ({"crop_pct": 0}, "crop_pct must be a number above 0"),
        ({"crop_pct": -0.9}, "crop_pct must be a number above 0"),
        ({"crop_pct": 2.5}, "at most 2.0"),
        ({"crop_pct": float("nan")}, "crop_pct must be a number"),
        ({"crop_pct": True}, "crop_pct must be a number"),
        ({"crop_pct": "0.9"}, "crop_pct must be a number"),
        ({"crop_pct": 1e-300}, "sides must be from 1 to"),
        ({"crop_pct": 0.005}, "sides must be from 1 to"),
        ({"input_size": [3, 1, 1], "crop_pct": 1.5}, "sides must be from 1 to"),
        ({"interpolation": "random"}, "interpolation 'random'"),
        ({"interpolation": "cubic"}, "unknown interpolation 'cubic'"),
        ({"interpolation": 3}, "unknown interpolation 3"),
        ({"interpolation": "nearest-exact"}, "unknown interpolation"),
        ({"input_size": [224, 224]}, "input_size must be [3, height, width]"),
        ({"input_size": [1, 224, 224]}, "input_size must be"),
        ({"input_size": [3, 0, 224]}, "input_size must be"),
        ({"input_size": [3, 224.0, 224]}, "input_size must be"),
        ({"input_size": [3, True, 224]}, "input_size must be"),
        ({"input_size": [3, MAX_SIDE + 1, 224]}, "input_size must be"),
        ({"input_size": 224}, "input_size must be"),
        ({"input_size": "3,224,224"}, "input_size must be"),
        ({"mean": [0.5, 0.5]}, "mean must be three finite numbers"),
        ({"mean": 0.5}, "mean must be"),
        ({"std": [0.5, float("inf"), 0.5]}, "std must be"),
        ({"std": [0.5, 0, 0.5]}, "image_std must be positive"),
        ({"std": [1e-9] * 3}, "over the limit"),
    ],
)
def test_from_timm_refuses_invalid_values(changes, needle):
    message = _config_error(lambda: PreprocessConfig.from_timm({**_cfg(), **changes}, "timm/cfg.json"), "timm/cfg.json")
    assert needle in message, message


def test_from_timm_refuses_a_non_object():
    assert "must be an object" in _config_error(lambda: PreprocessConfig.from_timm([224], "cfg"), "cfg")


@pytest.mark.parametrize(
    "changes, needle",
    [
        ({"crop_mode": "middle"}, "unknown crop_mode 'middle'"),
        ({"crop_pct": 0.0}, "crop_pct must be a number above 0"),
        ({"crop_pct": None}, "crop_pct must be a number"),
        ({"size": {"height": 256, "width": 255}}, "size must be {'height': 256, 'width': 256}"),
        ({"size": {"shortest_edge": 256}}, "size must be {'height': 256, 'width': 256}"),
        ({"do_center_crop": False}, "needs do_resize and do_center_crop"),
        ({"do_resize": False}, "needs do_resize and do_center_crop"),
        ({"crop_mode": None}, "crop_pct 0.875 needs a timm crop_mode"),
    ],
)
def test_from_dict_refuses_inconsistent_timm_values(changes, needle):
    values = {**PreprocessConfig.from_timm(_cfg(), "timm").to_dict(), **changes}
    message = _config_error(lambda: PreprocessConfig.from_dict(values, "m/config.json"), "m/config.json")
    assert needle in message, message


def test_preprocess_stays_fast():
    """Geometry and arithmetic are whole-array numpy; no per-pixel Python. A 640x427 photo well under 50 ms."""
    import time

    image = open_image(next(p for p in PHOTOS if p.name == "rocket.jpg"))
    config = PreprocessConfig.from_timm(_cfg(crop_pct=1.15, crop_mode="border", **CLIP), "timm")
    preprocess(image, config)
    start = time.perf_counter()
    for _ in range(5):
        preprocess(image, config)
    assert (time.perf_counter() - start) / 5 < 0.05
