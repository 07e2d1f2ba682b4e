"""The embedder's runtimes (``--runtime``): ONNX Runtime and OpenVINO run the network exported
from the model directory, whitening included, and give the embeddings of the PyTorch network
within :data:`~vsearch.predictor.runtimes.TOLERANCE` (1e-4 per component of the L2-normalised
vector) on real photos; the served vectors are those too; a wrong name is a usage error."""

from __future__ import annotations

import base64

import numpy as np
import pytest
import requests

from vsearch.cli import command_parser, main
from vsearch.local.samples import TINY
from vsearch.predictor.inference import Embedder
from vsearch.predictor.model_dir import default_model_dir
from vsearch.predictor.runtimes import (
    CACHE_ENV,
    TOLERANCE,
    RuntimeMismatch,
    UnknownRuntime,
    export_onnx,
)
from vsearch.predictor.zoo import init_model_dir, load_model_dir


def close_to_pytorch(got: np.ndarray, want: np.ndarray) -> None:
    assert got.dtype == np.float32 and got.shape == want.shape
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
    assert float(np.abs(got - want).max()) <= TOLERANCE
    assert float((got * want).sum(axis=1).min()) >= 1 - 1e-6          # cosine to the PyTorch vector


@pytest.mark.parametrize("model", ["default", "resnet18", "vit-small"])
def test_each_runtime_embeds_real_photos_like_pytorch(model, model_dirs, photo_bytes):
    """The default model (a ResNet with its PCA-whitening) and small models built from configs (a
    ResNet, a ViT: TorchScript leaves transformers eager, the exported runtimes run them too), 12
    Caltech-101 photos, in batches of 5 (the graph was traced at 2)."""
    model_dir = default_model_dir() if model == "default" else model_dirs[model]
    want = Embedder(model_dir, runtime="eager").embed_bytes(photo_bytes)
    assert not np.allclose(want[0], want[1])
    for runtime in ("onnxruntime", "openvino"):
        emb = Embedder(model_dir, runtime=runtime, batch_size=5, threads=1)
        assert (emb.runtime, emb.threads, str(emb.device)) == (runtime, 1, "cpu")
        close_to_pytorch(np.concatenate(list(emb.embed_stream(iter(photo_bytes)))), want)


def test_the_export_is_cached_per_network_and_a_graph_that_differs_is_refused(tmp_path, monkeypatch):
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache"))
    a, b = tmp_path / "a", tmp_path / "b"
    init_model_dir("resnet18", a, seed=1, **TINY["resnet18"])
    init_model_dir("resnet18", b, seed=2, **TINY["resnet18"])        # same name and shapes, other weights
    Embedder(a, runtime="onnxruntime")
    (graph_a,) = (tmp_path / "cache").glob("*.onnx")
    stamp = graph_a.stat().st_mtime_ns
    Embedder(a, runtime="openvino")                                   # the same graph, not exported again
    assert list((tmp_path / "cache").glob("*.onnx")) == [graph_a] and graph_a.stat().st_mtime_ns == stamp
    net_b, meta_b = load_model_dir(b)
    graph_b = export_onnx(net_b.eval().requires_grad_(False), meta_b)
    assert graph_b != graph_a
    graph_b.write_bytes(graph_a.read_bytes())                         # a stale or foreign graph
    with pytest.raises(RuntimeMismatch, match="differs from the PyTorch network"):
        Embedder(b, runtime="onnxruntime")


def test_a_wrong_runtime_is_a_usage_error(monkeypatch, capsys, tiny_model_dir):
    expected = "unknown runtime 'tensorrt': expected one of eager, torchscript, onnxruntime, openvino"
    commands = {"EMBEDDER": (["serve", "embedder"], []), "SEARCH": (["serve", "search"], []),
                "INGEST": (["ingest"], []), "EMBED": (["embed"], ["--out", "x.npy", "photos"])}
    for component, (names, rest) in commands.items():
        argv = [*names, *rest]
        with pytest.raises(SystemExit) as exc:
            main([*argv, "--runtime", "tensorrt"])
        assert exc.value.code == 2
        assert f"argument --runtime: {expected}" in capsys.readouterr().err
        monkeypatch.setenv(f"VSEARCH_{component}_RUNTIME", "tensorrt")
        with pytest.raises(SystemExit) as exc:
            main(argv)
        assert exc.value.code == 2
        assert f"VSEARCH_{component}_RUNTIME='tensorrt' is not valid: {expected}" in capsys.readouterr().err
        monkeypatch.setenv(f"VSEARCH_{component}_RUNTIME", "OpenVINO")
        assert command_parser(*names).parse_args(rest).runtime == "openvino"      # any case
    with pytest.raises(UnknownRuntime, match="unknown runtime 'tensorrt'"):
        Embedder(tiny_model_dir, runtime="tensorrt")
    with pytest.raises(ValueError, match="runs on the CPU"):
        Embedder(tiny_model_dir, runtime="onnxruntime", device="cuda")


def test_the_server_on_onnxruntime_answers_the_vectors_of_pytorch(onnx_embedder_url, photo_bytes):
    photos = photo_bytes[:6]
    r = requests.post(f"{onnx_embedder_url}/v2/models/embedder/infer", timeout=60, json={"inputs": [
        {"name": "image", "datatype": "BYTES", "shape": [len(photos)],
         "data": [base64.b64encode(p).decode() for p in photos]}]})
    assert r.status_code == 200, r.text
    out = r.json()["outputs"][0]
    got = np.asarray(out["data"], np.float32).reshape(out["shape"])
    close_to_pytorch(got, Embedder(default_model_dir(), runtime="eager").embed_bytes(photos))
    info = requests.get(f"{onnx_embedder_url}/vsearch/v1/model", timeout=10).json()
    assert (info["runtime"], info["name"]) == ("onnxruntime", "vsearch-default")
