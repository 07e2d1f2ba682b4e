"""The model directory: what serving, indexing and training read and write.

A model directory is the Hugging Face ``save_pretrained`` layout (``config.json`` +
``model.safetensors``) plus ``vsearch_model.json``, the metadata (:class:`ModelMeta`): name,
version, family, embedding dimension, input size, normalisation, pooling and, once evaluated, its
offline evaluation; an optional ``whitening.safetensors`` (see :mod:`.zoo`). Any directory of a
supported family saved with ``save_pretrained`` loads, with the metadata derived from its config
and ``preprocessor_config.json`` when ``vsearch_model.json`` is absent. No torch here: reading a
model's metadata (``vsearch model info``, the demo, the operator) stays cheap.
"""

from __future__ import annotations

import dataclasses
import importlib.resources
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from ..core import jsonsafe, naming
from .preprocess import PreprocessConfig

METADATA_FILE = "vsearch_model.json"
WHITENING_FILE = "whitening.safetensors"
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)



# The architectures :mod:`.zoo` builds from a config (``vsearch model init --arch``, ``vsearch train
# --arch``): named here, beside the format, so the command line lists them without importing torch.
ARCHS = ("resnet18", "resnet-tiny", "resnet-small", "vit-small", "dinov2-small", "clip-vit-b32")


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

def families():
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
    if model_type in families():
        return model_type
    raise ModelDirError(
        f"unsupported model type {model_type!r}: expected one of resnet, vit, dinov2, clip / clip_vision_model")


def embedding_dim_of(config, family: str) -> int:
    if family == "resnet":
        return int(config.hidden_sizes[-1])
    if family == "clip_vision_model":
        return int(config.projection_dim)
    return int(config.hidden_size)


def write_meta(model_dir: str | os.PathLike, meta: ModelMeta) -> None:
    path = Path(model_dir) / METADATA_FILE
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(jsonsafe.dumps(meta.to_json(), indent=2) + "\n")
    tmp.replace(path)



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
        if not (model_dir / "config.json").is_file():
            raise ModelDirError(f"{model_dir} is not a model directory (no {METADATA_FILE}, no config.json)")
        from transformers import AutoConfig
        config = AutoConfig.from_pretrained(model_dir)
    family = family_of(config)
    if config.model_type == "clip":
        config = config.vision_config
    pooling = families()[family][3]
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
