"""The shipped timm tables (mlx_vit/data/timm_vit.json, imagenet1k.txt): in step with timm, right where it matters."""

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "mlx_vit" / "data"
SCRIPT = ROOT / "scripts" / "timm_table.py"


@pytest.fixture(scope="module")
def table() -> dict:
    return json.loads((DATA / "timm_vit.json").read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def labels() -> list[str]:
    return (DATA / "imagenet1k.txt").read_text(encoding="utf-8").split("\n")[:-1]


def _generator():
    pytest.importorskip("timm")
    spec = importlib.util.spec_from_file_location("timm_table", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _kwargs(table: dict, name: str) -> dict:
    arch = table["architectures"][name]
    return {**table["defaults"][arch["class"]], **arch["kwargs"]}


def test_shipped_files_match_installed_timm():
    generator = _generator()
    assert (DATA / "timm_vit.json").read_text(encoding="utf-8") == generator.render_table(generator.build_table()), (
        "timm_vit.json is stale: run `python scripts/timm_table.py`"
    )
    assert (DATA / "imagenet1k.txt").read_text(encoding="utf-8") == generator.render_labels()


def test_layout(table):
    assert set(table) == {"timm_version", "defaults", "architectures", "pretrained", "skipped"}
    assert set(table["defaults"]) == {"VisionTransformer", "VisionTransformerDistilled"}
    for name, arch in table["architectures"].items():
        assert set(arch) == {"class", "kwargs", "default_tag"}, name
        assert set(arch["kwargs"]) <= set(table["defaults"][arch["class"]]), name
        if arch["default_tag"] is not None:
            assert f"{name}.{arch['default_tag']}" in table["pretrained"], name
    for full_name in table["pretrained"]:
        assert full_name.split(".", 1)[0] in table["architectures"], full_name
    assert len(table["architectures"]) > 150
    assert (DATA / "timm_vit.json").stat().st_size < 1_000_000


def test_vit_base(table):
    kwargs = _kwargs(table, "vit_base_patch16_224")
    assert (kwargs["embed_dim"], kwargs["depth"], kwargs["num_heads"], kwargs["patch_size"]) == (768, 12, 12, 16)
    assert kwargs["img_size"] == [224, 224]
    assert (kwargs["class_token"], kwargs["global_pool"], kwargs["reg_tokens"]) == (True, "token", 0)
    assert kwargs["norm_layer"] is None and kwargs["act_layer"] is None  # VisionTransformer's LayerNorm(1e-6), GELU
    assert (kwargs["block_fn"], kwargs["mlp_layer"], kwargs["embed_layer"]) == ("Block", "Mlp", "PatchEmbed")
    assert table["architectures"]["vit_base_patch16_224"]["default_tag"] == "augreg2_in21k_ft_in1k"


def test_dinov2_registers(table):
    kwargs = _kwargs(table, "vit_small_patch14_reg4_dinov2")
    assert kwargs["reg_tokens"] == 4 and kwargs["no_embed_class"] is True
    assert kwargs["init_values"] == 1e-5
    assert kwargs["img_size"] == [518, 518] and kwargs["patch_size"] == 14


def test_siglip_map_head(table):
    kwargs = _kwargs(table, "vit_base_patch16_siglip_224")
    assert kwargs["class_token"] is False and kwargs["global_pool"] == "map"


def test_clip_quickgelu(table):
    kwargs = _kwargs(table, "vit_base_patch16_clip_quickgelu_224")
    assert kwargs["pre_norm"] is True and kwargs["act_layer"] == "quick_gelu"
    assert kwargs["norm_layer"] == {"name": "layernorm", "eps": 1e-5}


def test_deit_distilled(table):
    assert table["architectures"]["deit_tiny_distilled_patch16_224"]["class"] == "VisionTransformerDistilled"
    assert table["architectures"]["deit_tiny_patch16_224"]["class"] == "VisionTransformer"


def test_registers_with_average_pool(table):
    kwargs = _kwargs(table, "vit_medium_patch16_reg4_gap_256")
    assert kwargs["global_pool"] == "avg" and kwargs["reg_tokens"] == 4 and kwargs["class_token"] is False


def test_unsupported_layers_are_named(table):
    """A reader refuses these by name, so the names must be there."""
    assert _kwargs(table, "aimv2_large_patch14_224")["mlp_layer"] == "SwiGLU"
    assert _kwargs(table, "vit_dwee_patch16_reg1_gap_256")["attn_layer"] == "DiffAttention"  # given as 'diff'
    assert _kwargs(table, "vit_small_patch16_18x2_224")["block_fn"] == "ParallelThingsBlock"
    assert _kwargs(table, "vit_base_patch16_xp_224")["qk_norm"] is True
    assert "HybridEmbed" in table["skipped"]["vit_base_r50_s16_384"]  # a built backbone is no data


def test_pretrained_cfg(table):
    cfg = table["pretrained"]["vit_base_patch16_224.augreg_in21k_ft_in1k"]
    assert cfg["crop_pct"] == 0.9 and cfg["mean"] == [0.5] * 3 and cfg["std"] == [0.5] * 3
    assert cfg["input_size"] == [3, 224, 224] and cfg["interpolation"] == "bicubic" and cfg["num_classes"] == 1000
    assert cfg["hf_hub_id"] == "timm/vit_base_patch16_224.augreg_in21k_ft_in1k"
    in21k = table["pretrained"]["vit_base_patch16_224.augreg_in21k"]
    assert in21k["num_classes"] == 21843 and in21k["kwargs"] == {"num_classes": 21843}


def test_imagenet_labels(labels):
    assert len(labels) == 1000 and all(line.strip() == line and line for line in labels)
    assert labels[0] == "tench, Tinca tinca" and labels[999] == "toilet tissue, toilet paper, bathroom tissue"
    # ImageNet-1k names two classes "crane" (the bird, 134, and the machine, 517); every other name is unique
    assert len(set(labels)) == 999 and labels[134] == labels[517] == "crane"
