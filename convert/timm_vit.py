"""timm's ViT family: a Hub folder (config.json with `architecture`), or a bare state dict named with --arch.

timm's names are the MLX model's, so the rename table only refuses what the model does not have; the layout fix
turns the patch convolution into a linear layer. The architecture is the timm name's constructor arguments, from
the table shipped in mlx_vit/data/timm_vit.json (scripts/timm_table.py), with config.json's `model_args` on top;
preprocessing is the checkpoint's `pretrained_cfg` with timm's eval-transform semantics.
"""

from __future__ import annotations

import difflib
import json
import re
from functools import cache
from importlib import resources
from typing import Any

import numpy as np

from mlx_vit.config import ViTConfig
from mlx_vit.errors import ConfigError, MlxVitError, shown
from mlx_vit.preprocess import PreprocessConfig

from .common import (
    TIMM_RESAMPLE,
    Checkpoint,
    Source,
    check_finite,
    conv_to_linear,
    head_classes,
    mlp_width,
    numbered_labels,
    read_weight_file,
    read_weights,
    rename,
    square,
    weight_budget,
)

NAME = "timm"
LOOKS_FOR = {
    "folder": "config.json with an architecture",
    "file": "a .pth/.pt/.bin/.safetensors with --arch",
}  # by source kind
SUFFIXES = (".pth", ".pt", ".bin", ".safetensors")

RENAMES = [
    (r"(cls_token|dist_token|reg_token|pos_embed)$", r"\1"),
    (r"(patch_embed\.proj|norm_pre|norm|fc_norm|head|head_dist)\.(weight|bias)$", r"\1.\2"),
    (r"blocks\.(\d+)\.(norm[12]|attn\.qkv|attn\.proj|mlp\.fc[12])\.(weight|bias)$", r"blocks.\1.\2.\3"),
    (r"blocks\.(\d+)\.(ls[12])\.gamma$", r"blocks.\1.\2.gamma"),
    (r"blocks\.(\d+)\.gamma_([12])$", r"blocks.\1.ls\2.gamma"),  # DeiT III's original names
    (r"attn_pool\.latent$", "attn_pool.latent"),
    (r"attn_pool\.(q|kv|proj|norm|mlp\.fc[12])\.(weight|bias)$", r"attn_pool.\1.\2"),
]
IGNORED = re.compile(r"pre_logits\..*")  # timm drops the old representation layer too

# Constructor arguments mlx-vit's model implements, and the only values it implements for the others.
ACTIVATIONS = {"gelu": "gelu", "quick_gelu": "quick_gelu", "gelu_tanh": "gelu_pytorch_tanh"}
POOLS = ("token", "avg", "map", "")
REQUIRED = {
    "qk_norm": False, "scale_attn_norm": False, "scale_mlp_norm": False, "proj_bias": True, "pos_embed": "learn",
    "final_norm": True, "pool_include_prefix": False, "dynamic_img_pad": False, "embed_norm_layer": None,
    "block_fn": "Block", "mlp_layer": "Mlp", "attn_layer": "Attention", "embed_layer": "PatchEmbed",
}  # fmt: skip
IGNORED_ARGS = {"dynamic_img_size", "drop_rate", "pos_drop_rate", "patch_drop_rate", "proj_drop_rate", "in_chans",
                "attn_drop_rate", "drop_path_rate", "weight_init", "fix_init", "device", "dtype", "img_size",
                "patch_size", "num_classes", "global_pool", "embed_dim", "depth", "num_heads", "mlp_ratio",
                "qkv_bias", "init_values", "class_token", "no_embed_class", "reg_tokens", "pre_norm", "fc_norm",
                "norm_layer", "act_layer"}  # fmt: skip


@cache
def table() -> dict[str, Any]:
    """The shipped table of timm's ViT architectures and pretrained configs."""
    return json.loads(resources.files("mlx_vit").joinpath("data/timm_vit.json").read_text())


