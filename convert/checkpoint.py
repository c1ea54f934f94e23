"""The format seam: one `read_checkpoint(path)` for every checkpoint layout mlx-vit reads.

Each format is a module in this folder with `NAME`, `LOOKS_FOR` (what `detect` looks for in a folder, in a
file), `detect(source)` and `read(source)`. The first module whose `detect` recognises the source reads it;
adding a format means adding a module to FORMATS.
"""

from __future__ import annotations

from pathlib import Path

from mlx_vit.errors import CheckpointError, ConfigError, MlxVitError, shown
from mlx_vit.files import exists, is_dir, read_json

from . import jax_npz, timm_vit, transformers_dinov2, transformers_vit
from .common import Checkpoint, Source

FORMATS = (transformers_vit, transformers_dinov2, timm_vit, jax_npz)


def open_source(path: Path, arch: str | None = None) -> Source:
    """A folder (with its config.json read) or a file; --arch is for bare weight files only."""
    if arch is not None and not isinstance(arch, str):
        raise MlxVitError(f"--arch must be a timm model name, got {shown(arch, 60, quote=True)}")
    if is_dir(path):
        if not exists(path / "config.json"):
            raise CheckpointError(f"{shown(path)}: folder has no config.json (not a checkpoint folder)")
        if arch is not None:
            raise MlxVitError(f"{shown(path)}: --arch is for bare weight files; this folder's config.json "
                              "names its architecture")  # fmt: skip
        return Source(path, config=read_json(path / "config.json"))
    if not exists(path):
        raise CheckpointError(f"{shown(path)}: no such file or folder")
    return Source(path, arch=arch)


def read_checkpoint(path: str | Path, arch: str | None = None) -> Checkpoint:
    """Read any supported checkpoint into the MLX model's names and layouts; each reader checks every tensor
    finite as read, and build_model the model's weights once more (after layout fixes, in the stored dtype)."""
    source = open_source(Path(path), arch)
    for candidate in FORMATS:
        if candidate.detect(source):
            return candidate.read(source)
    kind = "folder" if source.is_folder else "file"
    tried = "; ".join(f"{f.NAME} ({f.LOOKS_FOR[kind]})" for f in FORMATS if kind in f.LOOKS_FOR)
    if source.is_folder:  # config.json's fault
        model_type = shown(source.config.get("model_type"), 40, quote=True)
        raise ConfigError(f"{shown(source.path / 'config.json')}: model_type {model_type} is not supported; "
                          f"mlx-vit reads {tried}")  # fmt: skip
    raise CheckpointError(f"{source.name}: not a weight file mlx-vit reads; it reads {tried}")
