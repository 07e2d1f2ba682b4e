"""The configuration contract: every flag of every command reads its default from an
environment variable, ``VSEARCH_<COMPONENT>_<FLAG>`` for a command's own flags and
``VSEARCH_<FLAG>`` for the shared Milvus and Kafka settings; the command line wins; a bad
variable stops only the command that reads it, naming it; secrets never show in ``--help``."""

from __future__ import annotations

import os
import subprocess

import pytest

from vsearch.cli import command_env_vars, command_parser, main
from vsearch.core.config import env_name
from vsearch.local.services import vsearch_argv


def test_variable_names():
    assert env_name("--batch-size", "INGEST") == "VSEARCH_INGEST_BATCH_SIZE"
    assert env_name("--milvus-uri") == "VSEARCH_MILVUS_URI"


def test_each_command_reads_its_own_variables_and_the_shared_ones():
    ingest = command_env_vars("ingest")
    search = command_env_vars("serve", "search")
    embedder = command_env_vars("serve", "embedder")
    assert {"VSEARCH_INGEST_BATCH_SIZE", "VSEARCH_MILVUS_URI", "VSEARCH_MILVUS_TOKEN",
            "VSEARCH_INDEX_TYPE", "VSEARCH_KAFKA_BOOTSTRAP"} <= ingest
    assert {"VSEARCH_SEARCH_HTTP_PORT", "VSEARCH_SEARCH_API_KEY", "VSEARCH_MILVUS_URI",
            "VSEARCH_MILVUS_TOKEN", "VSEARCH_INDEX_TYPE", "VSEARCH_SEARCH_PARAMS"} <= search
    assert {"VSEARCH_EMBEDDER_MODEL_DIR", "VSEARCH_EMBEDDER_BATCH_SIZE"} <= embedder
    # one flag name, three meanings, three variables
    assert "VSEARCH_BATCH_SIZE" not in ingest | search | embedder
    assert "VSEARCH_INGEST_BATCH_SIZE" not in embedder and "VSEARCH_EMBEDDER_BATCH_SIZE" not in ingest


def test_the_environment_gives_defaults_and_the_command_line_wins(monkeypatch):
    monkeypatch.setenv("VSEARCH_INGEST_BATCH_SIZE", "64")
    monkeypatch.setenv("VSEARCH_INGEST_RETRY_MAX_S", "2.5")
    monkeypatch.setenv("VSEARCH_KAFKA_BOOTSTRAP", "kafka:9092")
    monkeypatch.setenv("VSEARCH_SEARCH_ALLOW_URL_QUERIES", "yes")
    monkeypatch.setenv("VSEARCH_INGEST_GROUP", "")                    # empty: the default
    args = command_parser("ingest").parse_args([])
    assert (args.batch_size, args.retry_max_s, args.kafka_bootstrap, args.group) == (64, 2.5, "kafka:9092", None)
    args = command_parser("ingest").parse_args(["--batch-size", "8", "--bootstrap", "other:9092"])
    assert (args.batch_size, args.kafka_bootstrap) == (8, "other:9092")
    assert command_parser("serve", "search").parse_args([]).allow_url_queries is True


def test_a_bad_variable_stops_only_the_command_that_reads_it(monkeypatch, capsys):
    monkeypatch.setenv("VSEARCH_INGEST_BATCH_SIZE", "many")
    with pytest.raises(SystemExit):
        main(["ingest", "--model-dir", "x"])
    assert "VSEARCH_INGEST_BATCH_SIZE='many' is not a valid int" in capsys.readouterr().err
    for argv in (["publish", "--help"], ["serve", "search", "--help"], ["ingest", "--help"]):
        with pytest.raises(SystemExit) as exc:
            main(argv)
        assert exc.value.code == 0
    capsys.readouterr()
    args = command_parser("ingest").parse_args(["--batch-size", "5"])     # the command line mends it
    assert args.batch_size == 5


def test_help_names_each_variable_and_never_shows_a_secret():
    env = {"VSEARCH_SEARCH_API_KEY": "s3cret-key", "VSEARCH_MILVUS_TOKEN": "root:Milvus",
           "VSEARCH_SEARCH_K_MAX": "50"}
    out = subprocess.run(vsearch_argv("serve", "search", "--help"), capture_output=True, text=True,
                         env={**os.environ, **env}, timeout=60).stdout
    out = " ".join(out.split())                                       # argparse wraps the lines
    assert "VSEARCH_SEARCH_K_MAX, default 50" in out
    assert "[env VSEARCH_SEARCH_API_KEY: set]" in out and "[env VSEARCH_MILVUS_TOKEN: set]" in out
    assert "s3cret-key" not in out and "root:Milvus" not in out
