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


def test_label_ranks_among_all_the_labels_outside_the_top_k(vit_folder):
    from mlx_vit.classify import softmax

    classifier = load(str(vit_folder))
    scores = softmax(np.asarray(classifier.logits(classifier.pixels([PHOTOS[0]])), np.float64))[0]
    order = np.argsort(-scores)
    last, third = classifier.labels[int(order[-1])], classifier.labels[int(order[2])]
    found = explain(classifier, PHOTOS[0], "last", top_k=2, label=last).label
    assert (found.label, found.rank, found.of) == (last, len(scores), len(scores))
    assert np.isclose(found.score, scores[order[-1]], rtol=1e-4)
    assert str(found) == f"label '{last}' ranks 10th of 10 (score {found.score:.4g})"
    assert explain(classifier, PHOTOS[0], "last", top_k=2, label=third).label.rank == 3


def test_a_label_is_found_by_one_of_its_names_and_a_repeated_one_by_its_best_rank():
    from types import SimpleNamespace

    from mlx_vit.errors import MlxVitError
    from mlx_vit.explain import label_indexes, ordinal

    model = SimpleNamespace(name="m", labels=dict(enumerate(["tabby, tabby cat", "tiger cat", "crane", "crane"])))
    assert label_indexes(model, "tabby") == [0] and label_indexes(model, "tabby, tabby cat") == [0]
    assert label_indexes(model, "crane") == [2, 3]
    with pytest.raises(MlxVitError, match="^--label 'tabbby': not one of the model's 4 labels; the nearest: "
                                          "'tabby, tabby cat'$"):  # fmt: skip
        label_indexes(model, "tabbby")
    assert [ordinal(n) for n in (1, 2, 3, 4, 11, 12, 13, 21, 22, 101, 111)] == [
        "1st", "2nd", "3rd", "4th", "11th", "12th", "13th", "21st", "22nd", "101st", "111th"]  # fmt: skip


def test_cli_says_where_the_label_ranks_and_refuses_an_unknown_one_in_a_line(vit_folder, tmp_path, isolated):
    out = tmp_path / "heat.png"
    done = run_cli("explain", PHOTOS[0], "-m", vit_folder, "-o", out, "-k", "1", "--label", "class 9 (j)",
                   env=isolated)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "label 'class 9 (j)' ranks " in done.stderr and " of 10 (score " in done.stderr
    wrong = run_cli("explain", PHOTOS[0], "-m", vit_folder, "-o", tmp_path / "x.png", "--label", "class 9",
                    env=isolated)  # fmt: skip
    assert wrong.returncode == 1 and wrong.stderr.count("\n") == 1, wrong.stderr
    assert ("--label 'class 9': not one of the model's 10 labels; the nearest: 'class 9 (j)', 'class 8 (i)', "
            "'class 7 (h)'") in wrong.stderr  # fmt: skip
    assert not (tmp_path / "x.png").exists()


def strip_of(picture: Image.Image, text: str, font) -> int | None:
    """The y of the legend line where `text` is drawn in `font` (at x = 6, as render draws it), or None."""
    line = Image.new("RGB", (picture.width, 18), "white")
    from PIL import ImageDraw

    ImageDraw.Draw(line).text((6, 0), text, fill="black", font=font)
    wanted, pixels = np.asarray(line), np.asarray(picture)
    found = [y for y in range(picture.height - 17) if np.array_equal(pixels[y : y + 18], wanted)]
    return found[0] if found else None


def test_a_label_with_non_ascii_characters_is_drawn_or_visibly_replaced(vit_folder, caplog):
    import dataclasses
    import logging

    from mlx_vit.engine import Prediction
    from mlx_vit.explain import legend_font, missing_glyphs

    classifier = load(str(vit_folder))
    explanation = explain(classifier, PHOTOS[0], "last", top_k=1)
    explanation = dataclasses.replace(explanation, predictions=[Prediction("Über-katze", 0.5, 0)])
    font, missing = legend_font("Über-katze")
    with caplog.at_level(logging.INFO, logger="mlx_vit"):
        picture = render(explanation, classifier.name)
    if missing:  # no font here has Ü: it is a '?', and a log line says so
        assert missing == {"Ü"} and strip_of(picture, "1. ?ber-katze  0.5000", font) is not None
        assert "draws 'Ü'" in caplog.text
    else:  # the font draws every character: none is its missing-glyph box
        assert missing_glyphs(font, "Über-katze") == set() and caplog.text == ""
        assert strip_of(picture, "1. Über-katze  0.5000", font) is not None


