"""Generate mlx-vit's table of timm ViT architectures and the ImageNet-1k class names from the installed timm.

    python scripts/timm_table.py

rewrites `mlx_vit/data/timm_vit.json` and `mlx_vit/data/imagenet1k.txt`, so mlx-vit can read timm checkpoints
without importing timm. The output depends only on the installed timm (the shipped files were made with timm
1.0.31, as `timm_version` in the JSON says); `tests/test_timm_table.py` fails when they no longer match it.

How: every model registered in a timm module that builds `VisionTransformer` (or deit's `VisionTransformerDistilled`)
is created with `timm.create_model` while those classes' `__init__` is replaced by one that records the keyword
arguments it receives, merged with the signature's defaults, and aborts, so nothing is built. The same is done for
each pretrained tag (`name.tag`), since timm takes `num_classes`, `in_chans` and `img_size` from the tag's config.

JSON layout (sorted keys, one entry a line):

    timm_version   the timm version the table was made from
    defaults       {class: {kwarg: default}}: the class signature's defaults
    architectures  {name: {"class", "kwargs", "default_tag"}}: kwargs holds only what differs from the class's
                   defaults; default_tag is what `timm.create_model(name, pretrained=True)` loads (null if none)
    pretrained     {"name.tag": {input_size, interpolation, mean, std, crop_pct, crop_mode, num_classes, hf_hub_id,
                   and where set: hf_hub_filename, label_names, label_offset, custom_load ("hf" only), kwargs}}: kwargs
                   holds the constructor kwargs that differ from the architecture's for this tag (often num_classes)
    skipped        {name or "name.tag": reason}: models of those modules that could not be recorded

Values: tuples become lists. Layers (act_layer, norm_layer, mlp_layer, block_fn, embed_layer, attn_layer, ...)
become a name: activations and norms by timm's registry name ("gelu", "quick_gelu", "gelu_tanh", "layernorm"),
other classes and functions by their `__name__` ("Mlp", "SwiGLU", "Block", "PatchEmbed", "DiffAttention"); names
given as strings are resolved the way the model resolves them first. A layer with arguments (a functools.partial)
becomes {"name": ..., **arguments}; a norm layer is always an object with its "eps" (the partial's, else the
class's default). Anything else (a module instance, positional partial arguments) can't be serialized, and the
model goes into "skipped". The values are what the constructor receives: a null norm_layer / act_layer means
VisionTransformer's own fallback (timm's LayerNorm, eps 1e-6 / torch's GELU).
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import json
import sys
from pathlib import Path

import timm
import torch
from timm.data import ImageNetInfo
from timm.layers import create_act, create_norm, get_act_layer, get_norm_layer
from timm.models import get_arch_pretrained_cfgs, get_pretrained_cfg, list_models, list_modules
from timm.models import vision_transformer as vit_module
from timm.models.deit import VisionTransformerDistilled
from timm.models.vision_transformer import VisionTransformer

DATA_DIR = Path(__file__).resolve().parent.parent / "mlx_vit" / "data"
TABLE_PATH = DATA_DIR / "timm_vit.json"
LABELS_PATH = DATA_DIR / "imagenet1k.txt"

CLASSES = {"VisionTransformer": VisionTransformer, "VisionTransformerDistilled": VisionTransformerDistilled}
ACT_KEYS = {"act_layer"}
NORM_KEYS = {"norm_layer", "embed_norm_layer"}
PRETRAINED_FIELDS = ("input_size", "interpolation", "mean", "std", "crop_pct", "crop_mode", "num_classes", "hf_hub_id")
OPTIONAL_PRETRAINED_FIELDS = ("hf_hub_filename", "label_names", "label_offset")
VIT_SIGNATURE = inspect.signature(VisionTransformer.__init__)  # taken before any patching


class _Captured(Exception):
    """Raised by the patched `__init__`: the class being built and its bound keyword arguments."""

    def __init__(self, cls: type, kwargs: dict):
        super().__init__(cls.__name__)
        self.cls = cls
        self.kwargs = kwargs


class Unserializable(ValueError):
    pass


def _bound_kwargs(*args, **kwargs) -> dict:
    """The arguments as `VisionTransformer.__init__` binds them, defaults included (the subclass forwards them)."""
    bound = VIT_SIGNATURE.bind(*args, **kwargs)
    bound.apply_defaults()
    return {k: v for k, v in bound.arguments.items() if k != "self"}


def _capturing_init(self, *args, **kwargs):
    raise _Captured(type(self), _bound_kwargs(self, *args, **kwargs))


@contextlib.contextmanager
def _capture_constructors():
    """Patch the classes' `__init__` to raise `_Captured`; force the classic (not NaFlexVit) path; build on meta."""
    originals = {cls: vars(cls)["__init__"] for cls in CLASSES.values()}
    use_naflex = vit_module._USE_NAFLEX_DEFAULT
    try:
        for cls in CLASSES.values():
            cls.__init__ = _capturing_init
        vit_module._USE_NAFLEX_DEFAULT = False
        with torch.device("meta"):
            yield
    finally:
        vit_module._USE_NAFLEX_DEFAULT = use_naflex
        for cls, init in originals.items():
            cls.__init__ = init


