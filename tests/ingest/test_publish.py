"""``vsearch publish`` through the real broker: folders, CSV files and deletes, keyed by id."""

from __future__ import annotations

import uuid

import pytest

from tests.fixtures.catalog import read_topic
from vsearch.cli import main
from vsearch.ingest.events import decode


def test_publish_folder_csv_and_deletes(tmp_path, broker, photo_bytes, capsys):
    topic = f"publish-{uuid.uuid4().hex[:8]}"
    (tmp_path / "shoes").mkdir()
    (tmp_path / "shoes" / "red.jpg").write_bytes(photo_bytes[0])
    (tmp_path / "blue.png").write_bytes(photo_bytes[1])
    (tmp_path / "notes.txt").write_text("not an image")
    assert main(["publish", "--bootstrap", broker, "--topic", topic, "--no-progress", str(tmp_path)]) == 0
    assert "published 2 events" in capsys.readouterr().out

    csv = tmp_path / "catalog.csv"
    csv.write_text('id,uri,metadata,visibility\n'
                   'c1,https://cdn.example.com/c1.jpg,"{""brand"": ""x""}",private\n'
                   'c2,file:///data/c2.jpg,,\n')
    assert main(["publish", "--bootstrap", broker, "--topic", topic, "--no-progress", str(csv)]) == 0
    assert main(["publish", "--bootstrap", broker, "--topic", topic, "--no-progress",
                 "--delete", "c2", "shoes/red"]) == 0
    assert main(["publish", "--bootstrap", broker, "--topic", topic, "--no-progress", "--inline",
                 str(tmp_path / "shoes")]) == 0

    recs = read_topic(broker, topic, 7)
    assert len(recs) == 7
    events = [decode(r.key, r.value, r.timestamp) for r in recs]       # all valid, key == id
    by_id = {}
    for ev in sorted(events, key=lambda e: e.ts):
        by_id.setdefault(ev.id, []).append(ev)
    red = by_id["shoes/red"]
    assert {e.op for e in red} == {"upsert", "delete"}
    uri_up = next(e for e in red if e.op == "upsert" and e.uri)
    assert uri_up.uri == (tmp_path / "shoes" / "red.jpg").as_uri()
    assert uri_up.metadata == {"path": "shoes/red.jpg", "label": "shoes"}
    inline = next(e for e in events if e.id == "red" and e.op == "upsert")
    assert inline.image == photo_bytes[0] and inline.uri is None
    c1 = by_id["c1"][0]
    assert (c1.uri, c1.metadata, c1.visibility) == ("https://cdn.example.com/c1.jpg", {"brand": "x"}, "private")
    assert [e.op for e in by_id["c2"]] == ["upsert", "delete"]          # the delete is newer
    assert by_id["blue"][0].metadata == {"path": "blue.png"}


def test_publish_refuses_a_bad_csv_before_sending(tmp_path, broker):
    bad = tmp_path / "bad.csv"
    bad.write_text("id,uri\nok,file:///x.jpg\nbroken,ftp://host/x.jpg\n")
    with pytest.raises(SystemExit, match=r"nothing published: .*bad.csv:3: uri must be"):
        main(["publish", "--bootstrap", broker, "--topic", "never-" + uuid.uuid4().hex[:6],
              "--no-progress", str(bad)])
    wrong = tmp_path / "wrong.csv"
    wrong.write_text("name,url\na,file:///a.jpg\n")
    with pytest.raises(SystemExit, match="missing"):
        main(["publish", "--bootstrap", broker, "--topic", "t", "--no-progress", str(wrong)])
