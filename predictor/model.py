"""The embedding model: one module used by serving, indexing and training.

A model directory is the Hugging Face ``save_pretrained`` layout (``config.json`` +
``model.safetensors``) plus ``vsearch_model.json``, the metadata: name, version, family,
embedding dimension, input size, normalisation, pooling and, once evaluated, its offline
evaluation. An optional ``whitening.safetensors`` holds a PCA-whitening of the pooled
features fitted on a catalog (:func:`fit_whitening`); the loader attaches it to the network, so
serving, indexing and evaluation apply it alike. Supported families: ResNet, ViT, DINOv2 and CLIP vision (with projection); any
directory of those saved with ``save_pretrained`` loads, with the metadata derived from its
config and ``preprocessor_config.json`` when ``vsearch_model.json`` is absent.

    >>> emb = Embedder(default_model_dir())
    >>> vectors = emb.embed_bytes([open("cat.jpg", "rb").read()])   # float32 [1, D], L2-normalised
"""

from __future__ import annotations

import concurrent.futures as futures
import dataclasses
import importlib.resources
import json
import logging
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..core import jsonsafe, naming
from .embedding import embed_isolated
from .preprocess import Box, InvalidImage, Limits, PreprocessConfig, bytes_to_array, stack

METADATA_FILE = "vsearch_model.json"
WHITENING_FILE = "whitening.safetensors"
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class ModelDirError(ValueError):
    """The model directory is missing, incomplete or of an unsupported family."""


def default_model_dir() -> Path:
    """The model the platform serves by default (``models/default`` of the repository, shipped
    inside the installed package as ``vsearch.models``): trained by ``vsearch train``."""
    return Path(str(importlib.resources.files("vsearch.models") / "default"))


@dataclass
class ModelMeta:
    name: str
    version: str
    family: str                      # resnet | vit | dinov2 | clip_vision_model
    embedding_dim: int
    image_size: int
    resize_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    pooling: str                     # pooler | cls | mean | image_embeds
    resample: str = "bilinear"
    arch: str | None = None
    evaluation: dict | None = None
    training: dict | None = None
    whitening: dict | None = None    # {"file": WHITENING_FILE, "fitted_on": ..., "shrinkage": ...}
    extra: dict = field(default_factory=dict)

    @property
    def preprocess(self) -> PreprocessConfig:
        return PreprocessConfig(self.image_size, self.resize_size, tuple(self.mean),
                                tuple(self.std), self.resample)

    @property
    def model_id(self) -> str:
        """``name__version`` sanitised: the model version written into search events."""
        return naming.model_id(self.name, self.version)

    def to_json(self) -> dict:
        d = dataclasses.asdict(self)
        d["mean"], d["std"] = list(self.mean), list(self.std)
        return d

    @classmethod
    def from_json(cls, d: dict) -> "ModelMeta":
        known = {f.name for f in dataclasses.fields(cls)}
        extra = {k: v for k, v in d.items() if k not in known}
        kwargs = {k: v for k, v in d.items() if k in known}
        kwargs["mean"], kwargs["std"] = tuple(kwargs["mean"]), tuple(kwargs["std"])
        kwargs.setdefault("extra", {}).update(extra)
        return cls(**kwargs)


# --------------------------------------------------------------------------- families

def _families():
    from transformers.utils import logging as hf_logging
    hf_logging.disable_progress_bar()
    from transformers import (
        CLIPVisionConfig,
        CLIPVisionModelWithProjection,
        Dinov2Config,
        Dinov2Model,
        ResNetConfig,
        ResNetModel,
        ViTConfig,
        ViTModel,
    )
    return {
        "resnet": (ResNetConfig, ResNetModel, {}, "pooler"),
        "vit": (ViTConfig, ViTModel, {"add_pooling_layer": False}, "cls"),
        "dinov2": (Dinov2Config, Dinov2Model, {}, "pooler"),
        "clip_vision_model": (CLIPVisionConfig, CLIPVisionModelWithProjection, {}, "image_embeds"),
    }


