"""What every checkpoint format shares: the `Checkpoint` a reader returns, weight files, renames and layout fixes.

A format module (transformers_vit, transformers_dinov2, timm_vit, jax_npz) has a `detect`, one rename table and
one layout fix, built from the helpers here; `checkpoint.read_checkpoint` picks the module.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from mlx_vit.config import ViTConfig
from mlx_vit.errors import CheckpointError, ConfigError, shown
from mlx_vit.files import exists, plain_name, read_json
from mlx_vit.numbers import is_number
from mlx_vit.preprocess import PreprocessConfig

from .safetensors_io import read_safetensors
from .torch_pickle import Choose, chosen, read_torch_bin, state_dict

WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")  # fmt: skip
# How each reference resamples position embeddings to another grid (pos_embed.resample_pos_embed's arguments).
TIMM_RESAMPLE = {"interpolation": "bicubic", "antialias": True}  # checkpoint_filter_fn
JAX_RESAMPLE = {"interpolation": "bilinear", "antialias": False}  # _load_weights
TRANSFORMERS_RESAMPLE = {"interpolation": "bicubic", "antialias": False}  # interpolate_pos_encoding


@dataclass
class Source:
    """What a reader is given: a folder or a file, its config.json (folders), and the user's --arch."""

    path: Path
    arch: str | None = None
    config: dict[str, Any] | None = None  # a folder's config.json, read once

    @property
    def name(self) -> str:
        return shown(self.path)

    @property
    def is_folder(self) -> bool:
        return self.config is not None


@dataclass
class Checkpoint:
    """A checkpoint in the MLX model's names and layouts, at the grid its position embeddings were trained at."""

    config: ViTConfig
    weights: dict[str, np.ndarray]
    preprocessing: dict[str, Any]  # PreprocessConfig.to_dict()
    id2label: dict[str, str]
    architecture: str
    resample: dict[str, Any]  # how its reference resamples pos_embed (TIMM_RESAMPLE, ...)
    extra: dict[str, Any] = field(default_factory=dict)  # more config.json keys (problem_type)
    image_size: int | None = None  # the size its reference runs it at, where not the table's (DINOv2's crop)


def weight_budget(config: ViTConfig) -> int:
    """The most bytes a checkpoint's tensors may take for `config`: every parameter in float64, twice over (a
    pooler, an unused head or pool), and room for a head of any size. A file declaring more (a sparse file can, at
    no cost) is refused from its header, before a byte is read."""
    return 16 * config.num_parameters() + 256 * 2**20


def read_weights(folder: Path, choose: Choose = state_dict, budget: int | None = None) -> dict[str, np.ndarray]:
    """All tensors of an HF-layout folder: safetensors preferred, then pytorch_model.bin; shards followed.
    `choose` finds the state dict in what a file holds (see torch_pickle.read_torch_bin); each file's tensors
    may take at most `budget` bytes (see weight_budget)."""
    for name in WEIGHT_FILES:
        path = folder / name
        if not exists(path):
            continue
        if name.endswith(".index.json"):
            weight_map = read_json(path, CheckpointError).get("weight_map")
            if not isinstance(weight_map, dict):
                raise CheckpointError(f"{shown(path)}: has no weight_map")
            values = list(weight_map.values())
            if any(not plain_name(s) or s.startswith(".") for s in values):
                raise CheckpointError(f"{shown(path)}: shard names must be plain file names in the same folder")
            files = [folder / s for s in sorted(set(values))]
        else:
            files = [path]
        tensors: dict[str, np.ndarray] = {}
        for file in files:
            if not exists(file):
                raise CheckpointError(f"{shown(file)}: shard listed in {name} is missing")
            left = None if budget is None else budget - sum(v.nbytes for v in tensors.values())  # the shards' total
            for key, value in read_weight_file(file, choose, left).items():
                if key in tensors:  # two shards holding one tensor: which would transformers take?
                    raise CheckpointError(f"{shown(file)}: tensor '{shown(key, 80)}' is in another shard too")
                tensors[key] = value
        return tensors
    raise CheckpointError(f"{shown(folder)}: no weights found (looked for {', '.join(WEIGHT_FILES)})")


def read_weight_file(path: Path, choose: Choose = state_dict, budget: int | None = None) -> dict[str, np.ndarray]:
    """One .safetensors file, or one torch.save()d state dict (.bin, .pth, .pt), its state dict found by `choose`
    as the format's reference finds it; the choice is logged where it was not the whole file."""
    if not path.name.endswith(".safetensors"):
        return read_torch_bin(path, choose, budget)
    return chosen(read_safetensors(path, budget), choose, np.ndarray, shown(path))


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


def rename(tensors: dict[str, np.ndarray], renames: list[tuple[str, str]], ignored: re.Pattern | None,
           source: str, kind: str, prefix: str = "") -> dict[str, np.ndarray]:  # fmt: skip
    """Checkpoint names -> the MLX model's, by the first matching (regex, replacement) after an optional `prefix`
    (a regex: a task model's `vit.`); unmatched names are refused."""
    mapped: dict[str, np.ndarray] = {}
    origin: dict[str, str] = {}
    for key, value in tensors.items():
        if ignored is not None and ignored.fullmatch(key):
            continue
        for pattern, replacement in renames:
            new, count = re.subn(f"^(?:{prefix})?{pattern}" if prefix else f"^{pattern}", replacement, key)
            if count:
                break
        else:
            raise CheckpointError(f"{source}: unexpected tensor '{shown(key, 80)}' for a {kind} checkpoint")
        if new in mapped:  # `vit.x` and `x`: the reference would load one of them; guessing which is a wrong answer
            raise CheckpointError(f"{source}: tensors '{shown(origin[new], 80)}' and '{shown(key, 80)}' are both {new}")
        mapped[new], origin[new] = value, key
    return mapped


