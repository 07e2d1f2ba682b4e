"""The configuration contract: every flag reads its default from a ``VSEARCH_`` environment
variable, the flag given on the command line wins, and a bad value says which variable."""

from __future__ import annotations

import argparse

import pytest

from vsearch.core.config import add_flag, env_name


def parser(**flags) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser()
    for flag, kw in flags.items():
        add_flag(p, flag, **kw)
    return p


def test_the_variable_of_a_flag():
    assert env_name("--model-dir") == "VSEARCH_MODEL_DIR"
    assert env_name("--max-image-bytes") == "VSEARCH_MAX_IMAGE_BYTES"


def test_the_environment_gives_defaults_and_the_command_line_wins(monkeypatch):
    monkeypatch.setenv("VSEARCH_BATCH_SIZE", "64")
    monkeypatch.setenv("VSEARCH_RATIO", "0.25")
    monkeypatch.setenv("VSEARCH_ALLOW_URL_QUERIES", "yes")
    monkeypatch.setenv("VSEARCH_NAME", "")                    # empty: the default
    flags = {"--batch-size": dict(default=32, type=int), "--ratio": dict(default=1.0, type=float),
             "--allow-url-queries": dict(default=False, type=bool), "--name": dict(default="x")}
    args = parser(**flags).parse_args([])
    assert (args.batch_size, args.ratio, args.allow_url_queries, args.name) == (64, 0.25, True, "x")
    args = parser(**flags).parse_args(["--batch-size", "8", "--name", "y"])
    assert (args.batch_size, args.name) == (8, "y")


def test_help_names_each_variable_and_its_default(monkeypatch, capsys):
    monkeypatch.delenv("VSEARCH_BATCH_SIZE", raising=False)
    with pytest.raises(SystemExit):
        parser(**{"--batch-size": dict(default=32, type=int, help="records per batch")}).parse_args(["--help"])
    assert "records per batch [env VSEARCH_BATCH_SIZE, default 32]" in capsys.readouterr().out


def test_a_bad_value_names_the_variable(monkeypatch):
    monkeypatch.setenv("VSEARCH_BATCH_SIZE", "many")
    with pytest.raises(SystemExit, match="VSEARCH_BATCH_SIZE='many' is not a valid int"):
        parser(**{"--batch-size": dict(default=32, type=int)})
