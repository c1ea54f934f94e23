"""Quantization measured on trained weights: the small ViT that scripts/train_digits.py trained on scikit-learn's
digits (tests/data/digits), converted by mlx-vit and run on its held-out split."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mlx_vit.classify import load
from mlx_vit.convert import Quantize, convert

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
