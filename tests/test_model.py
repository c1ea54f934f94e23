"""The MLX model equals transformers on the same weights: logits within 1e-4 in float32."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
import torch
import transformers
from checkpoints import make_checkpoint
from mlx.utils import tree_flatten

from mlx_vit.errors import CheckpointError, ConfigError
from mlx_vit.loading import load_model

TOLERANCE = 1e-4


def reference(folder, kind: str):
    cls = {
        "vit": transformers.ViTForImageClassification,
        "vit-model": transformers.ViTModel,
        "deit": transformers.DeiTForImageClassification,
        "deit-teacher": transformers.DeiTForImageClassificationWithTeacher,
        "deit-model": transformers.DeiTModel,
    }[kind]
    return cls.from_pretrained(folder).eval()


def compare(folder, kind: str, batch: int = 2, seed: int = 0) -> float:
    """Max |logit difference| between mlx-vit and transformers on random NHWC inputs."""
    loaded = load_model(str(folder))
    config = loaded.model.config
    x = np.random.default_rng(seed).standard_normal(
        (batch, config.image_size, config.image_size, config.num_channels), dtype=np.float32
    )
    ours = np.array(loaded.model(mx.array(x)))
    with torch.no_grad():
        out = reference(folder, kind)(torch.from_numpy(x.transpose(0, 3, 1, 2)))
    theirs = out.logits if hasattr(out, "logits") else out.last_hidden_state[:, 0]
    assert ours.shape == tuple(theirs.shape)
    return float(np.abs(ours - theirs.numpy()).max())


@pytest.mark.parametrize(
    "kind, config",
    [
        ("vit", {}),
        ("vit", {"qkv_bias": False, "image_size": 40, "patch_size": 10, "num_labels": 7}),
        ("vit", {"num_channels": 1, "image_size": 24, "patch_size": 4, "layer_norm_eps": 1e-6}),
        ("vit", {"hidden_act": "gelu_new", "hidden_size": 48, "num_attention_heads": 3}),
        ("vit-model", {}),
        ("deit", {}),
        ("deit-teacher", {"qkv_bias": False}),
        ("deit-model", {}),
    ],
)
def test_parity_small(tmp_path, kind, config):
    folder = make_checkpoint(tmp_path, kind=kind, seed=hash(kind) % 1000, **config)
    assert compare(folder, kind) < TOLERANCE


def test_parity_vit_base_patch16_224(tmp_path):
    """The full google/vit-base-patch16-224 architecture (86M parameters, 1000 classes)."""
    config = dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
                  image_size=224, patch_size=16, num_labels=1000)  # fmt: skip
    folder = make_checkpoint(tmp_path, **config)
    assert compare(folder, "vit", batch=2) < TOLERANCE


def test_pooler_equals_transformers(tmp_path):
    folder = make_checkpoint(tmp_path, kind="vit-model")
    loaded = load_model(str(folder))
    assert loaded.model.config.pooler and loaded.model.config.num_labels == 0
    x = np.random.default_rng(3).standard_normal((1, 32, 32, 3), dtype=np.float32)
    ours = np.array(loaded.model.pooler(loaded.model.forward_features(mx.array(x))[:, 0]))
    with torch.no_grad():
        theirs = reference(folder, "vit-model")(torch.from_numpy(x.transpose(0, 3, 1, 2))).pooler_output.numpy()
    assert np.abs(ours - theirs).max() < TOLERANCE


def test_distilled_logits_are_mean_of_heads(deit_folder):
    loaded = load_model(str(deit_folder))
    model = loaded.model
    x = mx.array(np.random.default_rng(4).standard_normal((1, 32, 32, 3), dtype=np.float32))
    tokens = model.forward_features(x)
    expected = (model.head(tokens[:, 0]) + model.head_dist(tokens[:, 1])) / 2
    assert np.allclose(np.array(model(x)), np.array(expected), atol=1e-6)


def test_bin_equals_safetensors(tmp_path):
    safe = make_checkpoint(tmp_path / "safe", kind="deit-teacher", seed=5)
    binary = make_checkpoint(tmp_path / "bin", kind="deit-teacher", seed=5, safe_serialization=False)
    assert (binary / "pytorch_model.bin").is_file() and not (binary / "model.safetensors").exists()
    a, b = load_model(str(safe)).model, load_model(str(binary)).model
    ours, theirs = dict(tree_flatten(a.parameters())), dict(tree_flatten(b.parameters()))
    assert ours.keys() == theirs.keys()
    for name in ours:
        assert np.array_equal(np.array(ours[name]), np.array(theirs[name])), name
    assert compare(binary, "deit-teacher") < TOLERANCE


def test_transformers5_parameter_names(tmp_path):
    """A state dict saved from a live transformers 5 model uses its in-memory names (layers.N.attention.q_proj)."""
    folder = make_checkpoint(tmp_path)
    model = transformers.ViTForImageClassification.from_pretrained(folder)
    assert any(".q_proj." in k for k in model.state_dict())
    torch.save(model.state_dict(), folder / "pytorch_model.bin")
    (folder / "model.safetensors").unlink()
    assert compare(folder, "vit") < TOLERANCE


def test_sharded_checkpoint(tmp_path):
    folder = make_checkpoint(tmp_path, max_shard_size="20KB")
    assert (folder / "model.safetensors.index.json").is_file()
    assert compare(folder, "vit") < TOLERANCE


def test_unexpected_tensor_is_refused(tmp_path):
    from safetensors.numpy import load_file, save_file

    folder = make_checkpoint(tmp_path)
    tensors = load_file(folder / "model.safetensors")
    tensors["vit.encoder.layer.0.surprise.weight"] = np.zeros(3, np.float32)
    save_file(tensors, folder / "model.safetensors")
    with pytest.raises(CheckpointError, match="surprise"):
        load_model(str(folder))


def test_shape_mismatch_is_refused(tmp_path):
    import json

    folder = make_checkpoint(tmp_path)
    config = json.loads((folder / "config.json").read_text())
    config["intermediate_size"] = 96  # the weights say 64
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"'blocks.0.mlp.fc1.bias' has shape \(64,\), the model takes \(96,\)"):
        load_model(str(folder))


@pytest.mark.parametrize(
    "change, message",
    [
        ({"hidden_size": 10**9}, "over the limit"),
        ({"hidden_size": 30}, "not divisible"),
        ({"hidden_act": "mystery"}, "not supported"),
        ({"model_type": "bert"}, "model_type"),
        ({"architectures": ["ViTForMaskedImageModeling"]}, "architecture"),
    ],
)
def test_bad_config_is_refused_before_allocation(tmp_path, change, message):
    import json

    folder = make_checkpoint(tmp_path)
    config = json.loads((folder / "config.json").read_text())
    config.update(change)
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match=message):
        load_model(str(folder))
