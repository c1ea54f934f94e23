"""Weight quantization and half precision for converted models.

Conversion quantizes the chosen linear layers' weights with one of MLX's quantization modes (affine groups, or
the mxfp4 / nvfp4 / mxfp8 microscaling floats) and records exactly which layers, so loading rebuilds the same
`QuantizedLinear` layers with nothing else to pass:

    "quantization": {"bits": 4, "group_size": 64, "mode": "affine", "layers": ["blocks.0.attn.qkv", ...],
                     "skipped": [...], "bits_of": {"blocks.0.attn.qkv": 8, ...}}

`bits_of` holds the layers a mixed recipe (RECIPES, as mlx-lm's --quant-predicate) gave other bits.

MLX's CPU backend runs quantized and half-precision matmuls as slow scalar loops (~30x slower than float32
with OpenBLAS for a ViT-B/16), so on the CPU `to_float32` expands them at load time: the file stays small.
"""

from __future__ import annotations

import re
from typing import Any

import mlx.core as mx
import numpy as np

from mlx_vit.errors import CheckpointError, ConfigError, shown

BITS = (2, 3, 4, 5, 6, 8)
GROUP_SIZES = (32, 64, 128)
# mode -> (bits, group sizes) that MLX takes for it. The float modes store uint8 scales and no biases.
MODES = {"affine": (BITS, GROUP_SIZES), "mxfp4": ((4,), (32,)), "nvfp4": ((4,), (16,)), "mxfp8": ((8,), (32,))}
# recipe -> bits for a layer: attention, whose errors every token shares, at 8 bits, the MLP at 4 (affine).
RECIPES = {"attn8_mlp4": lambda layer: 8 if ".attn." in layer else 4}
DTYPES = {"float32": mx.float32, "float16": mx.float16, "bfloat16": mx.bfloat16}

# The transformer blocks' linears hold ~98% of a ViT-B/16's weights; only they are quantized. The patch
# embedding and the classifier head stay in float: scripts/quantization_table.py measured that quantizing them
# too loses agreement with the float32 reference (docs/quantization.md, "+ patch embedding and head" rows) to save
# ~4.6 MB of a ViT-B/16, and each alone added ~0.1 to the max logit error of an 8-bit model.
QUANTIZED = re.compile(r"blocks\.\d+\.(attn\.(qkv|proj)|mlp\.fc[12])")


def quantize_weights(weights: dict[str, np.ndarray], bits: int, group_size: int, dtype: str,
                     pattern: re.Pattern | None = None, mode: str = "affine",
                     recipe: str | None = None) -> tuple[dict[str, mx.array], dict[str, Any]]:  # fmt: skip
    """Quantize the linear layers named by `pattern` (each at the bits `recipe` gives it, if any); cast the
    remaining float tensors to `dtype`.

    Returns the new weights and the config entry. Layers whose input size is not a multiple of the group size
    stay in `dtype` and are listed under "skipped".
    """
    target, pattern = DTYPES[dtype], pattern or QUANTIZED
    out: dict[str, mx.array] = {}
    layers, skipped, bits_of = [], [], {}
    for name, value in weights.items():
        array = mx.array(value)
        layer = name.removesuffix(".weight")
        if name.endswith(".weight") and array.ndim == 2 and pattern.fullmatch(layer):
            if array.shape[1] % group_size == 0:
                wanted = RECIPES[recipe](layer) if recipe else bits
                packed = mx.quantize(array.astype(target), group_size=group_size, bits=wanted, mode=mode)
                out[name], out[f"{layer}.scales"] = packed[0], packed[1]
                if mode == "affine":
                    out[f"{layer}.biases"] = packed[2]
                if wanted != bits:
                    bits_of[layer] = wanted
                layers.append(layer)
                continue
            skipped.append(layer)
        out[name] = array.astype(target) if mx.issubdtype(array.dtype, mx.floating) else array
    config = {"bits": bits, "group_size": group_size, "mode": mode, "layers": layers, "skipped": skipped}
    if bits_of:
        config["bits_of"] = bits_of
    return out, config


def layer_settings(quantization: dict[str, Any], layer: str) -> dict[str, Any]:
    """`layer`'s bits, group size and mode, as nn.quantize and mx.dequantize take them."""
    bits = quantization.get("bits_of", {}).get(layer, quantization["bits"])
    return {"group_size": quantization["group_size"], "bits": bits, "mode": quantization.get("mode", "affine")}