def family_of(config) -> str:
    model_type = getattr(config, "model_type", "")
    if model_type == "clip":
        return "clip_vision_model"
    if model_type in _families():
        return model_type
    raise ModelDirError(
        f"unsupported model type {model_type!r}: expected one of resnet, vit, dinov2, clip / clip_vision_model")


def embedding_dim_of(config, family: str) -> int:
    if family == "resnet":
        return int(config.hidden_sizes[-1])
    if family == "clip_vision_model":
        return int(config.projection_dim)
    return int(config.hidden_size)


def pool(outputs, pooling: str) -> torch.Tensor:
    """Model outputs -> [N, D] features (not yet normalised)."""
    if pooling == "image_embeds":
        return outputs.image_embeds
    if pooling == "pooler":
        return outputs.pooler_output.flatten(1)
    hidden = outputs.last_hidden_state
    if hidden.dim() == 4:                       # conv feature map [N, C, H, W]
        return hidden.mean(dim=(2, 3))
    if pooling == "cls":
        return hidden[:, 0]
    if pooling == "mean":
        return hidden[:, 1:].mean(dim=1)
    raise ModelDirError(f"unknown pooling {pooling!r}: expected pooler, cls, mean or image_embeds")


class Whitening(nn.Module):
    """PCA-whitening of L2-normalised features: ``(normalize(x) - mean) @ proj`` (D -> D)."""

    def __init__(self, mean: torch.Tensor, proj: torch.Tensor):
        super().__init__()
        self.register_buffer("mean", mean.float())
        self.register_buffer("proj", proj.float())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (F.normalize(x.float(), dim=-1) - self.mean) @ self.proj


def fit_whitening(features: np.ndarray | torch.Tensor, shrinkage: float = 1.0) -> Whitening:
    """Fit :class:`Whitening` on catalog features [N, D] (float64 eigendecomposition).

    ``shrinkage`` adds that multiple of the mean eigenvalue to every eigenvalue before the
    inverse square root (0 = full whitening; larger is closer to plain centring), which keeps
    the noisy low-variance directions of a small catalog from dominating."""
    x = torch.as_tensor(np.asarray(features), dtype=torch.float64)
    if x.dim() != 2 or len(x) < 2:
        raise ValueError(f"whitening needs features [N >= 2, D], got {tuple(x.shape)}")
    x = F.normalize(x, dim=-1)
    mean = x.mean(0)
    cov = (x - mean).t() @ (x - mean) / (len(x) - 1)
    eigval, eigvec = torch.linalg.eigh(cov)
    eigval = eigval.clamp(min=0) + shrinkage * eigval.clamp(min=0).mean() + 1e-12
    return Whitening(mean, eigvec / eigval.sqrt())


class EmbeddingNet(nn.Module):
    """Backbone + pooling (+ optional whitening). ``forward`` gives the un-normalised pooled
    features and stays differentiable, so the trainer trains exactly the serving network;
    ``embed`` adds the whitening, when the model has one, and the L2 normalisation."""

    def __init__(self, backbone: nn.Module, pooling: str, whitening: Whitening | None = None):
        super().__init__()
        self.backbone = backbone
        self.pooling = pooling
        self.whitening = whitening

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return pool(self.backbone(pixel_values=pixel_values), self.pooling)

    def embed(self, pixel_values: torch.Tensor) -> torch.Tensor:
        x = self.forward(pixel_values).float()
        if self.whitening is not None:
            x = self.whitening(x)
        return F.normalize(x, dim=-1)


# --------------------------------------------------------------------------- architectures

