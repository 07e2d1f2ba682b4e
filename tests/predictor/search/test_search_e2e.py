"""End to end: real photos, the real search server (a KServe ModelServer in its own process)
over the session's ``milvus-lite server``, events to the session's broker."""

from __future__ import annotations

import base64
import io
import json
import time
import urllib.parse
import zlib
from pathlib import Path

import numpy as np
import pytest
import requests
from itsdangerous.encoding import base64_decode

from tests.fixtures.search import MAX_UPLOAD, wait_for_events
from vsearch.predictor.preprocess import apply_crop, decode_image
from vsearch.predictor.search.ctr import read_events


def read_token(token: str) -> dict:
    """What anyone can read of an itsdangerous token: payload.timestamp.signature, the payload
    zlib-compressed when it starts with a dot."""
    payload = token.rsplit(".", 2)[0]
    raw = base64_decode(payload.lstrip("."))
    return json.loads(zlib.decompress(raw) if payload.startswith(".") else raw)


def ids(resp) -> list[str]:
    assert resp.status_code == 200, resp.text
    return [r["id"] for r in resp.json()["results"]]


def test_a_catalog_image_finds_itself_first_with_score_one(search_server):
    for item in ("photo-03", "photo-07"):
        body = search_server.search(search_server.catalog.photos[item], k=5).json()
        results = body["results"]
        assert results[0]["id"] == item
        assert results[0]["score"] == pytest.approx(1.0, abs=1e-3)
        # the catalog's own uri (a file path here) stays inside: uri is where this service serves it
        assert results[0]["uri"] == f"/images/{item}" and results[0]["metadata"]["label"]
        assert set(results[0]) == {"id", "score", "uri", "metadata"}
        assert "file:" not in json.dumps(body) and str(search_server.catalog.root) not in json.dumps(body)
        assert 1 <= len(results) <= 5 and body["query_id"] and body["model_version"]


def test_results_are_sorted_most_similar_first(search_server):
    for item in ("photo-02", "photo-05", "photo-09"):
        scores = [r["score"] for r in search_server.search(search_server.catalog.photos[item], k=20).json()["results"]]
        assert len(scores) >= 5
        assert scores == sorted(scores, reverse=True)


def test_a_private_item_never_appears(search_server):
    cat = search_server.catalog
    # Its own photo as the query: the private item would be the exact match.
    got = ids(search_server.search(cat.private_photo, k=100))
    assert "secret" not in got and len(got) >= 5
    for item in cat.photos:
        assert "secret" not in ids(search_server.search(cat.photos[item], k=100))
    # Nor through the image route.
    assert requests.get(f"{search_server.url}/images/secret", timeout=10).status_code == 404


def test_near_duplicates_collapse_to_one(search_server):
    cat = search_server.catalog
    got = ids(search_server.search(cat.photos["photo-00"], k=100))
    assert got[0] == "photo-00" or got[0] == "photo-00-copy"
    assert len({"photo-00", "photo-00-copy"} & set(got)) == 1        # same bytes
    assert len({"photo-01", "photo-01-resaved"} & set(got)) == 1     # re-encoded JPEG
    # every distinct public photo is still there: 10 photos, duplicates and the private one gone
    assert len(got) == 10 and len(set(got)) == 10


def test_k_limits_the_results_and_extra_candidates_fill_up_to_k(search_server):
    cat = search_server.catalog
    for k in (1, 3, 9):
        got = ids(search_server.search(cat.photos["photo-00"], k=k))
        assert len(got) == k                     # duplicates removed, filled from further candidates


def test_a_crop_query_differs_from_the_whole_image_and_equals_the_pre_cropped_image(search_server):
    photo = search_server.catalog.photos["photo-04"]
    box = (0.1, 0.2, 0.6, 0.7)
    whole = search_server.search(photo, k=8).json()["results"]
    cropped = search_server.search(photo, crop=",".join(map(str, box)), k=8).json()["results"]
    buf = io.BytesIO()
    apply_crop(decode_image(photo), box).save(buf, "PNG")             # lossless: the same pixels
    pre = search_server.search(buf.getvalue(), k=8).json()["results"]
    assert [(r["id"], round(r["score"], 4)) for r in cropped] != [(r["id"], round(r["score"], 4)) for r in whole]
    assert cropped[0]["score"] < 0.9999                               # the crop is not the catalog image
    assert [r["id"] for r in cropped] == [r["id"] for r in pre]
    np.testing.assert_allclose([r["score"] for r in cropped], [r["score"] for r in pre], atol=1e-4)


