"""The mlx-vit model folder: what `convert` writes and `load_model` reads back.

    config.json        a FolderConfig (folder_config.py): the model, labels, preprocessing, dtype, quantization
    manifest.json      {"format": "mlx-vit", "files": {NAME: {"size": ..., "sha256": ...}}, "source": ...}
    model.safetensors  the weights, with the MLX model's names and layouts

Folders are written into a temporary sibling, fsynced and renamed into place only when complete, so a target is
either absent, the old model, or the new one. A folder is read back as untrusted as any checkpoint (it may come
from someone else): every key of config.json, the manifest, the weights' header, names, shapes, dtypes and values
are checked before the model runs.
"""

from __future__ import annotations

import hashlib
import shutil
import time
import uuid
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten

from mlx_vit.config import ViTConfig
from mlx_vit.errors import CheckpointError, ConfigError, MlxVitError, shown
from mlx_vit.files import beside, exists, open_regular, os_reason, plain_name, read_json, sync, write_new
from mlx_vit.model import ViT
from mlx_vit.quantize import layer_settings, packed_kinds

from .folder_config import FORMAT, FolderConfig
from .pos_embed import resample_pos_embed
from .safetensors_io import header_of

MANIFEST = "manifest.json"
WEIGHTS = "model.safetensors"
STALE_SECONDS = 3600


def is_mlx_folder(folder: Path) -> bool:
    try:
        return read_json(folder / "config.json").get("format") == FORMAT
    except MlxVitError:
        return False


def check_manifest(folder: Path) -> None:
    """Refuse a folder whose files are missing or differ in size from what the conversion wrote."""
    path = folder / MANIFEST
    if not exists(path):
        return  # written before manifests existed, or by hand: nothing to check against
    manifest = read_json(path, CheckpointError)
    files = manifest.get("files")
    if not (
        isinstance(files, dict)
        and WEIGHTS in files
        and all(isinstance(e, dict) and type(e.get("size")) is int for e in files.values())
        and all(plain_name(n) for n in files)
    ):
        raise CheckpointError(f"{shown(path)}: malformed; convert the model again with --force")
    for name, entry in files.items():
        file = folder / name
        try:
            size = file.stat().st_size if file.is_file() else None
        except OSError:
            size = None
        if size != entry["size"]:
            raise CheckpointError(f"{shown(file)}: missing or incomplete; convert the model again with --force")


def read_mlx_folder(folder: Path) -> tuple[FolderConfig, dict[str, mx.array]]:
    """(config.json, weights) of an mlx-vit folder, each checked; the weights are evaluated (in memory)."""
    config = FolderConfig.from_dict(read_json(folder / "config.json"), shown(folder / "config.json"))
    check_manifest(folder)
    path = folder / WEIGHTS
    if not exists(path):
        raise CheckpointError(f"{shown(path)}: missing (an incomplete conversion? convert again with --force)")
    with open_regular(path, CheckpointError) as f:
        header, _ = header_of(f, path)  # validates offsets before MLX's loader touches the bytes
        # Names, shapes and dtypes before a byte is loaded: a sparse file can declare gigabytes of anything.
        model, packed = _skeleton(config, header, shown(folder))
        stored = {key: (tuple(entry["shape"]), _stored_kind(entry["dtype"])) for key, entry in header.items()}
        check_tensors(model, packed, stored, shown(folder))
        try:
            # The very file checked, by its descriptor's name (the path could be swapped for a FIFO meanwhile).
            # Not the file object itself: MLX's loader keeps a Python reader alive on its own I/O threads, whose
            # release during interpreter shutdown took the GIL there and aborted the process (exit 134).
            # macOS opens /dev/fd/N as a dup, sharing this file's offset: back to the start for MLX.
            f.seek(0)
            weights = mx.load(f"/dev/fd/{f.fileno()}", format="safetensors")
            mx.eval(list(weights.values()))
        except (RuntimeError, ValueError) as error:
            raise CheckpointError(f"{shown(path)}: unreadable ({shown(str(error), 200)})") from None
    return config, weights