def _arch_configs():
    from transformers import CLIPVisionConfig, Dinov2Config, ResNetConfig, ViTConfig
    return {
        "resnet18": (lambda **o: ResNetConfig(**{
            "embedding_size": 64, "hidden_sizes": [64, 128, 256, 512], "depths": [2, 2, 2, 2],
            "layer_type": "basic", **o}), dict(image_size=224, resize_size=256, mean=IMAGENET_MEAN,
                                              std=IMAGENET_STD, pooling="pooler")),
        "resnet-tiny": (lambda **o: ResNetConfig(**{
            "embedding_size": 32, "hidden_sizes": [32, 64, 128, 256], "depths": [1, 1, 1, 1],
            "layer_type": "basic", **o}), dict(image_size=128, resize_size=146, mean=IMAGENET_MEAN,
                                              std=IMAGENET_STD, pooling="pooler")),
        "resnet-small": (lambda **o: ResNetConfig(**{
            "embedding_size": 48, "hidden_sizes": [48, 96, 192, 384], "depths": [1, 1, 1, 1],
            "layer_type": "basic", **o}), dict(image_size=64, resize_size=73, mean=IMAGENET_MEAN,
                                              std=IMAGENET_STD, pooling="pooler")),
        "vit-small": (lambda **o: ViTConfig(**{
            "hidden_size": 384, "num_hidden_layers": 12, "num_attention_heads": 6,
            "intermediate_size": 1536, "image_size": 224, "patch_size": 16, **o}),
            dict(image_size=224, resize_size=256, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5),
                 pooling="cls")),
        "dinov2-small": (lambda **o: Dinov2Config(**{
            "hidden_size": 384, "num_hidden_layers": 12, "num_attention_heads": 6,
            "mlp_ratio": 4, "image_size": 224, "patch_size": 14, **o}),
            dict(image_size=224, resize_size=256, mean=IMAGENET_MEAN, std=IMAGENET_STD,
                 pooling="pooler", resample="bicubic")),
        "clip-vit-b32": (lambda **o: CLIPVisionConfig(**{
            "hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
            "num_attention_heads": 12, "image_size": 224, "patch_size": 32,
            "projection_dim": 512, **o}),
            dict(image_size=224, resize_size=224, mean=CLIP_MEAN, std=CLIP_STD,
                 pooling="image_embeds", resample="bicubic")),
    }


ARCHS = ("resnet18", "resnet-tiny", "resnet-small", "vit-small", "dinov2-small", "clip-vit-b32")


def build_model(arch: str, *, name: str | None = None, version: str = "0",
                config_overrides: dict | None = None, seed: int = 0,
                image_size: int | None = None) -> tuple[EmbeddingNet, ModelMeta]:
    """A random-initialised network of a known architecture and its metadata.

    ``config_overrides`` change the Hugging Face config (tests build tiny models this way);
    ``image_size`` changes the input size (and the resize size in proportion)."""
    archs = _arch_configs()
    if arch not in archs:
        raise ModelDirError(f"unknown arch {arch!r}: expected one of {', '.join(ARCHS)}")
    make_config, pre = archs[arch]
    pre = dict(pre)
    overrides = dict(config_overrides or {})
    if image_size:
        pre["resize_size"] = round(image_size * pre["resize_size"] / pre["image_size"])
        pre["image_size"] = image_size
    config = make_config(**overrides)
    if hasattr(config, "image_size") and not isinstance(config.image_size, (list, tuple)):
        config.image_size = pre["image_size"]
    family = family_of(config)
    _, model_cls, kwargs, _ = _families()[family]
    torch.manual_seed(seed)
    backbone = model_cls(config, **kwargs)
    meta = ModelMeta(name=name or arch, version=version, family=family,
                     embedding_dim=embedding_dim_of(config, family), arch=arch, **pre)
    return EmbeddingNet(backbone, meta.pooling), meta


def save_model_dir(net: EmbeddingNet, meta: ModelMeta, out: str | os.PathLike) -> Path:
    """Write a model directory: ``save_pretrained`` layout + ``vsearch_model.json`` (+ the
    whitening, when the network has one)."""
    from safetensors.torch import save_file
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    net.backbone.save_pretrained(out, safe_serialization=True)
    if net.whitening is not None:
        save_file({k: v.contiguous() for k, v in net.whitening.state_dict().items()}, out / WHITENING_FILE)
        meta.whitening = {**(meta.whitening or {}), "file": WHITENING_FILE}
    else:
        (out / WHITENING_FILE).unlink(missing_ok=True)
        meta.whitening = None
    write_meta(out, meta)
    return out


