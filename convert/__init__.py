"""Convert Hugging Face ViT / DeiT checkpoints into mlx-vit model folders (see `mlx_folder` for their layout).

`convert_folder` reads a checkpoint into MLX weights and an mlx-vit config; `convert` builds the model from them
(so what is written can be loaded) and writes the folder.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mlx_vit.errors import MlxVitError, shown
from mlx_vit.files import is_dir
from mlx_vit.hub import download

from .hf import read_hf_checkpoint
from .mlx_folder import (
    FORMAT,
    FORMAT_VERSION,
    build_model,
    check_config,
    check_target,
    is_mlx_folder,
    write_mlx_folder,
)

__all__ = ["FORMAT", "Quantize", "convert", "convert_folder", "is_mlx_folder", "write_mlx_folder"]

log = logging.getLogger("mlx_vit")


@dataclass(frozen=True)
class Quantize:
    bits: int = 4
    group_size: int = 64

    def __post_init__(self):
        from mlx_vit.quantize import BITS, GROUP_SIZES

        if self.bits not in BITS:
            raise MlxVitError(f"--q-bits must be one of {', '.join(map(str, BITS))}, got {self.bits}")
        if self.group_size not in GROUP_SIZES:
            sizes = ", ".join(map(str, GROUP_SIZES))
            raise MlxVitError(f"--q-group-size must be one of {sizes}, got {self.group_size}")


def convert_folder(folder: Path, source: dict[str, Any], quantize: Quantize | None = None,
                   dtype: str = "float32") -> tuple[dict, dict[str, Any]]:  # fmt: skip
    """Read an HF-layout folder into (MLX weights, MLX config.json contents)."""
    from mlx_vit.quantize import DTYPES, cast_weights, quantize_weights

    if dtype not in DTYPES:
        raise MlxVitError(f"--dtype must be one of {', '.join(DTYPES)}, got {shown(dtype, 40, quote=True)}")
    model_config, weights, metadata = read_hf_checkpoint(folder)
    quantization = None
    if quantize:
        weights, quantization = quantize_weights(weights, quantize.bits, quantize.group_size, dtype)
        for layer in quantization["skipped"]:
            log.warning("%s left in %s: its input size is not a multiple of %d", layer, dtype, quantize.group_size)
    else:
        weights = cast_weights(weights, dtype)
    config = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "model": model_config.to_dict(),
        **metadata,
        "dtype": dtype,
        "quantization": quantization,
        "source": source,
    }
    check_config(config, str(folder / "config.json"))  # what load_model will check, checked before writing
    return weights, config


def convert(src: str, mlx_path: str | Path | None = None, force: bool = False, revision: str | None = None,
            quantize: Quantize | None = None, dtype: str = "float32") -> Path:  # fmt: skip
    """Convert a Hub repo id or an HF-layout folder into an MLX model folder; returns the folder."""
    folder = Path(src).expanduser()
    if is_dir(folder):
        source: dict[str, Any] = {"path": str(folder.resolve())}
    else:
        folder = download(src, revision)
        source = {"repo": src, "revision": folder.name}
    target = Path(mlx_path) if mlx_path else Path(f"{Path(src).expanduser().resolve().name or 'model'}-mlx")
    check_target(target, force)  # fail before the slow part
    if target.resolve() == folder.resolve():
        raise MlxVitError(f"{shown(target, None)}: is the checkpoint being converted; choose another output folder")
    log.info("converting %s", shown(src, None))
    weights, config = convert_folder(folder, source, quantize, dtype)
    build_model(config, weights, str(folder))  # what is written must load: names, shapes, dtypes, finite values
    q = config["quantization"]
    if q:
        log.info("quantized %d layers to %d bits (group size %d)", len(q["layers"]), q["bits"], q["group_size"])
    return write_mlx_folder(target, weights, config, force)
