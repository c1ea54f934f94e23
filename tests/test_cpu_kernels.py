"""The CPU forms of GELU and the softmax's exp (mlx_vit.ops) against float64 references."""

from __future__ import annotations

import math

import mlx.core as mx
import numpy as np
import pytest

from mlx_vit import model as M
from mlx_vit import ops

pytestmark = pytest.mark.skipif(mx.default_device() != mx.cpu, reason="the CPU kernels run on the CPU only")


def erf_gelu(x: np.ndarray) -> np.ndarray:
    return np.array([0.5 * float(v) * math.erfc(-float(v) / math.sqrt(2)) for v in x])


@pytest.mark.parametrize("compiled", [True, False])
def test_gelu_within_1e_6_of_erf_gelu(compiled):
    x = np.concatenate([np.linspace(-12, 12, 240_001), [0.0, -0.0, 1e-30, -1e-30, 40.0, -40.0, 3e38, -3e38]])
    x = x.astype(np.float32)
    if compiled:
        ours = np.array(ops.gelu(mx.array(x)))
    else:
        mx.disable_compile()  # the same formula op by op, as where g++ is missing
        try:
            ours = np.array(ops.gelu(mx.array(x)))
        finally:
            mx.enable_compile()
    assert np.abs(ours.astype(np.float64) - erf_gelu(x)).max() < 1e-6


def test_softmax_exp_relative_error():
    t = np.linspace(-87, 0, 100_001, dtype=np.float32)
    ours = np.array(ops.softmax_exp(mx.array(t), mx.array(np.float32(0)), 1.0))  # exp(1.0 * (t - 0))
    exact = np.exp(t.astype(np.float64))
    # Rounding t * log2(e) to float32 moves the result by up to ~|t| * 7e-8 relative, as in mx.exp (which errs
    # as much); the polynomial and the rest add about one ulp.
    assert (np.abs(ours - exact) / exact / (1.2e-7 + 8e-8 * np.abs(t))).max() < 1
    # Far below the row maximum the weight is 0, never garbage from the exponent bits.
    assert np.array(ops.softmax_exp(mx.array([-1e4, -200.0]), mx.array(0.0), 1.0)).tolist() == [0.0, 0.0]


def test_attention_equals_fused_kernel(monkeypatch):
    mx.random.seed(1)
    attention = M.Attention(64, 4, qkv_bias=True)
    x = mx.random.normal((2, 17, 64)) * 3
    ours = np.array(attention(x))
    monkeypatch.setattr(ops, "use_cpu_kernels", lambda x: False)
    fused = np.array(attention(x))
    assert np.abs(ours - fused).max() < 1e-5
