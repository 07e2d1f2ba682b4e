"""What one HTTP server of ours (embedder or search) accepts before it has done any work: the
bounds of :mod:`vsearch.predictor.serving`, one home for their defaults and their flags.
Light on purpose (no FastAPI, no KServe): the command line imports it to build ``--help``."""

from __future__ import annotations

from dataclasses import dataclass, fields

DEFAULT_MAX_BODY_BYTES = 64 * 1024 * 1024


@dataclass(frozen=True)
class ServerLimits:
    """Bounds every request meets before its body is expanded (see ``serving.RequestGuard``)."""

    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES   # bytes read of one body: 413 past it
    header_timeout_s: float = 10.0       # from the first byte of a request to its last header: 408
    body_timeout_s: float = 60.0         # from the last header to the last byte of the body: 408
    keep_alive_s: float = 15.0           # an idle kept-alive connection is closed after this
    max_concurrent: int = 32             # requests being read or answered at once: 503 + Retry-After
    max_connections: int = 512           # open connections: the next one gets a 503 and is closed
    max_json_values: int = 4096          # objects, arrays and list items in one JSON body (or header)
    max_inputs: int = 8                  # inputs of one V2 inference request


FLAGS = {   # field -> (flag, type, help)
    "header_timeout_s": ("--header-timeout", float, "seconds a client has to send a request's headers (408 after)"),
    "body_timeout_s": ("--body-timeout", float, "seconds a client has to send a request's body (408 after)"),
    "keep_alive_s": ("--keep-alive", float, "seconds an idle kept-alive connection stays open"),
    "max_concurrent": ("--max-concurrent", int,
                       "requests read or answered at once; more: 503 with Retry-After (memory is about "
                       "this times the body limit at worst)"),
    "max_connections": ("--max-connections", int, "open connections; more: 503 and closed"),
    "max_json_values": ("--max-json-values", int,
                        "objects, arrays and list items in one JSON body; more: 400 before it is parsed"),
}


def add_server_flags(flags) -> None:
    """The flags of :data:`FLAGS` on a ``core.config.Flags`` group, defaults from :class:`ServerLimits`."""
    defaults = ServerLimits()
    for name, (flag, type_, help_) in FLAGS.items():
        flags.add(flag, default=getattr(defaults, name), type=type_, help=help_)


def server_limits_from(args, **overrides) -> ServerLimits:
    """The :class:`ServerLimits` of parsed flags (``overrides`` for fields without a flag)."""
    values = {f.name: getattr(args, f.name.removesuffix("_s"), None) for f in fields(ServerLimits)}
    values = {k: v for k, v in values.items() if v is not None and k in FLAGS}
    return ServerLimits(**values, **overrides)
