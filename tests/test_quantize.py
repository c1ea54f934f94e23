"""Quantized and half-precision conversions: what the config records is what loading rebuilds, and the
predictions stay with the float32 transformers reference."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
import torch
import transformers
from checkpoints import IMAGES, make_checkpoint, one_line_error
from mlx.utils import tree_flatten

import mlx_vit
from mlx_vit.convert import FolderConfig, Quantize, convert
from mlx_vit.convert.mlx_folder import build_model
from mlx_vit.convert.safetensors_io import read_header
from mlx_vit.errors import ConfigError, MlxVitError
from mlx_vit.images import open_image
from mlx_vit.loading import load_model
from mlx_vit.preprocess import preprocess
from mlx_vit.quantize import MODES

# hidden 64, MLP 128: every block linear's input divides 32 and 64; 128 divides only fc2's input.
WIDE = dict(hidden_size=64, num_attention_heads=4, intermediate_size=128, num_hidden_layers=2)
PHOTOS = [IMAGES / n for n in ("chelsea.png", "camera.png", "rocket.jpg", "astronaut.png", "horse.png")]


@pytest.fixture(scope="module")
def peaked(tmp_path_factory):
    """A random ViT that is confident, like a trained classifier: an input-dependent part (logit std 2) on top
    of a ladder of class biases 3 apart, so its top 5 are separated by more than quantization error."""
    from safetensors.numpy import load_file, save_file

    folder = make_checkpoint(tmp_path_factory.mktemp("peaked"), seed=7, logit_std=2, num_labels=50, **WIDE)
    tensors = load_file(folder / "model.safetensors")
    tensors["classifier.bias"] = -3 * np.arange(50, dtype=np.float32)
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    return folder


def reference_probabilities(folder) -> np.ndarray:
    model = transformers.ViTForImageClassification.from_pretrained(folder).eval()
    preprocessing = mlx_vit.load(str(folder)).preprocessing
    pixels = np.stack([preprocess(open_image(p), preprocessing) for p in PHOTOS])
    with torch.no_grad():
        return model(torch.from_numpy(pixels.transpose(0, 3, 1, 2))).logits.softmax(-1).numpy()


@pytest.mark.parametrize("bits, group_size", [(4, 32), (4, 64), (8, 64), (8, 128), (6, 32)])
def test_config_records_what_loading_rebuilds(peaked, tmp_path, bits, group_size):
    out = convert(str(peaked), tmp_path / "q", quantize=Quantize(bits, group_size))
    config = FolderConfig.from_dict(json.loads((out / "config.json").read_text()), str(out))
    q = config.quantization
    assert (q["bits"], q["group_size"]) == (bits, group_size)
    blocks = {f"blocks.{i}.{n}" for i in (0, 1) for n in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")}
    skipped = {layer for layer in blocks if not layer.endswith("fc2")} if group_size == 128 else set()
    assert set(q["layers"]) == blocks - skipped and set(q["skipped"]) == skipped
    # As stored (what Metal and CUDA run): QuantizedLinear layers with the recorded bits and group size.
    model = build_model(config, mx.load(str(out / "model.safetensors")), str(out))
    quantized = {path: m for path, m in model.named_modules() if isinstance(m, nn.QuantizedLinear)}
    assert set(quantized) == set(q["layers"])
    assert all((m.bits, m.group_size) == (bits, group_size) for m in quantized.values())
    # On the CPU the same weights are expanded to float32 and compute the same function.
    expanded = load_model(str(out)).model
    x = mx.array(np.random.default_rng(0).standard_normal((2, 32, 32, 3), dtype=np.float32))
    assert np.abs(np.array(model(x)) - np.array(expanded(x))).max() < 1e-3


def test_cpu_loads_quantized_and_half_models_as_float32(peaked, tmp_path):
    """MLX's CPU quantized and half matmuls are slow scalar loops: the CPU gets plain float32 layers."""
    if mx.default_device() != mx.cpu:
        pytest.skip("the expansion only happens on the CPU")
    for name, kwargs in {"q4": {"quantize": Quantize(4, 64)}, "bf16": {"dtype": "bfloat16"}}.items():
        out = convert(str(peaked), tmp_path / name, **kwargs)
        model = load_model(str(out)).model
        assert not any(isinstance(m, nn.QuantizedLinear) for _, m in model.named_modules())
        leaves = [v for _, v in tree_flatten(model.parameters())]
        assert leaves and all(v.dtype == mx.float32 for v in leaves)


def test_8bit_keeps_the_float32_top5(peaked, tmp_path):
    reference = reference_probabilities(peaked)
    classifier = mlx_vit.load(str(convert(str(peaked), tmp_path / "q8", quantize=Quantize(8, 64))))
    probs = classifier.scores(classifier.logits(classifier.pixels(PHOTOS)))
    assert np.median(reference.max(-1)) > 0.9  # the premise: a confident model
    assert (np.argsort(-probs, -1)[:, :5] == np.argsort(-reference, -1)[:, :5]).all()
    assert np.abs(probs - reference).max() < 0.01


