"""Every checkpoint format through the one seam, against its own reference on the repo's photos.

Each checkpoint is built here with seeded weights (seed 1: not the ones the readers were developed on), saved the
way its library saves it, converted by mlx-vit and compared with timm or transformers: logits within 1e-4 in
float32, and the same top-5 class ids with probabilities within 1e-4.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("timm")
import timm_checkpoints as tc  # noqa: E402
from checkpoints import IMAGES, PHOTOS, lay_into_hf_cache, make_checkpoint, one_line_error, run_cli  # noqa: E402

from mlx_vit.classify import Classifier, load, softmax  # noqa: E402
from mlx_vit.convert import convert  # noqa: E402
from mlx_vit.convert.checkpoint import read_checkpoint  # noqa: E402
from mlx_vit.errors import CheckpointError, ConfigError, MlxVitError  # noqa: E402
from mlx_vit.loading import load_model  # noqa: E402

TOLERANCE = 1e-4
SEED = 1
SMALL_TIMM = "test_vit.r160_in1k"  # a real timm architecture small enough to build at its own sizes
SMALL_TIMM_ARGS = dict(embed_dim=64, depth=6, num_heads=2, img_size=160, mlp_ratio=3)


def assert_matches(classifier: Classifier, reference: np.ndarray, photos=PHOTOS) -> None:
    """Logits and top-5 (ids and probabilities) equal to the reference's on every photo."""
    ours = classifier.logits(classifier.pixels(photos))
    assert ours.shape == reference.shape
    assert np.abs(ours - reference).max() < TOLERANCE
    for predictions, ref in zip(classifier.classify(photos, top_k=5), softmax(reference), strict=True):
        top = np.argsort(-ref, kind="stable")[:5]
        assert [p.class_id for p in predictions] == top.tolist()
        assert np.abs(np.array([p.score for p in predictions]) - ref[top]).max() < TOLERANCE


@pytest.fixture(scope="module")
def timm_models():
    return {key: tc.make_timm(key, seed=SEED) for key in tc.VARIANTS}


@pytest.mark.parametrize("key", list(tc.VARIANTS))
def test_timm_hub_folder_matches_timm(key, timm_models, tmp_path):
    model = timm_models[key]
    folder = tc.save_timm_hub(model, tmp_path / key)
    out = convert(str(folder), tmp_path / f"{key}-mlx")
    config = json.loads((out / "config.json").read_text())
    assert config["architecture"] == f"timm:{model.pretrained_cfg['architecture']}"
    assert_matches(load(str(out)), tc.timm_logits(model, PHOTOS))


def test_bare_files_need_and_take_arch(tmp_path):
    model = tc.make_timm(SMALL_TIMM, seed=SEED, **SMALL_TIMM_ARGS)
    reference = tc.timm_logits(model, PHOTOS)
    for path in (
        tc.save_timm_pth(model, tmp_path / "w.pth"),
        tc.save_timm_safetensors(model, tmp_path / "w.safetensors"),
    ):
        message = one_line_error(MlxVitError, read_checkpoint, path, names=path)
        assert "pass --arch TIMM_NAME[.TAG]" in message
        assert_matches(load(str(path), arch=SMALL_TIMM), reference)
    labels = load(str(path), arch=SMALL_TIMM).labels
    assert labels[3] == "class 3"  # 10 classes, no names: not ImageNet's


def test_arch_tag_gives_that_tags_preprocessing(tmp_path):
    model = tc.make_timm(SMALL_TIMM, seed=SEED, **SMALL_TIMM_ARGS)
    path = tc.save_timm_pth(model, tmp_path / "w.pth")
    checkpoint = read_checkpoint(path, arch=SMALL_TIMM)
    assert checkpoint.preprocessing["crop_pct"] == model.pretrained_cfg["crop_pct"]
    message = one_line_error(MlxVitError, read_checkpoint, path, "test_vit.no_such_tag")
    assert "tags: r160_in1k" in message
    message = one_line_error(ConfigError, read_checkpoint, path, "vit_base_patch16_244")
    assert "did you mean vit_base_patch16_224" in message


@pytest.mark.parametrize("style", ["vit", "big_vision"])
def test_jax_npz_matches_timm_load_weights(style, tmp_path):
    """An .npz in the layout timm's _load_weights reads (the helper proves it by loading it back into timm)."""
    model = tc.make_timm(SMALL_TIMM, seed=SEED, **SMALL_TIMM_ARGS)
    path = tc.save_npz(model, tmp_path / "ViT.npz", style=style)
    assert_matches(load(str(path), arch=SMALL_TIMM), tc.timm_logits(model, PHOTOS))