@cache
def imagenet_labels() -> tuple[str, ...]:
    return tuple(resources.files("mlx_vit").joinpath("data/imagenet1k.txt").read_text().splitlines())


def detect(source: Source) -> bool:
    if source.is_folder:
        return "architecture" in source.config and "model_type" not in source.config
    return source.path.suffix in SUFFIXES


def architecture_kwargs(name: str, overrides: dict[str, Any], source: str) -> tuple[str, dict[str, Any]]:
    """(class, constructor arguments) of a timm architecture, `overrides` (a tag's, then model_args) applied."""
    entry = table()["architectures"].get(name)
    if entry is None:
        close = difflib.get_close_matches(name, table()["architectures"], n=3)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        reason = table()["skipped"].get(name)
        why = f": {reason}" if reason else ""
        raise ConfigError(f"{source}: {shown(name, 80, quote=True)} is not a timm ViT architecture mlx-vit knows"
                          f"{why}{hint}")  # fmt: skip
    if not isinstance(overrides, dict):
        raise ConfigError(f"{source}: model_args must be an object")
    cls = entry["class"]
    return cls, {**table()["defaults"][cls], **entry["kwargs"], **overrides}


def _square(value: Any, key: str, source: str) -> int:
    value = square(value)
    if type(value) is not int:
        raise ConfigError(f"{source}: {key} {shown(value, 40, quote=True)} is not supported (square sizes only)")
    return value


def _layer(value: Any) -> tuple[Any, dict]:
    """A serialized layer ("gelu", or {"name": "layernorm", "eps": 1e-6}) -> (name, arguments)."""
    if isinstance(value, dict):
        return value.get("name"), {k: v for k, v in value.items() if k != "name"}
    return value, {}


def vit_config(cls: str, kwargs: dict[str, Any], num_labels: int, source: str) -> ViTConfig:
    """ViTConfig for timm's constructor arguments; refuses every option the MLX model does not implement."""
    for key, wanted in REQUIRED.items():
        if key in kwargs and kwargs[key] != wanted and _layer(kwargs[key]) != (wanted, {}):
            raise ConfigError(f"{source}: {key}={shown(kwargs[key], 60)} is not supported by mlx-vit's ViT")
    unknown = sorted(set(kwargs) - set(REQUIRED) - IGNORED_ARGS)
    if unknown:
        raise ConfigError(f"{source}: timm argument '{shown(unknown[0], 40)}' is not supported by mlx-vit's ViT")
    act, act_args = _layer(kwargs.get("act_layer") or "gelu")
    if not isinstance(act, str) or act not in ACTIVATIONS or act_args:
        raise ConfigError(f"{source}: act_layer {shown(kwargs.get('act_layer'), 60)} is not supported")
    norm, norm_args = _layer(kwargs.get("norm_layer") or {"name": "layernorm", "eps": 1e-6})
    if norm != "layernorm" or set(norm_args) - {"eps"}:
        raise ConfigError(f"{source}: norm_layer {shown(kwargs.get('norm_layer'), 60)} is not supported")
    pool = kwargs.get("global_pool", "token")
    if pool not in POOLS:
        raise ConfigError(f"{source}: global_pool {shown(pool, 40, quote=True)} is not supported")
    fc_norm, embed_dim = kwargs.get("fc_norm"), kwargs.get("embed_dim")
    distilled = cls == "VisionTransformerDistilled"
    return ViTConfig.from_dict(
        {
            "image_size": _square(kwargs.get("img_size"), "img_size", source),
            "patch_size": _square(kwargs.get("patch_size"), "patch_size", source),
            "num_channels": kwargs.get("in_chans", 3),
            "hidden_size": embed_dim,
            "num_hidden_layers": kwargs.get("depth"),
            "num_attention_heads": kwargs.get("num_heads"),
            "intermediate_size": mlp_width(embed_dim, kwargs.get("mlp_ratio"), source, "embed_dim and mlp_ratio"),
            "hidden_act": ACTIVATIONS[act],
            "layer_norm_eps": norm_args.get("eps", 1e-6),  # timm's LayerNorm (the registry's "layernorm")
            "qkv_bias": kwargs.get("qkv_bias", True),
            "num_labels": num_labels,
            "distillation_token": distilled,
            "distilled_head": distilled and num_labels > 0,
            "class_token": kwargs.get("class_token", True),
            "reg_tokens": kwargs.get("reg_tokens", 0),
            "no_embed_class": kwargs.get("no_embed_class", False),
            "pre_norm": kwargs.get("pre_norm", False),
            "global_pool": pool,
            "fc_norm": pool == "avg" if fc_norm is None else fc_norm,
            "init_values": kwargs.get("init_values"),
        },
        source,
    )