@pytest.mark.parametrize("dtype, tolerance", [("float16", 2e-3), ("bfloat16", 2e-2)])
def test_half_precision_files(peaked, tmp_path, dtype, tolerance):
    out = convert(str(peaked), tmp_path / dtype, dtype=dtype)
    header, _ = read_header(out / "model.safetensors")
    assert {entry["dtype"] for entry in header.values()} == {{"float16": "F16", "bfloat16": "BF16"}[dtype]}
    classifier = mlx_vit.load(str(out))
    probs = classifier.scores(classifier.logits(classifier.pixels(PHOTOS)))
    assert np.abs(probs - reference_probabilities(peaked)).max() < tolerance


def test_skipped_layers_are_reported(tmp_path):
    folder = make_checkpoint(tmp_path / "hf")  # hidden 32, MLP 64: of the blocks' linears only fc2's input divides 64
    done = subprocess.run([sys.executable, "-m", "mlx_vit", "convert", str(folder), "-o", str(tmp_path / "q"), "-q"],
                          capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})  # fmt: skip
    assert done.returncode == 0, done.stderr
    config = json.loads((tmp_path / "q" / "config.json").read_text())
    assert config["quantization"]["layers"] == ["blocks.0.mlp.fc2", "blocks.1.mlp.fc2"]
    for layer in config["quantization"]["skipped"]:
        assert f"{layer} left in float32" in done.stderr
    assert len(config["quantization"]["skipped"]) == 3 * 2  # qkv, proj and fc1 in each block


@pytest.mark.parametrize("bits, group_size", [(7, 64), (4, 48)])
def test_unsupported_widths_are_refused_before_work(bits, group_size):
    with pytest.raises(MlxVitError, match="--q-"):
        Quantize(bits, group_size)


def test_each_modes_group_sizes_and_bits_are_what_mx_quantize_takes():
    """MODES, which conversion and loading both check, against MLX itself: a mode's group sizes are exactly those
    mx.quantize takes in it (of a width every candidate divides), and each of its bits is taken."""

    def takes(mode: str, bits: int, group_size: int) -> bool:
        try:
            mx.eval(mx.quantize(mx.ones((4, 768)), group_size=group_size, bits=bits, mode=mode))
        except ValueError:
            return False
        return True

    for mode, (bits, sizes) in MODES.items():
        assert tuple(g for g in (8, 16, 24, 32, 48, 64, 96, 128, 256) if takes(mode, bits[0], g)) == sizes, mode
        assert all(takes(mode, b, sizes[0]) for b in bits), mode


@pytest.fixture(scope="module")
def quantized(peaked, tmp_path_factory):
    folder = convert(str(peaked), tmp_path_factory.mktemp("quantized") / "q", quantize=Quantize(4, 64))
    load_model(str(folder))  # loads as it is
    return folder


@pytest.mark.parametrize(
    "changes, needle",
    [
        (dict(group_size=48), "quantization group_size 48 is not one affine allows (32, 64, 128)"),
        (dict(group_size=16), "quantization group_size 16 is not one affine allows (32, 64, 128)"),
        (dict(mode="mxfp4"), "quantization group_size 64 is not one mxfp4 allows (32)"),
        (dict(mode="nvfp4", group_size=32), "quantization group_size 32 is not one nvfp4 allows (16)"),
        (dict(bits=7), "quantization bits 7 is not one affine allows (2, 3, 4, 5, 6, 8)"),
        (dict(bits_of={"blocks.0.attn.qkv": 1}), "quantization bits 1 is not one affine allows"),
        (dict(mode="mxfp8", group_size=32), "quantization bits 4 is not one mxfp8 allows (8)"),
        (dict(mode="int4"), "quantization mode 'int4' is not one of affine, mxfp4, nvfp4, mxfp8"),
    ],
)
def test_a_stored_quantization_mx_quantize_cannot_make_is_refused(quantized, tmp_path, changes, needle):
    """A converted folder's config.json is untrusted: a group size or bits its mode does not allow (48 with
    affine, say) is one line naming the config, before any weight is read."""
    folder = shutil.copytree(quantized, tmp_path / "q")
    (folder / "manifest.json").unlink()  # it records config.json's size
    config = json.loads((folder / "config.json").read_text())
    config["quantization"].update(changes)
    (folder / "config.json").write_text(json.dumps(config))
    message = one_line_error(ConfigError, load_model, str(folder), names=folder / "config.json")
    assert needle in message, message


def test_wrong_tensor_dtype_is_refused_on_every_backend(peaked, tmp_path):
    """A packed weight re-labelled as float32 (same size, so the manifest can't tell) is refused by name."""
    out = convert(str(peaked), tmp_path / "q", quantize=Quantize(4, 64))
    weights = mx.load(str(out / "model.safetensors"))
    weights["blocks.0.attn.qkv.weight"] = weights["blocks.0.attn.qkv.weight"].view(mx.float32)
    config = FolderConfig.from_dict(json.loads((out / "config.json").read_text()), str(out))
    with pytest.raises(MlxVitError, match="blocks.0.attn.qkv.weight"):
        build_model(config, weights, str(out))  # the Metal/CUDA path: layers stay quantized
