"""CPU lanes (mlx_vit/lanes.py): a forward pass split over several streams gives the one-lane numbers, whichever
way it is split, and the BLAS gets its share of the threads."""

from __future__ import annotations

import ctypes
import os
from concurrent.futures import ThreadPoolExecutor

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
import torch
import transformers
from checkpoints import make_checkpoint
from mlx.utils import tree_map

from mlx_vit import blas, lanes, runtime
from mlx_vit import model as model_module
from mlx_vit.config import ViTConfig
from mlx_vit.loading import load_model
from mlx_vit.model import ViT
from mlx_vit.numbers import NumberError

SMALL = dict(image_size=32, patch_size=8, hidden_size=48, num_hidden_layers=2, num_attention_heads=4,
             intermediate_size=96, num_labels=7)  # fmt: skip
VARIANTS = {
    "plain": {},
    "three heads, no qkv bias": dict(num_attention_heads=3, qkv_bias=False),  # heads split 2 + 1
    "layer scale, avg pool, fc_norm": dict(init_values=0.1, global_pool="avg", fc_norm=True, class_token=False),
    "distilled, registers": dict(distillation_token=True, distilled_head=True, reg_tokens=2),
}


@pytest.fixture
def in_lanes(monkeypatch):
    """set(n): the next passes run in n lanes, with a thread each, whatever this machine's core count."""

    monkeypatch.setattr(lanes, "MIN_LANE_WIDTH", 1)  # the small test models take the tensor split too

    def set_lanes(count: int) -> None:
        monkeypatch.setenv("MLX_VIT_CPU_LANES", str(count))
        monkeypatch.setenv("OPENBLAS_NUM_THREADS", str(count))
        assert replan().lanes == count

    yield set_lanes
    monkeypatch.undo()
    replan()
    lanes.use(1)  # back to every thread for the tests after


def replan() -> runtime.Plan:
    """The plan for the environment as it is now, as loading a model decides it."""
    return runtime.adopt()


def model(seed: int = 0, **options) -> ViT:
    mx.random.seed(seed)
    vit = ViT(ViTConfig(**{**SMALL, **options}))
    # MLX's random init leaves LayerScale at 1 and biases at 0: perturb everything, so every term counts.
    vit.update(tree_map(lambda p: p + 0.1 * mx.random.normal(p.shape), vit.parameters()))
    mx.eval(vit.parameters())
    return vit


def pixels(batch: int, size: int = 32, seed: int = 1) -> mx.array:
    return mx.array(np.random.default_rng(seed).standard_normal((batch, size, size, 3), dtype=np.float32))


def spy_plans(monkeypatch) -> list[str]:
    plans = []
    real = lanes.how
    monkeypatch.setattr(lanes, "how", lambda *a: plans.append(real(*a)) or plans[-1])
    return plans


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("count, batch, how", [(2, 1, "tensor"), (2, 3, "tensor"), (2, 4, "batch"),
                                               (3, 2, "tensor"), (3, 3, "batch")])  # fmt: skip
def test_lanes_give_the_one_lane_numbers(in_lanes, monkeypatch, variant, count, batch, how):
    vit, x = model(**VARIANTS[variant]), pixels(batch)
    in_lanes(1)
    one = np.array(vit(x))
    features = np.array(vit.features(x))
    plans = spy_plans(monkeypatch)
    in_lanes(count)
    np.testing.assert_allclose(np.array(vit(x)), one, rtol=0, atol=1e-5)
    np.testing.assert_allclose(np.array(vit.features(x)), features, rtol=0, atol=1e-5)
    assert plans == [how, how]


@pytest.mark.parametrize("batch", [1, 2, 3])
def test_lanes_equal_transformers(tmp_path, in_lanes, monkeypatch, batch):
    folder = make_checkpoint(tmp_path, kind="vit", seed=3)
    vit = load_model(str(folder)).model
    x = np.random.default_rng(batch).standard_normal((batch, 32, 32, 3), dtype=np.float32)
    plans = spy_plans(monkeypatch)
    in_lanes(2)
    ours = np.array(vit(mx.array(x)))
    with torch.no_grad():
        theirs = transformers.ViTForImageClassification.from_pretrained(folder).eval()(
            torch.from_numpy(x.transpose(0, 3, 1, 2))
        )
    assert plans == ["tensor" if batch % 2 else "batch"]
    assert np.abs(ours - theirs.logits.numpy()).max() < 1e-4


def test_lanes_on_another_thread(in_lanes, monkeypatch):
    """MLX's streams belong to their thread: a pass on the TUI's MLX thread gets lanes of its own."""
    vit, x = model(), pixels(1)
    in_lanes(2)
    here = np.array(vit(x))
    plans = spy_plans(monkeypatch)
    with ThreadPoolExecutor(1) as pool:
        there = pool.submit(lambda: np.array(vit(x))).result(timeout=60)
    np.testing.assert_array_equal(there, here)
    assert plans == ["tensor"]


