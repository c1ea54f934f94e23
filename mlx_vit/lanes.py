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

The threads: the cores this process may use, or OPENBLAS_NUM_THREADS / MKL_NUM_THREADS / OMP_NUM_THREADS when
set, shared out among the lanes. MLX_VIT_CPU_LANES sets the number of lanes (default 2; 0 or 1 turn them off).
Off the CPU (Metal, CUDA) there is one lane and nothing here runs.
"""

from __future__ import annotations

import os
import threading
import weakref

import mlx.core as mx
import mlx.nn as nn

from mlx_vit import blas, numbers

DEFAULT_LANES = 2
# The tensor split pays when each lane gets at least this much of the model's width: at batch 1 on 2 cores,
# ViT-B (768, two lanes of 384) took 0.87-0.90x the one-lane time, ViT-S (384) 0.97x and ViT-Ti (192) 1.24x.
MIN_LANE_WIDTH = 384
THREAD_VARIABLES = ("OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "OMP_NUM_THREADS")
MAX_COUNT = 4096  # lanes or BLAS threads: more than any machine has cores

_local = threading.local()  # .streams: this thread's CPU streams, its default one first
_threads: int | None = None  # BLAS threads per call, as last set here


def _count(name: str) -> int | None:
    """The environment variable `name` as a count, or None when unset. MLX_VIT_CPU_LANES must be a count (else
    NumberError); a BLAS's own variable that is not one is left to the BLAS, and ignored here."""
    try:
        return numbers.environment_int(name, 0, MAX_COUNT)
    except numbers.NumberError:
        if name == "MLX_VIT_CPU_LANES":
            raise
        return None


def _positive(name: str) -> int | None:
    count = _count(name)
    return count if count else None


def thread_budget() -> int:
    """How many threads a forward pass may keep busy: the user's BLAS thread count, or this process's cores."""
    for name in THREAD_VARIABLES:
        if (count := _positive(name)) is not None:
            return count
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def lane_count() -> int:
    """The number of lanes a CPU pass runs in: MLX_VIT_CPU_LANES (default 2; 0 or 1: one), at most one a thread.
    One where the BLAS's threads cannot be shared out: Accelerate's, or an OpenMP OpenBLAS's beyond one a lane
    (its count is per calling thread, so the lanes' threads would each use every core)."""
    wanted = _count("MLX_VIT_CPU_LANES")
    count = max(1, min(DEFAULT_LANES if wanted is None else wanted, thread_budget()))
    if count > 1 and not blas.shares_threads(threads_per_lane(count)):
        return 1
    return count


def streams() -> list[mx.Stream]:
    """The streams a forward pass on the default device should be split over: one per lane on the CPU, else
    just the default stream."""
    if mx.default_device() != mx.cpu:
        return [mx.default_stream(mx.default_device())]
    count = lane_count()
    made = getattr(_local, "streams", None)
    if made is None:  # MLX's streams belong to the thread that made them: made once a thread, on first use
        made = _local.streams = [mx.default_stream(mx.cpu)]
    while len(made) < count:
        made.append(mx.new_stream(mx.cpu))
    return made[:count]


