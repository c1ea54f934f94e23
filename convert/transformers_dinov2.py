"""transformers' DINOv2: Dinov2Model, Dinov2ForImageClassification and the `dinov2_with_registers` models.

DINOv2 is a ViT with layer scale; the register models add tokens that have no position embedding. Its position
table is for config.json's image_size (518 px, 37x37 patches at patch 14) and transformers interpolates it to
each input's grid (bicubic; with antialiasing in the register models): mlx-vit does that once, at load time.
The classifier's head reads the class token next to the mean of the patch tokens (`global_pool="token_avg"`).

Layout fix: q/k/v fused into `qkv`, the patch convolution as a linear layer, and with registers the class token's
position folded into the class token, so the position table covers the patches only (`no_embed_class`), as timm's
_convert_dinov2 does.
"""

from __future__ import annotations

import re

import numpy as np

from mlx_vit.config import ViTConfig
from mlx_vit.errors import ConfigError, shown
from mlx_vit.preprocess import PreprocessConfig

from .common import (
    TRANSFORMERS_RESAMPLE,
    Checkpoint,
    Source,
    check_finite,
    head_classes,
    hf_architecture,
    hf_labels,
    hf_layout,
    hf_preprocessing,
    hf_sizes,
    mlp_width,
    read_weights,
    weight_budget,
)

NAME = "transformers DINOv2"
LOOKS_FOR = {"folder": "model_type dinov2, dinov2_with_registers"}  # by source kind
MODEL_TYPES = ("dinov2", "dinov2_with_registers")
ARCHITECTURES = ("Dinov2Model", "Dinov2ForImageClassification", "Dinov2WithRegistersModel",
                 "Dinov2WithRegistersForImageClassification")  # fmt: skip

_LAYER = r"(?:encoder\.layer|layers)\.(\d+)\."
RENAMES = [
    (r"embeddings\.cls_token", "cls_token"),
    (r"embeddings\.register_tokens", "reg_token"),
    (r"embeddings\.position_embeddings", "pos_embed"),
    (r"embeddings\.patch_embeddings\.projection\.", "patch_embed.proj."),
    (_LAYER + r"attention\.attention\.(query|key|value)\.", lambda m: f"blocks.{m[1]}.attn.{m[2][0]}."),
    (_LAYER + r"attention\.([qkv])_proj\.", r"blocks.\1.attn.\2."),
    (_LAYER + r"attention\.(?:output\.dense|o_proj)\.", r"blocks.\1.attn.proj."),
    (_LAYER + r"layer_scale([12])\.lambda1", r"blocks.\1.ls\2.gamma"),
    (_LAYER + r"(norm[12])\.", r"blocks.\1.\2."),
    (_LAYER + r"mlp\.(fc[12])\.", r"blocks.\1.mlp.\2."),
    (r"layernorm\.", "norm."),
    (r"classifier\.", "head."),
]
IGNORED = re.compile(r"(?:dinov2\.|dinov2_with_registers\.)?embeddings\.mask_token")
PREFIX = r"dinov2\.|dinov2_with_registers\."
# transformers' config defaults, for keys a config.json leaves out
DEFAULTS = {
    "dinov2": {"hidden_size": 768, "mlp_ratio": 4, "image_size": 224, "patch_size": 14, "num_register_tokens": 0},
    "dinov2_with_registers": {"hidden_size": 768, "mlp_ratio": 4, "image_size": 224, "patch_size": 16,
                              "num_register_tokens": 4},
}  # fmt: skip


def detect(source: Source) -> bool:
    return source.is_folder and source.config.get("model_type") in MODEL_TYPES


def model_config(hf: dict, num_labels: int, source: str) -> ViTConfig:
    if hf.get("use_swiglu_ffn"):
        raise ConfigError(f"{source}: DINOv2 with a SwiGLU MLP (ViT-g/14) is not supported")
    values = {**DEFAULTS[hf["model_type"]], **hf_sizes(hf)}
    registers = values["num_register_tokens"]
    values.update(
        intermediate_size=mlp_width(values["hidden_size"], values["mlp_ratio"], source, "hidden_size and mlp_ratio"),
        layer_norm_eps=values.get("layer_norm_eps", 1e-6),
        num_labels=num_labels,
        reg_tokens=registers,
        no_embed_class=bool(registers),
        init_values=1.0,  # layer scale is always on in transformers' DINOv2
        global_pool="token_avg" if num_labels else "token",
    )
    return ViTConfig.from_dict(values, source)


def map_weights(tensors: dict[str, np.ndarray], config: ViTConfig, source: str) -> dict[str, np.ndarray]:
    """transformers' DINOv2 names and layouts -> the MLX model's."""
    mapped = hf_layout(tensors, RENAMES, IGNORED, PREFIX, config, source, "DINOv2")
    if config.no_embed_class and "pos_embed" in mapped and "cls_token" in mapped:
        pos = mapped["pos_embed"]  # (1, 1 + patches, D): the class token's position, then the patches'
        mapped["cls_token"] = mapped["cls_token"] + pos[:, :1]
        mapped["pos_embed"] = pos[:, 1:]
    return mapped


def read(source: Source) -> Checkpoint:
    hf, config_file = source.config, shown(source.path / "config.json")
    registers = "WithRegisters" if hf["model_type"] == "dinov2_with_registers" else ""
    architecture = hf_architecture(hf, ARCHITECTURES, f"Dinov2{registers}Model", config_file)
    id2label = hf.get("id2label")
    sizes = model_config(hf, len(id2label) if isinstance(id2label, dict) else 0, config_file)  # before any weight
    tensors = read_weights(source.path, budget=weight_budget(sizes))
    check_finite(tensors, source.name)
    head = next((k for k in tensors if re.fullmatch(r"(?:dinov2\.)?classifier\.weight", k)), None)
    config = model_config(hf, head_classes(tensors, head, source.name), config_file)
    preprocessing = hf_preprocessing(source.path, "dinov2", config.image_size)
    crop = PreprocessConfig.from_dict(preprocessing).fixed_size()
    return Checkpoint(
        config=config,
        weights=map_weights(tensors, config, source.name),
        preprocessing=preprocessing,
        image_size=crop[0] if crop and crop[0] == crop[1] else None,  # transformers interpolates to the input
        id2label=hf_labels(hf, config.num_labels, config_file),
        architecture=architecture,
        # Dinov2WithRegisters interpolates with antialiasing, Dinov2 without
        resample={**TRANSFORMERS_RESAMPLE, "antialias": config.reg_tokens > 0},
        extra={"problem_type": hf.get("problem_type")},
    )