def fuse_qkv(mapped: dict[str, np.ndarray], config: ViTConfig, source: str) -> None:
    """blocks.N.attn.{q,k,v}.{weight,bias} -> blocks.N.attn.qkv.*, one matmul; shapes checked first."""
    d = config.hidden_size
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


def conv_to_linear(mapped: dict[str, np.ndarray], config: ViTConfig, source: str) -> None:
    """The (D, C, p, p) patch convolution -> (D, p*p*C), a linear layer over flattened NHWC patches."""
    if "patch_embed.proj.weight" not in mapped:
        return
    d, c, p = config.hidden_size, config.num_channels, config.patch_size
    w = mapped["patch_embed.proj.weight"]
    if w.shape != (d, c, p, p):
        raise CheckpointError(f"{source}: patch projection has shape {w.shape}, the config makes {(d, c, p, p)}")
    mapped["patch_embed.proj.weight"] = w.transpose(0, 2, 3, 1).reshape(d, -1)


def head_classes(tensors: dict[str, np.ndarray], key: str | None, source: str) -> int:
    """Classes of the head whose weight is `tensors[key]` (0 for none), checked to be a matrix."""
    head = tensors.get(key) if key else None
    if head is None:
        return 0
    if head.ndim != 2:
        raise CheckpointError(f"{source}: classifier weight has shape {head.shape}, expected 2 dimensions")
    return int(head.shape[0])


def numbered_labels(num_labels: int, names: dict[int, str] | None = None, fallback: str = "class {}") -> dict:
    """{"0": name, ...} for every class; `fallback` names those `names` lacks."""
    names = names or {}
    return {str(i): names.get(i, fallback.format(i)) for i in range(num_labels)}


def mlp_width(width: Any, ratio: Any, source: str, names: str) -> int:
    """int(width * mlp_ratio), as timm and transformers size the MLP; refused unless both are numbers."""
    if not (is_number(width, integer=True) and is_number(ratio) and 0 < ratio <= 64):
        raise ConfigError(f"{source}: {names} must be numbers, got {shown([width, ratio])}")
    return int(width * ratio)


def square(value: Any) -> Any:
    """n for [n, n] (transformers and timm both accept a size as a pair), anything else as it is."""
    if isinstance(value, list) and len(value) == 2 and value[0] == value[1] and type(value[0]) is int:
        return value[0]
    return value


def hf_sizes(hf: dict[str, Any]) -> dict[str, Any]:
    """A transformers config.json's values, with [n, n] sizes (which transformers accepts) as n."""
    values = dict(hf)
    for key in ("image_size", "patch_size"):
        if key in values:
            values[key] = square(values[key])
    return values


def hf_architecture(hf: dict[str, Any], supported, default: str, source: str) -> str:
    """config.json's first architecture (transformers' class for it), `default` where it names none."""
    architectures = hf.get("architectures") or []
    if not (isinstance(architectures, list) and all(isinstance(a, str) for a in architectures)):
        raise ConfigError(f"{source}: architectures must be a list of class names")
    architecture = architectures[0] if architectures else default
    if architecture not in supported:
        raise ConfigError(f"{source}: architecture {shown(architecture, 60, quote=True)} is not supported "
                          f"(supported: {', '.join(supported)})")  # fmt: skip
    return architecture


def hf_layout(tensors: dict[str, np.ndarray], renames: list, ignored: re.Pattern, prefix: str, config: ViTConfig,
              source: str, kind: str) -> dict[str, np.ndarray]:  # fmt: skip
    """The transformers models' layout fix: renamed, q/k/v fused into qkv, the patch convolution as a linear."""
    mapped = rename(tensors, renames, ignored, source, kind, prefix=prefix)
    fuse_qkv(mapped, config, source)
    conv_to_linear(mapped, config, source)
    return mapped


def hf_labels(hf: dict[str, Any], num_labels: int, source: str = "config.json") -> dict[str, str]:
    """{"0": name, ...} for every class, as in config.json; transformers' LABEL_i where the file names none."""
    id2label = hf.get("id2label") or {}
    try:
        table = {int(k): str(v) for k, v in id2label.items()}
    except (AttributeError, ValueError, TypeError):
        raise ConfigError(f"{source}: id2label must map class ids to names") from None
    return numbered_labels(num_labels, table, "LABEL_{}")


def hf_preprocessing(folder: Path, model_type: str, image_size: int) -> dict[str, Any]:
    """The folder's preprocessor_config.json as transformers' PIL image processor reads it."""
    processor_file = folder / "preprocessor_config.json"
    # Without a preprocessor config transformers has no processor at all; class defaults at the model's size.
    processor = read_json(processor_file) if exists(processor_file) else {"size": image_size}
    return PreprocessConfig.from_hf(processor, model_type, shown(processor_file)).to_dict()
