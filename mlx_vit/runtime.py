"""How this process runs a model on the default device: decided when a model is loaded (and again if the default
device changes), and asked nowhere else.

On the CPU (MLX's CPU backend, as on Linux without CUDA) a plan means: GELU and the softmax's exp in the forms
its vectorizer runs fast (mlx_vit.ops), quantized and half-precision weights expanded to float32 at load (its
quantized and half matmuls are scalar loops), a forward pass split into lanes that share out the BLAS threads
(mlx_vit.lanes), and a larger cache of freed buffers. On Metal or CUDA: none of that, one stream.

The threads: the cores this process may use, or OPENBLAS_NUM_THREADS / MKL_NUM_THREADS / OMP_NUM_THREADS when
set. MLX_VIT_CPU_LANES sets the number of lanes (default 2; 0 or 1 turn them off).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import mlx.core as mx

from mlx_vit import blas, numbers

DEFAULT_LANES = 2
THREAD_VARIABLES = ("OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "OMP_NUM_THREADS")
MAX_COUNT = 4096  # lanes or BLAS threads: more than any machine has cores
# MLX's CPU allocator keeps only 32 MB of freed buffers for reuse; a ViT-B/16 forward pass cycles through more,
# and every buffer allocated afresh is paid again in page faults.
CPU_CACHE_LIMIT = 1 << 30


@dataclass(frozen=True)
class Plan:
    device: mx.Device  # what it was decided for: MLX's default device then
    cpu: bool  # the CPU's kernels, float32 weights, lanes
    lanes: int = 1  # the most CPU lanes a forward pass is split into
    threads: int = 1  # the BLAS threads the lanes share out
    cache_limit: int | None = None  # bytes of freed buffers MLX keeps for reuse, at least (None: MLX's own)

    def threads_per_lane(self, lanes: int) -> int:
        return max(1, self.threads // lanes)

    def describe(self) -> str:
        """How a CPU pass runs, for --version and bench: "up to 2 CPU lanes of 1 BLAS thread each" (a pass may
        run in one: lanes.how); "" off the CPU."""
        if not self.cpu:
            return ""
        threads = self.threads_per_lane(self.lanes)
        lane = f"up to {self.lanes} CPU lanes" if self.lanes > 1 else "1 CPU lane"
        return f"{lane} of {threads} BLAS thread{'s' * (threads > 1)}" + " each" * (self.lanes > 1)


def decide() -> Plan:
    """The plan for the default device and this environment (MLX_VIT_CPU_LANES must be a count: NumberError)."""
    device = mx.default_device()
    if device != mx.cpu:
        return Plan(device, cpu=False)
    threads = thread_budget()
    return Plan(device, cpu=True, lanes=lane_count(threads), threads=threads, cache_limit=CPU_CACHE_LIMIT)


_current: Plan | None = None


def adopt(plan: Plan | None = None) -> Plan:
    """Run from now on as `plan` says (by default one decided now, as loading a model does)."""
    global _current
    plan = _current = plan or decide()
    if plan.cache_limit is not None:
        previous = mx.set_cache_limit(plan.cache_limit)
        if previous > plan.cache_limit:  # never lower a limit someone raised
            mx.set_cache_limit(previous)
    return plan


def current() -> Plan:
    """The plan adopted last; one decided now (and kept, not adopted: MLX's cache stays as it is) if none was or
    if the default device is no longer the one it was decided for (a model built by hand; another device)."""
    global _current
    if _current is None or _current.device != mx.default_device():
        _current = decide()
    return _current


def _count(name: str) -> int | None:
    """The environment variable `name` as a count, or None when unset. MLX_VIT_CPU_LANES must be a count (else
    NumberError); a BLAS's own variable that is not one is left to the BLAS, and ignored here."""
    try:
        return numbers.environment_int(name, 0, MAX_COUNT)
    except numbers.NumberError:
        if name == "MLX_VIT_CPU_LANES":
            raise
        return None


def thread_budget() -> int:
    """How many threads a forward pass may keep busy: the user's BLAS thread count, or this process's cores."""
    for name in THREAD_VARIABLES:
        if count := _count(name):
            return count
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def lane_count(threads: int) -> int:
    """The number of lanes a CPU pass runs in: MLX_VIT_CPU_LANES (default 2; 0 or 1: one), at most one a thread.
    One where the BLAS's threads cannot be shared out: Accelerate's, or an OpenMP OpenBLAS's beyond one a lane
    (its count is per calling thread, so the lanes' threads would each use every core)."""
    wanted = _count("MLX_VIT_CPU_LANES")
    count = max(1, min(DEFAULT_LANES if wanted is None else wanted, threads))
    if count > 1 and not blas.shares_threads(max(1, threads // count)):
        return 1
    return count
