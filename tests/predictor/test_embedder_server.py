"""The embedder behind a real KServe ModelServer, driven over HTTP with real photos."""

from __future__ import annotations

import base64
import io
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import requests
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from vsearch.predictor.client import EmbedderClient, EmbedderUnavailable
from vsearch.predictor.inference import Embedder
from vsearch.predictor.preprocess import InvalidImage

B64 = lambda data: base64.b64encode(data).decode("ascii")  # noqa: E731


@pytest.fixture(scope="module")
def local(tiny_model_dir):
    return Embedder(tiny_model_dir)


def v2(url, inputs, name="embedder"):
    return requests.post(f"{url}/v2/models/{name}/infer", json={"inputs": inputs}, timeout=60)


def v1(url, instances):
    return requests.post(f"{url}/v1/models/embedder:predict", json={"instances": instances}, timeout=60)


def test_health_readiness_metadata_and_metrics(embedder_url, local):
    assert requests.get(f"{embedder_url}/v2/health/live", timeout=5).status_code == 200
    assert requests.get(f"{embedder_url}/v2/models/embedder/ready", timeout=5).json()["ready"] is True
    meta = requests.get(f"{embedder_url}/v2/models/embedder", timeout=5).json()
    assert meta["outputs"][0]["shape"] == [-1, local.dim]
    assert requests.get(f"{embedder_url}/v2/models/nope/ready", timeout=5).status_code == 404
    assert requests.get(f"{embedder_url}/docs", timeout=5).status_code == 200
    assert "/v2/models/{model_name}/infer" in requests.get(f"{embedder_url}/openapi.json", timeout=5).json()["paths"]


def test_v2_single_and_batched_equal_in_process(embedder_url, local, photo_bytes):
    r = v2(embedder_url, [{"name": "image", "datatype": "BYTES", "shape": [1], "data": [B64(photo_bytes[0])]}])
    assert r.status_code == 200, r.text
    out = r.json()["outputs"][0]
    assert out["name"] == "embedding" and out["datatype"] == "FP32" and out["shape"] == [1, local.dim]
    np.testing.assert_allclose(np.asarray(out["data"]), local.embed_bytes(photo_bytes[:1])[0], atol=1e-5)

    batch = photo_bytes[:6]
    r = v2(embedder_url, [{"name": "image", "datatype": "BYTES", "shape": [6], "data": [B64(b) for b in batch]}])
    got = np.asarray(r.json()["outputs"][0]["data"], np.float32).reshape(6, local.dim)
    np.testing.assert_allclose(got, local.embed_bytes(batch), atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)


def test_v1_form(embedder_url, local, photo_bytes):
    r = v1(embedder_url, [{"image": {"b64": B64(b)}} for b in photo_bytes[:2]])
    assert r.status_code == 200, r.text
    np.testing.assert_allclose(np.asarray(r.json()["predictions"]), local.embed_bytes(photo_bytes[:2]),
                               atol=1e-5)


def test_crop_equals_the_pre_cropped_image(embedder_url, local, photo_bytes):
    photo = Image.open(io.BytesIO(photo_bytes[1])).convert("RGB")
    w, h = photo.size
    box = (0.2, 0.1, 0.7, 0.8)
    left, top, right, bottom = int(box[0] * w), int(box[1] * h), int(np.ceil(box[2] * w)), int(np.ceil(box[3] * h))
    buf = io.BytesIO()
    photo.crop((left, top, right, bottom)).save(buf, "PNG")      # lossless
    pre_cropped = buf.getvalue()

    r = v2(embedder_url, [
        {"name": "image", "datatype": "BYTES", "shape": [2], "data": [B64(photo_bytes[1])] * 2},
        {"name": "crop", "datatype": "FP32", "shape": [2, 4], "data": [*box, 0, 0, 1, 1]}])
    assert r.status_code == 200, r.text
    cropped, whole = np.asarray(r.json()["outputs"][0]["data"], np.float32).reshape(2, -1)
    expected = local.embed_bytes([pre_cropped])[0]
    np.testing.assert_allclose(cropped, expected, atol=1e-4)
    assert float(cropped @ whole) < 0.9999                     # the crop changed the query
    r = v1(embedder_url, [{"image": {"b64": B64(photo_bytes[1])}, "crop": list(box)}])
    np.testing.assert_allclose(np.asarray(r.json()["predictions"][0]), expected, atol=1e-4)


def test_client_matches_in_process_and_reports_errors(embedder_url, local, photo_bytes):
    client = EmbedderClient(embedder_url)
    assert client.dim == local.dim
    np.testing.assert_allclose(client.embed_bytes(photo_bytes[:3], [None, (0, 0, .5, .5), None]),
                               local.embed_bytes(photo_bytes[:3], [None, (0, 0, .5, .5), None]), atol=1e-5)
    assert client.version == "1"
    with pytest.raises(InvalidImage, match="not an image"):
        client.embed_bytes([b"definitely not an image"])
    with pytest.raises(EmbedderUnavailable):
        EmbedderClient("http://127.0.0.1:9", timeout=2).embed_bytes(photo_bytes[:1])


def _image(data, shape=None, dt="BYTES"):
    return {"name": "image", "datatype": dt, "shape": shape or [len(data)], "data": data}


def _crop(data, shape):
    return {"name": "crop", "datatype": "FP32", "shape": shape, "data": data}


