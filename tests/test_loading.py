"""Loading by folder or Hub id, the Python API, and conversions that never leave half a model behind."""

from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from checkpoints import IMAGES, PHOTOS, hf_pipeline, lay_into_hf_cache, make_checkpoint
from PIL import Image

import mlx_vit
from mlx_vit.config import ViTConfig
from mlx_vit.convert import FolderConfig, convert, is_mlx_folder, write_mlx_folder
from mlx_vit.errors import CheckpointError, ConfigError, ImageError, MlxVitError, ModelNotFoundError
from mlx_vit.loading import load_model
from mlx_vit.preprocess import PreprocessConfig

A_CONFIG = FolderConfig(ViTConfig(), PreprocessConfig())  # any config: these tests are about the files


@pytest.fixture(autouse=True)
def isolated_caches(tmp_path, monkeypatch):
    import huggingface_hub.constants

    # The Hub client reads HF_HOME once at import; point its cache constant at the temporary one.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    monkeypatch.setenv("MLX_VIT_CACHE", str(tmp_path / "mlx-vit"))


def test_converted_folder_equals_in_memory_conversion(vit_folder, tmp_path):
    out = convert(str(vit_folder), tmp_path / "out")
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "manifest.json", "model.safetensors"]
    x = mx.array(np.random.default_rng(0).standard_normal((2, 32, 32, 3), dtype=np.float32))
    a, b = load_model(str(out)).model(x), load_model(str(vit_folder)).model(x)
    assert np.array_equal(np.array(a), np.array(b))
    config = json.loads((out / "config.json").read_text())
    assert config["source"] == {"path": str(vit_folder.resolve())}
    assert config["architecture"] == "ViTForImageClassification" and len(config["id2label"]) == 10


def test_api_classify_paths_and_pil_images(vit_folder):
    classifier = mlx_vit.load(str(vit_folder))
    photo = IMAGES / "chelsea.png"
    # One image a call: in one batch the two would be rows of one matrix, which a BLAS may round by row.
    (from_path,) = classifier.classify([photo], top_k=3)
    (from_pil,) = classifier.classify([Image.open(photo).convert("RGB")], top_k=3)
    assert from_path == from_pil and len(from_path) == 3
    assert from_path[0].score >= from_path[1].score >= from_path[2].score
    scores = classifier.scores(classifier.logits(classifier.pixels([photo])))[0]
    assert abs(scores.sum() - 1) < 1e-5 and from_path[0].class_id == int(scores.argmax())
    assert from_path[0].label == classifier.labels[from_path[0].class_id]


@pytest.mark.parametrize(
    "config, sigmoid",
    [
        (dict(num_labels=1), True),  # softmax of one logit is always 1.0
        (dict(problem_type="multi_label_classification"), True),
        (dict(num_labels=2, problem_type="multi_label_classification"), True),
        (dict(problem_type="single_label_classification"), False),
        (dict(num_labels=2), False),
        ({}, False),
    ],
)
def test_scores_follow_the_image_classification_pipelines_rule(tmp_path, config, sigmoid):
    """transformers' image-classification pipeline scores a multi-label model, or a one-label one, with a sigmoid of
    each logit, any other classifier with a softmax: the scores mlx-vit reports follow the same rule, computed here
    from its logits, and equal the pipeline's own on a photo."""
    folder = make_checkpoint(tmp_path / "hf", seed=11, **config)
    classifier = mlx_vit.load(str(folder))
    classes = len(classifier.labels)
    logits = classifier.logits(classifier.pixels(PHOTOS)).astype(np.float64)
    if sigmoid:
        expected = 1 / (1 + np.exp(-logits))
    else:
        expected = np.exp(logits - logits.max(axis=1, keepdims=True))
        expected /= expected.sum(axis=1, keepdims=True)
    assert np.abs(classifier.scores(logits) - expected).max() < 1e-12
    for predictions, row in zip(classifier.classify(PHOTOS, top_k=classes), expected, strict=True):
        assert [p.class_id for p in predictions] == np.argsort(-row, kind="stable").tolist()
        assert np.abs([p.score for p in predictions] - row[[p.class_id for p in predictions]]).max() < 1e-6
    if sigmoid and classes == 1:
        assert expected.std() > 0.05  # not the constant 1.0 a softmax of one logit gives
    theirs = {p["label"]: p["score"] for p in hf_pipeline(folder)(str(PHOTOS[0]), top_k=classes)}
    ours = {p.label: p.score for p in classifier.classify([PHOTOS[0]], top_k=classes)[0]}
    assert ours.keys() == theirs.keys()
    assert max(abs(ours[label] - theirs[label]) for label in ours) < 1e-4


def test_api_bad_file(vit_folder, tmp_path):
    classifier = mlx_vit.load(str(vit_folder))
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    with pytest.raises(ImageError, match="bad.png"):
        classifier.classify([IMAGES / "chelsea.png", bad])
    results = list(classifier.classify_files([bad, IMAGES / "chelsea.png", bad], batch_size=1))
    assert [r.error is None for r in results] == [False, True, False]
    assert results[1].predictions == classifier.classify([IMAGES / "chelsea.png"])[0]


