"""The PyTorch model `bench` times mlx-vit against: transformers' or timm's, with the weights mlx-vit loads where
they can be found, at the input size mlx-vit runs the model at. Imported only by bench's torch and ONNX workers.
"""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any

from mlx_vit.convert import FolderConfig, is_mlx_folder
from mlx_vit.errors import MlxVitError, shown
from mlx_vit.files import read_json


def reference_model(name: str, image_size: int) -> tuple[Any, bool]:
    """(a torch module: NCHW pixels -> logits, or pooled features for a model without a head; whether its
    weights are the ones mlx-vit loads)."""
    folder, same, converted = _source(name)
    architecture = (converted.architecture if converted else None) or ""
    if folder is not None and (folder.is_file() or architecture.startswith("timm:") or _is_timm(folder)):
        return _timm_model(folder, converted, image_size), same
    if folder is not None:
        import transformers

        config = read_json(folder / "config.json")
        cls = getattr(transformers, (config.get("architectures") or ["AutoModelForImageClassification"])[0])
        return _pixels_only(cls.from_pretrained(folder).eval(), image_size), same
    return _random_model(converted, architecture, image_size), False


def _is_timm(folder: Path) -> bool:
    config = read_json(folder / "config.json")
    return "architecture" in config and "model_type" not in config


def _source(name: str) -> tuple[Path | None, bool, FolderConfig | None]:
    """The checkpoint holding `name`'s weights (a folder or a file), whether they are the weights mlx-vit uses,
    and `name`'s mlx-vit config.json if it is a converted folder."""
    path = Path(name).expanduser()
    if path.is_file():
        return path, True, None
    if not path.is_dir():
        from mlx_vit.hub import download

        return download(name), True, None
    if not is_mlx_folder(path):
        return path, True, None
    config = FolderConfig.from_dict(read_json(path / "config.json"), shown(path / "config.json"))
    source = config.source or {}
    if source.get("path") and Path(source["path"]).exists():
        return Path(source["path"]), True, config
    if source.get("repo"):
        try:
            from mlx_vit.hub import download

            return download(source["repo"], source.get("revision")), True, config
        except MlxVitError:
            pass
    return None, False, config


def _timm_model(path: Path, converted: FolderConfig | None, image_size: int) -> Any:
    """timm's model at `image_size` (its checkpoint filter resamples the position table, as timm does)."""
    import timm

    if path.is_dir():
        return timm.create_model(f"local-dir:{path}", pretrained=True, img_size=image_size).eval()
    if converted is None:
        raise MlxVitError(f"{path}: bench compares a bare weight file after `mlx-vit convert FILE --arch ...`")
    name = (converted.architecture or "").removeprefix("timm:")
    classes = converted.model.num_labels
    overlay = {"file": str(path), "num_classes": classes, "custom_load": path.suffix == ".npz"}
    return timm.create_model(name, pretrained=True, pretrained_cfg_overlay=overlay, num_classes=classes,
                             img_size=image_size).eval()  # fmt: skip


def _random_model(converted: FolderConfig, architecture: str, image_size: int) -> Any:
    """The architecture with random weights, for timing only: an mlx-vit folder whose checkpoint is gone."""
    import transformers

    if architecture.startswith("timm:"):
        import timm

        classes = converted.model.num_labels
        return timm.create_model(architecture.removeprefix("timm:"), num_classes=classes, img_size=image_size).eval()
    if not architecture.startswith(("ViT", "DeiT")):
        raise MlxVitError(f"bench: the checkpoint {architecture} was converted from is gone; pass it with -m")
    fields = {k: v for k, v in converted.model.to_dict().items() if k in transformers.ViTConfig().to_dict()}
    config_class = transformers.DeiTConfig if architecture.startswith("DeiT") else transformers.ViTConfig
    model = getattr(transformers, architecture)(config_class(**{**fields, "image_size": image_size}))
    return _pixels_only(model.eval(), image_size)


def _pixels_only(model: Any, image_size: int) -> Any:
    """A transformers model as a module of pixels only, its position table interpolated where it needs it."""
    import torch

    sizes = model.config.image_size
    interpolate = "interpolate_pos_encoding" in inspect.signature(model.forward).parameters and sizes != image_size

    class Logits(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, pixel_values):
            kwargs = {"interpolate_pos_encoding": True} if interpolate else {}
            output = self.model(pixel_values=pixel_values, **kwargs)
            return output.logits if hasattr(output, "logits") else output.last_hidden_state[:, 0]  # mlx-vit's "token"

    return Logits().eval()
