"""Configuration: every knob is a command-line flag whose default comes from an environment
variable with the ``VSEARCH_`` prefix (``--max-pixels`` <- ``VSEARCH_MAX_PIXELS``). The Helm
chart's values use the same names."""

from __future__ import annotations

import os

PREFIX = "VSEARCH_"


def env_name(flag: str) -> str:
    """``--model-dir`` -> ``VSEARCH_MODEL_DIR``."""
    return PREFIX + flag.lstrip("-").replace("-", "_").upper()


def env(name: str, default=None, cast=str):
    """Read ``VSEARCH_<NAME>``; ``cast`` converts it; unset or empty gives ``default``."""
    raw = os.environ.get(env_name(name))
    if raw is None or raw == "":
        return default
    if cast is bool:
        return raw.strip().lower() in ("1", "true", "yes", "on")
    try:
        return cast(raw)
    except ValueError as exc:
        raise SystemExit(f"{env_name(name)}={raw!r} is not a valid {cast.__name__}") from exc


def add_flag(parser, flag: str, *, default=None, type=str, help: str = "", **kwargs):
    """Add ``flag`` to an argparse parser with its default taken from the environment."""
    if type is bool:
        value = env(flag, default, bool)
        parser.add_argument(flag, action="store_true", default=value,
                            help=f"{help} [env {env_name(flag)}]", **kwargs)
        return
    value = env(flag, default, type)
    parser.add_argument(flag, default=value, type=type,
                        help=f"{help} [env {env_name(flag)}, default {value!r}]", **kwargs)
