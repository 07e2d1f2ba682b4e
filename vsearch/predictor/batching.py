"""Micro-batching: requests that arrive while the model is busy are run together in the next
forward pass, so concurrent single-image requests get batch throughput with no added wait."""

from __future__ import annotations

import asyncio
import concurrent.futures as futures
from typing import Callable

import numpy as np

from .serving import Busy


class MicroBatcher:
    """``await batcher(arrays)`` -> ``fn(arrays)``, with concurrent calls coalesced.

    ``fn`` maps [N, ...] to [N, D] and blocks; it runs on one worker thread (torch already uses
    every core for one batch). While it runs, new calls queue up; the next pass takes queued
    calls in arrival order up to ``max_rows`` rows (a single larger call still runs whole).
    At most ``max_pending`` rows wait (None: no bound); a call that would pass it raises
    :class:`~vsearch.predictor.serving.Busy` at once (the server answers 503)."""

    def __init__(self, fn: Callable[[np.ndarray], np.ndarray], max_rows: int = 64,
                 on_pass: Callable[[int], None] | None = None, max_pending: int | None = None):
        self.fn, self.max_rows, self.max_pending = fn, max_rows, max_pending
        self.on_pass = on_pass            # called with the number of rows after each pass
        self._pending: list[tuple[np.ndarray, asyncio.Future]] = []
        self._runner: asyncio.Task | None = None
        self._executor = futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="forward")
        self.passes = 0

    @property
    def pending_rows(self) -> int:
        return sum(len(a) for a, _ in self._pending)

    async def __call__(self, arrays: np.ndarray) -> np.ndarray:
        if self.max_pending is not None and self._pending and self.pending_rows + len(arrays) > self.max_pending:
            raise Busy(f"{self.pending_rows} images are waiting for the model (the limit is "
                       f"{self.max_pending}); retry later")
        fut = asyncio.get_running_loop().create_future()
        self._pending.append((arrays, fut))
        if self._runner is None or self._runner.done():
            self._runner = asyncio.create_task(self._run())
        return await fut

    def _take(self) -> list[tuple[np.ndarray, asyncio.Future]]:
        batch, rows = [], 0
        while self._pending and (not batch or rows + len(self._pending[0][0]) <= self.max_rows):
            item = self._pending.pop(0)
            batch.append(item)
            rows += len(item[0])
        return batch

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while self._pending:
            batch = self._take()
            try:
                out = await loop.run_in_executor(
                    self._executor, self.fn, np.concatenate([a for a, _ in batch]))
            except Exception as exc:  # noqa: BLE001  (whatever the model raised goes to its callers)  # every caller of this pass gets the error
                for _, fut in batch:
                    if not fut.done():
                        fut.set_exception(exc)
                continue
            self.passes += 1
            if self.on_pass:
                self.on_pass(len(out))
            start = 0
            for arrays, fut in batch:
                if not fut.done():
                    fut.set_result(out[start:start + len(arrays)])
                start += len(arrays)
