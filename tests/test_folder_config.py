"""A converted folder's config.json as one typed value (convert/folder_config.py): read and checked once, written by
the same type, and what the model runs is decided from it; and the runtime plan a load adopts (mlx_vit/runtime.py)."""

from __future__ import annotations

import json
import random
from pathlib import Path

import mlx.core as mx
import pytest

from mlx_vit import runtime
from mlx_vit.classify import load
from mlx_vit.convert import FolderConfig, convert
from mlx_vit.errors import ConfigError

PHOTO = sorted((Path(__file__).parent / "data" / "images").glob("*.jpg"))[0]


@pytest.fixture(scope="module")
def converted(vit_folder, tmp_path_factory):
    return convert(str(vit_folder), tmp_path_factory.mktemp("converted") / "model")


def test_config_json_round_trips_exactly(converted):
    """to_dict is what convert wrote, key for key and in order: one function each way."""
    written = json.loads((converted / "config.json").read_text())
    config = FolderConfig.from_dict(written, "config.json")
    assert list(config.to_dict().items()) == list(written.items())
    assert config.labels == tuple(written["id2label"][str(i)] for i in range(len(written["id2label"])))
    assert config.runtime == config.model and config.image_size is None


def test_labels_follow_their_ids_not_the_file_order(converted, tmp_path):
    """A config.json edited by hand may list id2label in any order: class i is still the label named "i"."""
    folder = tmp_path / "model"
    folder.mkdir()
    for name in ("model.safetensors", "config.json"):
        (folder / name).write_bytes((converted / name).read_bytes())
    config = json.loads((folder / "config.json").read_text())
    items = list(config["id2label"].items())
    random.Random(0).shuffle(items)
    config["id2label"] = dict(items)
    (folder / "config.json").write_text(json.dumps(config))
    shuffled, original = load(str(folder)), load(str(converted))
    assert shuffled.labels == original.labels
    assert shuffled.classify([PHOTO], 10) == original.classify([PHOTO], 10)


def test_another_image_size_keeps_the_weights_model(converted):
    config = FolderConfig.from_dict(json.loads((converted / "config.json").read_text()), "config.json")
    at_48 = config.at_image_size(48, "--image-size")
    assert (at_48.model, at_48.runtime.image_size, at_48.image_size) == (config.model, 48, 48)
    assert at_48.preprocessing.fixed_size() == (48, 48) and at_48.to_dict()["image_size"] == 48
    back = at_48.at_image_size(config.model.image_size, "--image-size")
    assert back.image_size is None and "image_size" not in back.to_dict() and back.runtime == config.model
    with pytest.raises(ConfigError, match="image_size must be a positive multiple of the patch size 8, got 44"):
        FolderConfig.from_dict({**config.to_dict(), "image_size": 44}, "config.json")
    assert config.at_image_size(None, "--image-size") is config


def test_a_load_keeps_a_gib_of_freed_buffers(converted):
    """The runtime plan a load adopts raises MLX's CPU cache of freed buffers (32 MB by default) to 1 GiB, and never
    lowers a larger limit someone set."""
    mx.set_cache_limit(32 << 20)
    load(str(converted))
    assert runtime.current().cpu
    assert mx.set_cache_limit(2 << 30) == runtime.CPU_CACHE_LIMIT  # what the load set; now 2 GiB
    load(str(converted))
    assert mx.set_cache_limit(runtime.CPU_CACHE_LIMIT) == 2 << 30  # kept


def test_an_unused_pooler_activation_must_still_be_a_name(converted):
    """pooler_act is read only with a pooler, but written back whatever it is: a list nested 600 deep was accepted,
    then crashed to_dict (and a checkpoint's conversion) with a RecursionError."""
    written = json.loads((converted / "config.json").read_text())
    deep = "tanh"
    for _ in range(600):
        deep = [deep]
    with pytest.raises(ConfigError, match=r"config.json: pooler_act \[\[\[\[.*is not supported"):
        FolderConfig.from_dict({**written, "model": {**written["model"], "pooler": False, "pooler_act": deep}},
                               "config.json")  # fmt: skip


def test_what_to_dict_gives_is_a_copy(converted):
    config = FolderConfig.from_dict(json.loads((converted / "config.json").read_text()), "config.json")
    config.to_dict()["source"]["path"] = "elsewhere"
    assert config.source["path"] != "elsewhere"


@pytest.mark.parametrize("source", ["x", ["path"], 3])
def test_a_source_that_is_not_an_object_is_refused(converted, source):
    """convert writes {"repo", "revision"} or {"path"}; bench reads it as one (a string crashed it)."""
    written = json.loads((converted / "config.json").read_text())
    with pytest.raises(ConfigError, match="^config.json: source must be an object$"):
        FolderConfig.from_dict({**written, "source": source}, "config.json")
