"""Model directories of every supported family load through the production code path and
embed into float32, L2-normalised rows."""

from __future__ import annotations

import io
import json
import shutil
import subprocess

import numpy as np
import pytest
import torch
from PIL import Image

from vsearch.local.services import vsearch_argv
from vsearch.predictor.inference import Embedder
from vsearch.predictor.model_dir import METADATA_FILE, ModelDirError, read_meta
from vsearch.predictor.zoo import build_model, load_model_dir, save_model_dir


@pytest.mark.parametrize("arch", ["resnet18", "vit-small", "dinov2-small", "clip-vit-b32"])
def test_each_family_embeds_normalised_rows(model_dirs, photo_bytes, arch):
    emb = Embedder(model_dirs[arch])
    vectors = emb.embed_bytes(photo_bytes[:3])
    assert vectors.dtype == np.float32
    assert vectors.shape == (3, emb.dim) == (3, emb.meta.embedding_dim)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    # Different photos, different embeddings; the same photo, the same embedding.
    assert not np.allclose(vectors[0], vectors[1])
    np.testing.assert_allclose(emb.embed_bytes(photo_bytes[:1])[0], vectors[0], atol=1e-5)


def test_batching_does_not_change_the_result(tiny_model_dir, photo_bytes):
    one_by_one = Embedder(tiny_model_dir, batch_size=1).embed_bytes(photo_bytes[:5])
    batched = Embedder(tiny_model_dir, batch_size=4).embed_bytes(photo_bytes[:5])
    np.testing.assert_allclose(one_by_one, batched, atol=1e-5)
    stream = np.concatenate(list(Embedder(tiny_model_dir, batch_size=2)
                                 .embed_stream(iter(photo_bytes[:5]))))
    np.testing.assert_allclose(stream, batched, atol=1e-5)


def test_metadata_is_derived_when_the_file_is_absent(model_dirs, tmp_path):
    plain = tmp_path / "plain-clip"
    shutil.copytree(model_dirs["clip-vit-b32"], plain)
    (plain / METADATA_FILE).unlink()
    (plain / "preprocessor_config.json").write_text(json.dumps({
        "image_mean": [0.1, 0.2, 0.3], "image_std": [0.4, 0.5, 0.6],
        "crop_size": {"height": 64, "width": 64}, "size": {"shortest_edge": 64}, "resample": 3}))
    meta = read_meta(plain)
    assert meta.family == "clip_vision_model" and meta.pooling == "image_embeds"
    assert meta.embedding_dim == 24 and meta.image_size == 64
    assert meta.mean == (0.1, 0.2, 0.3) and meta.resample == "bicubic"
    assert Embedder(plain).embed_bytes([_png()]).shape == (1, 24)


def test_a_directory_that_is_not_a_model_is_refused(tmp_path):
    with pytest.raises(ModelDirError, match="not a model directory"):
        load_model_dir(tmp_path)
    with pytest.raises(ModelDirError, match="unknown arch"):
        build_model("alexnet")


def test_the_saved_network_equals_the_built_one(tmp_path):
    net, meta = build_model("resnet18", config_overrides=dict(embedding_size=8, hidden_sizes=[8, 16],
                                                              depths=[1, 1]), image_size=32, seed=3)
    save_model_dir(net, meta, tmp_path / "m")
    loaded, meta2 = load_model_dir(tmp_path / "m")
    x = torch.randn(2, 3, 32, 32)
    net.eval(), loaded.eval()
    with torch.inference_mode():
        torch.testing.assert_close(net.embed(x), loaded.embed(x))
    assert meta2 == meta


@pytest.mark.slow
def test_cli_model_init_and_embed_a_folder(tmp_path, photo_bytes):
    folder = tmp_path / "photos"
    (folder / "sub").mkdir(parents=True)
    for i, data in enumerate(photo_bytes[:4]):
        (folder / ("sub" if i % 2 else "") / f"p{i}.jpg").write_bytes(data)
    (folder / "broken.jpg").write_bytes(b"not a jpeg")
    model = tmp_path / "model"

    def run(*a):
        return subprocess.run(vsearch_argv(*a), capture_output=True, text=True, timeout=180)

    r = run("model", "init", "--arch", "resnet-tiny", "--out", str(model), "--image-size", "64")
    assert r.returncode == 0, r.stderr
    assert json.loads((model / METADATA_FILE).read_text())["embedding_dim"] == 256
    out = tmp_path / "emb.npy"
    r = run("embed", "--model-dir", str(model), "--out", str(out), "--batch-size", "3", str(folder))
    assert r.returncode == 0, r.stderr
    vectors = np.load(out)
    paths = (tmp_path / "emb.npy.paths.txt").read_text().split()
    assert vectors.shape == (4, 256) and len(paths) == 4
    assert "broken.jpg" in r.stderr and "skipped" in r.stderr
    # Row i is the embedding of paths[i].
    emb = Embedder(model)
    np.testing.assert_allclose(vectors[2], emb.embed_bytes([open(paths[2], "rb").read()])[0], atol=1e-5)


def _png() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (80, 60), (10, 200, 30)).save(buf, "PNG")
    return buf.getvalue()


def test_the_optimised_forward_of_a_conv_net_is_torchscript_and_matches_eager(tiny_model_dir, photo_bytes):
    """Serving runs ResNets traced and frozen by TorchScript in channels-last layout (batch norm
    folded into the convolutions); the embeddings must be those of the eager network."""
    fast = Embedder(tiny_model_dir)
    eager = Embedder(tiny_model_dir, optimize=False)
    assert fast._forward != fast.net.embed and eager._forward == eager.net.embed
    np.testing.assert_allclose(fast.embed_bytes(photo_bytes[:6]), eager.embed_bytes(photo_bytes[:6]),
                               atol=1e-4)


def test_transformer_families_stay_eager(model_dirs):
    emb = Embedder(model_dirs["vit-small"])
    assert emb._forward == emb.net.embed