def build_model(config: FolderConfig, weights: dict[str, mx.array], source: str) -> ViT:
    """The model for `config` with `weights`, every name, shape, dtype and value checked.

    Quantized layers are rebuilt from config.quantization. Used before a conversion is written, and on every
    load, so a model that was written can be loaded, and one that loads computes finite numbers.
    """
    model, packed = _skeleton(config, weights, source)
    check_tensors(model, packed, {key: (tuple(v.shape), _kind(v.dtype)) for key, v in weights.items()}, source)
    floats = {key: mx.all(mx.isfinite(value)) for key, value in weights.items() if key not in packed}
    mx.eval(floats)
    for key, finite in floats.items():
        if not finite.item():
            raise CheckpointError(
                f"{source}: tensor '{key}' holds NaN or infinite values (in {_dtype_name(weights[key].dtype)})"
            )
    if config.image_size is not None:  # another input size: the position table resampled once, here
        weights = {**weights, "pos_embed": _resampled(weights["pos_embed"], config)}
        model, _ = _skeleton(config, weights, source, config.runtime)
    model.load_weights(list(weights.items()), strict=True)
    mx.eval(model.parameters())
    return model


def _resampled(pos_embed: mx.array, config: FolderConfig) -> mx.array:
    """The position table for the weights' grid resampled to the runtime's, as the checkpoint's reference does."""
    stored, runtime = config.model, config.runtime
    grid = runtime.image_size // runtime.patch_size
    prefix = 0 if stored.no_embed_class else stored.num_prefix_tokens
    old = stored.image_size // stored.patch_size
    table = np.array(pos_embed.astype(mx.float32))
    table = resample_pos_embed(table, (grid, grid), prefix, old_grid=(old, old), **config.resample)
    return mx.array(table).astype(pos_embed.dtype)


def _skeleton(config: FolderConfig, names, source: str, model_config: ViTConfig | None = None):
    """The (lazy, unevaluated) model `config` describes (or `model_config`) for tensors of these names, and its
    packed weights."""
    model = ViT(model_config or config.model)  # nothing allocated
    quantization = config.quantization or {}
    # Layers stay quantized unless to_float32 expanded them (then their scales are gone).
    layers = {layer for layer in quantization.get("layers", []) if f"{layer}.scales" in names}
    if layers:

        def chosen(path: str, _) -> dict | bool:  # each layer's own bits (a mixed recipe), mode and group size
            return path in layers and layer_settings(quantization, path)

        try:
            nn.quantize(model, class_predicate=chosen)
        except ValueError as error:  # a layer's width its group size does not divide
            reason = shown(str(error), 160)
            raise ConfigError(f"{source}/config.json: the quantization does not fit the model ({reason})") from None
    return model, packed_kinds(quantization, layers)


def check_tensors(model: ViT, packed: dict[str, str], tensors: dict[str, tuple[tuple, str]], source: str) -> None:
    """CheckpointError unless `tensors` ({name: (shape, "float", "uint32" or another dtype)}) are exactly the
    model's parameters, in their shapes, the `packed` ones of their dtype (uint32 quantized weights, uint8
    scales of the float modes) and every other one a float type."""
    expected = dict(tree_flatten(model.parameters()))
    for key in sorted(set(expected) - set(tensors))[:1]:
        raise CheckpointError(f"{source}: the weights lack '{key}', which the model in config.json has")
    for key in sorted(set(tensors) - set(expected))[:1]:
        raise CheckpointError(f"{source}: tensor '{shown(key, 80)}' is not a parameter of the model in config.json")
    for key, (shape, kind) in tensors.items():
        if shape != tuple(expected[key].shape):
            raise CheckpointError(
                f"{source}: tensor '{key}' has shape {shape}, the model takes {tuple(expected[key].shape)}"
            )
        # The quantized kernels would fail mid-batch on a wrong dtype, and integers would compute nonsense.
        wanted = packed.get(key, "float")
        if kind != wanted:
            wanted = {"uint32": "uint32 (packed quantized weights)", "uint8": "uint8 (microscaling scales)"}.get(
                wanted, "a float type"
            )
            raise CheckpointError(f"{source}: tensor '{key}' is {kind}, expected {wanted}")