def capture(name: str) -> tuple[type, dict]:
    """The class `timm.create_model(name)` builds and its kwargs; raises Unserializable for anything else."""
    try:
        model = timm.create_model(name, pretrained=False)
    except _Captured as captured:
        return captured.cls, captured.kwargs
    except Exception as e:  # a broken entrypoint must land in "skipped", whatever it raises
        raise Unserializable(f"create_model failed: {type(e).__name__}: {e}") from e
    raise Unserializable(f"builds {type(model).__name__}, not {' or '.join(CLASSES)}")


# ---- serialization


@functools.cache
def _registry_names() -> dict:
    """Layer class -> timm's registry name (the first name registered for it), torch's equivalents added."""
    names = {}
    for registry in (create_act._ACT_LAYER_DEFAULT, create_norm._NORM_MAP):
        for name, cls in registry.items():
            names.setdefault(cls, name)
    for cls, name in ((torch.nn.GELU, "gelu"), (torch.nn.LayerNorm, "layernorm")):
        names.setdefault(cls, name)
    return names


def _resolve(value, key: str):
    """Strings name registry layers: turn them into the class (or partial) the model would use."""
    if not isinstance(value, str):
        return value
    if key in ACT_KEYS:
        return get_act_layer(value)
    if key in NORM_KEYS:
        return get_norm_layer(value)
    if key == "attn_layer":
        return vit_module.ATTN_LAYERS[value]
    return value


def _layer_name(func) -> str:
    name = _registry_names().get(func) or getattr(func, "__name__", None)
    if not name or name == "<lambda>":
        raise Unserializable(f"unnamed callable {func!r}")
    return name


def _default_eps(func):
    try:
        param = inspect.signature(func).parameters.get("eps")
    except (TypeError, ValueError):
        return None
    return None if param is None or param.default is inspect.Parameter.empty else param.default


def _serialize_layer(value, key: str):
    func, kwargs = value, {}
    if isinstance(value, functools.partial):
        if value.args:
            raise Unserializable(f"{key}: partial with positional arguments {value!r}")
        func, kwargs = value.func, dict(value.keywords)
    if not callable(func) or not (inspect.isclass(func) or inspect.isfunction(func)):
        raise Unserializable(f"{key}: cannot serialize {type(func).__name__} instance")
    name = _layer_name(func)
    try:
        out = {"name": name, **{k: serialize(v, k) for k, v in kwargs.items()}}
    except Unserializable as e:
        raise Unserializable(f"{key}={name}: {e}") from e
    if key in NORM_KEYS:
        out.setdefault("eps", _default_eps(func))
    return out if len(out) > 1 else out["name"]


def serialize(value, key: str = ""):
    """A constructor argument as JSON data (see the module docstring)."""
    value = _resolve(value, key)
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (tuple, list)):
        return [serialize(v, key) for v in value]
    if isinstance(value, dict):
        return {str(k): serialize(v, str(k)) for k, v in value.items()}
    return _serialize_layer(value, key)


def serialize_kwargs(kwargs: dict) -> dict:
    return {k: serialize(v, k) for k, v in kwargs.items()}


