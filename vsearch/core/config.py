"""Configuration: every knob of every command is a command-line flag whose default comes from
an environment variable, so the same settings work on a command line, in a shell and in a
container spec.

- A command's own flags read ``VSEARCH_<COMPONENT>_<FLAG>``: ``--batch-size`` of
  ``vsearch ingest`` <- ``VSEARCH_INGEST_BATCH_SIZE``, ``--http-port`` of
  ``vsearch serve search`` <- ``VSEARCH_SEARCH_HTTP_PORT``.
- The settings several commands share (where Milvus and Kafka are, the index) read
  ``VSEARCH_<FLAG>``: ``VSEARCH_MILVUS_URI``, ``VSEARCH_MILVUS_TOKEN``, ``VSEARCH_KAFKA_BOOTSTRAP``.
- A flag given on the command line wins over its variable.
- A variable that does not parse is reported, naming it, only by the command that reads it
  (``--help`` of every command keeps working); see :func:`check_environment`.
- Secret flags (tokens, keys) never show their value in ``--help``.

    flags = Flags(parser, "INGEST")
    flags.add("--batch-size", default=256, type=int, help="most records per batch")
    flags.add("--milvus-uri", default="./vsearch.db", shared=True, help="...")
"""

from __future__ import annotations

import argparse
import os

PREFIX = "VSEARCH_"
TRUE, FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


def env_name(flag: str, component: str | None = None) -> str:
    """``--model-dir`` of the EMBEDDER -> ``VSEARCH_EMBEDDER_MODEL_DIR``; shared (no
    component): ``--milvus-uri`` -> ``VSEARCH_MILVUS_URI``."""
    name = flag.lstrip("-").replace("-", "_").upper()
    return f"{PREFIX}{component.upper()}_{name}" if component else f"{PREFIX}{name}"


class UsageError(ValueError):
    """A wrong argument found by a command's handler (a missing folder, a model directory that is
    not one): ``vsearch`` prints the one line and exits 2, as argparse does for its own errors."""


class BadEnv:
    """The default of a flag whose environment variable does not parse; the command that
    reads it reports it (:func:`check_environment`)."""

    def __init__(self, var: str, raw: str, problem: str):
        self.var, self.raw, self.problem = var, raw, problem

    def __str__(self) -> str:
        return f"{self.var}={self.raw!r} {self.problem}"

    __repr__ = __str__


def _convert(raw: str, type):
    if type is bool:
        low = raw.strip().lower()
        if low in TRUE:
            return True
        if low in FALSE:
            return False
        raise ValueError(f"is not a boolean ({'/'.join(TRUE)} or {'/'.join(FALSE)})")
    try:
        return type(raw)
    except argparse.ArgumentTypeError as exc:            # a type that explains itself
        raise ValueError(f"is not valid: {exc}") from None
    except (TypeError, ValueError):
        raise ValueError(f"is not a valid {getattr(type, '__name__', 'value')}") from None


class Flags:
    """The flags of one command (one component's prefix)."""

    def __init__(self, parser: argparse.ArgumentParser, component: str):
        self.parser, self.component = parser, component

    def add(self, flag: str, *aliases: str, default=None, type=str, help: str = "",
            shared: bool = False, secret: bool = False, **kwargs):
        var = env_name(flag, None if shared else self.component)
        raw = os.environ.get(var)
        value = default
        if raw is not None and raw != "":
            try:
                value = _convert(raw, type)
            except ValueError as exc:
                value = BadEnv(var, raw, str(exc))
        if secret:
            shown = "set" if raw else "not set"
            text = f"{help} [env {var}: {shown}]"
        else:
            text = f"{help} [env {var}, default {value!r}]"
        text = text.replace("%", "%%")
        if type is bool:
            action = self.parser.add_argument(flag, *aliases, action="store_true", default=value,
                                              help=text, **kwargs)
        else:
            action = self.parser.add_argument(flag, *aliases, default=value, type=type, help=text, **kwargs)
        action.env_var = var
        return action


def check_environment(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Stop with a clear message when a setting of the command being run came from an
    environment variable that does not parse (and was not given on the command line)."""
    bad = [v for v in vars(args).values() if isinstance(v, BadEnv)]
    if bad:
        parser.error("; ".join(str(b) for b in bad))


def env_vars(parser: argparse.ArgumentParser) -> set[str]:
    """The environment variables a (sub-command's) parser reads."""
    return {a.env_var for a in parser._actions if getattr(a, "env_var", None)}


def csv_list(text) -> tuple[str, ...]:
    """``"a, b,,c"`` -> ``("a", "b", "c")``: the value of a comma-separated flag."""
    return tuple(p.strip() for p in str(text or "").split(",") if p.strip())


def add_kafka_flag(flags: Flags, **kwargs) -> None:
    """``--kafka-bootstrap`` (also ``--bootstrap``), shared: ``VSEARCH_KAFKA_BOOTSTRAP``."""
    flags.add("--kafka-bootstrap", "--bootstrap", dest="kafka_bootstrap", shared=True,
              **{"default": "127.0.0.1:9092", "help": "Kafka bootstrap servers HOST:PORT", **kwargs})


def add_milvus_flags(flags: Flags) -> None:
    """The Milvus flags every command that talks to Milvus shares, read by
    :meth:`vsearch.core.store.MilvusStore.from_args`; their variables have no component:
    ``VSEARCH_MILVUS_URI``."""
    flags.add("--milvus-uri", default="./vsearch.db", shared=True,
              help="Milvus: a file path ending in .db (Milvus Lite) or http://host:port")
    flags.add("--milvus-token", default="", shared=True, secret=True,
              help="Milvus token (user:password or an API key), if the server needs one")
    flags.add("--milvus-timeout", default=10.0, type=float, shared=True, help="seconds per Milvus call")
    flags.add("--index-type", default="HNSW", shared=True,
              help="HNSW (Milvus Lite/standalone), DISKANN (cluster), IVF_SQ8 or IVF_PQ (memory-bound), IVF_FLAT or FLAT")
    flags.add("--index-params", default="", shared=True, help='index build parameters, JSON, e.g. {"M": 16}')
    flags.add("--search-params", default="", shared=True,
              help='search parameters, JSON, e.g. {"ef": 64} or {"search_list": 100}')
    flags.add("--metric", default="COSINE", shared=True, help="COSINE or IP")
