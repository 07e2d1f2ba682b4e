"""The network zoo: the known architectures (random-initialised from a config), the serving
network :class:`EmbeddingNet` (backbone + pooling + optional PCA-whitening), and loading and saving
it as a model directory (:mod:`.model_dir`). Supported families: ResNet, ViT, DINOv2 and CLIP
vision (with projection). The whitening (``whitening.safetensors``, :func:`fit_whitening`) is
attached to the network by the loader, so serving, indexing and evaluation apply it alike.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import AutoConfig, CLIPVisionConfig, Dinov2Config, ResNetConfig, ViTConfig

from .model_dir import (
    ARCHS,
    CLIP_MEAN,
    CLIP_STD,
    IMAGENET_MEAN,
    IMAGENET_STD,
    WHITENING_FILE,
    ModelDirError,
    ModelMeta,
    embedding_dim_of,
    families,
    family_of,
    read_meta,
    write_meta,
)


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


class EmbedModule(nn.Module):
    """``net.embed`` as a module's forward: what tracing and export take (put it in eval mode:
    the exporter traces the wrapper's own mode)."""

    def __init__(self, net: EmbeddingNet):
        super().__init__()
        self.net = net

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.net.embed(pixel_values)


# --------------------------------------------------------------------------- architectures

def _arch_configs():
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
    _, model_cls, kwargs, _ = families()[family]
    torch.manual_seed(seed)
    backbone = model_cls(config, **kwargs)
    meta = ModelMeta(name=name or arch, version=version, family=family,
                     embedding_dim=embedding_dim_of(config, family), arch=arch, **pre)
    return EmbeddingNet(backbone, meta.pooling), meta


def save_model_dir(net: EmbeddingNet, meta: ModelMeta, out: str | os.PathLike) -> Path:
    """Write a model directory: ``save_pretrained`` layout + ``vsearch_model.json`` (+ the
    whitening, when the network has one)."""
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


def init_model_dir(arch: str, out: str | os.PathLike, **kwargs) -> ModelMeta:
    net, meta = build_model(arch, **kwargs)
    save_model_dir(net, meta, out)
    return meta


def load_model_dir(model_dir: str | os.PathLike, *, random_init: bool = False,
                   seed: int = 0) -> tuple[EmbeddingNet, ModelMeta]:
    """The network and metadata of a model directory; ``random_init``: the same architecture
    with fresh weights drawn with ``seed`` (the evaluation's random-init baseline)."""
    model_dir = Path(model_dir)
    if not (model_dir / "config.json").exists():
        raise ModelDirError(f"{model_dir} is not a model directory (no config.json); "
                            f"make one with `vsearch model init --arch resnet18 --out {model_dir}`")
    config = AutoConfig.from_pretrained(model_dir)
    family = family_of(config)
    meta = read_meta(model_dir, config)
    _, model_cls, kwargs, _ = families()[family]
    if random_init:
        torch.manual_seed(seed)
        backbone = model_cls(config.vision_config if config.model_type == "clip" else config, **kwargs)
        return EmbeddingNet(backbone, meta.pooling), meta
    backbone = model_cls.from_pretrained(model_dir, **kwargs)
    return EmbeddingNet(backbone, meta.pooling, load_whitening(model_dir, meta)), meta


def load_whitening(model_dir: str | os.PathLike, meta: ModelMeta) -> Whitening | None:
    if not meta.whitening:
        return None
    path = Path(model_dir) / meta.whitening.get("file", WHITENING_FILE)
    if not path.exists():
        raise ModelDirError(f"{model_dir}: the metadata names a whitening but {path.name} is missing")
    t = load_file(path)
    if t["proj"].shape != (meta.embedding_dim, meta.embedding_dim):
        raise ModelDirError(f"{path} is {tuple(t['proj'].shape)}, expected "
                            f"{meta.embedding_dim}x{meta.embedding_dim}")
    return Whitening(t["mean"], t["proj"])