def test_siglip_npz_with_attention_pool(timm_models, tmp_path):
    model = timm_models["siglip-map"]
    path = tc.save_npz(model, tmp_path / "siglip.npz", style="big_vision")
    arch = "vit_base_patch16_siglip_224"
    # The tiny model's sizes are not the architecture's: refused by shape, naming the array.
    message = one_line_error(CheckpointError, read_checkpoint, path, arch, names=path)
    assert "embedding/kernel" in message and "architecture makes" in message


def test_npz_cli_convert_and_classify(tmp_path, isolated):
    model = tc.make_timm(SMALL_TIMM, seed=SEED, **SMALL_TIMM_ARGS)
    path = tc.save_npz(model, tmp_path / "ViT-T.npz")
    done = run_cli("convert", path, "--arch", SMALL_TIMM, "-o", tmp_path / "out", env=isolated)
    assert done.returncode == 0, done.stderr
    photos = PHOTOS[:3]
    done = run_cli("classify", *photos, "-m", tmp_path / "out", "--format", "json", env=isolated)
    assert done.returncode == 0, done.stderr
    reference = softmax(tc.timm_logits(model, photos))
    for result, ref in zip(json.loads(done.stdout), reference, strict=True):
        assert [p["class_id"] for p in result["predictions"]] == np.argsort(-ref)[:5].tolist()
        assert np.abs([p["score"] - ref[p["class_id"]] for p in result["predictions"]]).max() < TOLERANCE
    done = run_cli("convert", path, "-o", tmp_path / "again", env=isolated)
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert done.returncode == 1 and len(errors) == 1 and "pass --arch" in errors[0]


def test_npz_object_arrays_are_refused_not_unpickled(tmp_path):
    model = tc.make_timm(SMALL_TIMM, seed=SEED, **SMALL_TIMM_ARGS)
    path = tc.save_npz(model, tmp_path / "bad.npz", extra={"head/bias": np.array([print], dtype=object)})
    message = one_line_error(CheckpointError, read_checkpoint, path, SMALL_TIMM, names=path)
    assert "holds Python objects" in message


@pytest.mark.parametrize("kind", ["npz", "pth", "hub"])
def test_nan_weights_are_refused_in_every_format(kind, tmp_path):
    import torch

    model = tc.make_timm(SMALL_TIMM, seed=SEED, **SMALL_TIMM_ARGS)
    with torch.no_grad():
        model.head.weight[3, 5] = float("nan")
    if kind == "npz":
        path = tc.save_npz(model, tmp_path / "w.npz")
    elif kind == "pth":
        path = tc.save_timm_pth(model, tmp_path / "w.pth")
    else:
        path = tc.save_timm_hub(model, tmp_path / "hub")
    arch = None if kind == "hub" else SMALL_TIMM
    message = one_line_error(CheckpointError, read_checkpoint, path, arch)
    assert "holds NaN or infinite values" in message and "head" in message


def test_unsupported_timm_architecture_is_named(tmp_path):
    model = tc.make_timm(SMALL_TIMM, seed=SEED, **SMALL_TIMM_ARGS)
    path = tc.save_timm_pth(model, tmp_path / "w.pth")
    message = one_line_error(ConfigError, read_checkpoint, path, "aimv2_huge_patch14_224")
    assert "is not supported by mlx-vit's ViT" in message
    message = one_line_error(ConfigError, read_checkpoint, path, "vit_base_patch16_rope_reg1_gap_256")
    assert "not a timm ViT architecture mlx-vit knows" in message


def test_unknown_files_and_folders_name_the_formats(tmp_path):
    path = tmp_path / "weights.ckpt"
    path.write_bytes(b"\0" * 64)
    message = one_line_error(CheckpointError, read_checkpoint, path, names=path)
    assert "timm (a .pth/.pt/.bin/.safetensors with --arch)" in message and "JAX (an .npz with --arch)" not in message
    assert "an .npz with --arch" in message
    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "config.json").write_text('{"model_type": "bert"}')
    message = one_line_error(ConfigError, read_checkpoint, folder)
    assert "model_type 'bert' is not supported" in message and "dinov2" in message and "architecture" in message


