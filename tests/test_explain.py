"""Attention maps: the weights against transformers' eager attention and timm's, rollout against the paper's
formula, the picture, and the inference path left untouched."""

from __future__ import annotations

import json

import numpy as np
import pytest
from checkpoints import PHOTOS, run_cli
from PIL import Image

from mlx_vit.classify import load
from mlx_vit.explain import attention_maps, explain, render, rollout

TOLERANCE = 1e-5


def our_weights(folder, photo=PHOTOS[0]):
    """(pixels (1, H, W, 3), [layer weights (heads, T, T)], pool weights or None, logits) of one photo."""
    import mlx.core as mx

    classifier = load(str(folder))
    pixels = classifier.pixels([photo])
    logits, layers, pool = classifier.model.with_attention(mx.array(pixels))
    return pixels, [np.array(w[0]) for w in layers], None if pool is None else np.array(pool[0]), np.array(logits)


@pytest.mark.parametrize("fixture", ["vit_folder", "deit_folder"])
def test_weights_equal_transformers_eager_attention(fixture, request):
    import torch
    import transformers

    folder = request.getfixturevalue(fixture)
    pixels, layers, _, logits = our_weights(folder)
    model = transformers.AutoModelForImageClassification.from_pretrained(str(folder), attn_implementation="eager")
    with torch.no_grad():
        out = model.eval()(pixel_values=torch.from_numpy(pixels).permute(0, 3, 1, 2), output_attentions=True)
    assert len(out.attentions) == len(layers)
    for ours, theirs in zip(layers, out.attentions, strict=True):
        assert np.abs(ours - theirs[0].numpy()).max() < TOLERANCE
    assert np.abs(logits - out.logits.numpy()).max() < 1e-4


@pytest.mark.parametrize("key", ["vit", "reg-gap"])
def test_weights_equal_timms(key, tmp_path):
    pytest.importorskip("timm")
    import timm_checkpoints as tc
    import torch

    from mlx_vit.convert import convert

    model = tc.make_timm(key, seed=4)
    captured = []
    for block in model.blocks:
        block.attn.fused_attn = False  # timm's explicit softmax, whose output goes through attn_drop
        block.attn.attn_drop.register_forward_hook(lambda module, args, out: captured.append(args[0][0].numpy()))
    folder = convert(str(tc.save_timm_hub(model, tmp_path / key)), tmp_path / f"{key}-mlx")
    pixels, layers, _, _ = our_weights(folder)
    with torch.no_grad():
        model(torch.from_numpy(pixels).permute(0, 3, 1, 2))
    assert len(captured) == len(layers)
    for ours, theirs in zip(layers, captured, strict=True):
        assert ours.shape == theirs.shape and np.abs(ours - theirs).max() < TOLERANCE


def paper_rollout(layers: list[np.ndarray]) -> np.ndarray:
    """Abnar & Zuidema (2020), eq. for rollout: Ã = 0.5·mean_h(A) + 0.5·I with rows summing to 1, and
    R = Ã_L · Ã_(L-1) · ... · Ã_1."""
    fused = []
    for a in layers:
        mixed = 0.5 * a.mean(axis=0) + 0.5 * np.eye(a.shape[-1])
        fused.append(mixed / mixed.sum(axis=-1, keepdims=True))
    return fused[0] if len(fused) == 1 else np.linalg.multi_dot(fused[::-1])


def test_rollout_is_the_papers_formula(deit_folder):
    rng = np.random.default_rng(0)
    raw = [rng.random((3, 6, 6)) for _ in range(4)]
    layers = [w / w.sum(axis=-1, keepdims=True) for w in raw]
    assert np.abs(rollout(layers) - paper_rollout(layers)).max() < 1e-12
    _, weights, _, _ = our_weights(deit_folder)  # class + distillation token: both left out of the map
    config = load(str(deit_folder)).model.config
    maps, what = attention_maps(config, weights, None, "rollout")
    side = config.image_size // config.patch_size
    expected = paper_rollout([w.astype(np.float64) for w in weights])[0, 2:].reshape(side, side)
    assert maps.shape == (1, side, side) and np.abs(maps[0] - expected).max() < 1e-6
    assert "rollout" in what and "class token" in what


def test_last_and_cls_read_the_class_row_of_a_layer(vit_folder):
    _, weights, _, _ = our_weights(vit_folder)
    config = load(str(vit_folder)).model.config
    side = config.image_size // config.patch_size
    last, _ = attention_maps(config, weights, None, "last")
    assert np.allclose(last[0], weights[-1][:, 0, 1:].mean(axis=0).reshape(side, side))
    one, what = attention_maps(config, weights, None, "cls", layer=0, head=2)
    assert np.allclose(one[0], weights[0][2, 0, 1:].reshape(side, side)) and "layer 0, head 2" in what
    heads, _ = attention_maps(config, weights, None, "cls", layer=-1, grid=True)
    assert heads.shape == (config.num_attention_heads, side, side)


