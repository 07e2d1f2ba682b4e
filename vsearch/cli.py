"""The ``vsearch`` command line. Each component registers its own sub-commands in its
``cli.py`` (``register(subparsers)``); heavy imports happen only inside the handlers, so
``vsearch --help`` stays fast."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

# One line per component that has commands; each module defines register(subparsers).
COMMAND_MODULES = [
    "predictor.cli",
    "trainer.cli",
    "ingest.cli",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vsearch",
        description="Visual search platform: serve, embed, ingest, search, train, evaluate.")
    parser.add_argument("--log-level", default="INFO", help="logging level (INFO, DEBUG, ...)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        rc = args.handler(args)
    except KeyboardInterrupt:
        return 130
    return int(rc or 0)


if __name__ == "__main__":
    sys.exit(main())
