"""An mlx-vit model folder's config.json as one typed value: `FolderConfig.from_dict` parses and checks it once
when a folder is read, `to_dict` is what `convert` writes.

    {"format": "mlx-vit", "format_version": 1, "model": {...ViTConfig...}, "architecture": ...,
     "id2label": {"0": ...}, "problem_type": ..., "preprocessing": {...}, "pos_embed_resample": {...},
     "dtype": "float32", "quantization": null or {"bits", "group_size", "mode", "layers", "skipped"},
     "source": {"repo": ..., "revision": ...} or {"path": ...},
     "image_size": N (only where the model runs at another size than its weights')}

A folder may come from someone else: every key is checked, and one convert could not have written is refused.
A second part (a text tower, a head naming its backbone) is one more key here, checked and typed the same way.
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field
from typing import Any

from mlx_vit.config import ViTConfig
from mlx_vit.errors import ConfigError, shown
from mlx_vit.preprocess import PreprocessConfig
from mlx_vit.quantize import check_stored_format

from .common import TRANSFORMERS_RESAMPLE
from .pos_embed import INTERPOLATIONS

FORMAT = "mlx-vit"
FORMAT_VERSION = 1
PROBLEM_TYPES = (None, "single_label_classification", "multi_label_classification", "regression")
_REQUIRED = {"format", "format_version", "model", "id2label", "preprocessing", "dtype", "quantization"}
_OPTIONAL = {"architecture", "problem_type", "source", "image_size", "pos_embed_resample"}


@dataclass(frozen=True)
class FolderConfig:
    model: ViTConfig  # the model the weights are for
    preprocessing: PreprocessConfig  # pixels as the model runs, at `image_size`
    labels: tuple[str, ...] = ()  # the class names, by class id
    dtype: str = "float32"  # how the weights are stored
    quantization: dict[str, Any] | None = None  # quantize_weights' record of the quantized layers
    problem_type: str | None = None  # transformers' name for how the logits are scored
    architecture: str | None = None  # what the weights were read as ("timm:NAME", a transformers class)
    source: dict[str, Any] | None = None  # {"repo", "revision"} or {"path"} of the checkpoint
    image_size: int | None = None  # the size the model runs at, when not its weights' (pos_embed resampled at load)
    resample: dict[str, Any] = field(default_factory=lambda: dict(TRANSFORMERS_RESAMPLE))  # how, then

    @property
    def runtime(self) -> ViTConfig:
        """The model that runs: `model` at `image_size`."""
        return _at_size(self.model, self.image_size)

    @property
    def multi_label(self) -> bool:
        """Scores are sigmoids, not a softmax: transformers' image-classification pipeline's rule."""
        return self.problem_type == "multi_label_classification" or len(self.labels) == 1

    @property
    def regression(self) -> bool:
        return self.problem_type == "regression"

    def describe(self) -> str:
        """'4-bit (group 64)', 'float16', ... as the weights are stored."""
        q = self.quantization
        return f"{q['bits']}-bit (group {q['group_size']})" if q else self.dtype

    @classmethod
    def from_dict(cls, values: Any, source: str) -> FolderConfig:
        """ConfigError unless `values` is a config.json `convert` could have written, in every key. Keys an older
        mlx-vit did not write take their defaults; keys it never writes are refused."""

        def fail(message: str) -> None:
            raise ConfigError(f"{source}: {message}")

        if not isinstance(values, dict):
            fail("must be a JSON object")
        unknown = set(values) - _REQUIRED - _OPTIONAL
        if unknown:
            fail(f"unknown key '{shown(sorted(unknown)[0], 60)}' (not written by mlx-vit convert)")
        missing = _REQUIRED - set(values)
        if missing:
            fail(f"missing key '{sorted(missing)[0]}'; convert the model again")
        if values["format"] != FORMAT or values["format_version"] != FORMAT_VERSION:
            fail(f"not an mlx-vit model folder of format version {FORMAT_VERSION}; convert the model again")
        if not isinstance(values["model"], dict):
            fail("model must be an object")
        names = {f.name for f in dataclasses.fields(ViTConfig)}
        if set(values["model"]) - names:
            fail(f"model has unknown key '{shown(sorted(set(values['model']) - names)[0], 60)}'")
        model = ViTConfig.from_dict(values["model"], source)  # the model the weights are for
        size = _run_size(model, values.get("image_size", model.image_size), source)
        preprocessing = PreprocessConfig.from_dict(values["preprocessing"], source)
        _check_input_size(preprocessing, _at_size(model, size), source)
        resample = values.get("pos_embed_resample", TRANSFORMERS_RESAMPLE)
        known = isinstance(resample, dict) and set(resample) == {"interpolation", "antialias"}
        if not (known and resample["interpolation"] in INTERPOLATIONS and isinstance(resample["antialias"], bool)):
            fail(f"pos_embed_resample must be {{\"interpolation\": one of {', '.join(INTERPOLATIONS)}, "
                 "\"antialias\": true or false}")  # fmt: skip
        id2label = values["id2label"]
        expected = [str(i) for i in range(model.num_labels)]
        if not (isinstance(id2label, dict) and all(isinstance(v, str) for v in id2label.values())):
            fail("id2label must map class ids to label names")
        if sorted(id2label, key=lambda k: (len(k), k)) != expected:
            wrong = next((k for k in id2label if k not in expected), None)
            detail = f"has '{shown(wrong, 40)}'" if wrong is not None else f"lacks class {len(id2label)}"
            fail(f"id2label must name classes 0 to {model.num_labels - 1}, one each ({detail})")
        if values.get("problem_type") not in PROBLEM_TYPES:
            fail(f"problem_type {shown(values.get('problem_type'), 60, quote=True)} is not one transformers knows")
        if values.get("architecture") is not None and not isinstance(values["architecture"], str):
            fail("architecture must be a string")
        source_entry = values.get("source")
        if source_entry is not None and not isinstance(source_entry, dict):
            fail("source must be an object")
        check_stored_format(values, source)
        return cls(
            model,
            preprocessing,
            labels=tuple(id2label[k] for k in expected),
            dtype=values["dtype"],
            quantization=values["quantization"],
            problem_type=values.get("problem_type"),
            architecture=values.get("architecture"),
            source=source_entry,
            image_size=size,
            resample=dict(resample),
        )

    def to_dict(self) -> dict[str, Any]:
        """config.json, as from_dict reads it back."""
        values = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "model": self.model.to_dict(),
            "architecture": self.architecture,
            "id2label": {str(i): label for i, label in enumerate(self.labels)},
            "problem_type": self.problem_type,
            "preprocessing": self.preprocessing.to_dict(),
            "pos_embed_resample": dict(self.resample),
            "dtype": self.dtype,
            "quantization": copy.deepcopy(self.quantization),  # copies: the config stays as it is
            "source": copy.deepcopy(self.source),
        }
        if self.image_size is not None:
            values["image_size"] = self.image_size
        return values

    def at_image_size(self, size: int | None, source: str) -> FolderConfig:
        """The model run at `size` (--image-size; None: as it is), its preprocessing scaled as the checkpoint's
        reference scales it."""
        if size is None:
            return self
        preprocessing = self.preprocessing.at_size(size)
        size = _run_size(self.model, size, source)
        _check_input_size(preprocessing, _at_size(self.model, size), source)
        return dataclasses.replace(self, preprocessing=preprocessing, image_size=size)


def _run_size(model: ViTConfig, size: Any, source: str) -> int | None:
    """The size a model for `model`'s weights runs at, checked (None: the weights' own)."""
    if size == model.image_size:
        return None
    if type(size) is not int or size <= 0 or size % model.patch_size:
        raise ConfigError(f"{source}: image_size must be a positive multiple of the patch size "
                          f"{model.patch_size}, got {shown(size, 40, quote=True)}")  # fmt: skip
    _at_size(model, size).validate(source)  # the tokens, activations and attention it makes at that size
    return size


def _at_size(model: ViTConfig, size: int | None) -> ViTConfig:
    return model if size is None else dataclasses.replace(model, image_size=size)


def _check_input_size(preprocessing: PreprocessConfig, model: ViTConfig, source: str) -> None:
    """ConfigError unless the preprocessing makes exactly the square inputs the model takes."""
    size = preprocessing.fixed_size()
    if size != (model.image_size, model.image_size):
        made = f"{size[0]}x{size[1]}" if size else "variable-size"
        raise ConfigError(
            f"{source}: preprocessing makes {made} pixels but the model takes {model.image_size}x{model.image_size}"
        )
