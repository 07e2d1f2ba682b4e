"""What a failed Milvus call means to its caller, classified from pymilvus' exception types,
gRPC status codes and Milvus' error codes (never from message text).

- :class:`StoreUnavailable` (a ``ConnectionError``): Milvus could not be reached, did not answer
  in time or sheds load; retry with backoff.
- :class:`StoreNotFound`: the collection or alias does not exist.
- :class:`StoreRefused` (a ``ValueError``): Milvus, or pymilvus' own checks before anything
  was sent, refused the request itself as invalid; sending it again cannot help.
- :class:`StoreError`: anything else, with the server's reason and code.

Bad input the store checks itself raises a plain ``ValueError`` before any call."""

from __future__ import annotations

import grpc
from pymilvus import exceptions as px


class StoreError(RuntimeError):
    """A Milvus call failed; the message carries the server's reason, ``code`` its error code."""

    def __init__(self, message: str, code=None):
        super().__init__(message)
        self.code = code


class StoreUnavailable(StoreError, ConnectionError):
    """Milvus could not be reached, did not answer in time or sheds load: retry with backoff."""


class StoreNotFound(StoreError):
    """The collection or alias does not exist."""


class StoreRefused(StoreError, ValueError):
    """Milvus refused the request itself as invalid: sending it again cannot help."""


# Milvus' error codes and what they mean to a caller. Servers of 2.4 and later (Milvus Lite
# among them) answer merr numbers (milvus pkg/util/merr): 2 service unavailable, 3 memory limit,
# 4 request limit, 8 rate limit, 9 quota exceeded; 100 collection not found, 101 collection not
# loaded, 1600 alias not found; 1100/1101/1102 parameter invalid/missing/too large, 1700 field
# not found. 5, 6 and 7 are what Milvus Lite answers for requests it refuses (6: an expression it
# cannot parse; 5 and 7 are the older common.ErrorCode IllegalArgument and IllegalDimension);
# none of them passes when sent again. 65535 (merr's "undefined") is what a Milvus 2.3 server
# answers for request errors: an expression it cannot parse, an unknown field, a query window
# over 16,384 rows; its outages come as gRPC UNAVAILABLE or the codes above.
NOT_FOUND = {100, 1600}
NOT_LOADED = 101
UNAVAILABLE = {2, 3, 4, 8, 9}
REFUSED = {5, 6, 7, 1100, 1101, 1102, 1700, 65535}


def _grpc_kind(code) -> type[StoreError] | None:
    if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED,
                grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.ABORTED, grpc.StatusCode.CANCELLED):
        return StoreUnavailable
    if code in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.PERMISSION_DENIED,
                grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.UNIMPLEMENTED,
                grpc.StatusCode.OUT_OF_RANGE, grpc.StatusCode.FAILED_PRECONDITION):
        return StoreRefused
    if code == grpc.StatusCode.NOT_FOUND:
        return StoreNotFound
    return None


def classify(exc: BaseException) -> type[StoreError]:
    """The :class:`StoreError` kind of an exception raised by pymilvus or gRPC."""
    if isinstance(exc, StoreError):
        return type(exc)
    if isinstance(exc, grpc.RpcError):
        return _grpc_kind(exc.code()) or StoreError
    if isinstance(exc, (px.ConnectError, px.MilvusUnavailableException)):
        return StoreUnavailable
    if isinstance(exc, (px.ParamError, px.DataNotMatchException, px.DataTypeNotMatchException,
                        px.DataTypeNotSupportException, px.PrimaryKeyException,
                        px.FieldsTypeException, px.FieldTypeException)):
        return StoreRefused                    # pymilvus' own checks, before anything was sent
    if isinstance(exc, px.MilvusException):
        code = exc.code
        if not isinstance(code, int):           # a gRPC status code after pymilvus' retries
            return _grpc_kind(code) or StoreError
        if code in NOT_FOUND:
            return StoreNotFound
        if code in UNAVAILABLE:
            return StoreUnavailable
        if code in REFUSED:
            return StoreRefused
        return StoreError
    if isinstance(exc, (ConnectionError, TimeoutError)):
        return StoreUnavailable
    if isinstance(exc, (ValueError, TypeError)):
        return StoreRefused
    return StoreError


def error_code(exc: BaseException):
    """The error code an exception carries (Milvus' number or a gRPC status), or None."""
    code = getattr(exc, "code", None)
    return code() if callable(code) else code