def test_a_character_no_font_has_becomes_a_question_mark_said_once(vit_folder, caplog, monkeypatch):
    import dataclasses
    import logging

    from PIL import ImageFont

    from mlx_vit import explain as module
    from mlx_vit.engine import Prediction

    monkeypatch.setattr(module, "FONT_FILES", ())  # Pillow's default font alone: ASCII (Latin-1 without FreeType)
    classifier = load(str(vit_folder))
    explanation = explain(classifier, PHOTOS[0], "last", top_k=1)
    explanation = dataclasses.replace(explanation, predictions=[Prediction("猫 cat", 0.5, 0)], titles=["猫"])
    default = ImageFont.load_default(size=module.FONT_SIZE)
    assert module.missing_glyphs(default, "猫 cat") == {"猫"}
    with caplog.at_level(logging.INFO, logger="mlx_vit"):
        picture = render(explanation, classifier.name)
    assert strip_of(picture, "1. ? cat  0.5000", default) is not None
    assert caplog.text.count("draws '猫'") == 1


def test_the_legend_names_the_image_and_has_a_colour_bar(vit_folder):
    import dataclasses

    from mlx_vit.explain import COLORS, legend, legend_font

    classifier = load(str(vit_folder))
    explanation = explain(classifier, PHOTOS[0], "last", top_k=1)
    assert f"image: {PHOTOS[0].name}" in legend(explanation, classifier.name)
    picture = render(explanation, classifier.name)
    unnamed = render(dataclasses.replace(explanation, image=""), classifier.name)
    assert picture.height == unnamed.height + 18  # the file name's line
    font, _ = legend_font("".join(legend(explanation, classifier.name)))
    assert strip_of(picture, f"image: {PHOTOS[0].name}", font) is not None
    tile = explanation.view.shape[0] * max(1, 448 // max(explanation.view.shape[:2]))
    bar = [tuple(p) for p in np.asarray(picture)[tile + 8 + 8]]  # the bar's middle row, under the image
    low, high = tuple(COLORS[0]), tuple(COLORS[255])
    assert low in bar and high in bar and bar.index(low) < bar.index(high)
    assert bar.index(high) - bar.index(low) >= 200  # a bar of at least 200 steps


def test_the_legend_font_is_never_read_from_the_current_folder(tmp_path, monkeypatch):
    # Pillow's truetype('DejaVuSans.ttf') opens that name in the current folder first: a font planted in a folder of
    # downloaded photos was parsed by FreeType and drawn. Only the platform's font folders, absolute, are searched.
    from pathlib import Path

    from PIL import ImageFont

    from mlx_vit import explain as module

    planted = tmp_path / "DejaVuSans.ttf"
    planted.write_bytes(b"\x00\x01\x00\x00" + b"\xff" * 64)  # a TrueType signature, then junk
    (tmp_path / "fonts").mkdir()
    (tmp_path / "fonts" / "DejaVuSans.ttf").write_bytes(planted.read_bytes())
    opened = []
    real = ImageFont.truetype
    monkeypatch.setattr(ImageFont, "truetype", lambda font, *a, **k: opened.append(font) or real(font, *a, **k))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("XDG_DATA_DIRS", ":.:/usr/share")  # relative entries (an empty one is the current folder)
    module._system_font.cache_clear()
    try:
        assert all(folder.is_absolute() for folder in module.font_folders())
        module.legend_font("Über-katze 猫")
    finally:
        module._system_font.cache_clear()
    names = [Path(font) for font in opened if isinstance(font, (str, Path))]  # Pillow's default font is bytes
    assert names and all(name.is_absolute() and tmp_path not in name.parents for name in names), names


def test_a_name_of_several_labels_is_refused_as_such():
    # ImageNet's 'grass snake' is a name of 'green snake, grass snake' and of 'garter snake, grass snake': it read
    # "not one of the model's labels", which it is (twice)
    from types import SimpleNamespace

    from mlx_vit.errors import MlxVitError
    from mlx_vit.explain import label_indexes

    model = SimpleNamespace(name="m", labels=dict(enumerate(["green snake, grass snake", "garter snake, grass snake",
                                                             "sea snake"])))  # fmt: skip
    refusal = ("^--label 'grass snake': a name of 2 of the model's labels \\('green snake, grass snake', "
               "'garter snake, grass snake'\\); give the whole label$")  # fmt: skip
    with pytest.raises(MlxVitError, match=refusal):
        label_indexes(model, "grass snake")
    assert label_indexes(model, "garter snake") == [1]
