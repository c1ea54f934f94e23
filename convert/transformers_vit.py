"""Hugging Face transformers ViT / DeiT checkpoints -> MLX model weights and config.

One rename table maps transformers' parameter names (both the names on the Hub and transformers 5's in-memory
names) onto the MLX model's timm-style names; query/key/value are fused into one `qkv` matmul and the patch
convolution becomes a linear layer over flattened NHWC patches.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np

from mlx_vit.errors import CheckpointError, ConfigError, shown
from mlx_vit.files import exists, read_json
from mlx_vit.model import ViTConfig
from mlx_vit.preprocess import PreprocessConfig

from .mlx_folder import check_input_size
from .safetensors_io import read_safetensors
from .torch_pickle import read_torch_bin

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

WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")  # fmt: skip


def read_weights(folder: Path) -> dict[str, np.ndarray]:
    """All tensors of an HF-layout folder: safetensors preferred, then pytorch_model.bin; shards followed."""
    for name in WEIGHT_FILES:
        path = folder / name
        if not exists(path):
            continue
        if name.endswith(".index.json"):
            weight_map = read_json(path, CheckpointError).get("weight_map")
            if not isinstance(weight_map, dict):
                raise CheckpointError(f"{shown(path, None)}: has no weight_map")
            values = list(weight_map.values())
            if any(not isinstance(s, str) or "/" in s or "\\" in s or s.startswith(".") or not s for s in values):
                raise CheckpointError(f"{shown(path, None)}: shard names must be plain file names in the same folder")
            files = [folder / s for s in sorted(set(values))]
        else:
            files = [path]
        reader = read_safetensors if ".safetensors" in name else read_torch_bin
        tensors: dict[str, np.ndarray] = {}
        for file in files:
            if not exists(file):
                raise CheckpointError(f"{shown(file, None)}: shard listed in {name} is missing")
            for key, value in reader(file).items():
                if key in tensors:  # two shards holding one tensor: which would transformers take?
                    raise CheckpointError(f"{shown(file, None)}: tensor '{shown(key, 80)}' is in another shard too")
                tensors[key] = value
        return tensors
    raise CheckpointError(f"{shown(folder, None)}: no weights found (looked for {', '.join(WEIGHT_FILES)})")


def check_finite(tensors: dict[str, np.ndarray], source: str) -> None:
    """Refuse NaN and infinite weights, and float64 values float32 cannot hold, naming the tensor."""
    limit = float(np.finfo(np.float32).max)
    for key, value in tensors.items():
        if value.dtype.kind != "f" or value.size == 0:
            continue
        if not np.isfinite(value).all():
            raise CheckpointError(f"{source}: tensor '{shown(key, 80)}' holds NaN or infinite values")
        if value.dtype == np.float64 and np.abs(value).max() > limit:
            raise CheckpointError(f"{source}: tensor '{shown(key, 80)}' holds values beyond float32's range")


def _architecture(hf: dict[str, Any], source: str) -> str:
    model_type = hf.get("model_type")
    if model_type not in ("vit", "deit"):
        raise ConfigError(
            f"{source}: model_type {shown(model_type, 40, quote=True)} is not supported (supported: vit, deit)"
        )
    architectures = hf.get("architectures") or []
    if not (isinstance(architectures, list) and all(isinstance(a, str) for a in architectures)):
        raise ConfigError(f"{source}: architectures must be a list of class names")
    default = "DeiTForImageClassificationWithTeacher" if model_type == "deit" else "ViTForImageClassification"
    architecture = architectures[0] if architectures else default
    if architecture not in ARCHITECTURES:
        raise ConfigError(f"{source}: architecture {shown(architecture, 60, quote=True)} is not supported "
                          f"(supported: {', '.join(ARCHITECTURES)})")  # fmt: skip
    return architecture


def _config_values(hf: dict[str, Any]) -> dict[str, Any]:
    values = dict(hf)
    for key in ("image_size", "patch_size"):  # transformers accepts [n, n]
        value = values.get(key)
        if isinstance(value, list) and len(value) == 2 and value[0] == value[1] and type(value[0]) is int:
            values[key] = value[0]
    return values


def check_config(hf: dict[str, Any], source: str) -> ViTConfig:
    """config.json alone, before any weight is read: the architecture, and every size's type and magnitude.

    Keys it leaves out take transformers' ViTConfig defaults, as transformers does; sizes the weights decide
    (the number of labels, the pooler) are checked against them later by `model_config`.
    """
    architecture = _architecture(hf, source)
    values = _config_values(hf)
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
    head_key = names.get("classifier.weight") or names.get("cls_classifier.weight")
    head = tensors[head_key] if head_key else None
    if head is not None and head.ndim != 2:
        raise CheckpointError(f"{source}: classifier weight has shape {head.shape}, expected 2 dimensions")
    values = _config_values(hf)
    values.update(
        num_labels=0 if head is None else int(head.shape[0]),
        distillation_token=distillation_token,
        distilled_head=distilled_head and head is not None,
        pooler="pooler.dense.weight" in names,
    )
    return ViTConfig.from_dict(values, source), architecture


def _strip_prefix(key: str) -> str:
    return key.split(".", 1)[1] if key.startswith(("vit.", "deit.")) else key


def map_weights(tensors: dict[str, np.ndarray], config: ViTConfig, source: str) -> dict[str, np.ndarray]:
    """transformers names and layouts -> the MLX model's; shapes checked before any layout is changed."""
    mapped: dict[str, np.ndarray] = {}
    origin: dict[str, str] = {}
    for key, value in tensors.items():
        if IGNORED.fullmatch(key):
            continue
        name = _strip_prefix(key)
        for pattern, replacement in RENAMES:
            new, count = re.subn(f"^{pattern}", replacement, name)
            if count:
                break
        else:
            raise CheckpointError(f"{source}: unexpected tensor '{shown(key, 80)}' for a ViT/DeiT checkpoint")
        if new in mapped:  # `vit.x` and `x`: transformers would load one of them; guessing which is a wrong answer
            raise CheckpointError(f"{source}: tensors '{shown(origin[new], 80)}' and '{shown(key, 80)}' are both {new}")
        mapped[new], origin[new] = value, key
    d, c, p = config.hidden_size, config.num_channels, config.patch_size
    for i in range(config.num_hidden_layers):
        prefix = f"blocks.{i}.attn."
        for kind, shape in (("weight", (d, d)), ("bias", (d,))):
            parts = [mapped.pop(f"{prefix}{q}.{kind}", None) for q in "qkv"]
            if all(part is not None for part in parts):
                if any(part.shape != shape for part in parts):
                    shapes = [part.shape for part in parts]
                    raise CheckpointError(f"{source}: layer {i} query/key/value {kind} shapes {shapes} are not {shape}")
                mapped[f"{prefix}qkv.{kind}"] = np.concatenate(parts, axis=0)
            elif any(part is not None for part in parts):
                raise CheckpointError(f"{source}: layer {i} has only some of query/key/value {kind}")
    if "patch_embed.proj.weight" in mapped:
        w = mapped["patch_embed.proj.weight"]  # (D, C, p, p) conv kernel -> (D, p*p*C) over NHWC patches
        if w.shape != (d, c, p, p):
            raise CheckpointError(f"{source}: patch projection has shape {w.shape}, the config makes {(d, c, p, p)}")
        mapped["patch_embed.proj.weight"] = w.transpose(0, 2, 3, 1).reshape(d, -1)
    return mapped