def packed_kinds(quantization: dict[str, Any] | None, layers) -> dict[str, str]:
    """The tensors of these quantized layers that are not floats, and their dtype: the packed weights (uint32)
    and, in the float modes, the scales (uint8)."""
    scales = (quantization or {}).get("mode", "affine") != "affine"
    kinds = {f"{layer}.weight": "uint32" for layer in layers}
    return kinds | ({f"{layer}.scales": "uint8" for layer in layers} if scales else {})


def check_stored_format(config: dict[str, Any], source: str) -> None:
    """ConfigError unless a converted folder's "dtype" and "quantization" entries are ones we write."""
    dtype, q = config.get("dtype", "float32"), config.get("quantization")
    if not isinstance(dtype, str) or dtype not in DTYPES:  # an integer dtype would run, and compute nonsense
        raise ConfigError(f"{source}: dtype must be one of {', '.join(DTYPES)}, got {shown(dtype, 40, quote=True)}")
    if q is None:
        return
    bits_of = q.get("bits_of", {}) if isinstance(q, dict) else None
    layers = q.get("layers", []) if isinstance(q, dict) else None
    layers = set(layers) if isinstance(layers, list) and all(isinstance(x, str) for x in layers) else set()
    if not (
        isinstance(q, dict)
        and set(q) <= {"bits", "group_size", "mode", "layers", "skipped", "bits_of"}
        and type(q.get("bits")) is int
        and type(q.get("group_size")) is int
        and isinstance(q.get("mode", "affine"), str)
        and all(isinstance(q.get(key, []), list) for key in ("layers", "skipped"))
        and all(isinstance(layer, str) for layer in [*q.get("layers", []), *q.get("skipped", [])])
        and isinstance(bits_of, dict)
        and all(k in layers and type(v) is int for k, v in bits_of.items())
    ):
        raise ConfigError(f"{source}: malformed quantization entry; convert the model again")
    # Only what mx.quantize makes in that mode, said here: MLX refuses the others only when the layers are built,
    # and in its own words (of a group size of 48, that the layer's width does not divide by it).
    mode = q.get("mode", "affine")
    if mode not in MODES:
        raise ConfigError(f"{source}: quantization mode {shown(mode, 40, quote=True)} is not one of "
                          f"{', '.join(MODES)}; convert the model again")  # fmt: skip
    bits, sizes = MODES[mode]
    if q["group_size"] not in sizes:
        raise _not_allowed(source, "group_size", q["group_size"], mode, sizes)
    for value in (q["bits"], *bits_of.values()):
        if value not in bits:
            raise _not_allowed(source, "bits", value, mode, bits)


def _not_allowed(source: str, key: str, value: int, mode: str, allowed: tuple[int, ...]) -> ConfigError:
    return ConfigError(f"{source}: quantization {key} {shown(value, 40)} is not one {mode} allows "
                       f"({', '.join(map(str, allowed))}); convert the model again")  # fmt: skip


def cast_weights(weights: dict[str, np.ndarray], dtype: str) -> dict[str, mx.array]:
    target = DTYPES[dtype]
    return {k: mx.array(v).astype(target) if v.dtype.kind == "f" else mx.array(v) for k, v in weights.items()}


def to_float32(weights: dict[str, mx.array], quantization: dict[str, Any] | None) -> dict[str, mx.array]:
    """Dequantize and upcast everything to float32 (for the CPU backend)."""
    out = dict(weights)
    for layer in (quantization or {}).get("layers", []):
        settings = layer_settings(quantization, layer)
        affine = settings["mode"] == "affine"
        if f"{layer}.scales" not in out or (affine and f"{layer}.biases" not in out) or f"{layer}.weight" not in out:
            raise CheckpointError(f"quantized layer {layer[:80]!r} is missing from the weights")
        biases = out.pop(f"{layer}.biases") if affine else None
        out[f"{layer}.weight"] = mx.dequantize(out[f"{layer}.weight"], out.pop(f"{layer}.scales"), biases, **settings)
    return {k: v.astype(mx.float32) if mx.issubdtype(v.dtype, mx.floating) else v for k, v in out.items()}
