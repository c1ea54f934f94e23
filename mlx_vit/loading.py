"""Turn a model name into a loaded MLX model.

A name is an MLX model folder (from `mlx-vit convert`), a checkpoint folder or a bare weight file with its timm
architecture (converted in memory), `random:NAME` (a preset architecture with seeded random weights, offline; see
mlx_vit.presets), or a Hub repo id: downloaded once into the standard HF cache, converted once
into mlx-vit's cache, reused afterwards, also offline: the cache remembers which commit each revision named.
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

from mlx_vit import presets, runtime
from mlx_vit.choice import DEFAULT_MODEL
from mlx_vit.convert import FORMAT, FolderConfig, convert_folder, is_mlx_folder, write_mlx_folder
from mlx_vit.convert.mlx_folder import build_model, read_mlx_folder
from mlx_vit.errors import CheckpointError, MlxVitError, ModelNotFoundError, shown
from mlx_vit.files import exists, is_dir, read_json, read_limited, replace_together
from mlx_vit.hub import HubUnreachableError, download
from mlx_vit.model import ViT
from mlx_vit.preprocess import PreprocessConfig
from mlx_vit.quantize import to_float32

log = logging.getLogger("mlx_vit")


@dataclass
class LoadedModel:
    model: ViT
    config: FolderConfig  # the MLX folder's config.json, or the checkpoint's as convert would write it
    name: str
    runtime_dtype: str = "float32"  # what the weights are in memory: float32 where the CPU expanded them


def cache_dir() -> Path:
    """Where Hub models are kept after conversion (MLX_VIT_CACHE overrides)."""
    if os.environ.get("MLX_VIT_CACHE"):
        return Path(os.environ["MLX_VIT_CACHE"]).expanduser()
    from platformdirs import user_cache_dir

    return Path(user_cache_dir("mlx-vit")) / "models"


def load_mlx_folder(folder: Path, image_size: int | None = None) -> LoadedModel:
    """An mlx-vit folder, its weights as the runtime plan decided here needs them (float32 on the CPU)."""
    config, weights = read_mlx_folder(folder)
    config = config.at_image_size(image_size, shown(folder / "config.json"))
    dtype = config.dtype
    if runtime.adopt().cpu and (config.quantization or dtype != "float32"):
        # MLX's CPU quantized/half matmuls are scalar loops, ~15-30x slower than float32 with a real BLAS.
        log.info("%s: %s weights expanded to float32 for the CPU (the file stays small)", shown(folder),
                 config.describe())  # fmt: skip
        try:
            weights = to_float32(weights, config.quantization)
        except (CheckpointError, ValueError) as error:
            raise CheckpointError(f"{shown(folder / 'model.safetensors')}: {shown(str(error), 200)}") from None
        dtype = "float32"
    model = build_model(config, weights, shown(folder))
    return LoadedModel(model, config, str(folder), runtime_dtype=dtype)


def load_checkpoint(path: Path, image_size: int | None = None, arch: str | None = None) -> LoadedModel:
    """A checkpoint folder or bare weight file of any supported format, converted in memory."""
    weights, config = convert_folder(path, {"path": str(path.resolve())}, arch=arch, image_size=image_size)
    model = build_model(config, weights, shown(path))
    runtime.adopt()  # float32, as converted: nothing to expand
    return LoadedModel(model, config, str(path))


def load_random(name: str, image_size: int | None = None) -> LoadedModel:
    """`random:NAME`: the preset's ViT with MLX's initialization seeded (presets.SEED), google/vit's preprocessing
    and ImageNet-1k's labels, so that every command runs offline; its predictions mean nothing."""
    import mlx.core as mx
    from mlx.utils import tree_flatten

    from mlx_vit.config import ViTConfig
    from mlx_vit.convert.timm_vit import imagenet_labels

    architecture = ViTConfig(**presets.PRESETS[presets.preset(name)])
    mx.random.seed(presets.SEED)
    weights = dict(tree_flatten(ViT(architecture).parameters()))
    config = FolderConfig(architecture, PreprocessConfig(), imagenet_labels()).at_image_size(image_size, name)
    model = build_model(config, weights, name)
    runtime.adopt()  # float32, as built: nothing to expand
    log.info("%s: random weights (seed %d), for trying mlx-vit offline; its predictions mean nothing", name,
             presets.SEED)  # fmt: skip
    return LoadedModel(model, config, name)


