"""Several processes, or several Macs, under MLX's own launcher (`mlx.launch`).

Only a process that `mlx.launch` started (it sets MLX_RANK) joins a group; any other run is rank 0 of 1 and
never touches mx.distributed. Ranks exchange bytes with all_gather, which every backend has: each round, every
rank sends its message's length, then the messages padded to the longest.
"""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Iterable, Iterator
from itertools import islice
from typing import Any, Protocol

import numpy as np

from mlx_vit import numbers
from mlx_vit.errors import MlxVitError
from mlx_vit.files import read_limited

_group: Any = None
MAX_RANKS = 65536
# The JSON files MLX's ring and JACCL backends read at init (hosts and their addresses: kilobytes).
FILE_VARIABLES = ("MLX_HOSTFILE", "MLX_IBV_DEVICES")
MAX_HOSTFILE_BYTES = 2**20


class Codec(Protocol):
    """Records to bytes and back, to send them from a rank to rank 0."""

    def encode(self, records: list[Any]) -> bytes: ...
    def decode(self, data: bytes) -> list[Any]: ...


def world() -> tuple[int, int]:
    """(rank, size): (0, 1) unless this process was started by mlx.launch."""
    global _group
    if "MLX_RANK" not in os.environ:
        return 0, 1
    if _group is None:
        import mlx.core as mx

        _check_environment()
        try:
            _group = mx.distributed.init(strict=True)
        except RuntimeError as error:
            raise MlxVitError(f"mlx.launch started this process, but MLX could not join its group: {error}") from None
    return _group.rank(), _group.size()


def _check_environment() -> None:
    """What MLX's backends will read, checked first: MLX blocks for ever on a FIFO named as its hostfile."""
    numbers.environment_int("MLX_RANK", 0, MAX_RANKS)
    numbers.environment_int("MLX_WORLD_SIZE", 1, MAX_RANKS)
    for name in FILE_VARIABLES:
        if os.environ.get(name):
            try:
                read_limited(os.environ[name], MAX_HOSTFILE_BYTES, MlxVitError, "host file")
            except MlxVitError as error:
                raise MlxVitError(f"{name}: {error}") from None


def mine(items: Iterable[Any], rank: int, size: int) -> Iterator[Any]:
    """This rank's share: items rank, rank + size, rank + 2·size, ..."""
    return iter(items) if size == 1 else islice(items, rank, None, size)


def all_gather_bytes(data: bytes) -> list[bytes]:
    """Every rank's `data`, in rank order, on every rank."""
    import mlx.core as mx

    lengths = mx.distributed.all_gather(mx.array([len(data)], dtype=mx.int64), group=_group, stream=mx.cpu)
    lengths = np.array(lengths).tolist()
    longest = max(lengths)
    if longest == 0:
        return [b""] * len(lengths)
    padded = np.zeros(longest, np.uint8)
    padded[: len(data)] = np.frombuffer(data, np.uint8)
    gathered = np.array(mx.distributed.all_gather(mx.array(padded), group=_group, stream=mx.cpu))
    return [gathered[i * longest : i * longest + n].tobytes() for i, n in enumerate(lengths)]


def broadcast_hashes(hashes: np.ndarray) -> np.ndarray:
    """Rank 0's uint64 array, on every rank."""
    rank, _ = world()
    return np.frombuffer(all_gather_bytes(hashes.tobytes() if rank == 0 else b"")[0], np.uint64).copy()


def gathered(local: Iterator[list[Any]], codec: Codec) -> Iterator[list[Any]]:
    """Every rank's batches merged on rank 0, in input order; the other ranks get [] for each round.

    Input i is rank i % size's (see `mine`), so rank 0 takes the records from each rank's queue in turn. A round
    in which every rank has run out ends it, after what is left in the queues.
    """
    rank, size = world()
    queues: list[deque] = [deque() for _ in range(size)]
    running = [True] * size
    turn = 0
    while True:
        batch = next(local, None)
        message = b"" if batch is None else b"+" + codec.encode(batch)
        parts = all_gather_bytes(message)
        if rank != 0:
            if not any(parts):
                return
            yield []
            continue
        for r, part in enumerate(parts):
            running[r] = bool(part)
            if part:
                queues[r].extend(codec.decode(part[1:]))
        merged = []
        while queues[turn] or (not running[turn] and any(queues)):
            if queues[turn]:
                merged.append(queues[turn].popleft())
            turn = (turn + 1) % size
        if merged:
            yield merged
        if not any(parts):
            return
