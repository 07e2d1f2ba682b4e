"""The ``vsearch`` command line: the top of the house. Each component registers its own
sub-commands in its ``cli.py`` (``register(subparsers)``); this module adds ``vsearch demo``
(the whole platform on one machine) and owns the process-wide logging set-up.

Imports go at the top of their module, with one exception, here and in the components'
``cli.py`` modules: whatever ``vsearch --help`` or ``vsearch COMMAND --help`` loads imports
nothing heavy at its top (torch, transformers, kserve, FastAPI/uvicorn, pymilvus, kafka-python,
kopf, the Kubernetes client, boto3, matplotlib, nor a module that pulls one in), so the command
handlers import those inside themselves, and the modules that the command line loads at its top
(``core/config.py``, ``predictor/model_dir.py``, ``predictor/preprocess.py``, ...) stay light:
``tests/test_cli.py`` checks that ``--help`` does not load torch. Also imported inside functions:
kserve (``predictor/serving.py``: it parses ``sys.argv`` when first imported), torch for
``vsearch demo``'s stand-in model (``local/demo.py``), optional extras (scikit-image,
scikit-learn, faiss, jsonschema, the ``milvus`` test server) and matplotlib after its backend
is chosen."""

from __future__ import annotations

import argparse
import logging
import os
import sys

from .core.config import Flags, UsageError, check_environment, env_vars
from .ingest import cli as ingest_cli
from .operators import cli as operator_cli
from .predictor import cli as predictor_cli
from .trainer import cli as trainer_cli

COMMAND_MODULES = (predictor_cli, trainer_cli, ingest_cli, operator_cli)

# Third-party loggers that report, at ERROR with tracebacks, failures this code already turns
# into its own exceptions and log lines (pymilvus logs every failed RPC; the embedded Milvus
# Lite server logs pymilvus' probes of calls it lacks; kafka-python logs each reconnect).
QUIET_LOGGERS = {"pymilvus": logging.CRITICAL, "pymilvus.decorators": logging.CRITICAL,
                 "pymilvus.milvus_client": logging.CRITICAL, "grpc._server": logging.CRITICAL,
                 "kafka": logging.WARNING}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vsearch",
        description="Visual search platform: serve, embed, ingest, search, train, evaluate.")
    parser.add_argument("--log-level", default="INFO", help="logging level (INFO, DEBUG, ...)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for module in COMMAND_MODULES:
        module.register(sub)
    register_demo(sub)
    return parser


def register_demo(sub) -> None:
    p = sub.add_parser("demo", help="run the whole platform on this machine and print the web page's URL",
                       description="Starts the Kafka broker, Milvus Lite (server), the embedder, the "
                                   "catalog consumer and the search service; publishes a sample "
                                   "catalog through Kafka; prints the URLs, a query image and commands "
                                   "to try (also written to DATA_DIR/demo.env). Ctrl-C stops everything.")
    pf = Flags(p, "DEMO")
    pf.add("--model-dir", default=None,
             help="model directory (default: models/default, else a random-initialised resnet-tiny)")
    pf.add("--catalog", default=None,
             help="folder of images to publish (default: scikit-image's sample photos and variants)")
    pf.add("--data-dir", default=".demo", help="where the demo keeps Milvus data, logs, queries")
    pf.add("--http-port", default=8000, type=int,
             help="HTTP port of the search service and web page (0: any free port)")
    pf.add("--ready-timeout", default=300.0, type=float,
             help="seconds to wait for the catalog to be searchable")
    p.add_argument("--check", "--smoke", dest="check", action="store_true",
                   help="run one query end to end, print the result and exit (0 = it worked); with "
                        "--rollout: exit 0 when the new version serves, 3 when the gate refused it, 4 when "
                        "the online experiment (--experiment) or a guardrail decided against it")
    pf.add("--rollout", default=None,
           help="once the catalog is searchable, roll out this model directory blue-green "
                "(the operator's rollout logic on local processes)")
    pf.add("--golden", default=None, help="judgments CSV (query,candidate,grade) for the rollout's gate")
    pf.add("--experiment", default=None, choices=("ab", "interleave"),
           help="after the gate, an online experiment between the serving version and --rollout's: "
                "users' clicks decide the switch (ab: half the users get the new version; interleave: "
                "half the users get both versions' results interleaved by team draft)")
    pf.add("--simulate-users", default=0, type=int,
           help="N simulated users search the catalog and click results (a position-based click model: "
                "relevant = same label) while the experiment runs, or before training with --loop; 0: only your own clicks on the web page")
    p.add_argument("--loop", action="store_true",
                   help="one turn of the learning loop: simulated users (--simulate-users N) search and click, "
                        "torchrun (2 processes) fine-tunes the serving model on the clicks, the job's offline "
                        "verdict against raw pixels, random init and the serving model, then the rollout of "
                        "the new version; with --check: exit 0 when it serves, 4 when it lost and the serving "
                        "version stayed")
    pf.add("--train-steps", default=30, type=int, help="--loop: the training job's optimiser steps")
    p.set_defaults(handler=_demo)


def _demo(args) -> int:
    from .local.demo import run_demo
    return run_demo(model_dir=args.model_dir, catalog=args.catalog, data_dir=args.data_dir,
                    port=args.http_port, timeout=args.ready_timeout, check=args.check,
                    rollout=args.rollout, golden=args.golden, experiment=args.experiment,
                    simulate_users=args.simulate_users, loop=args.loop, train_steps=args.train_steps)


def command_parser(*names: str) -> argparse.ArgumentParser:
    """The parser of one command: ``command_parser("serve", "search")``."""
    parser = build_parser()
    for name in names:
        sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        parser = sub.choices[name]
    return parser


def command_env_vars(*names: str) -> set[str]:
    """The environment variables one command reads (what a container spec may set for it)."""
    return env_vars(command_parser(*names))


def configure_logging(level: str) -> None:
    logging.basicConfig(level=level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    import pymilvus  # noqa: F401  (it reconfigures its loggers when imported: import it first)
    if logging.getLogger().level > logging.DEBUG:
        for name, quiet in QUIET_LOGGERS.items():
            logging.getLogger(name).setLevel(quiet)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    check_environment(parser, args)
    configure_logging(args.log_level)
    try:
        rc = args.handler(args)
        sys.stdout.flush()                 # inside the try: a closed pipe is reported here
    except KeyboardInterrupt:
        return 130
    except UsageError as exc:
        print(f"vsearch {args.command}: {exc}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        # the reader went away (`vsearch model info DIR | head`): stop quietly, as `cat` does; point
        # stdout at /dev/null so that the interpreter's final flush does not fail again
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    return int(rc or 0)


if __name__ == "__main__":
    sys.exit(main())