def test_new_weights_are_split_again(in_lanes):
    """A block's lane copies of proj and fc2 follow its weights: after update() the pass uses the new ones."""
    vit, x = model(seed=0), pixels(1)
    in_lanes(2)
    before = np.array(vit(x))
    vit.update(model(seed=5).parameters())
    after = np.array(vit(x))
    in_lanes(1)
    np.testing.assert_allclose(after, np.array(vit(x)), rtol=0, atol=1e-5)
    assert np.abs(after - before).max() > 1e-2


def test_in_place_edits_need_forget(in_lanes):
    vit, x = model(seed=0), pixels(1)
    in_lanes(2)
    vit(x).tolist()
    for block in vit.blocks:
        block.mlp.fc2.weight[:] = 0.5 * block.mlp.fc2.weight
    lanes.forget(vit.blocks)
    edited = np.array(vit(x))
    in_lanes(1)
    np.testing.assert_allclose(edited, np.array(vit(x)), rtol=0, atol=1e-5)


def test_compiled_forward_in_lanes(in_lanes, monkeypatch):
    """Under mx.compile the weights are placeholders: the lane copies are not evaluated while tracing."""
    vit, x = model(), pixels(1)
    in_lanes(2)
    plans = spy_plans(monkeypatch)
    compiled = mx.compile(vit, inputs=vit.state)
    np.testing.assert_allclose(np.array(compiled(x)), np.array(vit(x)), rtol=0, atol=1e-6)
    assert plans[0] == "tensor"


def test_half_precision_runs_an_odd_batch_in_one_lane(in_lanes, monkeypatch):
    """The lanes' partial sums would be rounded to half precision before they are added: float32 only."""
    vit = model()
    vit.set_dtype(mx.float16)
    plans = spy_plans(monkeypatch)
    in_lanes(2)
    vit(pixels(1).astype(mx.float16))
    vit(pixels(2).astype(mx.float16))
    assert plans == ["one", "batch"]


def test_copies_of_replaced_weights_are_dropped(in_lanes):
    vit = model(seed=0, hidden_size=64, intermediate_size=128)
    in_lanes(2)
    vit(pixels(1)).tolist()
    assert all(hasattr(block, "_shares") for block in vit.blocks)
    vit(pixels(2)).tolist()  # the same weights: the copies stay for the next batch 1
    assert all(hasattr(block, "_shares") for block in vit.blocks)
    nn.quantize(vit, group_size=32, bits=8)
    vit(pixels(2)).tolist()
    assert not any(hasattr(block, "_shares") for block in vit.blocks)


def test_a_quantized_model_splits_only_its_batch(in_lanes, monkeypatch):
    vit = model(seed=0, hidden_size=64, intermediate_size=128)
    nn.quantize(vit, group_size=32, bits=8)
    in_lanes(1)
    one = {batch: np.array(vit(pixels(batch))) for batch in (2, 3)}
    plans = spy_plans(monkeypatch)
    in_lanes(2)
    for batch in (2, 3):
        np.testing.assert_allclose(np.array(vit(pixels(batch))), one[batch], rtol=0, atol=1e-5)
    assert plans == ["batch", "one"]


def test_no_lanes_where_attention_goes_in_query_blocks(in_lanes, monkeypatch):
    vit, x = model(), pixels(2)
    in_lanes(1)
    at_once = np.array(vit(x))
    plans = spy_plans(monkeypatch)
    in_lanes(2)
    monkeypatch.setattr(model_module, "ATTENTION_BLOCK", 2 * 4 * 17 * 16)  # 17 tokens: blocks of 16 queries
    np.testing.assert_allclose(np.array(vit(x)), at_once, rtol=0, atol=1e-5)
    assert plans == ["one"]


def test_more_lanes_than_heads_or_too_narrow_run_in_one(in_lanes, monkeypatch):
    vit, x = model(num_attention_heads=2), pixels(1)
    plans = spy_plans(monkeypatch)
    in_lanes(3)
    vit(x)
    in_lanes(2)
    vit(x)
    monkeypatch.setattr(lanes, "MIN_LANE_WIDTH", 25)  # 48 wide: two lanes of 24
    vit(x)
    monkeypatch.setattr(lanes, "MIN_LANE_WIDTH", 24)
    vit(x)
    assert plans == ["one", "tensor", "one", "tensor"]


