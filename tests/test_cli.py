"""The command line's own behaviour: wrong arguments are one line and exit 2 before anything
starts, a closed pipe is not a traceback, ``--help`` does not import torch and lists what the
commands accept."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

from vsearch.local.services import vsearch_argv
from vsearch.predictor.model_dir import ARCHS, default_model_dir

DEFAULT = str(default_model_dir())


def run(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(vsearch_argv(*args), capture_output=True, text=True, timeout=timeout)


def one_line_error(out: subprocess.CompletedProcess, *words: str) -> None:
    assert out.returncode == 2, (out.returncode, out.stdout, out.stderr)
    assert "Traceback" not in out.stderr, out.stderr
    last = out.stderr.strip().splitlines()[-1]
    for word in words:
        assert word in last, (word, out.stderr)


def test_model_info_of_a_missing_folder_is_one_line(tmp_path):
    one_line_error(run("model", "info", str(tmp_path / "nowhere")), "vsearch model info:", "not a model directory")


def test_model_info_of_a_folder_without_a_model_is_one_line(tmp_path):
    one_line_error(run("model", "info", str(tmp_path)), "not a model directory")


def test_model_init_with_an_unknown_arch_is_one_line(tmp_path):
    out = run("model", "init", "--arch", "bogus", "--out", str(tmp_path / "m"))
    one_line_error(out, "invalid choice: 'bogus'", "resnet-small")
    assert not (tmp_path / "m").exists()


def test_train_with_an_unknown_arch_is_one_line(tmp_path):
    one_line_error(run("train", "--arch", "bogus", "--data", str(tmp_path), "--out", str(tmp_path / "o")),
                   "invalid choice: 'bogus'")


@pytest.mark.parametrize("args, words", [
    (["--rollout", "runs/tiny/model"], ["vsearch demo: --rollout runs/tiny/model: no such folder"]),
    (["--rollout", "{tmp}"], ["--rollout", "not a model directory"]),
    (["--model-dir", "{tmp}/nope"], ["--model-dir", "no such folder"]),
    (["--catalog", "{tmp}/nope"], ["--catalog", "not a folder"]),
    (["--rollout", DEFAULT, "--golden", "{tmp}/nope.csv"], ["--golden", "no such file"]),
    (["--golden", "{tmp}/nope.csv"], ["--golden", "--rollout"]),
    (["--experiment", "ab"], ["--experiment", "--rollout"]),
    (["--rollout", DEFAULT, "--simulate-users", "50"], ["--simulate-users", "--experiment"]),
])
def test_demo_checks_its_arguments_before_starting_anything(tmp_path, args, words):
    data = tmp_path / "demo-data"
    t0 = time.monotonic()
    out = run("demo", "--check", "--http-port", "0", "--data-dir", str(data),
              *[a.format(tmp=tmp_path) for a in args])
    one_line_error(out, *words)
    assert time.monotonic() - t0 < 30
    assert not data.exists(), "the demo started something before finding the wrong argument"
    assert "starting" not in out.stdout


def test_a_reader_that_goes_away_is_not_a_traceback():
    proc = subprocess.Popen(vsearch_argv("model", "info", DEFAULT), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    proc.stdout.readline()
    proc.stdout.close()                        # what `| head -1` does
    err = proc.stderr.read()
    assert proc.wait(timeout=60) in (0, 141), err
    assert "Traceback" not in err and "BrokenPipe" not in err, err


def test_help_does_not_import_torch_and_names_every_arch():
    code = ("import sys\nfrom vsearch.cli import main\n"
            "try:\n    main(['model', 'init', '--help'])\nexcept SystemExit:\n    pass\n"
            "print('TORCH' if 'torch' in sys.modules else 'NO-TORCH')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().endswith("NO-TORCH"), "`vsearch --help` imports torch (4-5 s): import it in the handlers"
    help_text = " ".join(out.stdout.split())
    for arch in ARCHS:
        assert arch in help_text


def test_help_texts_say_what_the_commands_do():
    assert "5% of steps" in " ".join(run("train", "--help").stdout.split())
    demo = " ".join(run("demo", "--help").stdout.split())
    assert "prints" in demo and "open the web page" not in demo
