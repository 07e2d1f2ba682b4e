"""The README's curl examples, extracted from README.md and run exactly as written with a real
curl against real servers (the session's embedder and search service); only the host and port
are pointed at the test servers, and ``cat.jpg`` is a real photo in the working folder."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[2] / "README.md"


def curl_commands() -> list[str]:
    """Every shell command in a ```sh block of the README that starts with ``curl`` (with its
    continuation lines and multi-line quoted arguments)."""
    commands = []
    for block in re.findall(r"```sh\n(.*?)```", README.read_text(), flags=re.S):
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
