"""Convert Hugging Face ViT / DeiT checkpoints into MLX model folders.

An MLX model folder holds `model.safetensors` (MLX parameter names and layouts), `config.json`:

    {"format": "mlx-vit", "format_version": 1, "model": {...ViTConfig...}, "architecture": ...,
     "id2label": {...}, "problem_type": ..., "preprocessing": {...}, "dtype": "float32",
     "quantization": null or {"bits", "group_size", "mode", "layers", "skipped"},
     "source": {"repo": ..., "revision": ...} or {"path": ...}}

and `manifest.json` with each file's size and sha256. Folders are written into a temporary sibling, fsynced and
renamed into place only when complete, so a target folder is either absent, the old model, or the new one.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mlx_vit.errors import MlxVitError
from mlx_vit.hub import download

from .hf import read_hf_checkpoint

__all__ = ["FORMAT", "Quantize", "convert", "convert_folder", "is_mlx_folder", "write_mlx_folder"]

FORMAT = "mlx-vit"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
STALE_SECONDS = 3600
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


def is_mlx_folder(folder: Path) -> bool:
    try:
        return json.loads((folder / "config.json").read_text()).get("format") == FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_mlx_folder(target: Path, weights: dict, config: dict[str, Any], force: bool) -> Path:
    """Write weights, config and manifest into a temporary sibling of `target`, then rename it into place.

    An existing target is refused unless `force`; with `force` the old folder is kept until the new one is
    complete, then swapped out. An interrupted write leaves at most a hidden `.NAME.tmp-*` sibling, which
    later writes to the same target remove once it is an hour old.
    """
    target = Path(target)
    check_target(target, force)
    try:
        return _write(target, weights, config)
    except OSError as error:  # disk full, read-only or missing location: one line naming the target
        raise MlxVitError(f"{target}: cannot write the model ({error.strerror or error})") from None


def check_target(target: Path, force: bool) -> None:
    """Refuse to overwrite anything but an mlx-vit model folder (or an empty folder), and that only with force."""
    if not target.exists() and not target.is_symlink():
        return
    if not force:
        raise MlxVitError(f"{target}: already exists; pass --force to replace it")
    if not (is_mlx_folder(target) or (target.is_dir() and not any(target.iterdir()))):
        raise MlxVitError(f"{target}: exists and is not an mlx-vit model folder; refusing to replace it")


def _write(target: Path, weights: dict, config: dict[str, Any]) -> Path:
    import mlx.core as mx

    target.parent.mkdir(parents=True, exist_ok=True)
    for stale in target.parent.glob(f".{target.name}.tmp-*"):  # left by a killed conversion (not a running one)
        if time.time() - stale.stat().st_mtime > STALE_SECONDS:
            shutil.rmtree(stale, ignore_errors=True)
    tmp = target.parent / f".{target.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        arrays = {k: v if isinstance(v, mx.array) else mx.array(v) for k, v in weights.items()}
        mx.save_safetensors(str(tmp / "model.safetensors"), arrays, metadata={"format": "mlx"})
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        files = {p.name: {"size": p.stat().st_size, "sha256": sha256(p)} for p in sorted(tmp.iterdir())}
        manifest = {"format": FORMAT, "files": files, "source": config.get("source")}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        for path in [*tmp.iterdir(), tmp]:
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


def check_manifest(folder: Path) -> None:
    """Refuse a folder whose files are missing or differ in size from what the conversion wrote."""
    try:
        files = json.loads((folder / MANIFEST).read_text())["files"]
        expected = {name: int(entry["size"]) for name, entry in files.items()}
    except FileNotFoundError:
        return  # written before manifests existed, or by hand: nothing to check against
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        raise MlxVitError(f"{folder}/{MANIFEST}: unreadable; convert the model again with --force") from None
    for name, size in expected.items():
        path = folder / name
        if not path.is_file() or path.stat().st_size != size:
            raise MlxVitError(f"{path}: missing or incomplete; convert the model again with --force")


def convert_folder(folder: Path, source: dict[str, Any], quantize: Quantize | None = None,
                   dtype: str = "float32") -> tuple[dict, dict[str, Any]]:  # fmt: skip
    """Read an HF-layout folder into (MLX weights, MLX config.json contents)."""
    from mlx_vit.quantize import DTYPES, cast_weights, quantize_weights

    if dtype not in DTYPES:
        raise MlxVitError(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
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
    return weights, config


def convert(src: str, mlx_path: str | Path | None = None, force: bool = False, revision: str | None = None,
            quantize: Quantize | None = None, dtype: str = "float32") -> Path:  # fmt: skip
    """Convert a Hub repo id or an HF-layout folder into an MLX model folder; returns the folder."""
    folder = Path(src).expanduser()
    if folder.is_dir():
        source: dict[str, Any] = {"path": str(folder.resolve())}
    else:
        folder = download(src, revision)
        source = {"repo": src, "revision": folder.name}
    target = Path(mlx_path) if mlx_path else Path(f"{Path(src).expanduser().resolve().name or 'model'}-mlx")
    check_target(target, force)  # fail before the slow part
    if target.resolve() == folder.resolve():
        raise MlxVitError(f"{target}: is the checkpoint being converted; choose another output folder")
    log.info("converting %s", src)
    weights, config = convert_folder(folder, source, quantize, dtype)
    q = config["quantization"]
    if q:
        log.info("quantized %d layers to %d bits (group size %d)", len(q["layers"]), q["bits"], q["group_size"])
    return write_mlx_folder(target, weights, config, force)