def labels(hf: dict[str, Any], num_labels: int, source: str = "config.json") -> dict[str, str]:
    """{"0": name, ...} for every class, as in config.json; transformers' LABEL_i where the file names none."""
    id2label = hf.get("id2label") or {}
    try:
        table = {int(k): str(v) for k, v in id2label.items()}
    except (AttributeError, ValueError, TypeError):
        raise ConfigError(f"{source}: id2label must map class ids to names") from None
    return {str(i): table.get(i, f"LABEL_{i}") for i in range(num_labels)}


def read_hf_checkpoint(folder: str | Path) -> tuple[ViTConfig, dict[str, np.ndarray], dict[str, Any]]:
    """Read an HF-layout folder: (model config, MLX-named float weights, metadata for config.json)."""
    folder = Path(folder)
    hf = read_json(folder / "config.json")
    check_config(hf, str(folder / "config.json"))  # absurd sizes are refused before any weight is read
    tensors = read_weights(folder)
    check_finite(tensors, shown(folder, None))
    config, architecture = model_config(hf, tensors, str(folder / "config.json"))
    weights = map_weights(tensors, config, shown(folder, None))
    processor_file = folder / "preprocessor_config.json"
    # Without a preprocessor config transformers has no processor at all; class defaults at the model's size.
    processor = read_json(processor_file) if exists(processor_file) else {"size": config.image_size}
    preprocessing = PreprocessConfig.from_hf(processor, hf["model_type"], str(processor_file))
    check_input_size(preprocessing, config, shown(processor_file, None))
    metadata = {
        "architecture": architecture,
        "id2label": labels(hf, config.num_labels, str(folder / "config.json")),
        "problem_type": hf.get("problem_type"),
        "preprocessing": preprocessing.to_dict(),
    }
    return config, weights, metadata