def load_model(name: str = DEFAULT_MODEL, revision: str | None = None, image_size: int | None = None,
               arch: str | None = None) -> LoadedModel:  # fmt: skip
    """Load a model by folder, weight file (with `arch`, a timm name) or Hub id (see the module docstring).

    `image_size` runs it at another square input size (position embeddings resampled once, here). How the
    model runs on this device (mlx_vit.runtime) is decided as it is loaded.
    """
    if presets.is_random(name):
        if arch is not None:
            raise ModelNotFoundError(f"{shown(name, 100)}: --arch is for bare weight files")
        return load_random(name, image_size)
    folder = Path(name).expanduser()
    if is_dir(folder):
        if not exists(folder / "config.json"):
            raise ModelNotFoundError(f"{shown(folder)}: folder has no config.json (not a model folder)")
        if read_json(folder / "config.json").get("format") == FORMAT:
            if arch is not None:
                raise ModelNotFoundError(f"{shown(folder)}: --arch is for bare weight files")
            return load_mlx_folder(folder, image_size)
        return load_checkpoint(folder, image_size, arch)
    if exists(folder):
        return load_checkpoint(folder, image_size, arch)
    if name.startswith((".", "/", "~")) or os.sep in name.strip(os.sep).replace("/", "", 1):
        raise ModelNotFoundError(f"{shown(name)}: no such folder")
    try:
        snapshot = download(name, revision)
    except HubUnreachableError:
        converted = converted_offline(name, revision)
        if converted is None:
            raise
        log.info("%s: the Hub cannot be reached; using the copy converted from %s", name, converted.name[:8])
    else:
        converted = _cached(name, snapshot.name)  # snapshot.name is the commit hash
        if not is_mlx_folder(converted):
            log.info("converting %s@%s once into %s", name, snapshot.name[:8], converted)
            weights, config = convert_folder(snapshot, {"repo": name, "revision": snapshot.name}, arch=arch)
            build_model(config, weights, str(snapshot))
            write_mlx_folder(converted, weights, config, force=True)
        _remember(converted.parent, revision, snapshot.name)
    loaded = load_mlx_folder(converted, image_size)
    loaded.name = name
    return loaded


def _cached(name: str, commit: str | None = None) -> Path:
    """A repository's folder in mlx-vit's cache (or its commit's), with no symbolic link on the way there: the cache
    holds only what mlx-vit wrote, and a planted link would send a conversion somewhere else."""
    repo = cache_dir() / name.replace("/", "--")
    for path in (repo, repo / "refs", *([repo / commit] if commit else [])):
        if os.path.islink(path):
            raise ModelNotFoundError(f"{shown(path)}: is a symbolic link; mlx-vit's cache holds only what it wrote "
                                     "(remove it)")  # fmt: skip
    return repo / commit if commit else repo


def _remember(repo: Path, revision: str | None, commit: str) -> None:
    """Which commit `revision` (None: main) named when last seen, as the HF cache's refs/ does, for offline use."""
    ref = repo / "refs" / (revision or "main")
    if revision == commit or _recorded(ref) == commit or os.path.islink(ref):
        return
    try:
        ref.parent.mkdir(parents=True, exist_ok=True)
        replace_together([(ref, [commit.encode()])])
    except (OSError, MlxVitError) as error:  # the model still loads; only the offline fallback is lost
        log.debug("cannot record %s: %s", ref, error)


def _recorded(ref: Path) -> str | None:
    """The commit a ref file names, or None: missing, unreadable, or not a commit hash."""
    try:
        commit = read_limited(ref, 100, ModelNotFoundError, follow=False).decode().strip() if exists(ref) else None
    except (ModelNotFoundError, UnicodeDecodeError):
        return None
    return commit if commit and re.fullmatch(r"[0-9a-f]{40}", commit) else None


def converted_offline(name: str, revision: str | None) -> Path | None:
    """The MLX folder converted from `name` at `revision` (None: main) when it was last reachable, if any."""
    repo = _cached(name)
    commit = revision if revision and re.fullmatch(r"[0-9a-f]{40}", revision) else None
    commit = commit or _recorded(repo / "refs" / (revision or "main"))
    if commit is None:
        return None
    folder = _cached(name, commit)
    return folder if is_mlx_folder(folder) else None
