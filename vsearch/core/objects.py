"""Objects in S3-compatible storage, ``s3://bucket/key``: the search service keeps query images
there when several replicas answer (every replica and the trainer's Job can read them), and the
fetcher reads them back. The endpoint and credentials come from the standard AWS settings of
the process (``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``, a pod's web
identity, ...): nothing of them is a flag of ours."""

from __future__ import annotations

import functools
import urllib.parse

import boto3
from botocore.config import Config
from botocore.exceptions import ConnectionError as BotoConnectionError
from botocore.exceptions import ConnectTimeoutError, ReadTimeoutError


def split_s3(uri: str) -> tuple[str, str]:
    """``s3://bucket/a/b.jpg`` -> ``("bucket", "a/b.jpg")`` (the key may be empty)."""
    parsed = urllib.parse.urlsplit(uri)
    if parsed.scheme != "s3" or not parsed.netloc:
        raise ValueError(f"not an s3://bucket/key URI: {uri[:200]!r}")
    return parsed.netloc, parsed.path.lstrip("/")


@functools.lru_cache(maxsize=4)
def s3_client(connect_timeout: float = 5.0, read_timeout: float = 30.0):
    """A boto3 S3 client (thread-safe, shared by the process) with bounded timeouts and
    boto's standard retries."""
    return boto3.client("s3", config=Config(connect_timeout=connect_timeout, read_timeout=read_timeout,
                                            retries={"max_attempts": 3, "mode": "standard"}))


def unavailable_errors() -> tuple[type[BaseException], ...]:
    """botocore's errors for an object store that cannot be reached or did not answer in time."""
    return (BotoConnectionError, ConnectTimeoutError, ReadTimeoutError)