def write_meta(model_dir: str | os.PathLike, meta: ModelMeta) -> None:
    path = Path(model_dir) / METADATA_FILE
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(jsonsafe.dumps(meta.to_json(), indent=2) + "\n")
    tmp.replace(path)


def init_model_dir(arch: str, out: str | os.PathLike, **kwargs) -> ModelMeta:
    net, meta = build_model(arch, **kwargs)
    save_model_dir(net, meta, out)
    return meta


def read_meta(model_dir: str | os.PathLike, config=None) -> ModelMeta:
    """The directory's metadata, derived from its config when the file is absent."""
    model_dir = Path(model_dir)
    path = model_dir / METADATA_FILE
    if path.exists():
        try:
            return ModelMeta.from_json(json.loads(path.read_text()))
        except (ValueError, TypeError, KeyError) as exc:
            raise ModelDirError(f"{path} is not valid model metadata: {exc}") from exc
    if config is None:
        from transformers import AutoConfig
        config = AutoConfig.from_pretrained(model_dir)
    family = family_of(config)
    if config.model_type == "clip":
        config = config.vision_config
    pooling = _families()[family][3]
    image_size = getattr(config, "image_size", 224)
    image_size = image_size if isinstance(image_size, int) else image_size[0]
    mean, std = (CLIP_MEAN, CLIP_STD) if family == "clip_vision_model" else (IMAGENET_MEAN, IMAGENET_STD)
    resize, resample = round(image_size * 256 / 224), "bilinear"
    proc = model_dir / "preprocessor_config.json"
    if proc.exists():
        p = json.loads(proc.read_text())
        mean, std = tuple(p.get("image_mean", mean)), tuple(p.get("image_std", std))
        crop = p.get("crop_size")
        if isinstance(crop, dict):
            image_size = int(crop.get("height", image_size))
        size = p.get("size")
        if isinstance(size, dict) and "shortest_edge" in size:
            resize = int(size["shortest_edge"])
        resample = {2: "bilinear", 3: "bicubic"}.get(p.get("resample"), resample)
    return ModelMeta(name=model_dir.name, version="0", family=family,
                     embedding_dim=embedding_dim_of(config, family), image_size=image_size,
                     resize_size=max(resize, image_size), mean=tuple(mean), std=tuple(std),
                     pooling=pooling, resample=resample)


def load_model_dir(model_dir: str | os.PathLike, *, random_init: bool = False,
                   seed: int = 0) -> tuple[EmbeddingNet, ModelMeta]:
    """The network and metadata of a model directory; ``random_init``: the same architecture
    with fresh weights drawn with ``seed`` (the evaluation's random-init baseline)."""
    model_dir = Path(model_dir)
    if not (model_dir / "config.json").exists():
        raise ModelDirError(f"{model_dir} is not a model directory (no config.json); "
                            f"make one with `vsearch model init --arch resnet18 --out {model_dir}`")
    from transformers import AutoConfig
    config = AutoConfig.from_pretrained(model_dir)
    family = family_of(config)
    meta = read_meta(model_dir, config)
    _, model_cls, kwargs, _ = _families()[family]
    if random_init:
        torch.manual_seed(seed)
        backbone = model_cls(config.vision_config if config.model_type == "clip" else config, **kwargs)
        return EmbeddingNet(backbone, meta.pooling), meta
    backbone = model_cls.from_pretrained(model_dir, **kwargs)
    return EmbeddingNet(backbone, meta.pooling, load_whitening(model_dir, meta)), meta


