"""LocalGroup: N feature shards in N threads of one process with the step's collectives — the
in-process stand-in for an all-reduce group in the tests (parity with one process and with Ray)."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import TypeVar

import torch
from torch import Tensor

from clt_ray.nn.clt import Gather
from clt_ray.nn.step import ReduceSum

T = TypeVar("T")


class LocalGroup:
    """N feature shards in N threads of one process, with the collectives the step needs: the
    in-process stand-in for an all-reduce group (tests; multi-shard runs without Ray).
    Sums run in rank order, so every rank gets bitwise the same result, as an all-reduce does."""

    def __init__(self, n: int, timeout: float = 120.0) -> None:
        self.n = n
        self._barrier = threading.Barrier(n, timeout=timeout)
        self._slots: list[Tensor | None] = [None] * n

    def _exchange(self, rank: int, t: Tensor) -> list[Tensor]:
        self._slots[rank] = t
        self._barrier.wait()
        out = list(self._slots)
        self._barrier.wait()  # all have read before anyone writes the next round
        return out  # type: ignore[return-value]

    def reduce_sum(self, rank: int) -> ReduceSum:
        def reduce(t: Tensor) -> Tensor:
            parts = self._exchange(rank, t)
            total = parts[0].clone()
            for p in parts[1:]:
                total += p
            return total

        return reduce

    def gather(self, rank: int) -> Gather:
        return lambda t: torch.cat(self._exchange(rank, t), dim=-1)

    def run(self, fn: Callable[[int], T]) -> list[T]:
        """fn(rank) in one thread per rank; results in rank order; the first error is re-raised
        (the barrier is broken so no other rank waits forever)."""
        results: list = [None] * self.n
        errors: list[BaseException] = []

        def target(rank: int) -> None:
            try:
                results[rank] = fn(rank)
            except BaseException as exc:  # noqa: BLE001 - handed to the caller below
                errors.append(exc)
                self._barrier.abort()

        threads = [threading.Thread(target=target, args=(r,)) for r in range(self.n)]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        if errors:
            raise next((e for e in errors if not isinstance(e, threading.BrokenBarrierError)),
                       errors[0])
        return results
