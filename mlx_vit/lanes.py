"""CPU lanes: one forward pass as parts on several MLX streams, so that every core works all the time.

On the CPU, MLX runs a stream's elementwise work (LayerNorm, GELU, the softmax, copies) on that stream's one
thread, while the BLAS spreads each matmul over every core. On two cores about a quarter of a ViT-B pass ran on
one core so. With two lanes, two streams that each call a BLAS of half the threads, both cores are busy throughout:
the matmuls keep their throughput and the rest goes twice as fast.

`run` splits a batch the lanes divide into one part a lane, which never meet. Any other batch (batch 1) is split
as tensor-parallel transformers are: each lane has some of the heads and some of the MLP's hidden units, and
the lanes add up their parts of the attention's and the MLP's output projection, twice a block. A lane's share of
`proj` and `fc2` is a column slice, which BLAS cannot read in place, so those are copied once, per block, the
first time (ViT-B: ~140 MB), and again when the weights are replaced (`forget` after editing them in place). A
model not in float32, or one too narrow to gain (MIN_LANE_WIDTH), runs such a batch in one lane.

How many lanes and threads is the runtime plan's (mlx_vit.runtime, decided at the last load). The block's own
code runs in each lane (Block.stages): nothing here knows what a block holds.
"""

from __future__ import annotations

import functools
import operator
import threading

import mlx.core as mx
import mlx.nn as nn

from mlx_vit import blas, runtime

# The tensor split pays when each lane gets at least this much of the model's width: at batch 1 on 2 cores,
# ViT-B (768, two lanes of 384) took 0.87-0.90x the one-lane time, ViT-S (384) 0.97x and ViT-Ti (192) 1.24x.
MIN_LANE_WIDTH = 384

_local = threading.local()  # .streams: this thread's CPU streams, its default one first
_threads: int | None = None  # BLAS threads per call, as last set here


def streams() -> list[mx.Stream]:
    """The streams a forward pass should be split over: one per lane of the plan on the CPU, else just the
    default stream."""
    plan = runtime.current()
    if not plan.cpu:
        return [mx.default_stream(mx.default_device())]
    made = getattr(_local, "streams", None)
    if made is None:  # MLX's streams belong to the thread that made them: made once a thread, on first use
        made = _local.streams = [mx.default_stream(mx.cpu)]
    while len(made) < plan.lanes:
        made.append(mx.new_stream(mx.cpu))
    return made[: plan.lanes]


def use(lanes: int) -> None:
    """Give each BLAS call its share of the threads for a pass in `lanes` lanes. Set as a pass is built: MLX
    evaluates it later, and every caller here evaluates a pass before it builds the next."""
    global _threads
    plan = runtime.current()
    threads = plan.threads_per_lane(lanes)
    if plan.cpu and threads != _threads and blas.set_threads(threads):
        _threads = threads


def split(count: int, parts: int) -> list[tuple[int, int]]:
    """(start, stop) of `parts` nearly equal runs covering range(count), the longer ones first."""
    size, extra = divmod(count, parts)
    bounds = [0]
    for part in range(parts):
        bounds.append(bounds[-1] + size + (part < extra))
    return list(zip(bounds, bounds[1:], strict=False))


def how(blocks: list[nn.Module], batch: int, streams: list[mx.Stream]) -> str:
    """How `run` runs a batch: "batch" (a part of the batch a lane), "tensor" (a part of each block a lane) or
    "one": one stream, or a batch the lanes do not divide, of blocks that cannot be split in as many shares
    (Block.splits: not float32, fewer heads than lanes) or too narrow to gain (MIN_LANE_WIDTH)."""
    if len(streams) < 2:
        return "one"
    if batch % len(streams) == 0:
        return "batch"
    wide = blocks[0].width >= MIN_LANE_WIDTH * len(streams)  # every block has the same shapes
    return "tensor" if wide and all(block.splits(len(streams)) for block in blocks) else "one"


def run(blocks: list[nn.Module], x: mx.array, streams: list[mx.Stream]) -> mx.array:
    """The transformer blocks on (B, T, D) tokens in one lane a stream (see the module's docstring)."""
    way = how(blocks, x.shape[0], streams)
    use(1 if way == "one" else len(streams))
    if way != "tensor":
        forget(blocks, stale_only=True)  # copies of replaced weights (quantized, say) would hold memory for nothing
    if way == "batch":
        parts = []
        for stream, (start, stop) in zip(streams, split(x.shape[0], len(streams)), strict=True):
            with mx.stream(stream):
                part = x[start:stop]
                for block in blocks:
                    part = block(part)
            parts.append(part)
        return mx.concatenate(parts, axis=0)
    if way == "tensor":
        xs = [x] * len(streams)
        for block in blocks:
            xs = _tensor_parallel(block, xs, streams)
        return xs[0]
    for block in blocks:
        x = block(x)
    return x


def forget(blocks: list[nn.Module], stale_only: bool = False) -> None:
    """Drop the blocks' lane shares (all, or those whose weights were replaced), so they are made again."""
    for block in blocks:
        kept = getattr(block, "_shares", None)
        if kept is not None and not (stale_only and kept[0].fits(block)):
            object.__delattr__(block, "_shares")


def _shares(block: nn.Module, count: int) -> list:
    """The block's `count` shares: made the first time, and again when its weights were replaced. Kept as a plain
    Python attribute, outside the Module's tree (where MLX would keep a list), so that tree_map and friends never
    meet them."""
    kept = getattr(block, "_shares", None)
    if kept is None or len(kept) != count or not kept[0].fits(block):
        kept = block.shares(split(block.attention_heads, count), split(block.hidden_units, count))
        object.__setattr__(block, "_shares", kept)
    return kept


def _tensor_parallel(block: nn.Module, xs: list[mx.array], streams: list[mx.Stream]) -> list[mx.array]:
    """One block, each lane with its share of it; `xs` holds every lane's (equal) copy of the input. Each stage's
    parts meet in every lane, added up in the same order there: the copies stay equal."""
    shares = _shares(block, len(streams))
    for branch, residual in block.stages():
        parts = []
        for stream, x, share in zip(streams, xs, shares, strict=True):
            with mx.stream(stream):
                parts.append(branch(x, share))
        whole = []
        for stream, x in zip(streams, xs, strict=True):
            with mx.stream(stream):
                whole.append(residual(x, functools.reduce(operator.add, parts), split=True))
        xs = whole
    return xs
