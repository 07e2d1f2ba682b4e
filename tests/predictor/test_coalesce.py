"""CoalescingEmbedder: concurrent in-process queries (the search service's threads) share
forward passes of the real model, and each caller gets exactly its own vectors."""

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from vsearch.predictor.coalesce import CoalescingEmbedder
from vsearch.predictor.inference import Embedder
from vsearch.predictor.preprocess import InvalidImage


class SlowForward:
    """The real tiny model whose forward pass takes at least 40 ms (a bigger model's time), so
    that calls arriving during a pass are seen waiting; records each pass's rows."""

    def __init__(self, inner: Embedder):
        self.inner, self.rows = inner, []

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def embed_arrays(self, x):
        self.rows.append(len(x))
        time.sleep(0.04)
        return self.inner.embed_arrays(x)


def test_concurrent_calls_share_passes_and_get_their_own_rows(tiny_model_dir, photo_bytes):
    inner = Embedder(tiny_model_dir, batch_size=16)
    expected = inner.embed_bytes(photo_bytes)
    slow = SlowForward(inner)
    emb = CoalescingEmbedder(slow, max_batch=4)
    n = len(photo_bytes)
    barrier = threading.Barrier(n)

    def one(i):
        barrier.wait()
        return emb.embed_bytes([photo_bytes[i]], [(0.0, 0.0, 1.0, 1.0)])

    with ThreadPoolExecutor(n) as pool:
        outs = list(pool.map(one, range(n)))
    for i, out in enumerate(outs):
        assert out.shape == (1, inner.dim)
        np.testing.assert_allclose(out[0], expected[i], atol=1e-5)
    assert len(slow.rows) < n and max(slow.rows) <= 4 and sum(slow.rows) == n
    assert emb.dim == inner.dim and emb.model_id == inner.model_id and emb.endpoint is None
    # a call of more rows than max_batch runs whole; a bad image fails its own call only
    assert emb.embed_bytes(photo_bytes[:6]).shape == (6, inner.dim)
    with pytest.raises(InvalidImage):
        emb.embed_bytes([b"not an image"])
    np.testing.assert_allclose(emb.embed_bytes(photo_bytes[:1])[0], expected[0], atol=1e-5)
