"""Turn a model name into a loaded MLX model.

A name is an MLX model folder (from `mlx-vit convert`), a Hugging Face layout folder (converted in memory), or a
Hub repo id: downloaded once into the standard HF cache, converted once into mlx-vit's cache, reused afterwards.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn

from mlx_vit.convert import FORMAT, check_manifest, convert_folder, is_mlx_folder, write_mlx_folder
from mlx_vit.convert.safetensors_io import read_header
from mlx_vit.errors import CheckpointError, ConfigError, ModelNotFoundError
from mlx_vit.hub import download
from mlx_vit.model import ViT, ViTConfig
from mlx_vit.quantize import check_stored_format, to_float32

DEFAULT_MODEL = "google/vit-base-patch16-224"
log = logging.getLogger("mlx_vit")


@dataclass
class LoadedModel:
    model: ViT
    config: dict[str, Any]  # the MLX folder's config.json contents
    name: str


def cache_dir() -> Path:
    """Where Hub models are kept after conversion (MLX_VIT_CACHE overrides)."""
    if os.environ.get("MLX_VIT_CACHE"):
        return Path(os.environ["MLX_VIT_CACHE"]).expanduser()
    from platformdirs import user_cache_dir

    return Path(user_cache_dir("mlx-vit")) / "models"


def on_cpu() -> bool:
    return mx.default_device() == mx.cpu


def build_model(config: dict[str, Any], weights: dict[str, mx.array], source: str) -> ViT:
    """The model for `config` with `weights`; quantized layers are rebuilt from config["quantization"]."""
    model = ViT(ViTConfig.from_dict(config["model"], f"{source}/config.json"))
    quantization = config.get("quantization") or {}
    # Layers stay quantized unless to_float32 expanded them (then their scales are gone).
    layers = {layer for layer in quantization.get("layers", []) if f"{layer}.scales" in weights}
    if layers:
        bits, group_size = quantization["bits"], quantization["group_size"]
        nn.quantize(model, group_size, bits, class_predicate=lambda path, _: path in layers)
    # load_weights checks names and shapes, not dtypes; the quantized kernels would fail mid-batch on a wrong one.
    for key, value in weights.items():
        packed = key.endswith(".weight") and key.removesuffix(".weight") in layers
        if (value.dtype == mx.uint32) if packed else mx.issubdtype(value.dtype, mx.floating):
            continue
        expected = "uint32 (packed quantized weights)" if packed else "a float type"
        raise CheckpointError(f"{source}: tensor {key[:80]!r} is {value.dtype}, expected {expected}")
    try:
        model.load_weights(list(weights.items()), strict=True)
    except ValueError as error:
        raise CheckpointError(f"{source}: weights do not match config.json ({error})") from None
    mx.eval(model.parameters())
    return model


def load_mlx_folder(folder: Path) -> LoadedModel:
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError) as error:
        raise ConfigError(f"{folder}/config.json: cannot read ({error})") from None
    if config.get("format") != FORMAT or not isinstance(config.get("model"), dict):
        raise ConfigError(f"{folder}/config.json: not an mlx-vit model folder")
    weights_file = folder / "model.safetensors"
    if not weights_file.is_file():
        raise CheckpointError(f"{weights_file}: missing (an incomplete conversion? convert again with --force)")
    check_manifest(folder)
    check_stored_format(config, f"{folder}/config.json")
    read_header(weights_file)  # validates offsets before MLX's loader touches the bytes
    weights = mx.load(str(weights_file))
    dtype = config.get("dtype", "float32")
    if on_cpu() and (config.get("quantization") or dtype != "float32"):
        # MLX's CPU quantized/half matmuls are scalar loops, ~15-30x slower than float32 with a real BLAS.
        log.info("%s: %s weights expanded to float32 for the CPU (the file stays small)", folder, describe(config))
        try:
            weights = to_float32(weights, config.get("quantization"))
        except (CheckpointError, ValueError) as error:
            raise CheckpointError(f"{weights_file}: {error}") from None
        config = {**config, "runtime_dtype": "float32"}
    return LoadedModel(build_model(config, weights, str(folder)), config, str(folder))


def describe(config: dict[str, Any]) -> str:
    """'4-bit (group 64)', 'float16', ... as a model's weights are stored."""
    q = config.get("quantization")
    return f"{q['bits']}-bit (group {q['group_size']})" if q else config.get("dtype", "float32")


def load_hf_folder(folder: Path, source: dict[str, Any]) -> LoadedModel:
    weights, config = convert_folder(folder, source)
    model = build_model(config, weights, str(folder))
    return LoadedModel(model, config, str(folder))


def load_model(name: str = DEFAULT_MODEL, revision: str | None = None) -> LoadedModel:
    """Load a model by folder or Hub id (see the module docstring)."""
    folder = Path(name).expanduser()
    if folder.is_dir():
        if is_mlx_folder(folder):
            return load_mlx_folder(folder)
        if (folder / "config.json").is_file():
            return load_hf_folder(folder, {"path": str(folder.resolve())})
        raise ModelNotFoundError(f"{folder}: folder has no config.json (not a model folder)")
    if folder.exists():
        raise ModelNotFoundError(f"{folder}: is a file; pass a model folder or a Hub repo id")
    if name.startswith((".", "/", "~")) or os.sep in name.strip(os.sep).replace("/", "", 1):
        raise ModelNotFoundError(f"{name}: no such folder")
    snapshot = download(name, revision)
    converted = cache_dir() / name.replace("/", "--") / snapshot.name  # snapshot.name is the commit hash
    if not is_mlx_folder(converted):
        log.info("converting %s@%s once into %s", name, snapshot.name[:8], converted)
        weights, config = convert_folder(snapshot, {"repo": name, "revision": snapshot.name})
        write_mlx_folder(converted, weights, config, force=True)
    loaded = load_mlx_folder(converted)
    loaded.name = name
    return loaded