def threads_per_lane(lanes: int) -> int:
    return max(1, thread_budget() // lanes)


def describe() -> str:
    """How a CPU pass runs, for --version and bench: "up to 2 CPU lanes of 1 BLAS thread each" (plan says when
    a pass runs in one); "" off the CPU."""
    if mx.default_device() != mx.cpu:
        return ""
    count = lane_count()
    threads = threads_per_lane(count)
    lane = f"up to {count} CPU lanes" if count > 1 else "1 CPU lane"
    return f"{lane} of {threads} BLAS thread{'s' * (threads > 1)}" + " each" * (count > 1)


def use(lanes: int) -> None:
    """Give each BLAS call its share of the threads for a pass in `lanes` lanes. Set as a pass is built: MLX
    evaluates it later, and every caller here evaluates a pass before it builds the next."""
    global _threads
    threads = threads_per_lane(lanes)
    if threads != _threads and mx.default_device() == mx.cpu and blas.set_threads(threads):
        _threads = threads


def split(count: int, parts: int) -> list[tuple[int, int]]:
    """(start, stop) of `parts` nearly equal runs covering range(count), the longer ones first."""
    size, extra = divmod(count, parts)
    bounds = [0]
    for part in range(parts):
        bounds.append(bounds[-1] + size + (part < extra))
    return list(zip(bounds, bounds[1:], strict=False))


def plan(blocks: list[nn.Module], batch: int, streams: list[mx.Stream]) -> str:
    """How `run` runs a batch: "batch" (a part of the batch a lane), "tensor" (a part of each block a lane) or
    "one": one stream, or a batch the lanes do not divide, of a model not in float32 (quantized, half), or of one
    too narrow to gain (MIN_LANE_WIDTH) or with fewer heads than lanes."""
    if len(streams) < 2:
        return "one"
    if batch % len(streams) == 0:
        return "batch"
    block = blocks[0]  # every block has the same shapes
    wide = block.attn.proj.weight.shape[0] >= MIN_LANE_WIDTH * len(streams) and block.attn.num_heads >= len(streams)
    # float32 only: in half precision the lanes' partial sums would be rounded before they are added
    float32 = all(
        type(layer) is nn.Linear and layer.weight.dtype == mx.float32 for b in blocks for layer in _linears(b)
    )
    return "tensor" if wide and float32 else "one"


def run(blocks: list[nn.Module], x: mx.array, streams: list[mx.Stream]) -> mx.array:
    """The transformer blocks on (B, T, D) tokens in one lane a stream (see the module's docstring)."""
    how = plan(blocks, x.shape[0], streams)
    use(1 if how == "one" else len(streams))
    if how != "tensor":
        forget(blocks, stale_only=True)  # copies of replaced weights (quantized, say) would hold memory for nothing
    if how == "batch":
        parts = []
        for stream, (start, stop) in zip(streams, split(x.shape[0], len(streams)), strict=True):
            with mx.stream(stream):
                part = x[start:stop]
                for block in blocks:
                    part = block(part)
            parts.append(part)
        return mx.concatenate(parts, axis=0)
    if how == "tensor":
        xs = [x] * len(streams)
        for block in blocks:
            xs = _tensor_parallel(block, xs, streams)
        return xs[0]
    for block in blocks:
        x = block(x)
    return x


def _linears(block: nn.Module) -> tuple[nn.Module, ...]:
    return block.attn.qkv, block.attn.proj, block.mlp.fc1, block.mlp.fc2


class _Lane:
    """One lane's share of a block: its heads' rows of `qkv` and its hidden units' rows of `fc1` (read in place
    as views), and the matching columns of `proj` and `fc2` (copied once: BLAS cannot read a column slice)."""

    def __init__(self, block: nn.Module, heads: tuple[int, int], hidden: tuple[int, int]):
        self.heads, self.hidden = heads, hidden
        self.proj = mx.contiguous(block.attn.proj.weight[:, heads[0] : heads[1]])
        self.fc2 = mx.contiguous(block.mlp.fc2.weight[:, hidden[0] : hidden[1]])


class _Split:
    """A block's lanes and (weakly) the `proj` and `fc2` weights their copies were made from; a plain object,
    which an MLX Module keeps as an attribute, not as one of its parameters. A weight replaced (update,
    load_weights, set_dtype, quantize) makes it stale; one edited in place (`w[:] = ...`) does not: call
    `forget` then."""

    def __init__(self, block: nn.Module, count: int):
        self.sources = [weakref.ref(layer.weight) for layer in _copied(block)]
        head = block.attn.proj.weight.shape[0] // block.attn.num_heads
        heads = [(start * head, stop * head) for start, stop in split(block.attn.num_heads, count)]
        hidden = split(block.mlp.fc1.weight.shape[0], count)
        # Not evaluated here: the pass evaluates them, also under mx.compile, where weights are placeholders.
        self.lanes = [_Lane(block, *share) for share in zip(heads, hidden, strict=True)]

    def fits(self, block: nn.Module, count: int | None = None) -> bool:
        now = [layer.weight for layer in _copied(block)]
        same = all(source() is weight for source, weight in zip(self.sources, now, strict=True))
        return same and count in (None, len(self.lanes))


def _copied(block: nn.Module) -> tuple[nn.Module, nn.Module]:
    return block.attn.proj, block.mlp.fc2


def _lanes_of(block: nn.Module, count: int) -> list[_Lane]:
    """The block's `count` lanes: made the first time, and again when its weights were replaced."""
    kept = getattr(block, "_split", None)
    if kept is None or not kept.fits(block, count):
        kept = block._split = _Split(block, count)
    return kept.lanes


def forget(blocks: list[nn.Module], stale_only: bool = False) -> None:
    """Drop the blocks' lane copies (all, or those whose weights were replaced), so they are made again."""
    for block in blocks:
        kept = getattr(block, "_split", None)
        if kept is not None and not (stale_only and kept.fits(block)):
            del block._split


def _rows(layer: nn.Module, start: int, stop: int, x: mx.array) -> mx.array:
    """x through the output units start:stop of a Linear: a row slice of its weight, which BLAS reads in place."""
    out = x @ layer.weight[start:stop].T
    return out + layer.bias[start:stop] if "bias" in layer else out


def _tensor_parallel(block: nn.Module, xs: list[mx.array], streams: list[mx.Stream]) -> list[mx.array]:
    """One block, each lane with its heads and hidden units; `xs` holds every lane's (equal) copy of the input."""
    attn, mlp = block.attn, block.mlp
    shares = list(zip(streams, xs, _lanes_of(block, len(streams)), strict=True))
    B, T, D = xs[0].shape
    attended = []
    for stream, x, lane in shares:
        with mx.stream(stream):
            h = block.norm1(x)
            a, b = lane.heads
            q, k, v = (_rows(attn.qkv, i * D + a, i * D + b, h).reshape(B, T, -1, D // attn.num_heads)
                       .transpose(0, 2, 1, 3) for i in range(3))  # fmt: skip
            attended.append(attn.mix(q, k, v) @ lane.proj.T)
    ys, mlps = [], []
    for stream, x, lane in shares:
        with mx.stream(stream):  # every lane adds up the same parts in the same order: equal copies
            y = block.add_attention(x, sum(attended) + attn.proj.bias)
            ys.append(y)
            mlps.append(mlp.act(_rows(mlp.fc1, *lane.hidden, block.norm2(y))) @ lane.fc2.T)
    out = []
    for (stream, _, _), y in zip(shares, ys, strict=True):
        with mx.stream(stream):
            out.append(block.add_mlp(y, sum(mlps) + mlp.fc2.bias))
    return out