def test_a_filter_keeps_only_matching_items(search_server):
    cat = search_server.catalog
    label = cat.labels["photo-06"]
    resp = search_server.search(cat.photos["photo-00"], k=20, filter=json.dumps({"label": label}))
    results = resp.json()["results"]
    assert results and all(r["metadata"]["label"] == label for r in results)
    expected = {i for i, lab in cat.labels.items() if lab == label and i != "secret"}
    assert {r["id"] for r in results} <= expected


def test_impressions_and_clicks_land_on_search_events(search_server):
    cat = search_server.catalog
    query = cat.photos["photo-05"]
    body = search_server.search(query, crop="0,0,0.8,0.8", k=5).json()
    qid, clicked = body["query_id"], body["results"][1]
    resp = requests.post(f"{search_server.url}/events", json={"type": "click", "token": body["token"],
                                                              "item_id": clicked["id"]}, timeout=10)
    assert resp.status_code == 200 and resp.json()["events"][0]["accepted"] is True

    # both records of the query, once the click is there (the impression was sent before it)
    wait_for_events(search_server.bootstrap, lambda r: r["query_id"] == qid and r["type"] == "click")
    records = wait_for_events(search_server.bootstrap, lambda r: r["query_id"] == qid)
    imp = next(r for r in records if r["type"] == "impression")
    click = next(r for r in records if r["type"] == "click")
    assert [x["id"] for x in imp["results"]] == [r["id"] for r in body["results"]]
    assert [x["rank"] for x in imp["results"]] == [1, 2, 3, 4, 5]
    assert imp["model_version"] == body["model_version"] == click["model_version"]
    assert imp["crop"] == [0, 0, 0.8, 0.8] and imp["query_hash"] != imp["image_hash"]
    # the trainer's (query image, clicked image) pair points at real files
    query_path = Path(urllib.parse.urlsplit(click["query_uri"]).path)
    assert query_path.read_bytes() == query
    assert click["item_id"] == clicked["id"] and click["rank"] == 2
    item_path = Path(urllib.parse.urlsplit(click["item_uri"]).path)
    assert item_path.read_bytes() == cat.photos[clicked["id"]]

    # The token is signed, not encrypted: it names the stored query image by its name in the
    # store (hash and date), never a path, bucket or catalog URI.
    token = body["token"]
    readable = read_token(token)
    assert readable["query_id"] == qid and readable["query_ref"].endswith(".jpg")
    assert "/" not in readable["query_ref"].split("/")[-1] and str(search_server.query_store) not in json.dumps(readable)
    assert "file:" not in json.dumps(readable) and all(set(r) == {"id", "rank", "score"} for r in readable["results"])
    assert all("uri" not in r for r in imp["results"])

    # Clicks must carry the search's own token and name one of its results.
    forged = token[:-4] + ("AAAA" if not token.endswith("AAAA") else "BBBB")
    for bad, reason in (({"type": "click", "item_id": clicked["id"]}, "token"),
                        ({"type": "click", "token": forged, "item_id": clicked["id"]}, "not issued by this service"),
                        ({"type": "click", "token": "x.y", "item_id": clicked["id"]}, "token"),
                        ({"type": "click", "token": token, "item_id": "not-a-result"}, "not among the results"),
                        ({"type": "purchase", "token": token}, "event type"), (["not", "objects"], "object")):
        r = requests.post(f"{search_server.url}/events", json=bad, timeout=10)
        assert r.status_code == 400 and reason in r.json()["error"], (bad, r.text)


def test_a_deferred_impression_is_logged_when_posted(search_server):
    body = search_server.search(search_server.catalog.photos["photo-08"], k=3, log_impression="false").json()
    qid = body["query_id"]
    time.sleep(1.0)                                   # nothing is logged for this search by itself
    assert not [r for r in read_events(search_server.bootstrap, idle_timeout=1.0) if r.get("query_id") == qid]
    posted = requests.post(f"{search_server.url}/events", json={"type": "impression", "token": body["token"]},
                           timeout=10)
    assert posted.json()["events"][0]["accepted"] is True
    got = wait_for_events(search_server.bootstrap, lambda r: r["query_id"] == qid)
    assert [r["type"] for r in got] == ["impression"]
    assert [r["id"] for r in got[0]["results"]] == [r["id"] for r in body["results"]]