def test_lane_count_and_thread_budget(monkeypatch):
    for name in (*runtime.THREAD_VARIABLES, "MLX_VIT_CPU_LANES"):
        monkeypatch.delenv(name, raising=False)
    cores = len(os.sched_getaffinity(0))
    assert runtime.decide().threads == cores
    assert runtime.decide().lanes == min(2, cores)
    monkeypatch.setenv("OMP_NUM_THREADS", "6")
    assert runtime.decide().threads == 6
    monkeypatch.setenv("OPENBLAS_NUM_THREADS", "3")  # the BLAS's own variable comes first
    assert runtime.decide().threads == 3
    monkeypatch.setenv("MLX_VIT_CPU_LANES", "8")
    assert runtime.decide().lanes == 3  # never more lanes than threads
    monkeypatch.setenv("MLX_VIT_CPU_LANES", "1")
    assert runtime.decide().lanes == 1
    monkeypatch.setenv("MLX_VIT_CPU_LANES", "0")
    assert runtime.decide().lanes == 1
    monkeypatch.setenv("OPENBLAS_NUM_THREADS", "0")  # not a thread count: the next variable's
    assert runtime.decide().threads == 6
    monkeypatch.setenv("MLX_VIT_CPU_LANES", "")  # unset
    assert runtime.decide().lanes == 2
    for junk in ("two", "\u00b2", "\u0663", "-2", "9" * 5000):  # not counts: one short line
        monkeypatch.setenv("MLX_VIT_CPU_LANES", junk)
        with pytest.raises(NumberError, match="^MLX_VIT_CPU_LANES: .{,60} is not an integer|out of range") as error:
            runtime.decide()
        assert len(str(error.value)) < 120
    monkeypatch.setenv("MLX_VIT_CPU_LANES", "2")
    for junk in ("two", "\u00b2", "9" * 5000):  # the BLAS's own variable: ignored as OpenBLAS's atoi does
        monkeypatch.setenv("OPENBLAS_NUM_THREADS", junk)
        assert runtime.decide().threads == 6


def test_no_lanes_where_the_blas_keeps_its_own_threads(monkeypatch):
    """An OpenMP OpenBLAS counts threads per calling thread: lanes only with one thread each."""

    class OpenMP:
        openblas_get_parallel = staticmethod(lambda: 2)

    monkeypatch.setattr(blas, "_lib", OpenMP())
    monkeypatch.setenv("MLX_VIT_CPU_LANES", "2")
    monkeypatch.setenv("OPENBLAS_NUM_THREADS", "2")
    assert runtime.decide().lanes == 2  # one thread a lane
    monkeypatch.setenv("OPENBLAS_NUM_THREADS", "4")
    assert runtime.decide().lanes == 1
    monkeypatch.setattr(blas.sys, "platform", "darwin")  # Accelerate
    monkeypatch.setenv("OPENBLAS_NUM_THREADS", "2")
    assert runtime.decide().lanes == 1


def test_describe(in_lanes, monkeypatch):
    in_lanes(2)
    monkeypatch.setenv("OPENBLAS_NUM_THREADS", "4")
    assert replan().describe() == "up to 2 CPU lanes of 2 BLAS threads each"
    in_lanes(1)
    assert runtime.current().describe() == "1 CPU lane of 1 BLAS thread"


def test_split():
    assert lanes.split(7, 2) == [(0, 4), (4, 7)]
    assert lanes.split(3, 3) == [(0, 1), (1, 2), (2, 3)]
    assert lanes.split(12, 2) == [(0, 6), (6, 12)]


@pytest.mark.skipif(not hasattr(blas._lib, "openblas_get_num_threads"), reason="needs the system OpenBLAS")
def test_each_lane_gets_its_share_of_the_blas_threads(in_lanes, monkeypatch):
    get = blas._lib.openblas_get_num_threads
    get.restype = ctypes.c_int
    in_lanes(2)
    monkeypatch.setenv("OPENBLAS_NUM_THREADS", "4")
    replan()
    model()(pixels(2))
    assert get() == 2
    model()(pixels(2)).tolist()
    monkeypatch.setenv("MLX_VIT_CPU_LANES", "1")
    replan()
    model()(pixels(2))
    assert get() == 4
    monkeypatch.setenv("MLX_VIT_CPU_LANES", "2")
    replan()
    model()(pixels(2))
    assert get() == 2
    model().with_attention(pixels(2))  # explain's pass: one lane, every thread
    assert get() == 4


def test_a_model_built_by_hand_leaves_the_buffer_cache_as_it_is(monkeypatch):
    """Only a load adopts a plan (and raises MLX's cache of freed buffers); a model built by hand runs by a plan
    decided for it, with the cache as the program left it."""
    monkeypatch.setattr(runtime, "_current", None)
    previous = mx.set_cache_limit(32 << 20)
    try:
        model()(pixels(1)).tolist()
        assert runtime.current().cpu
        assert mx.set_cache_limit(32 << 20) == 32 << 20
    finally:
        mx.set_cache_limit(previous)


def test_the_plan_follows_the_default_device(monkeypatch):
    """A plan is for the device it was decided on: another default device (Metal, CUDA) gets its own, without
    lanes or the CPU's kernels."""
    replan()
    assert runtime.current().cpu
    gpu = mx.Device(mx.gpu)
    monkeypatch.setattr(runtime.mx, "default_device", lambda: gpu)
    plan = runtime.current()
    assert (plan.device, plan.cpu, plan.lanes, plan.describe()) == (gpu, False, 1, "")
    monkeypatch.undo()
    assert runtime.current().cpu