def _kind(dtype: mx.Dtype) -> str:
    if dtype == mx.uint32:
        return "uint32"
    return "float" if mx.issubdtype(dtype, mx.floating) else _dtype_name(dtype)


def _stored_kind(dtype: str) -> str:
    """A safetensors header's dtype, as _kind names MLX's."""
    if dtype in ("F16", "BF16", "F32", "F64"):
        return "float"
    names = {"BOOL": "bool", "U8": "uint8", "U16": "uint16", "U32": "uint32", "U64": "uint64", "I8": "int8",
             "I16": "int16", "I32": "int32", "I64": "int64"}  # fmt: skip
    return names.get(dtype, dtype)


def _dtype_name(dtype: mx.Dtype) -> str:
    return str(dtype).removeprefix("mlx.core.")


def check_target(target: Path, force: bool) -> None:
    """Refuse to overwrite anything but an mlx-vit model folder (or an empty folder), and that only with force."""
    if not exists(target):
        return
    if not force:
        raise MlxVitError(f"{shown(target)}: already exists; pass --force to replace it")
    if not (is_mlx_folder(target) or (target.is_dir() and not any(target.iterdir()))):
        raise MlxVitError(f"{shown(target)}: exists and is not an mlx-vit model folder; refusing to replace it")


def write_mlx_folder(target: Path, weights: dict, config: FolderConfig, force: bool) -> Path:
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
        raise MlxVitError(f"{shown(target)}: cannot write the model ({os_reason(error)})") from None


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open_regular(path, CheckpointError, follow=False) as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _save_weights(path: Path, weights: dict) -> None:
    arrays = {k: v if isinstance(v, mx.array) else mx.array(v) for k, v in weights.items()}
    try:
        mx.save_safetensors(str(path), arrays, metadata={"format": "mlx"})
    except RuntimeError as error:  # MLX reports a failed write (a full disk, a file size limit) as RuntimeError
        if "write" not in str(error).lower() and "open" not in str(error).lower():
            raise
        raise OSError(f"{shown(str(error), 120).rstrip('.')}; is the disk full?") from None


def _write(target: Path, weights: dict, config: FolderConfig) -> Path:
    import json

    target.parent.mkdir(parents=True, exist_ok=True)
    temporary = beside(target, ".tmp-00000000").name[:-8]  # `.NAME.tmp-` and 8 hex digits
    for stale in target.parent.iterdir():  # left by a killed conversion (not a running one)
        if stale.name.startswith(temporary) and time.time() - stale.lstat().st_mtime > STALE_SECONDS:
            shutil.rmtree(stale, ignore_errors=True)
    tmp = beside(target, f".tmp-{uuid.uuid4().hex[:8]}")
    tmp.mkdir()
    try:
        _save_weights(tmp / WEIGHTS, weights)
        write_new(tmp / "config.json", (json.dumps(config.to_dict(), indent=2, allow_nan=False) + "\n").encode())
        files = {p.name: {"size": p.stat().st_size, "sha256": sha256(p)} for p in sorted(tmp.iterdir())}
        manifest = {"format": FORMAT, "files": files, "source": config.source}
        write_new(tmp / MANIFEST, (json.dumps(manifest, indent=2) + "\n").encode())
        for path in [*tmp.iterdir(), tmp]:
            sync(path)
        if exists(target):
            old = beside(target, f".old-{uuid.uuid4().hex[:8]}")
            target.rename(old)
            tmp.rename(target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(target)
        sync(target.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target
