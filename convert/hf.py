"""Hugging Face transformers ViT / DeiT checkpoints -> MLX model weights and config.

One rename table maps transformers' parameter names (both the names on the Hub and transformers 5's in-memory
names) onto the MLX model's timm-style names; query/key/value are fused into one `qkv` matmul and the patch
convolution becomes a linear layer over flattened NHWC patches.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import numpy as np

from mlx_vit.errors import CheckpointError, ConfigError
from mlx_vit.model import ViTConfig
from mlx_vit.preprocess import PreprocessConfig

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


# Real config files are kilobytes (ImageNet-21k's id2label is ~1 MB); this only stops a file that fills memory.
MAX_JSON_BYTES = 64 * 1024 * 1024


def read_json(path: Path) -> dict[str, Any]:
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_JSON_BYTES + 1)
    except FileNotFoundError:
        raise ConfigError(f"{path}: missing") from None
    except OSError as error:
        raise ConfigError(f"{path}: cannot read ({error.strerror or error})") from None
    if len(raw) > MAX_JSON_BYTES:
        raise ConfigError(f"{path}: over {MAX_JSON_BYTES // 2**20} MiB, too large for a config file")
    try:
        value = json.loads(raw)
    except (ValueError, RecursionError) as error:  # also UnicodeDecodeError, over-long ints, deep nesting
        raise ConfigError(f"{path}: not valid JSON ({str(error)[:200]})") from None
    if not isinstance(value, dict):
        raise ConfigError(f"{path}: expected a JSON object")
    return value


def read_weights(folder: Path) -> dict[str, np.ndarray]:
    """All tensors of an HF-layout folder: safetensors preferred, then pytorch_model.bin; shards followed."""
    for name in WEIGHT_FILES:
        path = folder / name
        if not path.is_file():
            continue
        if name.endswith(".index.json"):
            weight_map = read_json(path).get("weight_map")
            if not isinstance(weight_map, dict):
                raise CheckpointError(f"{path}: has no weight_map")
            values = list(weight_map.values())
            if any(not isinstance(s, str) or "/" in s or "\\" in s or s.startswith(".") or not s for s in values):
                raise CheckpointError(f"{path}: shard names must be plain file names in the same folder")
            shards = sorted(set(values))
            files = [folder / s for s in shards]
        else:
            files = [path]
        reader = read_safetensors if ".safetensors" in name else read_torch_bin
        tensors: dict[str, np.ndarray] = {}
        for file in files:
            if not file.is_file():
                raise CheckpointError(f"{file}: shard listed in {path.name} is missing")
            tensors.update(reader(file))
        return tensors
    raise CheckpointError(f"{folder}: no weights found (looked for {', '.join(WEIGHT_FILES)})")


def _architecture(hf: dict[str, Any], source: str) -> str:
    model_type = hf.get("model_type")
    if model_type not in ("vit", "deit"):
        shown = repr(model_type) if len(repr(model_type)) <= 40 else repr(model_type)[:37] + "..."
        raise ConfigError(f"{source}: model_type {shown} is not supported (supported: vit, deit)")
    architectures = hf.get("architectures") or []
    if not (isinstance(architectures, list) and all(isinstance(a, str) for a in architectures)):
        raise ConfigError(f"{source}: architectures must be a list of class names")
    default = "DeiTForImageClassificationWithTeacher" if model_type == "deit" else "ViTForImageClassification"
    architecture = architectures[0] if architectures else default
    if architecture not in ARCHITECTURES:
        raise ConfigError(f"{source}: architecture {architecture[:60]!r} is not supported "
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
    """transformers names and layouts -> the MLX model's."""
    mapped: dict[str, np.ndarray] = {}
    for key, value in tensors.items():
        if IGNORED.fullmatch(key):
            continue
        name = _strip_prefix(key)
        for pattern, replacement in RENAMES:
            new, count = re.subn(f"^{pattern}", replacement, name)
            if count:
                mapped[new] = value
                break
        else:
            raise CheckpointError(f"{source}: unexpected tensor {key!r} for a ViT/DeiT checkpoint")
    for i in range(config.num_hidden_layers):
        prefix = f"blocks.{i}.attn."
        for kind in ("weight", "bias"):
            parts = [mapped.pop(f"{prefix}{q}.{kind}", None) for q in "qkv"]
            if all(p is not None for p in parts):
                if len({p.shape[1:] for p in parts}) != 1 or parts[0].ndim == 0:
                    raise CheckpointError(f"{source}: layer {i} query/key/value {kind} shapes differ")
                mapped[f"{prefix}qkv.{kind}"] = np.concatenate(parts, axis=0)
            elif any(p is not None for p in parts):
                raise CheckpointError(f"{source}: layer {i} has only some of query/key/value {kind}")
    if "patch_embed.proj.weight" in mapped:
        w = mapped["patch_embed.proj.weight"]  # (D, C, p, p) conv kernel -> (D, p*p*C) over NHWC patches
        if w.ndim != 4:
            raise CheckpointError(f"{source}: patch projection has shape {w.shape}, expected a 4-d conv kernel")
        mapped["patch_embed.proj.weight"] = w.transpose(0, 2, 3, 1).reshape(w.shape[0], -1)
    return mapped


def labels(hf: dict[str, Any], num_labels: int, source: str = "config.json") -> dict[int, str]:
    id2label = hf.get("id2label") or {}
    try:
        table = {int(k): str(v) for k, v in id2label.items()}
    except (AttributeError, ValueError, TypeError):
        raise ConfigError(f"{source}: id2label must map class ids to names") from None
    return {i: table.get(i, f"LABEL_{i}") for i in range(num_labels)}


def read_hf_checkpoint(folder: str | Path) -> tuple[ViTConfig, dict[str, np.ndarray], dict[str, Any]]:
    """Read an HF-layout folder: (model config, MLX-named float weights, metadata for config.json)."""
    folder = Path(folder)
    hf = read_json(folder / "config.json")
    check_config(hf, str(folder / "config.json"))  # absurd sizes are refused before any weight is read
    tensors = read_weights(folder)
    config, architecture = model_config(hf, tensors, str(folder / "config.json"))
    weights = map_weights(tensors, config, str(folder))
    processor_file = folder / "preprocessor_config.json"
    # Without a preprocessor config transformers has no processor at all; class defaults at the model's size.
    processor = read_json(processor_file) if processor_file.is_file() else {"size": config.image_size}
    preprocessing = PreprocessConfig.from_hf(processor, hf["model_type"], str(processor_file))
    if preprocessing.fixed_size() != (config.image_size, config.image_size):
        raise ConfigError(
            f"{processor_file}: makes {preprocessing.fixed_size() or 'variable-size'} pixels but the model takes "
            f"{config.image_size}x{config.image_size}"
        )
    metadata = {
        "architecture": architecture,
        "id2label": labels(hf, config.num_labels, str(folder / "config.json")),
        "problem_type": hf.get("problem_type"),
        "preprocessing": preprocessing.to_dict(),
    }
    return config, weights, metadata
