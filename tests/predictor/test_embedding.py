"""The embedder contract (predictor/embedding.py): the in-process model and the KServe client
are both an ImageEmbedder, and answer the same images the same way."""

from __future__ import annotations

import numpy as np
import pytest

from vsearch.predictor.client import EmbedderClient
from vsearch.predictor.embedding import ImageEmbedder
from vsearch.predictor.inference import Embedder
from vsearch.predictor.preprocess import InvalidImage


@pytest.fixture(scope="module")
def local(tiny_model_dir):
    emb = Embedder(tiny_model_dir)
    yield emb
    emb.close()


def test_both_embedders_keep_the_contract(local, embedder_url):
    remote = EmbedderClient(embedder_url)
    assert isinstance(local, ImageEmbedder) and isinstance(remote, ImageEmbedder)
    assert local.endpoint is None and remote.endpoint == embedder_url.rstrip("/")
    assert (local.model_name, local.version, local.model_id) == (local.meta.name, local.meta.version,
                                                                 local.meta.model_id)
    assert remote.dim == local.dim
    assert remote.model_id == "embedder"                 # no version until the endpoint answered
    assert not isinstance(object(), ImageEmbedder)


def test_embed_each_answers_every_image_and_isolates_the_bad_ones_in_process_and_remote(
        local, embedder_url, photo_bytes):
    remote = EmbedderClient(embedder_url, batch_size=8)
    blobs = [photo_bytes[0], b"definitely not an image", photo_bytes[1], b"\xff\xd8 cut jpeg", photo_bytes[2]]
    expected = local.embed_bytes([photo_bytes[0], photo_bytes[1], photo_bytes[2]])
    for emb in (local, remote):
        out = emb.embed_each(blobs)
        assert len(out) == len(blobs)
        assert isinstance(out[1], InvalidImage) and isinstance(out[3], InvalidImage), type(emb).__name__
        np.testing.assert_allclose(np.stack([out[0], out[2], out[4]]), expected, atol=1e-5)
    assert remote.model_id == f"embedder__{local.version}"   # the version the endpoint served
    assert local.embed_each([]) == [] and remote.embed_each([]) == []


def test_requests_in_flight_answer_in_order_like_one_at_a_time(embedder_url, photo_bytes):
    """A call of several requests keeps two open at once (the embedder decodes one while its
    model runs the other): the vectors come back in the callers' order, equal to the
    one-request-at-a-time answers, and a refused image is still isolated to itself."""
    blobs = [photo_bytes[i % len(photo_bytes)] for i in range(11)]
    blobs[5] = b"not an image"
    serial = EmbedderClient(embedder_url, batch_size=2, in_flight=1)
    overlapped = EmbedderClient(embedder_url, batch_size=2, in_flight=2)
    try:
        good = [b for i, b in enumerate(blobs) if i != 5]
        np.testing.assert_allclose(overlapped.embed_bytes(good), serial.embed_bytes(good), atol=1e-5)
        with pytest.raises(InvalidImage):
            overlapped.embed_bytes(blobs)
        out = overlapped.embed_each(blobs)
        assert isinstance(out[5], InvalidImage)
        np.testing.assert_allclose(np.stack([v for i, v in enumerate(out) if i != 5]), serial.embed_bytes(good),
                                   atol=1e-5)
    finally:
        serial.close()
        overlapped.close()
