"""The embedder contract: what the ingest consumer and the search service call, whether the
model runs in this process (:class:`vsearch.predictor.inference.Embedder`) or behind the
embedder's KServe V2 endpoint (:class:`vsearch.predictor.client.EmbedderClient`).

Errors: an image that cannot be embedded raises (or, from :meth:`ImageEmbedder.embed_each`,
is answered with) :class:`~vsearch.predictor.preprocess.InvalidImage`; an embedder that
cannot be reached raises a ``ConnectionError`` (retry later)."""

from __future__ import annotations

from typing import Callable, Protocol, Sequence, runtime_checkable

import numpy as np

from ..core.bisection import bisect
from .preprocess import Box, InvalidImage


@runtime_checkable
class ImageEmbedder(Protocol):
    @property
    def endpoint(self) -> str | None:
        """The embedder's URL when the model runs behind one; None when it runs in this process."""

    @property
    def dim(self) -> int:
        """The size of an embedding."""

    @property
    def model_name(self) -> str:
        """The model's name (remote: the name the embedder serves it under)."""

    @property
    def version(self) -> str | None:
        """The model's version (remote: the one the endpoint last answered with, if any)."""

    @property
    def model_id(self) -> str:
        """The model version as search answers and events name it."""

    def embed_bytes(self, blobs: Sequence[bytes], crops: Sequence[Box | None] | None = None) -> np.ndarray:
        """Encoded images (each optionally cropped, normalised x0,y0,x1,y1) -> [N, D] float32,
        L2-normalised. One bad image fails the call (:class:`InvalidImage`)."""

    def embed_each(self, blobs: Sequence[bytes]) -> list[np.ndarray | InvalidImage]:
        """One item per image: its vector, or the :class:`InvalidImage` saying why it cannot be
        embedded; a bad image does not fail the others."""


def _image_fault(exc: BaseException) -> bool:
    """An error of the model about some image (not an outage, not memory): that image's fault."""
    return not isinstance(exc, (ConnectionError, TimeoutError, MemoryError))


def embed_isolated(embed: Callable[[list[int]], Sequence[np.ndarray]], idx: list[int]
                   ) -> list[np.ndarray | InvalidImage]:
    """``embed(idx)`` for the items ``idx``: their vectors; when it fails for an image's fault,
    the items are split until each failure is one item's (an :class:`InvalidImage` in its
    place). Outages propagate (the caller retries them)."""
    out: list[np.ndarray | InvalidImage] = []
    for part in bisect(idx, lambda chunk: list(embed(chunk)), _image_fault):
        if part.error is None:
            out += part.result
        elif isinstance(part.error, InvalidImage):
            out.append(part.error)
        else:
            out.append(InvalidImage(f"embedding failed: {type(part.error).__name__}: {str(part.error)[:300]}"))
    return out