def map_weights(tensors: dict[str, np.ndarray], config: ViTConfig, source: str) -> dict[str, np.ndarray]:
    """timm's state dict -> the MLX model's layouts; an attention pool the config does not use is dropped, as
    timm's non-strict load for SigLIP does."""
    if config.global_pool != "map":
        tensors = {k: v for k, v in tensors.items() if not k.startswith("attn_pool.")}
    mapped = rename(tensors, RENAMES, IGNORED, source, "timm ViT")
    conv_to_linear(mapped, config, source)
    return mapped


def resolve_arch(arch: str) -> tuple[str, dict[str, Any]]:
    """--arch NAME[.TAG] -> (architecture, pretrained config of that tag, or of the architecture's default tag)."""
    name, _, tag = arch.partition(".")
    architectures = table()["architectures"]
    if name in architectures:
        tag = tag or architectures[name].get("default_tag") or ""
    pretrained = table()["pretrained"].get(f"{name}.{tag}")
    if pretrained is None and tag and name in architectures:
        tags = sorted(k.partition(".")[2] for k in table()["pretrained"] if k.partition(".")[0] == name)
        raise MlxVitError(f"--arch {shown(arch, 80)}: timm has no tag {shown(tag, 60, quote=True)} for {name} "
                          f"(tags: {', '.join(tags) or 'none'})")  # fmt: skip
    return name, pretrained or {}


def _pretrained_cfg(config: dict[str, Any], source: str) -> dict[str, Any]:
    """config.json's pretrained_cfg with its top-level overrides, as timm's hub loader reads them."""
    pretrained = config.get("pretrained_cfg", config)  # old single-dict files hold it at the top level
    if not isinstance(pretrained, dict):
        raise ConfigError(f"{source}: pretrained_cfg must be an object")
    pretrained = dict(pretrained)
    for key in ("num_classes", "label_names", "label_descriptions"):
        if key in config:
            pretrained[key] = config[key]
    if "labels" in pretrained and "label_names" not in pretrained:
        pretrained["label_names"] = pretrained["labels"]
    return pretrained


def labels(pretrained: dict[str, Any], num_labels: int, source: str) -> dict[str, str]:
    """Names from the checkpoint (descriptions first), ImageNet-1k's for 1000 classes, else `class N`."""
    for key in ("label_descriptions", "label_names"):
        names = pretrained.get(key)
        if isinstance(names, dict):
            names = [names.get(k) for k in sorted(names, key=lambda k: (len(k), k))]
        if names is not None:
            if not (isinstance(names, list) and len(names) == num_labels and all(isinstance(n, str) for n in names)):
                raise ConfigError(f"{source}: {key} must be {num_labels} names, one for each class")
            return numbered_labels(num_labels, dict(enumerate(names)))
    if num_labels == 1000:
        return numbered_labels(num_labels, dict(enumerate(imagenet_labels())))
    return numbered_labels(num_labels)