def test_batches_equal_single_images(vit_folder):
    classifier = mlx_vit.load(str(vit_folder))
    photos = [IMAGES / n for n in ("chelsea.png", "camera.png", "rocket.jpg")]
    batched = [r.predictions for r in classifier.classify_files(photos, batch_size=2)]
    single = [classifier.classify([p])[0] for p in photos]
    for a, b in zip(batched, single, strict=True):
        assert [p.class_id for p in a] == [p.class_id for p in b]
        assert np.allclose([p.score for p in a], [p.score for p in b], atol=1e-5)


def test_hub_id_is_converted_once_into_the_cache(vit_folder, tmp_path):
    snapshot = lay_into_hf_cache(vit_folder, tmp_path / "hf", "org/model", commit="c" * 40)
    first = load_model("org/model")
    converted = tmp_path / "mlx-vit" / "org--model" / snapshot.name
    assert first.name == "org/model" and (converted / "model.safetensors").is_file()
    stamp = (converted / "model.safetensors").stat().st_mtime_ns
    load_model("org/model")
    assert (converted / "model.safetensors").stat().st_mtime_ns == stamp


@pytest.mark.parametrize(
    "name",
    ["../x", "a/b/c", "org/na me", "org/name.git", "-org/name", "org/" + "x" * 97, "google--vit-base", "o/" + "x" * 95],
)
def test_invalid_names_never_reach_the_hub(name):
    with pytest.raises(ModelNotFoundError):
        load_model(name)


def test_not_a_model_folder(tmp_path):
    with pytest.raises(ModelNotFoundError, match="no config.json"):
        load_model(str(tmp_path))
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        load_model(str(tmp_path))


def test_missing_weights(vit_folder, tmp_path):
    out = convert(str(vit_folder), tmp_path / "out")
    (out / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="missing"):
        load_model(str(out))


@pytest.mark.parametrize("failure", [RuntimeError("disk on fire"), KeyboardInterrupt(), OSError(28, "No space left")])
def test_interrupted_write_leaves_nothing(tmp_path, monkeypatch, failure):
    def fail(*args, **kwargs):
        raise failure

    monkeypatch.setattr(mx, "save_safetensors", fail)
    # A disk error is the user's to fix: one line naming the target. Anything else propagates as it is.
    with pytest.raises(MlxVitError if isinstance(failure, OSError) else type(failure)):
        write_mlx_folder(tmp_path / "model", {"w": np.zeros(2, np.float32)}, A_CONFIG, force=False)
    assert list(tmp_path.iterdir()) == []


def test_interrupted_force_keeps_the_old_model(vit_folder, tmp_path, monkeypatch):
    out = convert(str(vit_folder), tmp_path / "out")
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    monkeypatch.setattr(mx, "save_safetensors", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        convert(str(vit_folder), out, force=True)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in Path(tmp_path).iterdir()) == ["out"]


def test_pil_images_get_the_same_rgb_conversion_as_files(vit_folder, tmp_path):
    """An RGBA PIL image passed in memory is composited on white, exactly as the same file on disk."""
    classifier = mlx_vit.load(str(vit_folder))
    rgba = Image.open(IMAGES / "chelsea.png").convert("RGBA")
    alpha = np.zeros(rgba.size[::-1], np.uint8)
    alpha[:, : rgba.width // 2] = 255
    rgba.putalpha(Image.fromarray(alpha))
    rgba.save(tmp_path / "half.png")
    assert np.array_equal(classifier.pixels([rgba]), classifier.pixels([tmp_path / "half.png"]))


@pytest.mark.parametrize("id2label", [None, ["cat"], {"first": "cat"}])
def test_tampered_labels_are_a_one_line_error(vit_folder, tmp_path, id2label):
    out = convert(str(vit_folder), tmp_path / "out")
    config = json.loads((out / "config.json").read_text())
    config["id2label"] = id2label
    (out / "config.json").write_text(json.dumps(config))
    (out / "manifest.json").unlink()
    with pytest.raises(ConfigError, match="id2label"):
        mlx_vit.load(str(out))


def test_force_replaces_only_model_folders(vit_folder, tmp_path):
    """`-o ~/models --force` must not wipe a folder of the user's, nor the checkpoint being converted."""
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    with pytest.raises(MlxVitError, match="not an mlx-vit model folder"):
        convert(str(vit_folder), mine, force=True)
    assert (mine / "notes.txt").read_text() == "keep me"
    with pytest.raises(MlxVitError, match="not an mlx-vit model folder"):
        convert(str(vit_folder), vit_folder, force=True)
    assert (vit_folder / "config.json").is_file()
    (tmp_path / "empty").mkdir()
    assert is_mlx_folder(convert(str(vit_folder), tmp_path / "empty", force=True))


def test_unwritable_target_is_one_line(vit_folder, tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(MlxVitError, match="cannot write the model"):
        convert(str(vit_folder), tmp_path / "file" / "out")
