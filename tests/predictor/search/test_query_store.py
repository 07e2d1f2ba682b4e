"""Where query images are kept: a bounded folder, or S3 (a real S3-compatible server on
127.0.0.1) that several search replicas write and the trainer reads."""

from __future__ import annotations

import os
import time
import uuid

import boto3
import pytest
import requests

from tests.fixtures.search import start_search_server, wait_for_events
from vsearch.core.objects import s3_client
from vsearch.local.services import start_s3_server
from vsearch.predictor.search.query_store import QueryStore
from vsearch.trainer.data import read_source


def test_a_folder_store_stays_within_its_quota_oldest_first(tmp_path, photo_bytes):
    store = QueryStore(tmp_path / "q", max_bytes=3 * max(len(p) for p in photo_bytes[:6]))
    uris = []
    for i, data in enumerate(photo_bytes[:6]):
        uris.append(store.put(data, f"{i:02d}" + "0" * 62))
        time.sleep(0.01)                                  # distinct modification times
    kept = [p for p in (tmp_path / "q").rglob("*") if p.is_file()]
    assert sum(p.stat().st_size for p in kept) <= store.max_bytes
    assert uris[-1].endswith(".jpg") and os.path.exists(uris[-1][len("file://"):])   # the newest stays
    assert not os.path.exists(uris[0][len("file://"):])                               # the oldest went
    assert store.put(photo_bytes[5], "05" + "0" * 62) == uris[5]                      # same digest, same file


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    root = tmp_path_factory.mktemp("s3")
    try:
        svc = start_s3_server(log_path=root / "s3.log")
    except FileNotFoundError as exc:
        pytest.skip(str(exc))
    env = {"AWS_ENDPOINT_URL": svc.uri, "AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test",
           "AWS_DEFAULT_REGION": "us-east-1"}
    yield svc, env
    svc.stop()


def test_search_replicas_keep_query_images_in_s3_where_the_trainer_reads_them(
        s3, search_catalog, tiny_model_dir, milvus_server_uri, broker, tmp_path, monkeypatch):
    svc, env = s3
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    bucket = f"queries-{uuid.uuid4().hex[:8]}"
    boto3.client("s3").create_bucket(Bucket=bucket)
    replica = start_search_server(milvus_uri=milvus_server_uri, alias=search_catalog.alias,
                                  model_dir=tiny_model_dir, bootstrap=broker, log_path=tmp_path / "search.log",
                                  query_store=f"s3://{bucket}/search", env=env)
    try:
        photo = search_catalog.photos["photo-07"]
        body = requests.post(f"{replica.url}/search", files={"image": ("q.jpg", photo, "image/jpeg")},
                             data={"k": "2"}, timeout=60).json()
        imp = wait_for_events(broker, lambda r: r["query_id"] == body["query_id"])[0]
        uri = imp["query_uri"]
        assert uri.startswith(f"s3://{bucket}/search/{time.strftime('%Y/%m/%d', time.gmtime())}/")
        assert uri.endswith(".jpg")
        s3_client.cache_clear()                           # this process's client, with the test's settings
        assert read_source(uri) == photo                  # what a training Job reads for the pair
    finally:
        replica.stop()
