"""Convert Hugging Face ViT / DeiT checkpoints into MLX model folders.

An MLX model folder holds `model.safetensors` (MLX parameter names and layouts) and `config.json`:

    {"format": "mlx-vit", "format_version": 1, "model": {...ViTConfig...}, "architecture": ...,
     "id2label": {...}, "problem_type": ..., "preprocessing": {...}, "dtype": "float32",
     "quantization": null, "source": {"repo": ..., "revision": ...}}

Folders are written into a temporary sibling and renamed into place only when complete.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import uuid
from pathlib import Path
from typing import Any

import numpy as np

from mlx_vit.errors import MlxVitError
from mlx_vit.hub import download

from .hf import read_hf_checkpoint

__all__ = ["FORMAT", "convert", "convert_folder", "is_mlx_folder", "write_mlx_folder"]

FORMAT = "mlx-vit"
FORMAT_VERSION = 1
log = logging.getLogger("mlx_vit")


def is_mlx_folder(folder: Path) -> bool:
    try:
        return json.loads((folder / "config.json").read_text()).get("format") == FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_mlx_folder(target: Path, weights: dict[str, np.ndarray], config: dict[str, Any], force: bool) -> Path:
    """Write weights and config into a temporary sibling of `target`, then rename it into place.

    An existing target is refused unless `force`; with `force` the old folder is kept until the new one is
    complete, then swapped out. An interrupted write leaves only a hidden `.NAME.tmp-*` sibling.
    """
    import mlx.core as mx

    target = Path(target)
    if target.exists() and not force:
        raise MlxVitError(f"{target}: already exists; pass --force to replace it")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".{target.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        mx.save_safetensors(str(tmp / "model.safetensors"), {k: mx.array(v) for k, v in weights.items()},
                            metadata={"format": "mlx"})  # fmt: skip
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        for path in (tmp / "model.safetensors", tmp / "config.json", tmp):
            _fsync(path)
        if target.exists():
            old = target.parent / f".{target.name}.old-{uuid.uuid4().hex[:8]}"
            target.rename(old)
            tmp.rename(target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(target)
        _fsync(target.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def convert_folder(folder: Path, source: dict[str, Any]) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Read an HF-layout folder into (MLX weights, MLX config.json contents)."""
    model_config, weights, metadata = read_hf_checkpoint(folder)
    weights = {k: v.astype(np.float32) if v.dtype.kind == "f" else v for k, v in weights.items()}
    config = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "model": model_config.to_dict(),
        **metadata,
        "dtype": "float32",
        "quantization": None,
        "source": source,
    }
    return weights, config


def convert(src: str, mlx_path: str | Path | None = None, force: bool = False,
            revision: str | None = None) -> Path:  # fmt: skip
    """Convert a Hub repo id or an HF-layout folder into an MLX model folder; returns the folder."""
    folder = Path(src).expanduser()
    if folder.is_dir():
        source: dict[str, Any] = {"path": str(folder.resolve())}
    else:
        folder = download(src, revision)
        source = {"repo": src, "revision": folder.name}
    target = Path(mlx_path) if mlx_path else Path(f"{Path(src).name}-mlx")
    if target.exists() and not force:  # fail before the slow part
        raise MlxVitError(f"{target}: already exists; pass --force to replace it")
    log.info("converting %s", src)
    weights, config = convert_folder(folder, source)
    return write_mlx_folder(target, weights, config, force)
