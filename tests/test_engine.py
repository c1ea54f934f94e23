"""The inference engine (mlx_vit/engine.py): every pass runs in the weights' dtype, and the attention pass gives the
forward pass's logits."""

from __future__ import annotations

from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from mlx_vit.engine import Engine
from mlx_vit.loading import LoadedModel, load_model

PHOTOS = sorted((Path(__file__).parent / "data" / "images").glob("*.jpg"))[:2]


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_every_pass_runs_in_the_weights_dtype(vit_folder, monkeypatch, dtype):
    """On the CPU a load expands half weights to float32; on Metal and CUDA they stay, and so must the inputs of
    every pass (float32 pixels would promote the whole pass to float32)."""
    loaded = load_model(str(vit_folder))
    loaded.model.set_dtype(getattr(mx, dtype))
    engine = Engine(LoadedModel(loaded.model, loaded.config, loaded.name, runtime_dtype=dtype))
    pixels = engine.pixels(PHOTOS)
    seen = []
    forward = type(loaded.model).__call__
    monkeypatch.setattr(type(loaded.model), "__call__", lambda self, x: seen.append(x.dtype) or forward(self, x))
    logits = engine.logits(pixels)
    monkeypatch.undo()
    attended, layers, pool = engine.attention(pixels)
    assert seen == [getattr(mx, dtype)] and {w.dtype for w in layers} == {getattr(mx, dtype)} and pool is None
    assert logits.dtype == attended.dtype == np.float32
    np.testing.assert_allclose(attended, logits, atol=1e-4 if dtype == "float32" else 2e-2)