def test_224_model_at_384(timm_models, tmp_path):
    """--image-size at convert time, at classify time and in the API: timm's resample_abs_pos_embed."""
    model = timm_models["vit"]
    folder = tc.save_timm_hub(model, tmp_path / "hub")
    big = tc.timm_at_size(model, 384)
    reference = tc.timm_logits(big, PHOTOS, img_size=384)
    assert_matches(load(str(folder), image_size=384), reference)
    out = convert(str(folder), tmp_path / "at384", image_size=384)
    assert json.loads((out / "config.json").read_text())["image_size"] == 384
    assert_matches(load(str(out)), reference)
    native = convert(str(folder), tmp_path / "native")
    assert_matches(load(str(native), image_size=384), reference)  # resampled from the stored 224 table


def test_transformers_vit_at_384(tmp_path):
    """transformers' interpolate_pos_encoding, and its processor at the new size."""
    import torch
    import transformers

    folder = make_checkpoint(tmp_path / "vit", seed=SEED, image_size=32, patch_size=8)
    processor = transformers.AutoImageProcessor.from_pretrained(
        str(folder), backend="pil", size={"height": 48, "width": 48}
    )
    model = transformers.ViTForImageClassification.from_pretrained(str(folder)).eval()
    from mlx_vit.images import open_image

    pixels = processor([open_image(p) for p in PHOTOS], return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        reference = model(pixel_values=pixels, interpolate_pos_encoding=True).logits.numpy()
    assert_matches(load(str(folder), image_size=48), reference)


@pytest.mark.parametrize("kind", ["model", "classifier", "registers", "registers-classifier"])
@pytest.mark.parametrize("size", [None, 518])
def test_transformers_dinov2(kind, size, tmp_path):
    """Dinov2 at its processor's 224 crop (the 518-px table interpolated as transformers does) and at 518."""
    folder = tc.make_dinov2(tmp_path / kind, kind=kind, seed=SEED)
    reference = tc.dinov2_logits(folder, PHOTOS, size=size, backend="pil")
    loaded = load_model(str(folder), image_size=size)
    assert loaded.model.config.image_size == (size or 224)
    classifier = Classifier(loaded)
    if kind.endswith("classifier"):
        assert_matches(classifier, reference)
    else:  # a feature extractor: the pooled class token, as transformers' pooler_output
        ours = classifier.logits(classifier.pixels(PHOTOS))
        assert np.abs(ours - reference).max() < TOLERANCE


def test_dinov2_converted_at_224_runs_at_518_from_the_native_table(tmp_path):
    folder = tc.make_dinov2(tmp_path / "dinov2", kind="registers-classifier", seed=SEED)
    out = convert(str(folder), tmp_path / "out")
    config = json.loads((out / "config.json").read_text())
    assert config["model"]["image_size"] == 518 and config["image_size"] == 224
    assert_matches(load(str(out), image_size=518), tc.dinov2_logits(folder, PHOTOS, size=518, backend="pil"))


def test_timm_hub_id_through_the_hf_cache(timm_models, tmp_path, isolated):
    model = timm_models["reg-gap"]
    folder = tc.save_timm_hub(model, tmp_path / "hub")
    hf_home = Path(isolated["HF_HOME"])
    lay_into_hf_cache(folder, hf_home, "timm/vit_medium_patch16_reg4_gap_256.sbb_in1k")
    done = run_cli("classify", IMAGES / "chelsea.png", "-m", "timm/vit_medium_patch16_reg4_gap_256.sbb_in1k",
                   "--format", "json", env=isolated)  # fmt: skip
    assert done.returncode == 0, done.stderr
    top = json.loads(done.stdout)[0]["predictions"][0]
    reference = softmax(tc.timm_logits(model, IMAGES / "chelsea.png"))
    assert top["class_id"] == int(np.argmax(reference)) and abs(top["score"] - reference.max()) < TOLERANCE


def test_imagenet_names_for_1000_classes(tmp_path):
    model = tc.make_timm(SMALL_TIMM, seed=SEED, **{**SMALL_TIMM_ARGS, "num_classes": 1000})
    labels = load(str(tc.save_timm_pth(model, tmp_path / "w.pth")), arch=SMALL_TIMM).labels
    assert labels[0] == "tench, Tinca tinca" and len(labels) == 1000


def test_quantized_attention_pool_model(timm_models, tmp_path):
    from mlx_vit.convert import Quantize

    model = timm_models["siglip-map"]
    folder = tc.save_timm_hub(model, tmp_path / "hub")
    out = convert(str(folder), tmp_path / "q8", quantize=Quantize(8, 32))
    layers = json.loads((out / "config.json").read_text())["quantization"]["layers"]
    # The blocks' linears only: the attention pool is part of the head, which stays in float like the head
    assert "blocks.0.attn.qkv" in layers and not any(layer.startswith("attn_pool") for layer in layers)
    ours = load(str(out)).logits(load(str(out)).pixels(PHOTOS[:2]))
    assert np.abs(ours - tc.timm_logits(model, PHOTOS[:2])).max() < 0.05  # 8-bit weights: close, not equal


# -- hostile input in the new formats: one line naming the file, never a traceback ---------------------------------


@pytest.fixture(scope="module")
def small_timm():
    return tc.make_timm(SMALL_TIMM, seed=SEED, **SMALL_TIMM_ARGS)


def _npz(path: Path, arrays: dict, compress: bool = False) -> Path:
    with open(path, "wb") as f:
        (np.savez_compressed if compress else np.savez)(f, **arrays)
    return path


def _raw_npy(shape: tuple, dtype: str, data: bytes) -> bytes:
    import io

    buffer = io.BytesIO()
    np.lib.format.write_array_header_1_0(buffer, {"descr": dtype, "fortran_order": False, "shape": shape})
    return buffer.getvalue() + data


@pytest.mark.parametrize(
    "case",
    ["int array", "bfloat16 bytes", "float128", "shape beyond its bytes", "zip bomb", "member twice", "not a zip",
     "stacked blocks wrong", "stacked blocks deeper", "missing array", "unexpected array", "wrong shape",
     "corrupt deflate", "encrypted", "unknown compression", "bool shape", "name with and without .npy",
     "0-d head", "fc_norm architecture"],
)  # fmt: skip
def test_hostile_npz_is_one_line(case, small_timm, tmp_path):
    import zipfile

    path = tmp_path / "w.npz"
    arrays = tc.npz_arrays(small_timm)
    needle = {
        "int array": "not a float16, float32 or float64 array",
        "bfloat16 bytes": "bfloat16 as raw bytes",
        "float128": "not a float16, float32 or float64 array",
        "shape beyond its bytes": "declares more data",
        "zip bomb": "over 2x the file's size",
        "member twice": "twice",
        "not a zip": "not a readable .npz archive",
        "stacked blocks wrong": "not one row per block",
        "missing array": "has no array 'Transformer/encoder_norm/scale'",
        "unexpected array": "is not one a test_vit reads",
        "wrong shape": "has shape (3,), the architecture makes (64,)",
        "stacked blocks deeper": "not one row per block",
        "corrupt deflate": "not a .npy array (Error -3",
        "encrypted": "is encrypted, compressed otherwise",
        "unknown compression": "is encrypted, compressed otherwise",
        "bool shape": "is not a shape",
        "name with and without .npy": "holds array 'cls' twice",
        "0-d head": "expected 1 dimension",
        "fc_norm architecture": "normalizes after pooling (fc_norm)",
    }[case]
    arch = SMALL_TIMM
    if case == "int array":
        _npz(path, {**arrays, "cls": arrays["cls"].astype(np.int32)})
    elif case == "bfloat16 bytes":
        _npz(path, {**arrays, "cls": arrays["cls"].astype(np.float32).view("V4")})
    elif case == "float128":
        _npz(path, {**arrays, "cls": arrays["cls"].astype(np.longdouble)})
    elif case == "shape beyond its bytes":
        with zipfile.ZipFile(path, "w") as z:
            z.writestr("cls.npy", _raw_npy((1 << 30,), "<f4", b"\0" * 64))
    elif case == "zip bomb":
        with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as z:
            z.writestr("cls.npy", _raw_npy((1 << 24,), "<f4", b"\0" * (4 << 24)))
    elif case == "member twice":
        _npz(path, arrays)
        with zipfile.ZipFile(path, "a") as z, pytest.warns(UserWarning):
            z.writestr("cls.npy", _raw_npy((1, 1, 64), "<f4", b"\0" * 256))
    elif case == "not a zip":
        path.write_bytes(b"PK\x03\x04" + b"\xff" * 100)
    elif case == "stacked blocks wrong":
        stacked = tc.npz_arrays(small_timm, style="big_vision")
        stacked["params/img/Transformer/encoderblock/LayerNorm_0/scale"] = np.ones((2, 64), np.float32)  # 6 blocks
        _npz(path, stacked)
    elif case == "missing array":
        _npz(path, {k: v for k, v in arrays.items() if k != "Transformer/encoder_norm/scale"})
    elif case == "unexpected array":
        _npz(path, {**arrays, "Transformer/extra/kernel": np.ones(3, np.float32)})
    elif case == "wrong shape":
        _npz(path, {**arrays, "Transformer/encoder_norm/scale": np.ones(3, np.float32)})
    elif case == "stacked blocks deeper":  # a 12-block file read as a 6-block architecture: refused, not cut
        stacked = tc.npz_arrays(small_timm, style="big_vision")
        stacked = {k: np.concatenate([v, v]) if "encoderblock/" in k else v for k, v in stacked.items()}
        _npz(path, stacked)
    elif case in ("corrupt deflate", "encrypted", "unknown compression"):
        _npz(path, arrays, compress=True)
        data = bytearray(path.read_bytes())
        with zipfile.ZipFile(path) as z:
            info = z.infolist()[0]
        at = info.header_offset  # the local header: its name's and extra field's lengths, then the compressed bytes
        start = (
            at
            + 30
            + int.from_bytes(data[at + 26 : at + 28], "little")
            + int.from_bytes(data[at + 28 : at + 30], "little")
        )
        if case == "corrupt deflate":
            data[start : start + 16] = b"\xff" * 16
        else:  # patch the first member's local header: the flags' encryption bit, or method 99
            field, value = (6, 1) if case == "encrypted" else (8, 99)
            data[info.header_offset + field] = value
            central = data.find(b"PK\x01\x02")  # the first member's central directory entry
            data[central + field + 2] = value
        path.write_bytes(bytes(data))
    elif case == "bool shape":
        with zipfile.ZipFile(path, "w") as z:
            z.writestr("cls.npy", _raw_npy((True, True, 64), "<f4", b"\0" * 256))
    elif case == "name with and without .npy":
        _npz(path, arrays)
        with zipfile.ZipFile(path, "a") as z:
            z.writestr("cls", _raw_npy((1, 1, 64), "<f4", b"\0" * 256))
    elif case == "0-d head":
        _npz(path, {**arrays, "head/bias": np.float32(1.0)})
    elif case == "fc_norm architecture":
        _npz(path, arrays)
        arch = "test_vit2"
    message = one_line_error(CheckpointError, read_checkpoint, path, arch, names=path)
    assert needle in message, message


@pytest.mark.parametrize(
    "change, needle",
    [
        ({"architecture": 5}, "architecture must be a timm model name"),
        ({"architecture": "vit_nope_patch16_224"}, "not a timm ViT architecture"),
        ({"model_args": []}, "model_args must be an object"),
        ({"model_args": {"img_size": "big"}}, "img_size 'big' is not supported"),
        ({"model_args": {"img_size": [224, 160]}}, "square sizes only"),
        ({"model_args": {"depth": 10**9}}, "num_hidden_layers"),
        ({"model_args": {"embed_dim": True}}, "embed_dim and mlp_ratio must be numbers"),
        ({"model_args": {"mlp_ratio": "4"}}, "embed_dim and mlp_ratio must be numbers"),
        ({"model_args": {"act_layer": ["gelu"]}}, "act_layer"),
        ({"model_args": {"norm_layer": "rmsnorm"}}, "norm_layer"),
        ({"model_args": {"global_pool": "avgmax"}}, "global_pool 'avgmax' is not supported"),
        ({"model_args": {"qk_norm": True}}, "qk_norm=True is not supported"),
        ({"model_args": {"secret_option": 1}}, "'secret_option' is not supported"),
        ({"pretrained_cfg": "x"}, "pretrained_cfg must be an object"),
        ({"pretrained_cfg": {"crop_pct": "x", "input_size": [3, 224, 224]}}, "crop_pct"),
        ({"label_names": ["a", "b"]}, "label_names must be 10 names"),
    ],
)
def test_hostile_timm_config_is_one_line(change, needle, timm_models, tmp_path):
    folder = tc.save_timm_hub(timm_models["vit"], tmp_path / "hub")
    config = json.loads((folder / "config.json").read_text())
    for key, value in change.items():
        if key == "model_args":
            config["model_args"] = {**config["model_args"], **value} if isinstance(value, dict) else value
        else:
            config[key] = value
    (folder / "config.json").write_text(json.dumps(config))
    message = one_line_error((ConfigError, CheckpointError), read_checkpoint, folder)
    assert needle in message, message


@pytest.mark.parametrize(
    "change, needle",
    [
        ({"image_size": True}, "image_size must be a positive multiple of the patch size"),
        ({"image_size": -16}, "image_size must be a positive multiple"),
        ({"image_size": 17}, "image_size must be a positive multiple"),
        ({"image_size": "224"}, "image_size must be a positive multiple"),
        ({"image_size": 16 * 4096}, "tokens"),
        ({"pos_embed_resample": {"interpolation": "nearest", "antialias": False}}, "pos_embed_resample must be"),
        ({"pos_embed_resample": "bicubic"}, "pos_embed_resample must be"),
        ({"pos_embed_resample": {"interpolation": "bicubic", "antialias": 1}}, "pos_embed_resample must be"),
    ],
)
def test_hostile_converted_folder_sizes_are_one_line(change, needle, timm_models, tmp_path):
    folder = tc.save_timm_hub(timm_models["vit"], tmp_path / "hub")
    out = convert(str(folder), tmp_path / "out")
    config = json.loads((out / "config.json").read_text())
    config.update(change)
    (out / "config.json").write_text(json.dumps(config))
    message = one_line_error(ConfigError, load_model, str(out), names=out)
    assert needle in message, message


def test_timm_layernorm_by_registry_name_is_timms_eps(tmp_path):
    """norm_layer "layernorm" in model_args is timm's LayerNorm, eps 1e-6 (torch's default is 1e-5)."""
    model = tc.make_timm("vit", seed=SEED, norm_layer="layernorm")
    folder = tc.save_timm_hub(model, tmp_path / "hub")
    assert json.loads((folder / "config.json").read_text())["model_args"]["norm_layer"] == "layernorm"
    assert_matches(load(str(folder)), tc.timm_logits(model, PHOTOS))


def test_model_options_the_reference_refuses_or_ignores(tmp_path):
    from mlx_vit.config import ViTConfig
    from mlx_vit.model import ViT

    message = one_line_error(ConfigError, ViTConfig.from_dict, {"global_pool": "", "num_labels": 10})
    assert "global_pool '' (no pooling) is for models without one" in message
    no_scale = ViT(ViTConfig(init_values=0, num_hidden_layers=1))  # timm: layer scale only for a nonzero value
    assert "ls1" not in no_scale.blocks[0]


def test_dinov2_config_defaults_are_transformers(tmp_path):
    """A config.json that leaves out num_register_tokens, image_size and patch_size means transformers' defaults."""
    folder = tc.make_dinov2(tmp_path / "dinov2", kind="registers-classifier", seed=SEED, image_size=224,
                            patch_size=16, num_register_tokens=4)  # fmt: skip
    config = json.loads((folder / "config.json").read_text())
    for key in ("num_register_tokens", "image_size", "patch_size"):
        del config[key]
    (folder / "config.json").write_text(json.dumps(config))
    assert_matches(load(str(folder)), tc.dinov2_logits(folder, PHOTOS, backend="pil"))


def test_a_preprocessor_at_another_size_is_still_refused_for_vit(tmp_path):
    """transformers refuses a ViT input of another size without interpolate_pos_encoding; so does mlx-vit."""
    folder = make_checkpoint(tmp_path / "vit", seed=SEED, image_size=32, patch_size=8)
    processor = json.loads((folder / "preprocessor_config.json").read_text())
    (folder / "preprocessor_config.json").write_text(json.dumps({**processor, "size": 64}))
    message = one_line_error(ConfigError, load_model, str(folder))
    assert "preprocessing makes 64x64 pixels but the model takes 32x32" in message


def test_training_checkpoints_are_unwrapped(tmp_path):
    """DeiT's released .pth files hold {"model": state_dict}; DataParallel ones prefix every name with module."""
    import torch

    model = tc.make_timm(SMALL_TIMM, seed=SEED, **SMALL_TIMM_ARGS)
    reference = tc.timm_logits(model, PHOTOS[:2])
    path = tmp_path / "checkpoint.pth"
    torch.save({"model": {f"module.{k}": v for k, v in model.state_dict().items()}, "epoch": 300}, path)
    ours = load(str(path), arch=SMALL_TIMM)
    assert np.abs(ours.logits(ours.pixels(PHOTOS[:2])) - reference).max() < TOLERANCE


def test_deit3_original_layer_scale_names(tmp_path):
    """DeiT III's released .pth files ({"model": state_dict}) name the layer scales gamma_1 (attention branch) and
    gamma_2 (MLP branch), where timm has blocks.N.ls1.gamma and ls2.gamma. Same shapes, so only the numbers can
    tell a swap: here the two differ in every block, and the file is compared with what timm reads from it through
    DeiT III's own checkpoint filter (checkpoint_filter_fn with adapt_layer_scale, as timm's deit3 models load).
    On test_vit2, a small timm architecture with layer scale (a DeiT III is 22M parameters at the least)."""
    from functools import partial

    import timm
    import torch
    from timm.models.vision_transformer import checkpoint_filter_fn

    arch, sizes = "test_vit2", dict(embed_dim=64, depth=8, num_heads=2, img_size=160, mlp_ratio=3)
    model = tc.make_timm(arch, seed=SEED, **sizes)
    original = {}
    for name, value in model.state_dict().items():
        for branch in ("1", "2"):
            name = name.replace(f".ls{branch}.gamma", f".gamma_{branch}")
        original[name] = value
    for block in range(len(model.blocks)):
        assert (original[f"blocks.{block}.gamma_1"] - original[f"blocks.{block}.gamma_2"]).abs().max() > 0.1
    assert not any(".ls" in name for name in original)
    path = tmp_path / "deit_3_checkpoint.pth"
    torch.save({"model": original}, path)
    reference = timm.create_model(arch, pretrained=False, **{**tc.TINY, **sizes})
    timm.models.load_checkpoint(reference, str(path), filter_fn=partial(checkpoint_filter_fn, adapt_layer_scale=True))
    assert_matches(load(str(path), arch=arch), tc.timm_logits(reference, PHOTOS))


@pytest.mark.parametrize(
    "layout",
    [
        {"state_dict": "plain", "state_dict_ema": "ema", "epoch": "300"},
        {"model": "plain", "model_ema": "ema"},
        {"state_dict_ema": None, "model_ema": "ema", "state_dict": "plain"},
        {"model_ema": None, "model": "plain", "optimizer": "plain"},
        {"state_dict": "plain", "model": "ema"},  # state_dict before model
    ],
)
def test_a_training_checkpoint_gives_the_weights_timm_loads(layout, tmp_path, caplog):
    """timm's load_state_dict takes the EMA weights first (state_dict_ema, model_ema, then state_dict, model), and
    removes DDP / torch.compile prefixes per name: mlx-vit reads what timm reads, and says which it took."""
    import timm
    import torch

    plain = tc.make_timm(SMALL_TIMM, seed=SEED, **SMALL_TIMM_ARGS)
    ema = tc.make_timm(SMALL_TIMM, seed=SEED + 1, **SMALL_TIMM_ARGS)
    weights = {"plain": plain.state_dict(), "ema": {f"_orig_mod.module.{k}": v for k, v in ema.state_dict().items()}}
    path = tmp_path / "checkpoint.pth"
    torch.save({k: weights[v] if v in weights else v for k, v in layout.items()}, path)
    reference = tc.make_timm(SMALL_TIMM, seed=SEED + 2, **SMALL_TIMM_ARGS)
    timm.models.load_checkpoint(reference, str(path))  # use_ema=True by default
    expected = tc.timm_logits(reference, PHOTOS[:2])
    with caplog.at_level("INFO", logger="mlx_vit"):
        ours = load(str(path), arch=SMALL_TIMM)
    assert np.abs(ours.logits(ours.pixels(PHOTOS[:2])) - expected).max() < TOLERANCE
    taken = next(k for k in ("state_dict_ema", "model_ema", "state_dict", "model") if layout.get(k) is not None)
    assert f"read its {taken}" in caplog.text


def test_image_size_out_of_range_is_one_line(timm_models, tmp_path, isolated):
    folder = tc.save_timm_hub(timm_models["vit"], tmp_path / "hub")
    out = convert(str(folder), tmp_path / "out")
    for size, needle in ((100, "multiple of the patch size 16"), (8192, "tokens"), (10**9, "--image-size")):
        done = run_cli("classify", IMAGES / "chelsea.png", "-m", out, "--image-size", str(size), env=isolated)
        errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
        assert done.returncode == 1 and len(errors) == 1 and needle in errors[0], done.stderr
