"""Convert ViT checkpoints (transformers, timm, JAX .npz: see `checkpoint`) into mlx-vit model folders.

`convert_folder` reads a checkpoint into MLX weights and an mlx-vit config; `convert` builds the model from them
(so what is written can be loaded) and writes the folder (see `mlx_folder` for its layout).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mlx_vit import presets
from mlx_vit.errors import MlxVitError, shown
from mlx_vit.files import exists, is_dir
from mlx_vit.hub import download

from . import jax_npz, timm_vit
from .checkpoint import FORMATS, open_source, read_checkpoint
from .folder_config import FORMAT, FORMAT_VERSION, FolderConfig
from .mlx_folder import build_model, check_target, is_mlx_folder, write_mlx_folder

__all__ = ["FORMAT", "FolderConfig", "Quantize", "convert", "convert_folder", "is_mlx_folder", "write_mlx_folder"]

log = logging.getLogger("mlx_vit")


@dataclass(frozen=True)
class Quantize:
    """Quantization settings: `mode` affine (any of BITS and GROUP_SIZES) or mxfp4 / nvfp4 / mxfp8 (their own
    bits and group size); `recipe` (affine only) gives some layers other bits (quantize.RECIPES)."""

    bits: int = 4
    group_size: int = 64
    mode: str = "affine"
    recipe: str | None = None

    @classmethod
    def of(cls, bits: int | None = None, group_size: int | None = None, mode: str = "affine",
           recipe: str | None = None) -> Quantize:  # fmt: skip
        """With the mode's own defaults for what is not given (affine: 4 bits, groups of 64)."""
        from mlx_vit.quantize import MODES

        allowed_bits, allowed_sizes = MODES.get(mode, ((4,), (64,)))
        default_bits = 4 if 4 in allowed_bits else allowed_bits[0]
        default_size = 64 if 64 in allowed_sizes else allowed_sizes[0]
        return cls(bits or default_bits, group_size or default_size, mode, recipe)

    def __post_init__(self):
        from mlx_vit.quantize import MODES, RECIPES

        if self.mode not in MODES:
            raise MlxVitError(f"--q-mode must be one of {', '.join(MODES)}, got {shown(self.mode, 40, quote=True)}")
        bits, sizes = MODES[self.mode]
        if self.bits not in bits:
            raise MlxVitError(f"--q-bits must be one of {', '.join(map(str, bits))} with {self.mode}, got {self.bits}")
        if self.group_size not in sizes:
            sizes = ", ".join(map(str, sizes))
            raise MlxVitError(f"--q-group-size must be one of {sizes} with {self.mode}, got {self.group_size}")
        if self.recipe is not None and (self.recipe not in RECIPES or self.mode != "affine"):
            raise MlxVitError(f"--quant-predicate must be one of {', '.join(RECIPES)}, with --q-mode affine")


def convert_folder(folder: Path, source: dict[str, Any], quantize: Quantize | None = None, dtype: str = "float32",
                   arch: str | None = None, image_size: int | None = None) -> tuple[dict, FolderConfig]:  # fmt: skip
    """Read a checkpoint (folder or file, any format in checkpoint.FORMATS) into (MLX weights, its config), the
    config checked as loading will check it."""
    from mlx_vit.quantize import DTYPES, cast_weights, quantize_weights

    if dtype not in DTYPES:
        raise MlxVitError(f"--dtype must be one of {', '.join(DTYPES)}, got {shown(dtype, 40, quote=True)}")
    checkpoint = read_checkpoint(folder, arch)
    weights, quantization = checkpoint.weights, None
    if quantize:
        weights, quantization = quantize_weights(weights, quantize.bits, quantize.group_size, dtype,
                                                 mode=quantize.mode, recipe=quantize.recipe)  # fmt: skip
        for layer in quantization["skipped"]:
            log.warning("%s left in %s: its input size is not a multiple of %d", layer, dtype, quantize.group_size)
    else:
        weights = cast_weights(weights, dtype)
    config = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "model": checkpoint.config.to_dict(),
        "architecture": checkpoint.architecture,
        "id2label": checkpoint.id2label,
        "problem_type": checkpoint.extra.get("problem_type"),
        "preprocessing": checkpoint.preprocessing,
        "pos_embed_resample": checkpoint.resample,
        "dtype": dtype,
        "quantization": quantization,
        "source": source,
    }
    if checkpoint.image_size not in (None, checkpoint.config.image_size):  # DINOv2: a 518-px table, 224-px crops
        config["image_size"] = checkpoint.image_size
    return weights, FolderConfig.from_dict(config, shown(folder)).at_image_size(image_size, shown(folder))


def convert(src: str, mlx_path: str | Path | None = None, force: bool = False, revision: str | None = None,
            quantize: Quantize | None = None, dtype: str = "float32", arch: str | None = None,
            image_size: int | None = None) -> Path:  # fmt: skip
    """Convert a Hub repo id, a checkpoint folder or a bare weight file (with `arch`) into an MLX model folder.

    `image_size` runs the model at another square input size: its position embeddings are resampled at load
    time the way the checkpoint's reference does, and its preprocessing scaled to match. Returns the folder.
    """
    folder = Path(src).expanduser()
    if is_dir(folder) or exists(folder):
        source: dict[str, Any] = {"path": str(folder.resolve())}
    elif presets.is_random(src):  # the Hub's refusal named `-m random:...` as what to try, for this very name
        raise MlxVitError(f"{shown(src, 100)}: a random: model has no checkpoint to convert; give it to classify, "
                          "embed, search or explain with -m")  # fmt: skip
    else:
        folder = download(src, revision)
        source = {"repo": src, "revision": folder.name}
    named = Path(src).expanduser().resolve()
    target = Path(mlx_path) if mlx_path else Path(f"{(named.name if is_dir(named) else named.stem) or 'model'}-mlx")
    if "path" in source and not is_dir(folder):  # a bare weight file is nothing without --arch: say that first
        bare = open_source(folder, arch)
        if any(f.detect(bare) for f in FORMATS):
            timm_vit.bare_architecture(bare, "a JAX .npz" if jax_npz.detect(bare) else "a bare weight file")
    check_target(target, force)  # fail before the slow part
    if target.resolve() == folder.resolve():
        raise MlxVitError(f"{shown(target)}: is the checkpoint being converted; choose another output folder")
    log.info("converting %s", shown(src))
    weights, config = convert_folder(folder, source, quantize, dtype, arch, image_size)
    build_model(config, weights, str(folder))  # what is written must load: names, shapes, dtypes, finite values
    q = config.quantization
    if q:
        eights = len(q.get("bits_of", {}))
        mixed = f", {eights} of them (attention) to 8" if eights else ""
        log.info("quantized %d layers to %d bits%s (%s, group size %d)", len(q["layers"]), q["bits"], mixed,
                 q["mode"], q["group_size"])  # fmt: skip
    return write_mlx_folder(target, weights, config, force)
