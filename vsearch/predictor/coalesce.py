"""Micro-batching for an in-process embedder shared by many threads (the search service runs
each query on a worker thread): concurrent ``embed_bytes`` calls decode in their own threads
and share forward passes, so concurrent single-image queries get batch throughput with no
added wait (the asyncio twin for the embedder server is :mod:`.batching`)."""

from __future__ import annotations

import queue
import threading
from typing import Sequence

import numpy as np

from .preprocess import Box


class _Job:
    __slots__ = ("arrays", "result", "error", "done")

    def __init__(self, arrays: np.ndarray):
        self.arrays, self.result, self.error = arrays, None, None
        self.done = threading.Event()


class CoalescingEmbedder:
    """Wraps an in-process embedder (``preprocess_bytes`` + ``embed_arrays``, e.g.
    :class:`~vsearch.predictor.inference.Embedder`); everything but ``embed_bytes`` is the
    wrapped embedder's. One forward thread takes the first waiting call and every call queued
    behind it, up to ``max_batch`` images (a larger call runs whole), runs them as one batch
    and hands each caller its rows; an error of a pass reaches every caller in it."""

    def __init__(self, inner, max_batch: int = 16):
        if max_batch < 1:
            raise ValueError("max_batch must be at least 1")
        self.inner, self.max_batch = inner, int(max_batch)
        self._queue: queue.SimpleQueue[_Job] = queue.SimpleQueue()
        self._carry: _Job | None = None
        self.passes = 0
        self._thread = threading.Thread(target=self._run, name="coalesced-forward", daemon=True)
        self._thread.start()

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def embed_bytes(self, blobs: Sequence[bytes], crops: Sequence[Box | None] | None = None) -> np.ndarray:
        job = _Job(self.inner.preprocess_bytes(blobs, crops))     # decoding stays in this thread
        if len(job.arrays) == 0:
            return self.inner.embed_arrays(job.arrays)
        self._queue.put(job)
        job.done.wait()
        if job.error is not None:
            raise job.error
        return job.result

    def _take(self) -> list[_Job]:
        first = self._carry if self._carry is not None else self._queue.get()
        self._carry = None
        batch, rows = [first], len(first.arrays)
        while True:
            try:
                job = self._queue.get_nowait()
            except queue.Empty:
                return batch
            if rows + len(job.arrays) > self.max_batch:
                self._carry = job              # first in the next pass
                return batch
            batch.append(job)
            rows += len(job.arrays)

    def _run(self) -> None:
        while True:
            batch = self._take()
            try:
                out = self.inner.embed_arrays(np.concatenate([j.arrays for j in batch]))
                start = 0
                for j in batch:
                    j.result = out[start:start + len(j.arrays)]
                    start += len(j.arrays)
            except BaseException as exc:  # noqa: BLE001  (the model's error goes to its callers)
                for j in batch:
                    j.error = exc
            self.passes += 1
            for j in batch:
                j.done.set()
