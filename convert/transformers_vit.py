"""transformers' ViT and DeiT: a folder with config.json (`model_type` vit or deit) and the weights.

One rename table maps transformers' parameter names (both the names on the Hub and transformers 5's in-memory
names) onto the MLX model's timm-style names; the layout fix fuses query/key/value into one `qkv` matmul and turns
the patch convolution into a linear layer over flattened NHWC patches.
"""

from __future__ import annotations

import re
from typing import Any

import numpy as np

from mlx_vit.config import ViTConfig
from mlx_vit.errors import ConfigError, shown

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
    read_weights,
    weight_budget,
)

NAME = "transformers ViT/DeiT"
LOOKS_FOR = {"folder": "model_type vit, deit"}  # by source kind
MODEL_TYPES = ("vit", "deit")

ARCHITECTURES = {
    # architecture: (has a distillation token, logits are the mean of two heads)
    "ViTForImageClassification": (False, False),
    "ViTModel": (False, False),
    "DeiTForImageClassification": (True, False),
    "DeiTForImageClassificationWithTeacher": (True, True),
    "DeiTModel": (True, False),
}

RENAMES = [
    (r"embeddings\.cls_token", "cls_token"),
    (r"embeddings\.distillation_token", "dist_token"),
    (r"embeddings\.position_embeddings", "pos_embed"),
    (r"embeddings\.patch_embeddings\.projection\.", "patch_embed.proj."),
    (r"(?:encoder\.layer|layers)\.(\d+)\.attention\.attention\.query\.", r"blocks.\1.attn.q."),
    (r"(?:encoder\.layer|layers)\.(\d+)\.attention\.attention\.key\.", r"blocks.\1.attn.k."),
    (r"(?:encoder\.layer|layers)\.(\d+)\.attention\.attention\.value\.", r"blocks.\1.attn.v."),
    (r"(?:encoder\.layer|layers)\.(\d+)\.attention\.output\.dense\.", r"blocks.\1.attn.proj."),
    (r"(?:encoder\.layer|layers)\.(\d+)\.attention\.([qkv])_proj\.", r"blocks.\1.attn.\2."),
    (r"(?:encoder\.layer|layers)\.(\d+)\.attention\.o_proj\.", r"blocks.\1.attn.proj."),
    (r"(?:encoder\.layer|layers)\.(\d+)\.intermediate\.dense\.", r"blocks.\1.mlp.fc1."),
    (r"(?:encoder\.layer|layers)\.(\d+)\.output\.dense\.", r"blocks.\1.mlp.fc2."),
    (r"(?:encoder\.layer|layers)\.(\d+)\.mlp\.(fc[12])\.", r"blocks.\1.mlp.\2."),
    (r"(?:encoder\.layer|layers)\.(\d+)\.layernorm_before\.", r"blocks.\1.norm1."),
    (r"(?:encoder\.layer|layers)\.(\d+)\.layernorm_after\.", r"blocks.\1.norm2."),
    (r"layernorm\.", "norm."),
    (r"pooler\.dense\.", "pooler.fc."),
    (r"(?:cls_)?classifier\.", "head."),
    (r"distillation_classifier\.", "head_dist."),
]
# Present in some checkpoints, used by no classifier (ViTForMaskedImageModeling's mask token).
IGNORED = re.compile(r"(?:vit\.|deit\.)?embeddings\.mask_token")


def _architecture(hf: dict[str, Any], source: str) -> str:
    model_type = hf.get("model_type")
    if model_type not in ("vit", "deit"):
        raise ConfigError(
            f"{source}: model_type {shown(model_type, 40, quote=True)} is not supported (supported: vit, deit)"
        )
    default = "DeiTForImageClassificationWithTeacher" if model_type == "deit" else "ViTForImageClassification"
    return hf_architecture(hf, ARCHITECTURES, default, source)


def check_config(hf: dict[str, Any], source: str) -> ViTConfig:
    """config.json alone, before any weight is read: the architecture, and every size's type and magnitude.

    Keys it leaves out take transformers' ViTConfig defaults, as transformers does; sizes the weights decide
    (the number of labels, the pooler) are checked against them later by `model_config`.
    """
    architecture = _architecture(hf, source)
    values = hf_sizes(hf)
    id2label = hf.get("id2label")
    values["num_labels"] = len(id2label) if isinstance(id2label, dict) else 0
    values["distillation_token"], values["distilled_head"] = ARCHITECTURES[architecture]
    values["pooler"] = False
    return ViTConfig.from_dict(values, source)


def model_config(hf: dict[str, Any], tensors: dict[str, np.ndarray], source: str) -> tuple[ViTConfig, str]:
    """ViTConfig from transformers' config.json, checked against what the weights actually hold."""
    architecture = _architecture(hf, source)
    distillation_token, distilled_head = ARCHITECTURES[architecture]
    names = {_strip_prefix(k): k for k in tensors}
    num_labels = head_classes(tensors, names.get("classifier.weight") or names.get("cls_classifier.weight"), source)
    values = hf_sizes(hf)
    values.update(
        num_labels=num_labels,
        distillation_token=distillation_token,
        distilled_head=distilled_head and num_labels > 0,
        pooler="pooler.dense.weight" in names,
    )
    return ViTConfig.from_dict(values, source), architecture


def _strip_prefix(key: str) -> str:
    return key.split(".", 1)[1] if key.startswith(("vit.", "deit.")) else key


def detect(source: Source) -> bool:
    return source.is_folder and source.config.get("model_type") in MODEL_TYPES


def map_weights(tensors: dict[str, np.ndarray], config: ViTConfig, source: str) -> dict[str, np.ndarray]:
    """transformers names and layouts -> the MLX model's; shapes checked before any layout is changed."""
    return hf_layout(tensors, RENAMES, IGNORED, r"vit\.|deit\.", config, source, "ViT/DeiT")


def read(source: Source) -> Checkpoint:
    """An HF-layout ViT/DeiT folder, in the MLX model's names and layouts."""
    hf, folder, config_file = source.config, source.path, shown(source.path / "config.json")
    budget = weight_budget(check_config(hf, config_file))  # absurd sizes are refused before any weight is read
    tensors = read_weights(folder, budget=budget)
    check_finite(tensors, source.name)
    config, architecture = model_config(hf, tensors, config_file)
    return Checkpoint(
        config=config,
        weights=map_weights(tensors, config, source.name),
        preprocessing=hf_preprocessing(folder, hf["model_type"], config.image_size),
        id2label=hf_labels(hf, config.num_labels, config_file),
        architecture=architecture,
        resample=TRANSFORMERS_RESAMPLE,
        extra={"problem_type": hf.get("problem_type")},
    )