def _diff(values: dict, base: dict) -> dict:
    """The entries of `values` that differ from `base` (compared as JSON, so True and 1 differ)."""
    return {k: v for k, v in values.items() if k not in base or json.dumps(v) != json.dumps(base[k])}


# ---- the table


def vit_modules() -> list[str]:
    """timm's model modules that expose VisionTransformer (or a subclass) to their entrypoints."""

    def exposes_vit(module_name: str) -> bool:
        module = sys.modules.get(f"timm.models.{module_name}")
        return any(inspect.isclass(v) and issubclass(v, VisionTransformer) for v in vars(module or {}).values())

    return sorted(m for m in list_modules() if exposes_vit(m))


def class_defaults() -> dict:
    defaults = serialize_kwargs(_bound_kwargs(None))
    return {name: defaults for name in CLASSES}


def pretrained_entry(cfg) -> dict:
    entry = {field: serialize(getattr(cfg, field)) for field in PRETRAINED_FIELDS}
    for field in OPTIONAL_PRETRAINED_FIELDS:
        if getattr(cfg, field) is not None:
            entry[field] = serialize(getattr(cfg, field))
    if isinstance(cfg.custom_load, str):  # only "hf" changes how a Hub checkpoint is read
        entry["custom_load"] = cfg.custom_load
    return entry


def default_tag(name: str):
    cfg = get_pretrained_cfg(name, allow_unregistered=False)
    return cfg.tag if cfg is not None else None


def _add_tags(table: dict, name: str, kwargs: dict) -> None:
    for full_name in get_arch_pretrained_cfgs(name):
        try:
            _, tag_kwargs = capture(full_name)
            entry = pretrained_entry(get_pretrained_cfg(full_name))
            overrides = _diff(serialize_kwargs(tag_kwargs), kwargs)
        except Unserializable as e:
            table["skipped"][full_name] = str(e)
            continue
        table["pretrained"][full_name] = {**entry, **({"kwargs": overrides} if overrides else {})}


def _add_architecture(table: dict, name: str) -> None:
    try:
        cls, raw = capture(name)
        kwargs = serialize_kwargs(raw)
    except Unserializable as e:
        table["skipped"][name] = str(e)
        return
    defaults = table["defaults"][cls.__name__]
    entry = {"class": cls.__name__, "kwargs": _diff(kwargs, defaults), "default_tag": default_tag(name)}
    table["architectures"][name] = entry
    _add_tags(table, name, kwargs)


def build_table() -> dict:
    table = {"timm_version": timm.__version__, "defaults": class_defaults()}
    table.update(architectures={}, pretrained={}, skipped={})
    with _capture_constructors():
        for name in list_models(module=vit_modules()):
            _add_architecture(table, name)
    return table


def render_table(table: dict) -> str:
    """Sorted JSON with each section's entries one a line, so a timm upgrade diffs line by line."""
    lines = ["{"]
    for i, key in enumerate(sorted(table)):
        comma = "," if i < len(table) - 1 else ""
        value = table[key]
        if not isinstance(value, dict) or not value:
            lines.append(f"{json.dumps(key)}: {json.dumps(value, sort_keys=True)}{comma}")
            continue
        entries = [f"{json.dumps(k)}: {json.dumps(value[k], sort_keys=True)}" for k in sorted(value)]
        lines += [f"{json.dumps(key)}: {{", ",\n".join(entries), f"}}{comma}"]
    return "\n".join(lines + ["}"]) + "\n"


def render_labels() -> str:
    info = ImageNetInfo()
    return "".join(f"{info.index_to_description(i)}\n" for i in range(info.num_classes()))


def main() -> None:
    DATA_DIR.mkdir(parents=True, exist_ok=True)
    table = build_table()
    TABLE_PATH.write_text(render_table(table), encoding="utf-8")
    LABELS_PATH.write_text(render_labels(), encoding="utf-8")
    counts = ", ".join(f"{len(table[k])} {k}" for k in ("architectures", "pretrained", "skipped"))
    print(f"timm {timm.__version__}: {counts} -> {TABLE_PATH} ({TABLE_PATH.stat().st_size} bytes), {LABELS_PATH}")


if __name__ == "__main__":
    main()
