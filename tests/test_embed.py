"""Features (`mlx-vit embed`) against transformers and timm on the same weights and photos; index files; search."""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest
from checkpoints import PHOTOS, make_checkpoint, one_line_error

from mlx_vit.classify import load
from mlx_vit.embed import IndexFileError, features, paths_file, read_embeddings, write_embeddings
from mlx_vit.search import nearest, search_index

TOLERANCE = 1e-4


def ours(folder, all_tokens=False, normalize=False, photos=PHOTOS) -> np.ndarray:
    classifier = load(str(folder))
    vectors, finite = features(classifier, classifier.pixels(photos), all_tokens, normalize)
    assert finite.all() and vectors.dtype == np.float32
    return vectors


def transformers_hidden(folder, photos=PHOTOS) -> np.ndarray:
    """transformers' last_hidden_state (after the final LayerNorm) for the photos, through its PIL processor."""
    import torch
    import transformers

    from mlx_vit.images import open_image

    processor = transformers.AutoImageProcessor.from_pretrained(str(folder), backend="pil")
    model = transformers.AutoModel.from_pretrained(str(folder)).eval()
    pixels = processor([open_image(p) for p in photos], return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        return model(pixel_values=pixels).last_hidden_state.numpy()


@pytest.mark.parametrize("kind", ["vit", "vit-model"])
def test_vit_features_equal_transformers_class_token(kind, tmp_path):
    folder = make_checkpoint(tmp_path / kind, kind=kind, seed=2)
    hidden = transformers_hidden(folder)
    assert np.abs(ours(folder) - hidden[:, 0]).max() < TOLERANCE
    assert np.abs(ours(folder, all_tokens=True) - hidden).max() < TOLERANCE


def test_normalized_features_are_unit_vectors_in_the_same_direction(vit_folder):
    plain, unit = ours(vit_folder), ours(vit_folder, normalize=True)
    assert np.abs(np.linalg.norm(unit, axis=-1) - 1).max() < 1e-6
    assert np.abs(unit - plain / np.linalg.norm(plain, axis=-1, keepdims=True)).max() < 1e-6
    tokens = ours(vit_folder, all_tokens=True, normalize=True)
    assert np.abs(np.linalg.norm(tokens, axis=-1) - 1).max() < 1e-6  # every token's vector


@pytest.fixture(scope="module")
def timm_models():
    pytest.importorskip("timm")
    import timm_checkpoints as tc

    return {key: tc.make_timm(key, seed=3) for key in tc.VARIANTS}


def timm_pre_logits(model, photos=PHOTOS) -> tuple[np.ndarray, np.ndarray]:
    """timm's forward_head(pre_logits=True) and forward_features, through timm's own eval transform."""
    import timm_checkpoints as tc
    import torch
    from timm.data import create_transform

    from mlx_vit.images import open_image

    transform = create_transform(**tc.timm_data_config(model))
    pixels = torch.stack([transform(open_image(p)) for p in photos])
    with torch.no_grad():
        tokens = model.forward_features(pixels)
        return model.forward_head(tokens, pre_logits=True).numpy(), tokens.numpy()


@pytest.mark.parametrize("key", ["vit", "deit-distilled", "reg-gap", "ls-fcnorm", "clip-quickgelu", "siglip-map",
                                 "dinov2-reg-518"])  # fmt: skip
def test_timm_features_equal_pre_logits(key, timm_models, tmp_path):
    import timm_checkpoints as tc

    from mlx_vit.convert import convert

    model = timm_models[key]
    out = convert(str(tc.save_timm_hub(model, tmp_path / key)), tmp_path / f"{key}-mlx")
    pre_logits, tokens = timm_pre_logits(model, PHOTOS[:3])
    assert np.abs(ours(out, photos=PHOTOS[:3]) - pre_logits).max() < TOLERANCE
    assert np.abs(ours(out, all_tokens=True, photos=PHOTOS[:3]) - tokens).max() < TOLERANCE


def test_features_leave_the_logits_bit_identical(vit_folder):
    import mlx.core as mx

    classifier = load(str(vit_folder))
    pixels = mx.array(classifier.pixels(PHOTOS[:2]))
    model = classifier.model
    logits = np.array(model(pixels))
    assert np.array_equal(logits, np.array(model.head(model.forward_features(pixels)[:, 0])))  # as before pre_logits
    assert np.array_equal(logits, np.array(model.head(model.features(pixels))))


@pytest.mark.parametrize("suffix", [".safetensors", ".npy"])
def test_index_round_trip(suffix, tmp_path):
    rng = np.random.default_rng(0)
    rows = rng.standard_normal((5, 7)).astype(np.float32)
    paths = ["a.png", "dir/b, c.jpg", "caf\u00e9 \u732b.png", "bad\udcff.png", " s p a c e "]
    index = tmp_path / f"index{suffix}"
    write_embeddings(index, [rows[:2], rows[2:]], paths, "my/model")
    vectors, read_paths, model = read_embeddings(index)
    assert np.array_equal(np.asarray(vectors), rows) and read_paths == paths
    assert model == ("my/model" if suffix == ".safetensors" else None)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporary file left behind
    if suffix == ".safetensors":  # readable by the safetensors library itself, metadata included
        from safetensors.numpy import load_file, safe_open

        assert np.array_equal(load_file(index)["embeddings"], rows)
        with safe_open(index, "np") as f:
            assert json.loads(f.metadata()["paths"]) == paths
    else:
        assert np.array_equal(np.load(index), rows)
        assert paths_file(index).read_bytes().decode("utf-8", "surrogateescape").split("\n") == [*paths, ""]


def test_a_library_too_large_for_the_header_keeps_its_paths_beside_it(tmp_path):
    paths = [f"photos/{i:07d}," * 3 for i in range(400_000)]  # commas: ~1.2M JSON values if listed in the header
    paths[7] = "a line\nbreak.png"
    rows = np.zeros((len(paths), 2), np.float32)
    index = tmp_path / "big.safetensors"
    write_embeddings(index, [rows], paths, "m")
    (length,) = struct.unpack("<Q", index.read_bytes()[:8])
    assert length < 4096 and (tmp_path / "big.paths.jsonl").exists()
    assert read_embeddings(index)[1] == paths


@pytest.mark.parametrize("damage", ["count", "not-an-index", "truncated-npy", "missing-paths", "all-tokens", "nan-row"])
def test_broken_indices_are_one_line(damage, vit_folder, tmp_path):
    model = str(vit_folder)
    index = tmp_path / ("i.safetensors" if damage == "not-an-index" else "i.npy")
    write_embeddings(index, [np.ones((3, 4), np.float32)], ["a", "b", "c"], "m")
    if damage == "count":
        paths_file(index).write_text("a\nb\nc\nd\n")
    elif damage == "not-an-index":
        from safetensors.numpy import save_file

        save_file({"weight": np.ones((3, 4), np.float32)}, index)
    elif damage == "truncated-npy":
        index.write_bytes(index.read_bytes()[:-4])
    elif damage == "missing-paths":
        paths_file(index).unlink()
    elif damage == "nan-row":
        rows = np.ones((3, 32), np.float32)  # vit_folder's width
        rows[1, 2] = np.nan
        write_embeddings(index, [rows], ["a", "b", "c"], "m")
        message = one_line_error(IndexFileError, search_index, [PHOTOS[0]], index, model=model, names=index.name)
        assert "row 1 (b)" in message
        return
    else:
        write_embeddings(index, [np.ones((3, 2, 4), np.float32)], ["a", "b", "c"], "m")
        message = one_line_error(IndexFileError, search_index, [PHOTOS[0]], index, model="m", names=index.name)
        assert "--all-tokens" in message
        return
    one_line_error(IndexFileError, read_embeddings, index, names=index.name)


def test_nearest_is_exact_cosine_with_ties_in_index_order(monkeypatch):
    import mlx_vit.search

    monkeypatch.setattr(mlx_vit.search, "CHUNK_ROWS", 3)  # several chunks, merged
    monkeypatch.setattr(mlx_vit.search, "SPARE", 0)  # each keeping only k candidates
    rng = np.random.default_rng(1)
    index = rng.standard_normal((10, 5)).astype(np.float32)
    index[7] = index[2] * 3  # same direction as row 2: a tie, at similarity 1
    queries = np.stack([index[2], rng.standard_normal(5)])
    rows, similarities = nearest(queries, index, 4)
    unit = index / np.linalg.norm(index, axis=1, keepdims=True)
    expected = (queries / np.linalg.norm(queries, axis=1, keepdims=True)) @ unit.T
    for q in range(2):
        assert rows[q].tolist() == np.argsort(-expected[q], kind="stable")[:4].tolist()
        assert np.abs(similarities[q] - expected[q][rows[q]]).max() < 1e-6
    assert rows[0][:2].tolist() == [2, 7] and similarities[0][0] == 1.0
    assert nearest(queries, index, 50)[0].shape == (2, 10)


def test_nearest_is_cosine_whatever_the_rows_norms():
    """Rows of norms from 1e-3 to 1e3 (features are not normalized unless asked): the float32 pre-filter ranks by
    cosine, not by dot product, so the long rows do not crowd out the nearest short ones. Against a brute-force
    float64 cosine over every row."""
    rng = np.random.default_rng(2)
    directions = rng.standard_normal((2000, 16))
    index = (directions * 10.0 ** rng.uniform(-3, 3, (2000, 1))).astype(np.float32)
    queries = rng.standard_normal((5, 16))
    rows, similarities = nearest(queries, index, 10)
    rows64 = index.astype(np.float64)
    expected = (queries / np.linalg.norm(queries, axis=1, keepdims=True)) @ (
        rows64 / np.linalg.norm(rows64, axis=1, keepdims=True)
    ).T
    for q in range(len(queries)):
        best = np.argsort(-expected[q], kind="stable")[:10]
        assert rows[q].tolist() == best.tolist()
        assert np.abs(similarities[q] - expected[q][best]).max() < 1e-12
