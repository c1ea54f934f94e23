"""Fit the polynomial coefficients behind mlx_vit.model's CPU GELU and softmax exponential, and check them.

    python scripts/fit_cpu_kernels.py

MLX's x86 CPU backend evaluates erf and exp one element at a time through libm-style calls (~26 and ~11 ns per
element), while adds, multiplies and divides run as vectorized loops, and a compiled chain of them runs as one
fused loop. So mlx_vit.model computes, on the CPU:

- GELU as relu(x) - |x| * Phi(-|x|) with Phi(-a) = 0.5 * (1 + a * P(a)) ** -16 and P a degree-5 polynomial.
  Nothing cancels: the tail Phi(-a) is computed directly, so its error is relative, and the result is within
  ~5e-7 of the float64 erf-GELU everywhere (PyTorch's float32 GELU is within ~1.2e-6).
- exp for the softmax as 2 ** t = 2 ** n * 2 ** f, n = round(t), f in [-0.5, 0.5], 2 ** f a degree-6 polynomial
  (relative error ~1e-7, one float32 ulp) and 2 ** n built from the exponent bits.

This script fits both (weighted least squares iterated towards minimax; numpy only, float64), prints the
coefficients as mlx_vit.model holds them, and evaluates them in float32 with the same operation order as the
model to print the errors that matter. Rerun it after changing either form.
"""

from __future__ import annotations

import math

import numpy as np

GELU_POWER = 16  # Phi(-a) = 0.5 * (1 + a * P(a)) ** -GELU_POWER; four squarings
GELU_DEGREE = 5
GELU_RANGE = 8.0  # a * Phi(-a) < 5e-15 beyond: nothing left to fit
EXP2_DEGREE = 6


def lawson(basis: np.ndarray, target: np.ndarray, weight: np.ndarray, rounds: int = 300) -> np.ndarray:
    """Coefficients minimizing max |weight * (basis @ c - target)|, by iteratively reweighted least squares."""
    extra = np.ones_like(target)
    for _ in range(rounds):
        w = np.sqrt(extra) * weight
        coefficients, *_ = np.linalg.lstsq(basis * w[:, None], target * w, rcond=None)
        error = np.abs((basis @ coefficients - target) * weight)
        extra = extra * error + 1e-300
        extra /= extra.sum()
    return coefficients


def fit_gelu() -> np.ndarray:
    a = np.unique(np.concatenate([np.linspace(0, GELU_RANGE, 40001),
                                  GELU_RANGE * (0.5 - 0.5 * np.cos(np.linspace(0, np.pi, 20001)))]))  # fmt: skip
    tail = np.array([0.5 * math.erfc(v / math.sqrt(2)) for v in a])  # Phi(-a)
    # (1 + a P(a)) = (0.5 / Phi(-a)) ** (1/16): fit P where a GELU error would show, weighting by how an error in
    # 1 + a P(a) moves a * Phi(-a).
    root = (0.5 / tail) ** (1 / GELU_POWER)
    basis = a[:, None] ** np.arange(1, GELU_DEGREE + 2)
    weight = a * tail * GELU_POWER / root
    coefficients = lawson(basis, root - 1, weight)
    assert (coefficients > 0).all(), "P must have positive coefficients, so 1 + a P(a) grows monotonically"
    return coefficients


def gelu_float32(x: np.ndarray, p: np.ndarray) -> np.ndarray:
    """mlx_vit.ops.gelu_cpu's operation order, in numpy float32."""
    f32 = np.float32
    a = np.abs(x)
    poly = f32(p[-1]) * a + f32(p[-2])
    for c in p[-3::-1]:
        poly = poly * a + f32(c)
    base = f32(1) + a * poly
    for _ in range(int(math.log2(GELU_POWER))):
        base = base * base
    half = f32(0.5) * x
    return (half + np.abs(half)) - np.abs(half) / base


def fit_exp2() -> np.ndarray:
    f = 0.5 * np.cos(np.linspace(0, np.pi, 8001))
    basis = f[:, None] ** np.arange(EXP2_DEGREE + 1)
    target = 2.0**f
    return lawson(basis / target[:, None], np.ones_like(f), np.ones_like(f))


def exp2_float32(t: np.ndarray, e: np.ndarray) -> np.ndarray:
    """mlx_vit.model._exp2_cpu's operation order, in numpy float32 (t <= 0)."""
    f32 = np.float32
    n = (t + f32(12582912.0)) - f32(12582912.0)
    f = t - n
    poly = f32(e[-1]) * f + f32(e[-2])
    for c in e[-3::-1]:
        poly = poly * f + f32(c)
    exponent = np.maximum(n.astype(np.int32) + 127, 0)
    return poly * np.left_shift(exponent, 23).astype(np.int32).view(np.float32)


def main() -> None:
    p = fit_gelu()
    x = np.linspace(-16, 16, 3_200_001, dtype=np.float32)
    exact = np.array([0.5 * float(v) * math.erfc(-float(v) / math.sqrt(2)) for v in x])
    error = np.abs(gelu_float32(x, p).astype(np.float64) - exact)
    print(f"GELU_P = {tuple(float(c) for c in p)!r}")
    print(f"  float32 GELU: max |error| vs float64 erf-GELU {error.max():.2e} at x = {x[error.argmax()]:.4f}")

    e = fit_exp2()
    t = np.linspace(-126, 0, 2_000_001, dtype=np.float32)
    relative = np.abs(exp2_float32(t, e).astype(np.float64) / 2.0 ** t.astype(np.float64) - 1)
    print(f"EXP2_P = {tuple(float(c) for c in e)!r}")
    print(f"  float32 2**t on [-126, 0]: max relative error {relative.max():.2e}")


if __name__ == "__main__":
    main()
