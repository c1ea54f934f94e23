"""An index records the fingerprint of the weights that made it, and `search` refuses a model with other weights
(issue 24, point 3): another model of the same width used to embed the queries and answer nonsense, exit 0."""

from __future__ import annotations

import numpy as np
import pytest
from checkpoints import PHOTOS, make_checkpoint, one_line_error

import mlx_vit
from mlx_vit.convert import convert
from mlx_vit.embed import FINGERPRINT, IndexFileError, read_index, write_embeddings
from mlx_vit.errors import OutputError, shown
from mlx_vit.search import search_index

QUERIES = PHOTOS[:3]


@pytest.fixture(autouse=True)
def caches(tmp_path, monkeypatch):
    monkeypatch.setenv("MLX_VIT_CACHE", str(tmp_path / "mlx-vit"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def embedded(model: str, index, **options) -> dict[str, str]:
    mlx_vit.embed_library(mlx_vit.load(model, image_size=options.pop("image_size", None)), QUERIES, index, **options)
    return read_index(index)[2]


def test_the_same_model_searches_its_index(vit_folder, tmp_path):
    index = tmp_path / "i.safetensors"
    made = embedded(str(vit_folder), index)
    assert made[FINGERPRINT] == mlx_vit.load(str(vit_folder)).fingerprint
    for model in (None, str(vit_folder)):
        answers = search_index([QUERIES[1]], index, top_k=1, model=model)
        assert answers[0].matches[0][0] == str(QUERIES[1]) and answers[0].matches[0][1] == pytest.approx(1.0)


@pytest.mark.parametrize("options", [{"image_size": 48}, {"normalize": True}])
def test_an_index_made_with_other_settings_is_searched_by_its_model(options, vit_folder, tmp_path):
    index = tmp_path / "i.safetensors"
    embedded(str(vit_folder), index, **options)
    assert len(search_index([QUERIES[0]], index, top_k=2, model=str(vit_folder))[0].matches) == 2


def test_the_fingerprint_is_the_weights_not_how_they_were_loaded(vit_folder, tmp_path):
    converted = convert(str(vit_folder), tmp_path / "converted")  # the same weights, as an mlx-vit folder
    index = tmp_path / "i.safetensors"
    embedded(str(vit_folder), index)
    assert search_index([QUERIES[0]], index, top_k=1, model=str(converted))[0].matches[0][0] == str(QUERIES[0])


def test_a_model_with_other_weights_of_the_same_width_is_refused(vit_folder, tmp_path):
    other = make_checkpoint(tmp_path / "other", seed=7)  # the same architecture, other weights
    index = tmp_path / "i.safetensors"
    embedded(str(vit_folder), index)
    message = one_line_error(IndexFileError, search_index, [QUERIES[0]], index, model=str(other), names=other)
    assert shown(vit_folder) in message and "other weights" in message


def test_an_index_without_a_fingerprint_keeps_the_width_check(vit_folder, tmp_path):
    other = make_checkpoint(tmp_path / "other", seed=7)
    for index in (tmp_path / "old.safetensors", tmp_path / "i.npy"):  # an older index; .npy has no metadata
        write_embeddings(index, [np.ones((2, 32), np.float32)], ["a", "b"], str(vit_folder))
        assert len(search_index([QUERIES[0]], index, top_k=1, model=str(other))[0].matches) == 1
        write_embeddings(index, [np.ones((2, 5), np.float32)], ["a", "b"], str(vit_folder))
        one_line_error(IndexFileError, search_index, [QUERIES[0]], index, model=str(other), names=index.name)


def test_resume_refuses_other_weights_and_extends_an_older_index_as_it_was(vit_folder, tmp_path):
    index = tmp_path / "i.safetensors"
    embedded(str(vit_folder), index)
    other = mlx_vit.load(str(make_checkpoint(tmp_path / "other", seed=7)))
    with pytest.raises(OutputError, match="weights"):
        mlx_vit.embed_library(other, PHOTOS[:4], index, resume=True)
    old = tmp_path / "old.safetensors"  # as an older mlx-vit wrote it: no fingerprint
    vectors, paths, settings = read_index(index)
    del settings[FINGERPRINT]
    write_embeddings(old, [np.array(vectors)], paths, settings.pop("model"), settings)
    mlx_vit.embed_library(mlx_vit.load(str(vit_folder)), PHOTOS[:4], old, resume=True)
    vectors, paths, settings = read_index(old)
    assert len(paths) == 4 and FINGERPRINT not in settings  # its older rows' weights are still unknown


def test_an_index_whose_model_cannot_be_loaded_is_named(vit_folder, tmp_path):
    # the model's name comes from the index, which the user never read: the line read "error: /gone/model: no such
    # folder ...", naming neither the index nor -m
    import shutil

    from mlx_vit.errors import MlxVitError

    model = tmp_path / "model"
    shutil.copytree(vit_folder, model)
    index = tmp_path / "i.safetensors"
    embedded(str(model), index)
    shutil.rmtree(model)
    line = one_line_error(MlxVitError, search_index, [QUERIES[0]], index, names=index.name)
    assert line.startswith(f"{shown(index)}: its model cannot be loaded ({shown(model)}") and line.endswith("with -m")
    answers = search_index([QUERIES[0]], index, top_k=1, model=str(vit_folder))
    assert answers[0].matches[0][0] == str(QUERIES[0])
