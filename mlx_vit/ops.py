"""The models' elementwise ops: the activations by their config names, and GELU and the softmax's exp in the form
MLX's x86 CPU backend runs fast (its own are scalar loops; see below). The GPU keeps nn.gelu and the fused
attention kernel."""

from __future__ import annotations

import math
from functools import partial

import mlx.core as mx
import mlx.nn as nn

from mlx_vit import runtime

# CPU kernels. MLX's x86 CPU backend runs erf and exp one element at a time through scalar calls (~26 and ~11 ns
# an element: exact GELU alone was ~16 ms per layer per image), while a compiled chain of adds, multiplies and
# divides becomes one vectorized loop (~1 ns an element). So on the CPU, in float32, GELU and the softmax's exp
# are written with those ops only; the GPU keeps nn.gelu and the fused attention kernel. The coefficients and
# their error bounds come from scripts/fit_cpu_kernels.py.
GELU_P = (0.04986413916402573, 0.02115728879835862, 0.0032493307619688183, 5.970604563967938e-05,
          4.138809695931833e-05, 6.332420879672396e-06)  # fmt: skip
EXP2_P = (1.0000000005541694, 0.6931472057373621, 0.2402264689061661, 0.05550328776759633, 0.009618488958256325,
          0.0013399931302852607, 0.00015345811891953086)  # fmt: skip
_LOG2_E = 1.4426950408889634
_ROUND = 12582912.0  # 1.5 * 2**23: (t + _ROUND) - _ROUND rounds a float32 |t| < 2**22 to an integer


def _horner(x: mx.array, coefficients: tuple[float, ...]) -> mx.array:
    # Horner's chain, not Estrin's tree: each step has one consumer, so mx.compile fuses it into one loop.
    y = coefficients[-1] * x + coefficients[-2]
    for c in coefficients[-3::-1]:
        y = y * x + c
    return y


@partial(mx.compile, shapeless=True)
def gelu_cpu(x: mx.array) -> mx.array:
    # x * Phi(x) = relu(x) - |x| * Phi(-|x|), with Phi(-a) = 0.5 * (1 + a * P(a)) ** -16. The tail is computed
    # directly, not as 1 - erf, so nothing cancels: within 5.1e-7 of the float64 erf-GELU for every finite
    # float32 (PyTorch's float32 GELU: 1.2e-6). +-inf give NaN; a working model never feeds it one.
    a = mx.abs(x)
    base = 1.0 + a * _horner(a, GELU_P)
    for _ in range(4):
        base = base * base
    half = 0.5 * x
    return (half + mx.abs(half)) - mx.abs(half) / base


@mx.compile
def softmax_exp(scores: mx.array, row_max: mx.array, scale: float) -> mx.array:
    # exp(scale * (scores - row_max)) as 2**t, t <= 0: 2**round(t) from the exponent bits (0 below 2**-126)
    # times a polynomial for 2**f, f in [-0.5, 0.5] (relative error 1e-7), as accurate as mx.exp.
    t = (scores - row_max) * (scale * _LOG2_E)
    n = (t + _ROUND) - _ROUND
    exponent = mx.maximum(n.astype(mx.int32) + 127, 0)
    return _horner(t - n, EXP2_P) * mx.left_shift(exponent, 23).view(mx.float32)


def use_cpu_kernels(x: mx.array) -> bool:
    return x.dtype == mx.float32 and runtime.current().cpu


def gelu(x: mx.array) -> mx.array:
    """Exact (erf) GELU, as transformers' ViT uses; on the CPU in float32 through the vectorizable form above."""
    return gelu_cpu(x) if use_cpu_kernels(x) else nn.gelu(x)


def _gelu_tanh(x: mx.array) -> mx.array:
    return 0.5 * x * (1 + mx.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))


ACTIVATIONS = {
    "gelu": gelu,  # exact, erf-based: what transformers' ViT uses
    "gelu_new": _gelu_tanh,
    "gelu_pytorch_tanh": _gelu_tanh,
    "quick_gelu": lambda x: x * mx.sigmoid(1.702 * x),
    "relu": nn.relu,
    "silu": nn.silu,
    "swish": nn.silu,
    "tanh": mx.tanh,
}
