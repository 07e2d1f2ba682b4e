"""The README's curl examples, extracted from README.md and run exactly as written with a real
curl against real servers (the session's embedder and search service); only the host and port
are pointed at the test servers, and ``cat.jpg`` is a real photo in the working folder. The quick
start ("What next") runs as written, unchanged, against a real ``vsearch demo``."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.fixtures.demo import stop_demo
from vsearch.local.samples import generated_photos
from vsearch.predictor.model_dir import default_model_dir

README = Path(__file__).resolve().parents[2] / "README.md"


QUICK_START = "## What next"


def quick_start() -> str:
    """The first ```sh block of the README's "What next" section (run against a real demo)."""
    text = README.read_text()
    return re.search(r"```sh\n(.*?)```", text[text.index(QUICK_START):], flags=re.S).group(1)


def curl_commands() -> list[str]:
    """Every shell command in a ```sh block of the README that starts with ``curl`` (with its
    continuation lines and multi-line quoted arguments), but the quick start's."""
    commands = []
    for block in re.findall(r"```sh\n(.*?)```", README.read_text(), flags=re.S):
        if block == quick_start():
            continue
        lines = block.splitlines()
        i = 0
        while i < len(lines):
            if lines[i].startswith("curl "):
                cmd = [lines[i]]
                while cmd[-1].endswith("\\") or cmd_open(cmd):
                    i += 1
                    cmd.append(lines[i])
                commands.append("\n".join(cmd))
            i += 1
    return commands


def cmd_open(lines: list[str]) -> bool:
    return "\n".join(lines).count("'") % 2 == 1


def test_the_readme_has_the_curl_examples():
    cmds = curl_commands()
    assert any("/v2/models/embedder/infer" in c for c in cmds)
    assert any("/v1/models/embedder:predict" in c for c in cmds)
    assert any("/search" in c for c in cmds)


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed (.ci/run installs it)")
def test_every_curl_example_works_as_written(embedder_url, search_server, photo_bytes, tmp_path):
    (tmp_path / "cat.jpg").write_bytes(search_server.catalog.photos["photo-03"])
    embedder = embedder_url.removeprefix("http://")
    search = search_server.url
    for cmd in curl_commands():
        run = cmd.replace("localhost:8080", embedder).replace("http://127.0.0.1:8000", search)
        out = subprocess.run(["bash", "-c", run + " -sS -w '\\n%{http_code}'"], cwd=tmp_path,
                             capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, (cmd, out.stderr)
        body, _, status = out.stdout.rpartition("\n")
        assert status == "200", (cmd, status, body[:500])
        answer = json.loads(body)
        if "/v2/" in cmd:
            emb = answer["outputs"][0]
            assert emb["name"] == "embedding" and emb["shape"][0] == 1
        elif ":predict" in cmd:
            assert len(answer["predictions"]) == 1
        else:
            assert answer["results"] and answer["results"][0]["id"] == "photo-03"


def test_the_quick_start_follows_the_set_up():
    text = README.read_text()
    assert text.index("## Set-up") < text.index(QUICK_START) < text.index("## Layout")
    block = quick_start()
    assert ". .demo/demo.env" in block and ".venv/bin/vsearch" in block
    assert "localhost:8080" not in block and "cat.jpg" not in block


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed (.ci/run installs it)")
def test_the_quick_start_works_as_written_against_a_real_demo(tmp_path, tiny_model_dir):
    """`vsearch demo` in a folder laid out like the checkout (.venv, models/default), then the
    quick start's block, unchanged, in a second shell in that folder."""
    root = README.parent
    (tmp_path / ".venv").symlink_to(Path(sys.executable).parent.parent)
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "default").symlink_to(default_model_dir())
    catalog = tmp_path / "photos"
    catalog.mkdir()
    for i, data in enumerate(generated_photos(6)):
        (catalog / f"p{i}.jpg").write_bytes(data)
    env = {**os.environ, "PYTHONPATH": str(root)}
    proc = subprocess.Popen([sys.executable, "-m", "vsearch", "demo", "--http-port", "0",
                             "--model-dir", str(tiny_model_dir), "--catalog", str(catalog),
                             "--ready-timeout", "180"],
                            cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=(tmp_path / "demo.err").open("w"),
                            text=True)
    lines: list[str] = []
    try:
        deadline = time.monotonic() + 300
        for line in proc.stdout:
            lines.append(line)
            if "Press Ctrl-C" in line or time.monotonic() > deadline:
                break
        banner = "".join(lines)
        assert "Press Ctrl-C" in banner, banner[-3000:]
        assert (tmp_path / ".demo" / "demo.env").exists() and (tmp_path / ".demo" / "query.jpg").exists()
        assert "curl -s -F image=@.demo/query.jpg" in banner and ".venv/bin/vsearch ctr" in banner
        out = subprocess.run(["bash", "-euo", "pipefail", "-c", quick_start()], cwd=tmp_path, env=env,
                             capture_output=True, text=True, timeout=240)
        assert out.returncode == 0, (out.stdout[-3000:], out.stderr[-3000:])
        assert out.stdout.count('"results": [{') + out.stdout.count('"results":[{') == 2, out.stdout[:3000]
        assert '"outputs":[{"name":"embedding"' in out.stdout.replace(" ", ""), out.stdout[:3000]
        assert "impressions" in out.stdout and '"name": "vsearch-default"' in out.stdout, out.stdout[-3000:]
        rest = stop_demo(proc, tmp_path / "demo.err", str(tmp_path))
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, rest[-3000:]
    assert not (tmp_path / ".demo" / "demo.env").exists(), "demo.env outlived the demo"