def _big_png() -> bytes:
    png = io.BytesIO()
    Image.new("L", (6000, 6000)).save(png, "PNG")
    return png.getvalue()


# (case, protocol, payload from the base64 of a good photo and the photo's bytes, words of the reason)
BAD_REQUESTS = [
    ("not an image", "v2", lambda good, photo: [_image([B64(b"hello world")])], "not an image"),
    ("0 bytes", "v2", lambda good, photo: [_image([""])], "0 bytes"),
    ("truncated", "v2", lambda good, photo: [_image([B64(photo[: len(photo) // 2])])], "truncated"),
    ("over pixel limit", "v2", lambda good, photo: [_image([B64(_big_png())])], "pixels"),
    ("bad base64", "v2", lambda good, photo: [_image(["%%%not base64"])], "base64"),
    ("crop outside", "v2", lambda good, photo: [_image([good]), _crop([0, 0, 1.2, 1], [1, 4])], "crop"),
    ("crop empty", "v2", lambda good, photo: [_image([good]), _crop([0.5, 0.5, 0.5, 0.9], [1, 4])], "empty"),
    ("crop shape", "v2", lambda good, photo: [_image([good]), _crop([0, 0, 1, 1], [4])], "shape"),
    ("wrong datatype", "v2", lambda good, photo: [_image([1.0], dt="FP32")], "BYTES"),
    ("wrong shape", "v2", lambda good, photo: [_image([good, good], shape=[3])], "shape"),
    ("missing image", "v2", lambda good, photo: [_crop([0, 0, 1, 1], [1, 4])], "missing input 'image'"),
    ("unknown input", "v2", lambda good, photo: [_image([good]), {"name": "text", "datatype": "BYTES",
                                                                   "shape": [1], "data": ["x"]}], "unknown input"),
    ("too many", "v2", lambda good, photo: [_image([good] * 17)], "over the limit of 16"),
    ("empty batch", "v1", lambda good, photo: [], "no images"),
    ("v1 crop", "v1", lambda good, photo: [{"image": {"b64": good}, "crop": [0.9, 0, 0.1, 1]}], "crop"),
    ("v1 no image", "v1", lambda good, photo: [{"picture": good}], "image"),
]


@pytest.mark.parametrize("protocol, payload, reason", [case[1:] for case in BAD_REQUESTS],
                         ids=[case[0] for case in BAD_REQUESTS])
def test_bad_input_gets_a_400_with_a_reason_and_the_server_keeps_serving(embedder_url, photo_bytes, protocol,
                                                                        payload, reason):
    body = payload(B64(photo_bytes[0]), photo_bytes[0])
    r = v2(embedder_url, body) if protocol == "v2" else v1(embedder_url, body)
    assert r.status_code == 400, (r.status_code, r.text)
    assert reason.lower() in r.json()["error"].lower(), r.json()
    ok = v2(embedder_url, [_image([B64(photo_bytes[0])])])
    assert ok.status_code == 200


def test_malformed_json_is_a_400(embedder_url):
    r = requests.post(f"{embedder_url}/v2/models/embedder/infer", data=b"{not json",
                      headers={"content-type": "application/json"}, timeout=10)
    assert r.status_code == 400


def metric(url, name, **labels):
    """A sample of the embedder's /metrics, parsed by prometheus_client's own parser."""
    labels = labels or {"model": "embedder"}
    text = requests.get(f"{url}/metrics", timeout=5).text
    return next(s.value for fam in text_string_to_metric_families(text) for s in fam.samples
                if s.name == name and s.labels == labels)


def test_metrics_count_images_and_rejections(embedder_url, photo_bytes):
    before_ok = metric(embedder_url, "vsearch_embedder_images_total")
    before_bad = metric(embedder_url, "vsearch_embedder_rejected_total")
    v1(embedder_url, [{"image": {"b64": B64(b)}} for b in photo_bytes[:3]])
    v1(embedder_url, [{"image": {"b64": B64(b"junk")}}])
    assert metric(embedder_url, "vsearch_embedder_images_total") == before_ok + 3
    assert metric(embedder_url, "vsearch_embedder_rejected_total") == before_bad + 1


def test_concurrent_requests_are_batched_and_each_gets_its_own_rows(embedder_url, local, photo_bytes):
    def one(i):
        data = photo_bytes[i % len(photo_bytes)]
        r = v2(embedder_url, [{"name": "image", "datatype": "BYTES", "shape": [1], "data": [B64(data)]}])
        return i, np.asarray(r.json()["outputs"][0]["data"], np.float32)

    passes_before = metric(embedder_url, "vsearch_embedder_forward_passes_total")
    rows_before = metric(embedder_url, "vsearch_embedder_batch_rows_sum")
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(one, range(24)))
    # every row went through exactly one forward pass (how many the passes were depends on the
    # timing of the requests; that concurrent calls share passes is tested in test_batching.py)
    passes = metric(embedder_url, "vsearch_embedder_forward_passes_total") - passes_before
    assert metric(embedder_url, "vsearch_embedder_batch_rows_sum") - rows_before == 24
    assert 1 <= passes <= 24
    expected = local.embed_bytes(photo_bytes)
    for i, vec in results:
        np.testing.assert_allclose(vec, expected[i % len(photo_bytes)], atol=1e-5)