def bare_architecture(source: Source, kind: str) -> tuple[str, dict[str, Any], str, dict[str, Any]]:
    """--arch's (name, pretrained config, class, constructor arguments) for a bare weight file; an architecture
    mlx-vit cannot run is refused before the file is read."""
    if source.arch is None:
        raise MlxVitError(f"{source.name}: {kind} names no architecture; pass --arch TIMM_NAME[.TAG] "
                          "(for example --arch vit_base_patch16_224.augreg2_in21k_ft_in1k)")  # fmt: skip
    name, pretrained = resolve_arch(source.arch)
    cls, kwargs = architecture_kwargs(name, pretrained.get("kwargs", {}), source.name)  # a tag's num_classes
    vit_config(cls, kwargs, 0, source.name)
    return name, pretrained, cls, kwargs


def checkpoint(name: str, config: ViTConfig, weights: dict[str, np.ndarray], pretrained: dict[str, Any],
               resample: dict[str, Any], source: str) -> Checkpoint:  # fmt: skip
    """A timm architecture's Checkpoint: timm's preprocessing for `pretrained`'s tag at the model's size."""
    data = {**pretrained, "input_size": [config.num_channels, config.image_size, config.image_size]}
    return Checkpoint(
        config=config,
        weights=weights,
        preprocessing=PreprocessConfig.from_timm(data, source).to_dict(),
        id2label=labels(pretrained, config.num_labels, source),
        architecture=f"timm:{name}",
        resample=resample,
    )


def read(source: Source) -> Checkpoint:
    if source.is_folder:
        config_file = shown(source.path / "config.json")
        name, overrides = source.config["architecture"], source.config.get("model_args")
        if not isinstance(name, str):
            raise ConfigError(f"{config_file}: architecture must be a timm model name")
        pretrained = _pretrained_cfg(source.config, config_file)
        cls, kwargs = architecture_kwargs(name, {} if overrides is None else overrides, config_file)
        classes = pretrained.get("num_classes", kwargs.get("num_classes", 1000))
        sizes = vit_config(cls, kwargs, classes if isinstance(classes, int) else 0, config_file)  # before weights
        tensors = read_weights(source.path, hub_state_dict, weight_budget(sizes))
    else:
        config_file = source.name
        name, pretrained, cls, kwargs = bare_architecture(source, "a bare weight file")
        budget = weight_budget(vit_config(cls, kwargs, 0, source.name))
        tensors = read_weight_file(source.path, training_state_dict, budget)
    check_finite(tensors, source.name)
    config = vit_config(cls, kwargs, head_classes(tensors, "head.weight", source.name), config_file)
    return checkpoint(name, config, map_weights(tensors, config, source.name), pretrained, TIMM_RESAMPLE, config_file)


def hub_state_dict(state: object) -> tuple[object, str]:
    """The state dict timm takes from a Hub folder's file: checkpoint_filter_fn's own unwrapping of `model`, then
    `state_dict`, nothing else."""
    taken = []
    for key in ("model", "state_dict"):
        if isinstance(state, dict) and key in state:
            state = state[key]
            taken.append(key)
    return state, ".".join(taken)


# What a DDP or torch.compile wrapper puts in front of every name; timm's clean_state_dict removes them in order.
WRAPPER_PREFIXES = ("_orig_mod.", "module.", "_orig_mod.")


def training_state_dict(state: object) -> tuple[object, str]:
    """The state dict timm loads from a checkpoint file (`load_state_dict` with use_ema, then checkpoint_filter_fn):
    a training checkpoint's EMA weights first (state_dict_ema, model_ema), then state_dict, then model; wrapper
    prefixes removed from each name (a later name wins, as in timm); then the filter's own unwrapping."""
    key = ""
    if isinstance(state, dict):
        present = [k for k in ("state_dict_ema", "model_ema") if state.get(k) is not None]
        present += [k for k in ("state_dict", "model") if k in state]
        key = present[0] if present else ""
    if key:
        state = state[key]
    if isinstance(state, dict):
        cleaned = {}
        for name, value in state.items():
            for prefix in WRAPPER_PREFIXES if isinstance(name, str) else ():
                name = name.removeprefix(prefix)
            cleaned[name] = value
        state = cleaned
    state, unwrapped = hub_state_dict(state)
    return state, ".".join(filter(None, [key, unwrapped]))
