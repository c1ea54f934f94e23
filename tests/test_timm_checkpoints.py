"""The timm / DINOv2 checkpoint helpers themselves: files as timm and transformers write and read them."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from checkpoints import PHOTOS, lay_into_hf_cache
from timm_checkpoints import (
    DINOV2_KINDS,
    DINOV2_PREPROCESSOR,
    TINY,
    VARIANTS,
    dinov2_logits,
    make_dinov2,
    make_timm,
    npz_arrays,
    save_npz,
    save_timm_hub,
    save_timm_pth,
    save_timm_safetensors,
    timm_at_size,
    timm_data_config,
    timm_logits,
)

timm = pytest.importorskip("timm")
_MODELS: dict = {}


def model(key):
    """make_timm(key), made once per session (tests only read it)."""
    if key not in _MODELS:
        _MODELS[key] = make_timm(key)
    return _MODELS[key]


def assert_same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    different = [k for k in sa if not torch.equal(sa[k], sb[k])]
    assert not different, different


def assert_input_sensitive(logits: np.ndarray, classes: int = TINY["num_classes"]):
    assert logits.shape == (len(PHOTOS), classes), logits.shape
    assert np.isfinite(logits).all()
    assert len(set(logits.argmax(1).tolist())) >= 3, logits.argmax(1)  # the photos do not all get one class
    assert (logits - logits.mean(0)).std() > 0.3 * logits.std(1).mean()  # the image moves the scores, not a bias


# -- make_timm ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("key", VARIANTS)
def test_every_variant_is_input_sensitive(key):
    m = model(key)
    assert not m.training
    assert_input_sensitive(timm_logits(m, PHOTOS))
    assert m.embed_dim == VARIANTS[key][1].get("embed_dim", TINY["embed_dim"])
    gammas = [p for n, p in m.named_parameters() if n.endswith("gamma")]
    for g in gammas:  # layer scale re-drawn U(0.5, 1.5), not left at 1e-5
        assert 0.5 <= g.min() and g.max() <= 1.5 and g.std() > 0.1
    norms = [mod for mod in m.modules() if isinstance(mod, torch.nn.LayerNorm)]
    assert norms and all(mod.weight.std() > 0.1 and mod.bias.abs().max() > 0 for mod in norms)


def test_variants_are_what_their_names_say():
    from timm.layers import AttentionPoolLatent
    from timm.models.deit import VisionTransformerDistilled

    assert isinstance(model("deit-distilled"), VisionTransformerDistilled)
    assert model("augreg").pretrained_cfg["tag"] == "augreg_in1k" and len(model("augreg").blocks) == 3
    reg = model("reg-gap")
    assert reg.reg_token.shape == (1, 4, 32) and reg.cls_token is None and reg.global_pool == "avg"
    assert reg.pos_embed.shape == (1, 256, 32)  # no_embed_class: positions for the 16x16 patches only
    ls = model("ls-fcnorm")
    assert ls.cls_token is not None and ls.global_pool == "avg" and isinstance(ls.fc_norm, torch.nn.LayerNorm)
    assert isinstance(ls.norm, torch.nn.Identity) and not isinstance(ls.blocks[0].ls1, torch.nn.Identity)
    assert model("gap-noqkvbias").blocks[0].attn.qkv.bias is None
    clip = model("clip-quickgelu")
    assert isinstance(clip.norm_pre, torch.nn.LayerNorm) and clip.patch_embed.proj.bias is None
    assert clip.norm_pre.eps == 1e-5 and type(clip.blocks[0].mlp.act).__name__ == "QuickGELU"
    siglip = model("siglip-map")
    assert siglip.cls_token is None and isinstance(siglip.attn_pool, AttentionPoolLatent)
    dino = model("dinov2-reg-518")
    assert dino.patch_embed.grid_size == (37, 37) and dino.pos_embed.shape == (1, 1369, 32)
    assert dino.reg_token.shape == (1, 4, 32) and timm_data_config(dino)["input_size"] == (3, 518, 518)


def test_make_timm_is_seeded():
    assert_same_weights(make_timm("vit", seed=3), make_timm("vit", seed=3))
    a, b = make_timm("vit", seed=3).state_dict(), make_timm("vit", seed=4).state_dict()
    assert not torch.equal(a["blocks.0.attn.qkv.weight"], b["blocks.0.attn.qkv.weight"])


# -- save_npz -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("key", "style", "scan"),
    [("vit", "vit", None), ("augreg", "vit", None), ("siglip-map", "big_vision", None), ("siglip-map", "vit", None),
     ("siglip-map", "big_vision", False)],
)  # fmt: skip
def test_npz_loads_back_through_timms_load_weights(tmp_path, key, style, scan):
    from timm.models.vision_transformer import _load_weights

    path = save_npz(model(key), tmp_path / "w.npz", style=style, scan=scan)
    fresh = make_timm(key, seed=99)
    _load_weights(fresh, str(path))
    assert_same_weights(fresh, model(key))


def test_npz_through_timms_pretrained_file_path(tmp_path):
    """Read as timm reads a local copy of an original release: pretrained_cfg_overlay file + custom_load=True."""
    name, recipe = VARIANTS["augreg"]
    path = save_npz(model("augreg"), tmp_path / "S_16-i1k.npz")
    overlay = dict(file=str(path), custom_load=True)
    loaded = timm.create_model(name, pretrained=True, pretrained_cfg_overlay=overlay, **{**TINY, **recipe})
    assert_same_weights(loaded, model("augreg"))
    checkpoint = make_timm("augreg", seed=5)
    timm.models.load_checkpoint(checkpoint, str(path))
    assert_same_weights(checkpoint, model("augreg"))


def test_npz_layout_of_a_two_layer_vit(tmp_path):
    with np.load(save_npz(model("vit"), tmp_path / "w.npz")) as z:
        shapes = {k: z[k].shape for k in z.files}
        assert all(z[k].dtype == np.float32 for k in z.files)
    block = {
        "LayerNorm_0/scale": (32,), "LayerNorm_0/bias": (32,),
        **{f"MultiHeadDotProductAttention_1/{n}/kernel": (32, 4, 8) for n in ("query", "key", "value")},
        **{f"MultiHeadDotProductAttention_1/{n}/bias": (4, 8) for n in ("query", "key", "value")},
        "MultiHeadDotProductAttention_1/out/kernel": (4, 8, 32), "MultiHeadDotProductAttention_1/out/bias": (32,),
        "LayerNorm_2/scale": (32,), "LayerNorm_2/bias": (32,),
        "MlpBlock_3/Dense_0/kernel": (32, 128), "MlpBlock_3/Dense_0/bias": (128,),
        "MlpBlock_3/Dense_1/kernel": (128, 32), "MlpBlock_3/Dense_1/bias": (32,),
    }  # fmt: skip
    expected = {
        "embedding/kernel": (16, 16, 3, 32), "embedding/bias": (32,), "cls": (1, 1, 32),
        "Transformer/posembed_input/pos_embedding": (1, 197, 32),
        "Transformer/encoder_norm/scale": (32,), "Transformer/encoder_norm/bias": (32,),
        "head/kernel": (32, 10), "head/bias": (10,),
        **{f"Transformer/encoderblock_{i}/{k}": s for i in range(2) for k, s in block.items()},
    }  # fmt: skip
    assert shapes == expected


def test_npz_big_vision_map_head_layout():
    arrays = npz_arrays(model("siglip-map"), style="big_vision")
    assert arrays["params/img/MAPHead_0/probe"].shape == (1, 1, 32)
    assert arrays["params/img/MAPHead_0/MultiHeadDotProductAttention_0/key/kernel"].shape == (32, 4, 8)
    assert arrays["params/img/MAPHead_0/MlpBlock_0/Dense_0/kernel"].shape == (32, 128)
    assert arrays["params/img/pos_embedding"].shape == (1, 196, 32) and "params/img/cls" not in arrays
    assert arrays["params/img/Transformer/encoderblock/LayerNorm_1/scale"].shape == (2, 32)  # scanned
    assert arrays["params/img/Transformer/encoderblock/MultiHeadDotProductAttention_0/out/kernel"].shape == (
        2,
        4,
        8,
        32,
    )


@pytest.mark.parametrize("key", ["deit-distilled", "reg-gap", "ls-fcnorm", "gap-noqkvbias", "clip-quickgelu"])
def test_npz_refuses_what_load_weights_would_not_load(tmp_path, key):
    with pytest.raises(ValueError, match="_load_weights cannot load"):
        save_npz(model(key), tmp_path / "w.npz")


# -- save_timm_hub / pth / safetensors ----------------------------------------------------------------------------


@pytest.mark.parametrize("key", VARIANTS)
def test_hub_folder_reloads_in_timm_offline(tmp_path, key):
    m = model(key)
    folder = save_timm_hub(m, tmp_path / "repo")
    assert sorted(p.name for p in folder.iterdir()) == ["README.md", "config.json", "model.safetensors",
                                                        "pytorch_model.bin"]  # fmt: skip
    config = json.loads((folder / "config.json").read_text())
    name, recipe = VARIANTS[key]
    assert config["architecture"] == name.split(".")[0] and config["pretrained_cfg"]["tag"] == name.split(".")[1]
    assert config["num_classes"] == 10 and config["pretrained_cfg"]["num_classes"] == 10
    for k, v in {**TINY, **recipe}.items():  # the tiny dims, where timm itself reads them back
        assert config["model_args"][k] == ([v, v] if k == "img_size" else v)
    expected = timm_logits(m, PHOTOS[:3])
    by_folder = timm.create_model(f"local-dir:{folder}", pretrained=True)
    lay_into_hf_cache(folder, tmp_path / "hf", "someone/tiny")
    by_hub = timm.create_model("hf-hub:someone/tiny", pretrained=True, cache_dir=tmp_path / "hf" / "hub")
    for loaded in (by_folder, by_hub):
        assert_same_weights(loaded, m)
        assert timm_data_config(loaded) == timm_data_config(m)
        np.testing.assert_array_equal(timm_logits(loaded, PHOTOS[:3]), expected)


def test_pth_and_safetensors_load_with_timms_load_checkpoint(tmp_path):
    m = model("reg-gap")
    for path in (save_timm_pth(m, tmp_path / "w.pth"), save_timm_safetensors(m, tmp_path / "w.safetensors")):
        fresh = make_timm("reg-gap", seed=7)
        timm.models.load_checkpoint(fresh, str(path))
        assert_same_weights(fresh, m)


# -- timm_at_size -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("key", "size"), [("vit", 384), ("deit-distilled", 288), ("reg-gap", 192),
                                           ("dinov2-reg-518", 224)])  # fmt: skip
def test_timm_at_size_is_timms_own_resize(tmp_path, key, size):
    from timm.layers import resample_abs_pos_embed

    m = model(key)
    resized = timm_at_size(m, size)
    grid = size // m.patch_embed.patch_size[0]
    assert resized.patch_embed.grid_size == (grid, grid)
    assert timm_data_config(resized)["input_size"] == (3, size, size)
    prefix = 0 if m.no_embed_class else m.num_prefix_tokens
    expected = resample_abs_pos_embed(m.pos_embed.detach(), (grid, grid), num_prefix_tokens=prefix,
                                      interpolation="bicubic", antialias=True)  # fmt: skip
    torch.testing.assert_close(resized.pos_embed.detach(), expected, rtol=0, atol=0)
    # the same model as a user gets from the saved folder: create_model("local-dir:...", img_size=size)
    by_folder = timm.create_model(f"local-dir:{save_timm_hub(m, tmp_path / 'repo')}", pretrained=True, img_size=size)
    assert_same_weights(resized, by_folder)
    logits = timm_logits(resized, PHOTOS)
    assert np.isfinite(logits).all() and len(set(logits.argmax(1).tolist())) >= 2


# -- DINOv2 (transformers) ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def dinov2_folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("dinov2")
    return {kind: make_dinov2(root / kind, kind=kind, seed=i) for i, kind in enumerate(DINOV2_KINDS)}


@pytest.mark.parametrize("kind", DINOV2_KINDS)
def test_dinov2_folder_reloads_with_from_pretrained(dinov2_folders, kind):
    import transformers
    from safetensors import safe_open

    folder = dinov2_folders[kind]
    assert json.loads((folder / "preprocessor_config.json").read_text()) == DINOV2_PREPROCESSOR
    assert type(transformers.AutoImageProcessor.from_pretrained(folder)).__name__ == "BitImageProcessor"
    config = transformers.AutoConfig.from_pretrained(folder)
    assert (config.image_size, config.patch_size, config.hidden_size) == (518, 14, 32)
    auto = transformers.AutoModelForImageClassification if kind.endswith("classifier") else transformers.AutoModel
    loaded = auto.from_pretrained(folder)
    assert type(loaded).__name__ == DINOV2_KINDS[kind][1]
    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        names = list(f.keys())
        table = next(n for n in names if n.endswith("embeddings.position_embeddings"))
        assert tuple(f.get_slice(table).get_shape()) == (1, 1 + 37 * 37, 32)  # image_size 518 / patch 14
        lam = f.get_tensor(next(n for n in names if n.endswith("layer.0.layer_scale1.lambda1")))
        assert 0.5 <= lam.min() and lam.max() <= 1.5 and lam.std() > 0.1
        assert any(n.endswith("layer.0.attention.attention.query.weight") for n in names)  # the Hub's names
    out = dinov2_logits(folder, PHOTOS)
    if kind.endswith("classifier"):
        assert_input_sensitive(out)
    else:  # pooler output: the final-normed CLS token
        assert out.shape == (len(PHOTOS), 32) and np.isfinite(out).all()
        assert np.abs(out - out.mean(0)).max() > 0.1
    hidden = dinov2_logits(folder, PHOTOS[0], hidden=True)
    registers = 4 if kind.startswith("registers") else 0
    assert hidden.shape == (1 + registers + 16 * 16, 32)  # a 224 crop: 16x16 patches from the 37x37 table
    assert dinov2_logits(folder, PHOTOS[0], size=448, hidden=True).shape == (1 + registers + 32 * 32, 32)
    np.testing.assert_allclose(dinov2_logits(folder, PHOTOS[:2], backend="pil"), out[:2], atol=0.05)
