"""Quantization measured on trained weights: the small ViT that scripts/train_digits.py trained on scikit-learn's
digits (tests/data/digits), converted by mlx-vit and run on its held-out split."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mlx_vit.classify import load
from mlx_vit.convert import Quantize, convert
from mlx_vit.errors import MlxVitError

DIGITS = Path(__file__).parent / "data" / "digits"


def pixels(images: np.ndarray) -> np.ndarray:
    """As scripts/train_digits.py makes them: grey levels 0..16 to 0..1, mean 0.5, std 0.5, three channels."""
    return np.repeat(((images.astype(np.float32) / 16 - 0.5) / 0.5)[..., None], 3, axis=-1)


@pytest.fixture(scope="module")
def heldout():
    data = np.load(DIGITS / "heldout.npz")
    return data["images"], data["labels"]


@pytest.fixture(scope="module")
def float32_predictions(heldout, tmp_path_factory):
    classifier = load(str(convert(str(DIGITS / "model"), tmp_path_factory.mktemp("digits") / "f32")))
    return classifier.logits(pixels(heldout[0])).argmax(-1)


def test_the_model_is_trained_and_its_preprocessing_is_its_own(heldout, float32_predictions):
    images, labels = heldout
    assert (float32_predictions == labels).mean() > 0.95
    classifier = load(str(DIGITS / "model"))
    files = [Image.fromarray(image, "L") for image in images[:20]]  # what a user's image goes through
    assert np.abs(classifier.pixels(files) - pixels(images[:20])).max() < 1e-6


@pytest.mark.parametrize("name, quantize, dtype, agreement", [
    ("float16", None, "float16", 0.995),
    ("8-bit", Quantize(8, 64), "float32", 0.995),
    ("4-bit", Quantize(4, 32), "float32", 0.99),
])  # fmt: skip
def test_quantized_models_agree_with_float32(name, quantize, dtype, agreement, heldout, float32_predictions,
                                              tmp_path):  # fmt: skip
    out = convert(str(DIGITS / "model"), tmp_path / name, quantize=quantize, dtype=dtype)
    predictions = load(str(out)).logits(pixels(heldout[0])).argmax(-1)
    assert (predictions == float32_predictions).mean() >= agreement


@pytest.mark.parametrize("mode, bits, group_size", [("mxfp8", 8, 32), ("mxfp4", 4, 32), ("nvfp4", 4, 16)])
def test_microscaling_modes_round_trip_and_agree(mode, bits, group_size, heldout, float32_predictions, tmp_path):
    import json

    import mlx.core as mx

    from mlx_vit.convert import FolderConfig
    from mlx_vit.convert.mlx_folder import build_model

    out = convert(str(DIGITS / "model"), tmp_path / mode, quantize=Quantize.of(mode=mode))
    config = FolderConfig.from_dict(json.loads((out / "config.json").read_text()), str(out))
    q = config.quantization
    assert (q["mode"], q["bits"], q["group_size"]) == (mode, bits, group_size) and len(q["layers"]) == 16
    weights = mx.load(str(out / "model.safetensors"))
    assert weights["blocks.0.attn.qkv.scales"].dtype == mx.uint8 and "blocks.0.attn.qkv.biases" not in weights
    model = build_model(config, weights, str(out))  # the GPU path: layers stay quantized, in their mode
    assert model.blocks[0].attn.qkv.mode == mode
    predictions = load(str(out)).logits(pixels(heldout[0])).argmax(-1)  # the CPU path: expanded to float32
    assert (predictions == float32_predictions).mean() >= 0.985
    weights["blocks.0.attn.qkv.scales"] = weights["blocks.0.attn.qkv.scales"].astype(mx.float16)
    with pytest.raises(MlxVitError, match="blocks.0.attn.qkv.scales' is float, expected uint8"):
        build_model(config, weights, str(out))


def test_mixed_recipe_keeps_attention_at_8_bits(heldout, float32_predictions, tmp_path):
    import json

    out = convert(str(DIGITS / "model"), tmp_path / "mixed", quantize=Quantize.of(recipe="attn8_mlp4"))
    q = json.loads((out / "config.json").read_text())["quantization"]
    assert q["bits"] == 4 and set(q["bits_of"]) == {f"blocks.{i}.attn.{n}" for i in range(4) for n in ("qkv", "proj")}
    assert set(q["bits_of"].values()) == {8}
    predictions = load(str(out)).logits(pixels(heldout[0])).argmax(-1)
    assert (predictions == float32_predictions).mean() >= 0.995


@pytest.mark.parametrize("settings, message", [
    (dict(mode="mxfp4", bits=8), "--q-bits must be one of 4 with mxfp4"),
    (dict(mode="nvfp4", group_size=32), "--q-group-size must be one of 16 with nvfp4"),
    (dict(mode="int3"), "--q-mode must be one of"),
    (dict(mode="mxfp4", recipe="attn8_mlp4"), "with --q-mode affine"),
])  # fmt: skip
def test_impossible_settings_are_one_line(settings, message):
    with pytest.raises(MlxVitError, match=message):
        Quantize.of(**settings)


def test_a_tampered_mode_or_bits_of_is_refused(tmp_path):
    import json

    out = convert(str(DIGITS / "model"), tmp_path / "m", quantize=Quantize.of(recipe="attn8_mlp4"))
    config = json.loads((out / "config.json").read_text())
    for change in ({"mode": "mxfp4"}, {"bits_of": {"blocks.0.attn.qkv": 7}}, {"bits_of": {"head": 8}}):
        tampered = {**config, "quantization": {**config["quantization"], **change}}
        (out / "config.json").write_text(json.dumps(tampered))
        with pytest.raises(MlxVitError):
            load(str(out))


def test_cli_flags(tmp_path, isolated):
    import json

    from checkpoints import run_cli

    done = run_cli("convert", DIGITS / "model", "-o", tmp_path / "n", "-q", "--q-mode", "nvfp4", env=isolated)
    assert done.returncode == 0, done.stderr
    assert json.loads((tmp_path / "n" / "config.json").read_text())["quantization"]["mode"] == "nvfp4"
    alone = run_cli("convert", DIGITS / "model", "-o", tmp_path / "x", "--quant-predicate", "attn8_mlp4", env=isolated)
    assert alone.returncode == 2 and "go with -q/--quantize" in alone.stderr