def load_whitening(model_dir: str | os.PathLike, meta: ModelMeta) -> Whitening | None:
    if not meta.whitening:
        return None
    from safetensors.torch import load_file
    path = Path(model_dir) / meta.whitening.get("file", WHITENING_FILE)
    if not path.exists():
        raise ModelDirError(f"{model_dir}: the metadata names a whitening but {path.name} is missing")
    t = load_file(path)
    if t["proj"].shape != (meta.embedding_dim, meta.embedding_dim):
        raise ModelDirError(f"{path} is {tuple(t['proj'].shape)}, expected "
                            f"{meta.embedding_dim}x{meta.embedding_dim}")
    return Whitening(t["mean"], t["proj"])


# --------------------------------------------------------------------------- the embedder

class _Embed(nn.Module):
    def __init__(self, net: EmbeddingNet):
        super().__init__()
        self.net = net

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.net.embed(pixel_values)


def optimise_for_inference(net: EmbeddingNet, meta: ModelMeta):
    """A faster forward for serving, same results: convolutional nets run in channels-last
    memory format, traced, frozen (batch norm folded into the convolutions) and optimised by
    TorchScript. Checked against the eager network at other batch sizes than the trace's;
    any failure or mismatch falls back to the eager network. Transformers stay eager."""
    if meta.family != "resnet":
        return net.embed
    log = logging.getLogger(__name__)
    device = next(net.parameters()).device
    net.to(memory_format=torch.channels_last)
    size = meta.image_size
    try:
        with torch.inference_mode(False), torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            example = torch.randn(4, 3, size, size, device=device).contiguous(
                memory_format=torch.channels_last)
            traced = torch.jit.trace(_Embed(net).eval(), example, check_trace=False)
            fast = torch.jit.optimize_for_inference(torch.jit.freeze(traced.eval()))
            for n in (1, 3):
                x = torch.randn(n, 3, size, size, device=device)
                if not torch.allclose(fast(x.contiguous(memory_format=torch.channels_last)),
                                      net.embed(x), atol=1e-4):
                    raise ValueError(f"optimised network differs from eager at batch {n}")
    except Exception as exc:  # noqa: BLE001  (any tracing problem: serve the eager network)
        log.warning("serving the eager network (%s could not be optimised: %s)", meta.name, exc)
        return net.embed

    def forward(x: torch.Tensor) -> torch.Tensor:
        return fast(x.contiguous(memory_format=torch.channels_last))

    return forward


def set_torch_threads(n: int | None) -> None:
    """torch's CPU threads, a process-wide setting: for the entry point that owns the process
    (None: torch's own choice)."""
    if n:
        torch.set_num_threads(int(n))


def pick_device(device: str | None = None) -> torch.device:
    if device:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