def test_attention_pool_models_use_the_pools_attention(tmp_path):
    pytest.importorskip("timm")
    import timm_checkpoints as tc

    from mlx_vit.convert import convert

    folder = convert(str(tc.save_timm_hub(tc.make_timm("siglip-map", seed=4), tmp_path / "s")), tmp_path / "s-mlx")
    _, layers, pool, _ = our_weights(folder)
    config = load(str(folder)).model.config
    maps, what = attention_maps(config, layers, pool, "last")
    assert np.allclose(maps.reshape(-1), pool[:, 0].mean(axis=0)) and "attention pool" in what
    rolled, what = attention_maps(config, layers, pool, "rollout")
    assert np.isclose(rolled.sum(), 1.0) and "no class token" in what


def test_the_inference_path_is_unchanged_bit_for_bit(vit_folder, monkeypatch):
    import mlx.core as mx

    # One CPU lane, as the blocks run below: two lanes split the batch, and a BLAS may round a matrix's rows
    # differently by its height (OpenBLAS's Haswell kernels on an AVX-512 Zen do; tests/test_lanes.py bounds that).
    monkeypatch.setenv("MLX_VIT_CPU_LANES", "1")

    classifier = load(str(vit_folder))
    pixels = mx.array(classifier.pixels(PHOTOS[:2]))
    model = classifier.model
    logits = np.array(model(pixels))
    # As the model computed them before the attention path existed: blocks, final norm, class token, head.
    x = model.embed(pixels)
    for block in model.blocks:
        x = block(x)
    assert np.array_equal(logits, np.array(model.head(model.norm(x)[:, 0])))
    assert np.abs(np.array(model.with_attention(pixels)[0]) - logits).max() < 1e-5


def test_the_picture_is_hottest_where_the_attention_is(vit_folder):
    classifier = load(str(vit_folder))
    gray = Image.new("RGB", (64, 64), (128, 128, 128))  # a flat image: brightness comes from the heatmap only
    explanation = explain(classifier, gray, "last")
    picture = render(explanation, classifier.name, scale=8)
    side = explanation.maps.shape[-1]
    size = side * classifier.model.config.patch_size * 8
    assert picture.width >= size and picture.height > size  # the legend below the image
    brightness = np.asarray(picture, np.float64)[:size, :size].sum(axis=-1)
    row, column = np.unravel_index(brightness.argmax(), brightness.shape)
    patch = size // side
    assert (row // patch, column // patch) == np.unravel_index(explanation.maps[0].argmax(), (side, side))


def test_cli_writes_the_png_and_the_numbers(vit_folder, tmp_path, isolated):
    out, numbers = tmp_path / "heat.png", tmp_path / "heat.npy"
    done = run_cli("explain", PHOTOS[0], "-m", vit_folder, "-o", out, "--save-npy", numbers, "--method", "last",
                   env=isolated)  # fmt: skip
    assert done.returncode == 0, done.stderr
    config = json.loads((vit_folder / "config.json").read_text())
    side = config["image_size"] // config["patch_size"]
    assert Image.open(out).format == "PNG" and np.load(numbers).shape == (side, side)
    again = run_cli("explain", PHOTOS[0], "-m", vit_folder, "-o", out, env=isolated)
    assert again.returncode == 1 and "already exists (--force replaces it)" in again.stderr
    grid = run_cli("explain", PHOTOS[0], "-m", vit_folder, "-o", tmp_path / "g.png", "--grid", "--save-npy",
                   tmp_path / "g.npy", "--method", "cls", "--layer", "0", env=isolated)  # fmt: skip
    assert grid.returncode == 0 and np.load(tmp_path / "g.npy").shape == (config["num_attention_heads"], side, side)
    wrong = run_cli("explain", PHOTOS[0], "-m", vit_folder, "--grid", env=isolated)
    assert wrong.returncode == 1 and wrong.stderr.count("\n") == 1 and "--grid go with" in wrong.stderr


def test_bad_output_choices_are_one_line_and_leave_nothing(vit_folder, tmp_path):
    from mlx_vit.errors import MlxVitError
    from mlx_vit.explain import write_explanation

    classifier = load(str(vit_folder))
    cases = [
        ({"output": tmp_path / "a.jpg"}, "explain writes a PNG"),
        ({"output": tmp_path / "a.png", "save_npy": tmp_path / "a.png"}, "name the same file"),
        ({"output": tmp_path / "a.png", "method": "last", "grid": True, "head": 0}, "leave out --head"),
        ({"output": tmp_path / "a.png", "save_npy": tmp_path / "missing" / "a.npy"}, "cannot write it"),
    ]
    for options, message in cases:
        with pytest.raises(MlxVitError, match=message):
            write_explanation(classifier, PHOTOS[0], **options)
        assert list(tmp_path.iterdir()) == []  # not the PNG either, nor a temporary file
