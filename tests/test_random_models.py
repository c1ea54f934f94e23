"""`-m random:NAME` everywhere a model is loaded (issue 24): a preset ViT with seeded random weights, offline,
labelled as such; and the Hub's errors say how to get a model without it."""

from __future__ import annotations

import json
import logging

import mlx.core as mx
import numpy as np
import pytest
from checkpoints import IMAGES
from mlx.utils import tree_flatten
from typer.testing import CliRunner

from mlx_vit.cli import app
from mlx_vit.cli.errors import state
from mlx_vit.errors import ModelNotFoundError
from mlx_vit.loading import load_model
from mlx_vit.presets import PRESETS

runner = CliRunner()
TINY = "random:vit-tiny-patch16-224"


@pytest.fixture(autouse=True)
def offline(tmp_path, monkeypatch):
    """No Hub, empty caches; mlx_vit's logger as it was (the app's callback points it at the runner's stderr)."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("MLX_VIT_CACHE", str(tmp_path / "mlx-vit"))
    logger = logging.getLogger("mlx_vit")
    handlers, level, debug = logger.handlers[:], logger.level, state["debug"]
    yield
    logger.handlers[:], state["debug"] = handlers, debug
    logger.setLevel(level)


def test_classify_a_random_model_offline_through_the_cli():
    photo = str(IMAGES / "chelsea.png")
    done = runner.invoke(app, ["classify", "-m", TINY, photo])
    assert done.exit_code == 0, done.output
    assert f"mlx-vit · {TINY}" in done.stdout  # the table is titled with the name that says what it is
    assert f"{TINY}: random weights (seed 0), for trying mlx-vit offline; its predictions mean nothing" in done.stderr
    first = runner.invoke(app, ["classify", "-m", TINY, "--format", "json", "-k", "3", photo])
    again = runner.invoke(app, ["classify", "-m", TINY, "--format", "json", "-k", "3", photo])
    predictions = json.loads(first.stdout)[0]["predictions"]
    assert len(predictions) == 3 and all(isinstance(p["label"], str) and p["label"] for p in predictions)
    assert predictions == json.loads(again.stdout)[0]["predictions"]  # seeded: the same weights every time


def test_a_random_model_is_the_preset_with_seeded_weights():
    loaded = load_model(TINY)
    config = loaded.model.config
    assert (config.hidden_size, config.num_hidden_layers) == (192, 12) and loaded.name == TINY
    assert len(loaded.config.labels) == 1000 and loaded.config.labels[281] == "tabby, tabby cat"
    again = dict(tree_flatten(load_model(TINY).model.parameters()))
    for key, value in tree_flatten(loaded.model.parameters()):
        assert mx.array_equal(value, again[key]).item(), key
    assert load_model(TINY, image_size=384).model.config.image_size == 384


def test_an_unknown_preset_is_one_line_listing_the_presets():
    done = runner.invoke(app, ["classify", "-m", "random:vit-huge-patch99", str(IMAGES / "chelsea.png")])
    assert done.exit_code == 1
    message = done.stderr.strip()
    assert "\n" not in message and message.startswith("error: random:vit-huge-patch99: unknown preset")
    assert all(f"random:{name}" in message for name in PRESETS)


def test_convert_of_a_random_model_says_it_has_no_checkpoint(tmp_path):
    # it read the Hub's 'not a valid repo id ... -m random:vit-tiny-patch16-224 tries mlx-vit offline', for that name
    done = runner.invoke(app, ["convert", TINY, "-o", str(tmp_path / "out")])
    assert done.exit_code == 1 and not (tmp_path / "out").exists()
    assert done.stderr == f"error: {TINY}: a random: model has no checkpoint to convert; give it to classify, embed, " \
                          "search or explain with -m\n"  # fmt: skip


@pytest.mark.parametrize("name", ["bad name!", "google/vit-base-patch16-224"])
def test_hub_errors_say_how_to_get_a_model_folder(name):
    with pytest.raises(ModelNotFoundError) as error:
        load_model(name)
    assert "mlx-vit convert" in str(error.value) and TINY in str(error.value)
    assert "\n" not in str(error.value)


def test_random_weights_classify_finite_scores():
    from mlx_vit.classify import Classifier

    classifier = Classifier(load_model(TINY))
    scores = [p.score for p in classifier.classify([IMAGES / "chelsea.png"], top_k=5)[0]]
    assert np.all(np.isfinite(scores)) and scores == sorted(scores, reverse=True)
