"""Weight quantization and half precision for converted models.

Conversion quantizes the chosen linear layers' weights with MLX's affine group quantization and records exactly
which layers, so loading rebuilds the same `QuantizedLinear` layers with nothing else to pass:

    "quantization": {"bits": 4, "group_size": 64, "mode": "affine", "layers": ["blocks.0.attn.qkv", ...],
                     "skipped": [...]}

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
DTYPES = {"float32": mx.float32, "float16": mx.float16, "bfloat16": mx.bfloat16}

# The transformer blocks' linears hold ~98% of a ViT-B/16's weights; only they are quantized. The patch
# embedding and the classifier head stay in float: scripts/quantization_table.py measured that quantizing them
# too loses agreement with the float32 reference (README table, "+ patch embedding and head" rows) to save
# ~4.6 MB of a ViT-B/16, and each alone added ~0.1 to the max logit error of an 8-bit model.
QUANTIZED = re.compile(r"blocks\.\d+\.(attn\.(qkv|proj)|mlp\.fc[12])")


def quantize_weights(weights: dict[str, np.ndarray], bits: int, group_size: int, dtype: str,
                     pattern: re.Pattern | None = None) -> tuple[dict[str, mx.array], dict[str, Any]]:  # fmt: skip
    """Quantize the linear layers named by `pattern`; cast the remaining float tensors to `dtype`.

    Returns the new weights and the config entry. Layers whose input size is not a multiple of the group size
    stay in `dtype` and are listed under "skipped".
    """
    target, pattern = DTYPES[dtype], pattern or QUANTIZED
    out: dict[str, mx.array] = {}
    layers, skipped = [], []
    for name, value in weights.items():
        array = mx.array(value)
        layer = name.removesuffix(".weight")
        if name.endswith(".weight") and array.ndim == 2 and pattern.fullmatch(layer):
            if array.shape[1] % group_size == 0:
                out[name], out[f"{layer}.scales"], out[f"{layer}.biases"] = mx.quantize(
                    array.astype(target), group_size=group_size, bits=bits
                )
                layers.append(layer)
                continue
            skipped.append(layer)
        out[name] = array.astype(target) if mx.issubdtype(array.dtype, mx.floating) else array
    config = {"bits": bits, "group_size": group_size, "mode": "affine", "layers": layers, "skipped": skipped}
    return out, config


def check_stored_format(config: dict[str, Any], source: str) -> None:
    """ConfigError unless a converted folder's "dtype" and "quantization" entries are ones we write."""
    dtype, q = config.get("dtype", "float32"), config.get("quantization")
    if not isinstance(dtype, str) or dtype not in DTYPES:  # an integer dtype would run, and compute nonsense
        raise ConfigError(f"{source}: dtype must be one of {', '.join(DTYPES)}, got {shown(dtype, 40, quote=True)}")
    if q is None:
        return
    if not (
        isinstance(q, dict)
        and set(q) <= {"bits", "group_size", "mode", "layers", "skipped"}
        and type(q.get("bits")) is int
        and q["bits"] in BITS
        and type(q.get("group_size")) is int
        and q["group_size"] in GROUP_SIZES
        and q.get("mode", "affine") == "affine"
        and all(isinstance(q.get(key, []), list) for key in ("layers", "skipped"))
        and all(isinstance(layer, str) for layer in [*q.get("layers", []), *q.get("skipped", [])])
    ):
        raise ConfigError(f"{source}: malformed quantization entry; convert the model again")


def cast_weights(weights: dict[str, np.ndarray], dtype: str) -> dict[str, mx.array]:
    target = DTYPES[dtype]
    return {k: mx.array(v).astype(target) if v.dtype.kind == "f" else mx.array(v) for k, v in weights.items()}


def to_float32(weights: dict[str, mx.array], quantization: dict[str, Any] | None) -> dict[str, mx.array]:
    """Dequantize and upcast everything to float32 (for the CPU backend)."""
    out = dict(weights)
    for layer in (quantization or {}).get("layers", []):
        if f"{layer}.scales" not in out or f"{layer}.biases" not in out or f"{layer}.weight" not in out:
            raise CheckpointError(f"quantized layer {layer[:80]!r} is missing from the weights")
        out[f"{layer}.weight"] = mx.dequantize(
            out[f"{layer}.weight"],
            out.pop(f"{layer}.scales"),
            out.pop(f"{layer}.biases"),
            group_size=quantization["group_size"],
            bits=quantization["bits"],
        )
    return {k: v.astype(mx.float32) if mx.issubdtype(v.dtype, mx.floating) else v for k, v in out.items()}