def test_bad_input_gets_its_status_and_the_next_query_works(search_server):
    url, photo = search_server.url, search_server.catalog.photos["photo-02"]

    def post(files=None, data=None, json_body=None):
        return requests.post(f"{url}/search", files=files, data=data, json=json_body, timeout=30)

    img = {"image": ("q.jpg", photo, "image/jpeg")}
    cases = [
        (post(files={"image": ("q.txt", b"this is not an image", "text/plain")}), 400, "not an image"),
        (post(files={"image": ("q.jpg", photo[: len(photo) // 3], "image/jpeg")}), 400, "image"),
        (post(files=img, data={"crop": "0.5,0.5,1.5,0.9"}), 400, "crop"),
        (post(files=img, data={"crop": "0.6,0.1,0.2,0.9"}), 400, "crop"),
        (post(files=img, data={"crop": "a,b"}), 400, "crop"),
        (post(files=img, data={"k": "0"}), 400, "k must"),
        (post(files=img, data={"k": "100000"}), 400, "k must"),
        (post(files=img, data={"k": "ten"}), 400, "k must"),
        (post(files=img, data={"filter": '{"colour": "red"}'}), 400, "unknown filter field"),
        (post(files=img, data={"filter": "{not json"}), 400, "filter"),
        (post(files=img, data={"topk": "3"}), 400, "unknown form field"),
        (post(data={"k": "3"}), 400, "image"),
        (post(json_body={"image_b64": "%%%"}), 400, "base64"),
        (post(json_body={"url": "http://127.0.0.1/x.jpg"}), 400, "turned off"),
        (requests.post(f"{url}/search", data=b"raw", headers={"content-type": "image/jpeg"}, timeout=10),
         400, "multipart"),
        (post(files={"image": ("big.jpg", b"\xff\xd8" + b"0" * (MAX_UPLOAD + 10), "image/jpeg")}), 413, "limit"),
        (post(json_body={"image_b64": base64.b64encode(b"0" * (MAX_UPLOAD * 2)).decode()}), 413, "limit"),
    ]
    for resp, status, words in cases:
        assert resp.status_code == status, (status, words, resp.text[:300])
        assert words in resp.json()["error"], (words, resp.json())
    assert ids(post(files=img, data={"k": "3"}))[0] == "photo-02"


def test_kserve_v1_and_v2_answer_like_the_plain_route(search_server):
    url, photo = search_server.url, search_server.catalog.photos["photo-06"]
    b64 = base64.b64encode(photo).decode()
    plain = ids(search_server.search(photo, k=4, crop="0,0,1,0.9"))
    v1 = requests.post(f"{url}/v1/models/visual-search:predict", timeout=30,
                       json={"instances": [{"image": {"b64": b64}, "k": 4, "crop": [0, 0, 1, 0.9]}]})
    assert v1.status_code == 200, v1.text
    assert [r["id"] for r in v1.json()["predictions"][0]["results"]] == plain
    v2 = requests.post(f"{url}/v2/models/visual-search/infer", timeout=30, json={"inputs": [
        {"name": "image", "datatype": "BYTES", "shape": [1], "data": [b64]},
        {"name": "crop", "datatype": "FP32", "shape": [1, 4], "data": [0, 0, 1, 0.9]},
        {"name": "k", "datatype": "INT32", "shape": [1], "data": [4]}]})
    assert v2.status_code == 200, v2.text
    out = {o["name"]: o for o in v2.json()["outputs"]}
    assert [r["id"] for r in json.loads(out["results"]["data"][0])] == plain
    bad = requests.post(f"{url}/v1/models/visual-search:predict", timeout=30,
                        json={"instances": [{"image": {"b64": b64}, "k": 0}]})
    assert bad.status_code == 400 and "k must" in bad.json()["error"]


def test_result_images_openapi_and_page_are_served(search_server):
    url, cat = search_server.url, search_server.catalog
    img = requests.get(f"{url}/images/photo-05", timeout=10)
    assert img.status_code == 200 and img.headers["content-type"] == "image/jpeg"
    assert img.content == cat.photos["photo-05"]
    assert requests.get(f"{url}/images/no-such-id", timeout=10).status_code == 404
    spec = requests.get(f"{url}/openapi.json", timeout=10).json()
    assert {"/search", "/events", "/images/{item_id}"} <= set(spec["paths"])
    assert requests.get(f"{url}/docs", timeout=10).status_code == 200
    page = requests.get(f"{url}/", timeout=10)
    assert page.status_code == 200 and "<title>Visual search</title>" in page.text
    assert requests.get(f"{url}/web/app.js", timeout=10).status_code == 200
    assert requests.get(f"{url}/v2/health/live", timeout=10).status_code == 200
    metrics = requests.get(f"{url}/metrics", timeout=10).text
    assert "vsearch_search_impressions_total" in metrics