class Embedder:
    """Images -> float32, L2-normalised embeddings, one row per image: the in-process
    :class:`~vsearch.predictor.embedding.ImageEmbedder`.

    Decoding and resizing run on a small thread pool (PIL releases the GIL), the forward pass
    under ``torch.inference_mode`` in batches of at most ``batch_size``."""

    endpoint = None                          # the model runs in this process

    def __init__(self, model_dir: str | os.PathLike, *, device: str | None = None,
                 batch_size: int = 32, limits: Limits = Limits(), decode_workers: int | None = None,
                 optimize: bool = True):
        self.model_dir = Path(model_dir)
        self.device = pick_device(device)
        self.net, self.meta = load_model_dir(self.model_dir)
        self.net.eval().to(self.device)
        self._forward = optimise_for_inference(self.net, self.meta) if optimize else self.net.embed
        self.cfg = self.meta.preprocess
        self.dim = self.meta.embedding_dim
        self.batch_size = max(1, int(batch_size))
        self.limits = limits
        workers = decode_workers or min(4, (os.cpu_count() or 2))
        self._pool = futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="decode")
        self._prefetch = futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="prefetch")

    # -- forward
    def embed_arrays(self, x: np.ndarray | torch.Tensor) -> np.ndarray:
        """Preprocessed float32 [N, 3, H, W] -> [N, D] normalised float32."""
        n = len(x)
        if n == 0:
            return np.zeros((0, self.dim), np.float32)
        out = []
        with torch.inference_mode():
            for i in range(0, n, self.batch_size):
                chunk = torch.as_tensor(x[i:i + self.batch_size]).to(self.device, non_blocking=True)
                out.append(self._forward(chunk).float().cpu().numpy())
        return np.concatenate(out).astype(np.float32, copy=False)

    # -- preprocessing on the pool
    def preprocess_bytes(self, blobs: Sequence[bytes], crops: Sequence[Box | None] | None = None
                         ) -> np.ndarray:
        """Decode and preprocess in parallel. An :class:`InvalidImage` names the bad item."""
        crops = list(crops) if crops is not None else [None] * len(blobs)
        if len(crops) != len(blobs):
            raise InvalidImage(f"got {len(blobs)} images but {len(crops)} crop boxes")

        def one(i):
            try:
                return bytes_to_array(blobs[i], self.cfg, crops[i], self.limits)
            except InvalidImage as exc:
                raise InvalidImage(f"image {i}: {exc}" if len(blobs) > 1 else str(exc)) from exc
            except MemoryError:
                raise
            except Exception as exc:  # noqa: BLE001  (a decoder surprise is the image's fault: a 400)
                raise InvalidImage(f"image {i}: could not be preprocessed ({type(exc).__name__})") from exc

        return stack(list(self._pool.map(one, range(len(blobs)))))

    def try_preprocess(self, blobs: Sequence[bytes], crops: Sequence[Box | None] | None = None
                       ) -> list[np.ndarray | InvalidImage]:
        """Like :meth:`preprocess_bytes` but one bad image does not fail the others: each item
        is its array or the :class:`InvalidImage` that says what is wrong with it."""
        crops = list(crops) if crops is not None else [None] * len(blobs)

        def one(i):
            try:
                return bytes_to_array(blobs[i], self.cfg, crops[i], self.limits)
            except InvalidImage as exc:
                return exc
            except MemoryError:
                raise
            except Exception as exc:  # noqa: BLE001  (one image's surprise must not fail the others)
                return InvalidImage(f"image could not be preprocessed: {type(exc).__name__}: {str(exc)[:200]}")

        return list(self._pool.map(one, range(len(blobs))))

    def embed_bytes(self, blobs: Sequence[bytes], crops: Sequence[Box | None] | None = None
                    ) -> np.ndarray:
        return self.embed_arrays(self.preprocess_bytes(blobs, crops))

    def embed_each(self, blobs: Sequence[bytes]) -> list[np.ndarray | InvalidImage]:
        """Each image's vector, or the :class:`InvalidImage` saying why it has none."""
        arrays = self.try_preprocess(blobs)
        ok = [i for i, a in enumerate(arrays) if not isinstance(a, InvalidImage)]
        out: list = list(arrays)
        if ok:
            vectors = embed_isolated(lambda idx: self.embed_arrays(np.stack([arrays[i] for i in idx])), ok)
            for i, v in zip(ok, vectors):
                out[i] = v
        return out

    @property
    def model_name(self) -> str:
        return self.meta.name

    @property
    def version(self) -> str:
        return self.meta.version

    @property
    def model_id(self) -> str:
        return self.meta.model_id

    def embed_stream(self, items: Iterable[bytes]) -> Iterator[np.ndarray]:
        """Embed an iterable of image bytes in batches, preprocessing the next batch while the
        current one runs through the network. Yields one [b, D] array per batch."""
        def batches():
            batch = []
            for item in items:
                batch.append(item)
                if len(batch) == self.batch_size:
                    yield batch
                    batch = []
            if batch:
                yield batch

        pending = None
        for batch in batches():
            nxt = self._prefetch.submit(self.preprocess_bytes, batch)
            if pending is not None:
                yield self.embed_arrays(pending.result())
            pending = nxt
        if pending is not None:
            yield self.embed_arrays(pending.result())

    def close(self):
        self._pool.shutdown(wait=False)
        self._prefetch.shutdown(wait=False)

