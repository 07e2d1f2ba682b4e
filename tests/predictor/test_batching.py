"""MicroBatcher: concurrent calls share forward passes and each gets exactly its rows."""

import asyncio
import time

import numpy as np
import pytest

from vsearch.predictor.batching import MicroBatcher
from vsearch.predictor.serving import Busy


def slow_double(x):
    time.sleep(0.05)
    return x * 2


def test_concurrent_calls_are_coalesced_in_order():
    batcher = MicroBatcher(slow_double, max_rows=8)

    async def main():
        calls = [np.full((n, 2), i, np.float32) for i, n in enumerate([1, 2, 1, 3, 1, 1])]
        return calls, await asyncio.gather(*(batcher(c) for c in calls))

    calls, outs = asyncio.run(main())
    for c, o in zip(calls, outs):
        np.testing.assert_array_equal(o, c * 2)
    assert batcher.passes < len(calls)      # fewer passes than calls: they were batched


def test_max_rows_splits_passes_and_errors_reach_every_caller():
    batcher = MicroBatcher(slow_double, max_rows=2)

    async def main():
        return await asyncio.gather(*(batcher(np.ones((1, 1))) for _ in range(5)))

    assert len(asyncio.run(main())) == 5
    assert batcher.passes >= 3

    def boom(x):
        raise RuntimeError("model failed")

    failing = MicroBatcher(boom)

    async def fail():
        return await asyncio.gather(*(failing(np.ones((1, 1))) for _ in range(3)), return_exceptions=True)

    errors = asyncio.run(fail())
    assert all(isinstance(e, RuntimeError) for e in errors)
    with pytest.raises(RuntimeError):
        asyncio.run(failing(np.ones((1, 1))))


def test_a_full_queue_is_refused_at_once_not_queued():
    def slow(x):
        time.sleep(0.2)
        return x.reshape(len(x), -1)

    async def main():
        b = MicroBatcher(slow, max_rows=1, max_pending=2)
        calls = [asyncio.ensure_future(b(np.zeros((1, 2)))) for _ in range(6)]
        return await asyncio.gather(*calls, return_exceptions=True)

    out = asyncio.run(main())
    busy = [o for o in out if isinstance(o, Busy)]
    assert 1 <= len(busy) <= 4 and all("retry later" in str(o) for o in busy)
    assert all(isinstance(o, np.ndarray) for o in out if not isinstance(o, Busy))
