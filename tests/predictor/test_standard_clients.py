"""Clients nobody here wrote, against the real ``vsearch serve embedder`` process: tritonclient
and KServe's ``InferenceRESTClient`` sending raw image bytes as a BYTES tensor over the binary
tensor extension (their default), curl's form content type, float32 crops, and errors that
never echo what was sent."""

from __future__ import annotations

import asyncio
import base64
import concurrent.futures as cf
import socket

import numpy as np
import pytest
import requests
import tritonclient.http as httpclient
from kserve import InferenceRESTClient, InferInput, InferRequest, RESTConfig

from vsearch.local.services import start_embedder


def _json_embedding(url: str, image: bytes, crop=None) -> np.ndarray:
    inputs = [{"name": "image", "datatype": "BYTES", "shape": [1], "data": [base64.b64encode(image).decode()]}]
    if crop is not None:
        inputs.append({"name": "crop", "datatype": "FP64", "shape": [1, 4], "data": list(crop)})
    r = requests.post(f"{url}/v2/models/embedder/infer", json={"inputs": inputs}, timeout=60)
    assert r.status_code == 200, r.text
    out = r.json()["outputs"][0]
    return np.asarray(out["data"], np.float32).reshape(out["shape"])


CROP = (0.1, 0.2, 0.6, 0.9)          # 0.1, 0.2, 0.6 and 0.9 are not exact in float32


def test_tritonclient_sends_raw_bytes_over_the_binary_extension(embedder_url, photo_bytes):
    photo = photo_bytes[0]
    client = httpclient.InferenceServerClient(url=embedder_url.removeprefix("http://"))
    try:
        image = httpclient.InferInput("image", [1], "BYTES")
        image.set_data_from_numpy(np.array([photo], dtype=np.object_), binary_data=True)
        crop = httpclient.InferInput("crop", [1, 4], "FP32")
        crop.set_data_from_numpy(np.array([CROP], np.float32), binary_data=True)
        for binary_out in (True, False):
            res = client.infer("embedder", [image, crop],
                               outputs=[httpclient.InferRequestedOutput("embedding", binary_data=binary_out)])
            got = res.as_numpy("embedding")
            # the same crop as decimal JSON (float64) gives the very same embedding
            assert np.array_equal(got, _json_embedding(embedder_url, photo, CROP))
        # a client mistake is a 400 that does not echo the image
        bad = httpclient.InferInput("image", [1], "BYTES")
        bad.set_data_from_numpy(np.array([b"\xff\xfe not an image " * 1000], dtype=np.object_), binary_data=True)
        with pytest.raises(Exception) as exc:
            client.infer("embedder", [bad])
        assert "400" in str(exc.value) or "not an image" in str(exc.value)
        assert "not an image " * 3 not in str(exc.value)
    finally:
        client.close()


def test_kserve_inference_rest_client_sends_raw_bytes(embedder_url, photo_bytes):
    photo = photo_bytes[1]

    async def call():
        client = InferenceRESTClient(RESTConfig(protocol="v2", retries=0, timeout=60))
        image = InferInput(name="image", shape=[1], datatype="BYTES")
        image.set_data_from_numpy(np.array([photo], dtype=np.object_), binary_data=True)
        crop = InferInput(name="crop", shape=[1, 4], datatype="FP32")
        crop.set_data_from_numpy(np.array([CROP], np.float32), binary_data=True)
        try:
            res = await client.infer(embedder_url, InferRequest(model_name="embedder", infer_inputs=[image, crop]),
                                     model_name="embedder")
        finally:
            await client.close()
        return res.outputs[0].as_numpy()

    got = np.asarray(asyncio.run(call()), np.float32)
    assert np.array_equal(got, _json_embedding(embedder_url, photo, CROP))


def test_float32_and_float64_crops_give_identical_embeddings(embedder_url, photo_bytes):
    photo = photo_bytes[2]
    as_f32 = [float(v) for v in np.asarray(CROP, np.float32)]      # 0.6000000238418579, ...
    assert as_f32 != list(CROP)
    assert np.array_equal(_json_embedding(embedder_url, photo, as_f32), _json_embedding(embedder_url, photo, CROP))


