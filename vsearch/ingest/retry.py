"""Retries through outages: the broker, Milvus or the embedder being away is waited out with
exponential backoff, never a crash and never a commit; a refusal of the request is not an
outage and is raised at once. A stop request ends the waiting once its grace period is over
(:class:`ShutdownDuringOutage`: nothing committed, the batch will be replayed)."""

from __future__ import annotations

import logging
import threading
import time
from typing import Callable

from kafka.errors import CommitFailedError, KafkaError

from ..core.store_errors import StoreError, StoreRefused, StoreUnavailable
from ..predictor.preprocess import InvalidImage
from .metrics import RETRIES

log = logging.getLogger(__name__)

# What is retried with backoff: the broker, Milvus or the embedder being away (the embedder
# client's EmbedderUnavailable is a ConnectionError).
OUTAGES: tuple[type[BaseException], ...] = (ConnectionError, TimeoutError, StoreUnavailable, KafkaError)


class ShutdownDuringOutage(RuntimeError):
    """Asked to stop while an outage kept the batch from finishing; nothing was committed."""


class Retrier:
    """``retry(stage, fn)`` calls ``fn`` until it succeeds, backing off on outages.

    A Milvus error of no known kind (neither an outage nor a refusal) may pass when tried
    again: it is tried ``unknown_attempts`` times (None: like an outage), then raised. A
    refusal (``StoreRefused``, ``InvalidImage``) and a refused commit are raised at once."""

    def __init__(self, initial_s: float, max_s: float):
        self.initial_s, self.max_s = initial_s, max_s
        self.stopped = threading.Event()
        self._deadline: float | None = None

    def stop(self, grace_s: float) -> bool:
        """Ask the retries to end ``grace_s`` from now; True the first time."""
        if self.stopped.is_set():
            return False
        self._deadline = time.monotonic() + grace_s
        self.stopped.set()
        return True

    def __call__(self, stage: str, fn: Callable, unknown_attempts: int | None = None):
        delay = self.initial_s
        unknown = 0
        while True:
            try:
                return fn()
            except (CommitFailedError, InvalidImage, StoreRefused):
                raise
            except (*OUTAGES, StoreError) as exc:
                if isinstance(exc, StoreError) and not isinstance(exc, StoreUnavailable):
                    unknown += 1
                    if unknown_attempts is not None and unknown >= unknown_attempts:
                        raise
                RETRIES.labels(stage).inc()
                if self.stopped.is_set() and time.monotonic() >= (self._deadline or 0):
                    raise ShutdownDuringOutage(f"stopping during an outage at {stage}: {exc}; "
                                               "nothing committed, the batch will be replayed") from exc
                log.warning("%s failed (%s: %s); retrying in %.1fs", stage, type(exc).__name__,
                            str(exc)[:300], delay)
                if self.stopped.is_set():
                    time.sleep(min(delay, 1.0))
                else:
                    self.stopped.wait(delay)
                delay = min(delay * 2, self.max_s)