def _raw_http(url: str, request: bytes, timeout: float = 30) -> tuple[int, bytes]:
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=timeout) as s:
        s.sendall(request)
        data = b""
        while True:
            try:
                chunk = s.recv(65536)
            except (ConnectionResetError, BrokenPipeError):
                break
            if not chunk:
                break
            data += chunk
            if b"\r\n\r\n" in data:
                head, _, body = data.partition(b"\r\n\r\n")
                length = [int(line.split(b":")[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length")]
                if length and len(body) >= length[0]:
                    break
    status = int(data.split(b" ", 2)[1]) if data else 0
    return status, data.partition(b"\r\n\r\n")[2]


def test_malformed_binary_requests_are_400s_without_echo(embedder_url):
    cases = [
        (b'{"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1], "parameters": {"binary_data_size": 999}}]}',
         b"", "does not fit"),
        (b'{"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1], "parameters": {"binary_data_size": 6}}]}',
         b"\xff\xff\xff\x7fSE", "overruns"),
        (b'{"inputs": [{"name": "image", "datatype": "BYTES", "shape": [2], "parameters": {"binary_data_size": 9}}]}',
         b"\x05\x00\x00\x00SECRE", "needs 2"),
        (b'not json at all SECRET', b"", "not valid JSON"),
    ]
    for head, tail, phrase in cases:
        r = requests.post(f"{embedder_url}/v2/models/embedder/infer", data=head + tail, timeout=30,
                          headers={"Inference-Header-Content-Length": str(len(head)),
                                   "Content-Type": "application/octet-stream"})
        assert r.status_code == 400, (phrase, r.status_code, r.text)
        assert phrase in r.json()["error"] and "SECRE" not in r.text


def test_curl_d_form_content_type_is_read_as_json(embedder_url, photo_bytes):
    b64 = base64.b64encode(photo_bytes[0]).decode()
    for path, body in (("/v2/models/embedder/infer",
                        f'{{"inputs": [{{"name": "image", "datatype": "BYTES", "shape": [1], "data": ["{b64}"]}}]}}'),
                       ("/v1/models/embedder:predict", f'{{"instances": [{{"image": {{"b64": "{b64}"}}}}]}}')):
        r = requests.post(embedder_url + path, data=body, timeout=60,
                          headers={"Content-Type": "application/x-www-form-urlencoded"})
        assert r.status_code == 200, r.text


def test_errors_never_echo_the_request(embedder_url):
    secret = "SECRETPAYLOAD" * 500
    for body in ({"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1], "data": [secret]}]},
                 {"inputs": [{"name": "image", "datatype": "FP32", "shape": [1], "data": [secret]}]},
                 {"inputs": [{"name": "crop", "datatype": "FP32", "shape": [1, 4], "data": secret}]},
                 {"instances": [{"image": {"b64": "x"}, "crop": secret}]}):
        path = "/v1/models/embedder:predict" if "instances" in body else "/v2/models/embedder/infer"
        r = requests.post(embedder_url + path, json=body, timeout=30)
        assert 400 <= r.status_code < 500, r.text
        assert "SECRETPAYLOAD" * 3 not in r.text, r.text[:300]


@pytest.fixture(scope="module")
def guarded_embedder(tiny_model_dir, tmp_path_factory):
    """An embedder with a key, a small body limit and a one-image queue."""
    log = tmp_path_factory.mktemp("guarded") / "embedder.log"
    svc = start_embedder(tiny_model_dir, log_path=log, extra=(
        "--threads", "1", "--api-key", "k-123", "--max-body-bytes", "200000", "--max-queue", "1",
        "--max-batch", "1"))
    yield svc
    svc.stop()


def test_embedder_key_body_limit_and_queue(guarded_embedder, photo_bytes):
    url = guarded_embedder.url
    body = {"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1],
                        "data": [base64.b64encode(photo_bytes[0]).decode()]}]}
    assert requests.post(f"{url}/v2/models/embedder/infer", json=body, timeout=30).status_code == 401
    assert requests.get(f"{url}/v2/models/embedder", timeout=10).status_code == 401
    assert requests.get(f"{url}/v2/models/embedder/ready", timeout=10).status_code == 200
    assert requests.get(f"{url}/v2/health/live", timeout=10).status_code == 200
    ok = requests.post(f"{url}/v2/models/embedder/infer", json=body, headers={"X-API-Key": "k-123"}, timeout=60)
    assert ok.status_code == 200, ok.text
    # a chunked body (no Content-Length) past the limit: 413 on the bytes read
    head = (b"POST /v2/models/embedder/infer HTTP/1.1\r\nHost: x\r\nX-API-Key: k-123\r\n"
            b"Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n")
    chunk = b'{"inputs": [' + b" " * 65000
    req = head + b"".join(b"%x\r\n%s\r\n" % (len(chunk), chunk) for _ in range(5)) + b"0\r\n\r\n"
    status, reply = _raw_http(url, req)
    assert status == 413 and b"limit" in reply
    # a declared length over the limit is refused before anything is read
    r = requests.post(f"{url}/v2/models/embedder/infer", data=b"x" * 300_000, timeout=30,
                      headers={"X-API-Key": "k-123", "Content-Type": "application/json"})
    assert r.status_code == 413
    # the queue holds one image: concurrent requests beyond it get a 503 with Retry-After
    with cf.ThreadPoolExecutor(8) as pool:
        replies = list(pool.map(lambda _: requests.post(f"{url}/v2/models/embedder/infer", json=body, timeout=60,
                                                        headers={"X-API-Key": "k-123"}), range(8)))
    codes = sorted(r.status_code for r in replies)
    assert set(codes) <= {200, 503} and 200 in codes, codes
    busy = [r for r in replies if r.status_code == 503]
    assert all(r.headers.get("retry-after") for r in busy)
