"""A label-free validation signal: is this checkpoint better than that one on *this* catalog?

Fine-tuning can end worse than it started (a catalog unlike the training photos, a recipe too
strong for it), and without labels the trainer cannot see it. This module gives it a signal
measured on a held-out part of the unlabelled catalog (never trained on):

* **neighbour agreement** (:func:`neighbour_agreement`, the signal): every held-out image is
  seen through ``n_views`` seeded views (the serving view and gentle random ones: crop, flip,
  a little colour; never the training's strong recipe). Each view gives a k-nearest-neighbour
  graph of the held-out *images* (an image's own other views left out); the signal is the mean
  overlap of an image's k neighbours between two views. It asks whether the catalog's
  neighbourhoods, what retrieval returns, survive a change of view, not whether a view finds its
  own image: that one (:func:`agreement`, kept as a diagnostic) is what SimCLR trains for, so it
  rises with every fine-tuning step even where retrieval gets worse (measured: see
  ``trainer/EXPERIMENTS.md``);
* **click recall** (:func:`pair_agreement`): with click pairs, the held-out pairs themselves:
  recall@1 / MRR of the clicked item among all held-out clicked items, for each query.

    >>> vset = view_set(images, meta.preprocess, seed=0)          # views made once
    >>> score(features(net, vset.x), vset)["score"]               # neighbour agreement, higher = better
    >>> score(features(net, vset.x), vset, whitening=w)["score"]  # the same net, whitened

:func:`select` then picks among candidates (checkpoints x whitening variants) with a margin
and with the signal's noise in view: a candidate replaces the reference (the starting model as
it is) only when it beats it by more than ``min_gain`` on average and the lower end of the
paired per-image interval of its gain is above zero, on both measures. The trainer
(``train.py``) uses all of this on rank 0.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..predictor.preprocess import PreprocessConfig, stack
from ..predictor.zoo import EmbeddingNet, Whitening
from .augment import AugmentConfig, SimCLRAugment, serving_view

# The views the signal compares: milder than training's SimCLR recipe on purpose (a model
# trained for exactly those views would win by construction).
VALIDATION_AUGMENT = AugmentConfig(crop_scale=(0.5, 1.0), jitter_p=0.5, brightness=0.2, contrast=0.2,
                                   saturation=0.2, hue=0.02, grey_p=0.0, blur_p=0.0)


@dataclass
class ViewSet:
    """``n_views`` views of each of ``n`` images: ``x`` [n * n_views, C, H, W], image i's views
    at rows ``i * n_views ... i * n_views + n_views - 1``."""
    x: torch.Tensor
    n: int
    n_views: int
    info: dict = field(default_factory=dict)

    @property
    def ids(self) -> np.ndarray:
        return np.repeat(np.arange(self.n), self.n_views)


def view_set(images: Sequence, pre: PreprocessConfig, *, n_views: int = 3, seed: int = 0,
             augment: AugmentConfig = VALIDATION_AUGMENT, serving_first: bool = True) -> ViewSet:
    """The views of decoded images (PIL) the signal is measured on: with ``serving_first`` the
    first view of each image is the serving view itself (what a query looks like), the others
    seeded random views. Deterministic: the same views for every checkpoint compared."""
    if n_views < 2:
        raise ValueError(f"view agreement needs at least 2 views per image, got {n_views}")
    if len(images) < 2:
        raise ValueError(f"view agreement needs at least 2 images, got {len(images)}")
    aug = SimCLRAugment(pre, augment)
    rows = []
    for i, img in enumerate(images):
        rng = random.Random(f"{seed}-{i}")
        views = [serving_view(img, pre)] if serving_first else []
        views += [aug(img, rng) for _ in range(n_views - len(views))]
        rows += views
    return ViewSet(torch.from_numpy(stack(rows)), len(images), n_views,
                   {"images": len(images), "views_per_image": n_views, "seed": seed,
                    "augment": augment.to_json()})


def serving_batch(images: Sequence, pre: PreprocessConfig) -> torch.Tensor:
    """The serving views of decoded images (what a whitening is fitted on)."""
    return torch.from_numpy(stack([serving_view(im, pre) for im in images]))


def features(net: EmbeddingNet, x: torch.Tensor, batch_size: int = 128) -> torch.Tensor:
    """The network's pooled features (before any whitening), eval mode, no gradients; the
    network's train/eval mode is restored afterwards."""
    was_training = net.training
    net.eval()
    device = next(net.parameters()).device
    out = []
    with torch.inference_mode():
        for i in range(0, len(x), batch_size):
            out.append(net(x[i:i + batch_size].to(device)).float().cpu())
    net.train(was_training)
    return torch.cat(out) if out else torch.zeros(0, 1)


def embed(feats: torch.Tensor, whitening: Whitening | None = None) -> torch.Tensor:
    """Features -> what serving returns: whitened when ``whitening`` is given, L2-normalised."""
    x = feats.float()
    if whitening is not None:
        with torch.inference_mode():
            x = whitening.to(x.device)(x)
    return F.normalize(x, dim=-1)


def agreement(z: torch.Tensor, ids: np.ndarray) -> dict:
    """Leave-one-out retrieval of every row among all the others, relevant = same id (the
    other views of the same image): mAP, recall@1 (nearest other view is a sibling) and MRR of
    the first sibling. ``score`` is the mAP."""
    z = F.normalize(z.float(), dim=-1)
    sim = z @ z.t()
    n = len(z)
    ids_t = torch.as_tensor(ids)
    same = ids_t[:, None] == ids_t[None, :]
    eye = torch.eye(n, dtype=torch.bool)
    sim = sim.masked_fill(eye, -float("inf"))
    rel = same & ~eye
    # descending similarity; among equal similarities the non-relevant items first (ties count
    # pessimistically, as in the labelled metrics)
    order = torch.from_numpy(np.lexsort((rel.numpy(), -sim.numpy()), axis=1))
    rel_sorted = torch.gather(rel, 1, order)
    hits = rel_sorted[:, : n - 1].float()
    cum = hits.cumsum(1)
    ranks = torch.arange(1, n, dtype=torch.float32)[None, :]
    n_rel = hits.sum(1).clamp(min=1)
    ap = (hits * cum / ranks).sum(1) / n_rel
    first = hits.argmax(1).float() + 1
    ids_np = np.asarray(ids)
    per_id = np.bincount(ids_np, weights=ap.numpy(), minlength=int(ids_np.max()) + 1) / np.maximum(
        np.bincount(ids_np, minlength=int(ids_np.max()) + 1), 1)
    return {"score": float(ap.mean()), "map": float(ap.mean()), "recall@1": float(hits[:, 0].mean()),
            "mrr": float((1.0 / first).mean()), "items": n, "_values": per_id}


def pair_agreement(zq: torch.Tensor, zc: torch.Tensor) -> dict:
    """Held-out click pairs: for query i, the rank of its clicked item c_i among all held-out
    clicked items (by cosine similarity). ``score`` is the MRR; recall@1 is given too."""
    zq, zc = F.normalize(zq.float(), dim=-1), F.normalize(zc.float(), dim=-1)
    if not (torch.isfinite(zq).all() and torch.isfinite(zc).all()):
        return {"score": -1.0, "mrr": None, "diverged": True, "items": len(zq)}
    sim = zq @ zc.t()
    own = sim.diagonal()[:, None]
    rank = 1 + (sim > own).sum(1).float() + ((sim == own).sum(1).float() - 1)   # ties: pessimistic
    rr = (1 / rank).numpy().astype(np.float64)
    return {"score": float(rr.mean()), "mrr": float(rr.mean()), "recall@1": float((rank == 1).float().mean()),
            "items": len(zq), "_per_image": {"score": rr}}


def neighbour_agreement(z: torch.Tensor, n: int, n_views: int, k: int = 10,
                        gallery: torch.Tensor | None = None) -> dict:
    """``z`` [n * n_views, D], image i's views at rows i * n_views ...: for each view v, the k
    nearest other images of every image by its view v (cosine); ``score`` = the mean fraction
    of those k shared between two views of the same image, over all pairs of views. With a
    ``gallery`` [G, D] (embeddings of other catalog images, e.g. training images' serving
    views) the neighbours are taken among the gallery instead: what a held-out query would get
    back from the catalog. Ties are broken at random (seeded), independently per view: a
    collapsed network, whose images all tie, scores chance (about k / n), not a perfect
    agreement of identical orderings."""
    if n < 2 or n_views < 2:
        raise ValueError(f"neighbour agreement needs 2 images and 2 views, got {n} x {n_views}")
    pool = n if gallery is None else len(gallery)
    k = max(1, min(k, pool - 1 if gallery is None else pool))
    zz = F.normalize(z.float(), dim=-1).view(n, n_views, -1)
    other = None if gallery is None else F.normalize(gallery.float(), dim=-1).double()
    eye = torch.eye(n, dtype=torch.bool)
    gen = torch.Generator().manual_seed(0)
    graphs = []
    for v in range(n_views):
        q = zz[:, v].double()
        jitter = torch.rand(n, pool, generator=gen, dtype=torch.float64) * 1e-6
        if other is None:
            sim = (q @ q.t() + jitter).masked_fill(eye, -float("inf"))
        else:
            sim = q @ other.t() + jitter
        member = torch.zeros(n, pool, dtype=torch.bool)
        member.scatter_(1, sim.topk(k, dim=1).indices, True)
        graphs.append(member)
    shared = np.mean([(graphs[a] & graphs[b]).sum(1).double().numpy() / k
                      for a in range(n_views) for b in range(a + 1, n_views)], axis=0)   # per image
    return {"score": float(shared.mean()), "neighbour_agreement": float(shared.mean()), "k": k,
            "_values": shared}


def score(feats: torch.Tensor, vset: ViewSet, whitening: Whitening | None = None, k: int = 10,
          gallery: torch.Tensor | None = None) -> dict:
    """The signal of a network's features of ``vset.x`` (with a whitening): the neighbour
    agreement (``score``; among the ``gallery`` features' images when given), with the view
    agreement's mAP and recall@1 beside it."""
    z = embed(feats, whitening)
    if not torch.isfinite(z).all():                # a diverged network: worse than anything
        return {"score": -1.0, "neighbour_agreement": None, "diverged": True, "images": vset.n}
    g = None if gallery is None else embed(gallery, whitening)
    if g is not None and not torch.isfinite(g).all():
        return {"score": -1.0, "neighbour_agreement": None, "diverged": True, "images": vset.n}
    views = agreement(z, vset.ids)
    na = neighbour_agreement(z, vset.n, vset.n_views, k, gallery=g)
    return {**na, "view_map": views["map"], "view_recall@1": views["recall@1"], "images": vset.n,
            **({"gallery": len(g)} if g is not None else {}),
            "_per_image": {"score": na["_values"], "view_map": views["_values"]}}


def public(m: dict) -> dict:
    """Measures without their per-image values (what run logs and metadata keep)."""
    return {k: v for k, v in m.items() if not k.startswith("_")}


MEASURES = ("score", "view_map")     # both must agree (click pairs: one, the MRR, used for both)


def paired_gain(m: dict, ref: dict, alpha: float = 0.05) -> dict:
    """The gain of ``m`` over ``ref`` with its noise: the *smaller* of the gains in neighbour
    agreement and in view agreement (``view_map``), so that both must agree (click pairs have
    one measure, the MRR, used for both; measured on the bench collections, each of the two alone
    ordered some catalog's candidates the wrong way, see trainer/EXPERIMENTS.md). For each
    measure, the per-image paired difference (the same held-out images, views and pairs under
    both) and the lower end of its one-sided ``1 - alpha`` t-interval (statsmodels); ``lower``
    and ``mean`` are the smaller of the measures'. A held-out set of 56 images moves the neighbour agreement
    by +-0.03 between checkpoints of one run (textures, trainer/EXPERIMENTS.md): a mean gain
    alone mistakes that for progress."""
    from statsmodels.stats.weightstats import DescrStatsW

    if m.get("diverged"):
        return {"mean": -1.0, "lower": -1.0, "images": 0, "measures": {}}
    per, per_ref = m.get("_per_image") or {}, ref.get("_per_image") or {}
    out = {}
    for name in MEASURES:
        a, b = per.get(name, per.get("score")), per_ref.get(name, per_ref.get("score"))
        if a is None or b is None or len(a) != len(b):
            raise ValueError(f"paired gain needs the per-image {name} of both candidates on the same images")
        d = np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)
        mean = float(d.mean())
        if len(d) < 2 or float(d.std()) == 0.0:
            lower = mean                                    # no spread: the difference is exact
        else:
            lower = float(DescrStatsW(d).tconfint_mean(alpha=alpha, alternative="larger")[0])
        out[name] = {"mean": mean, "lower": lower}
    return {"mean": min(v["mean"] for v in out.values()), "lower": min(v["lower"] for v in out.values()),
            "images": len(d), "measures": out}


@dataclass
class Candidate:
    """One way to export: weights (``step``: 0 = the starting model) x whitening variant, with
    its measures (``score``: the neighbour agreement or the click MRR; ``view_map``)."""
    step: int
    whitening: str                  # "none", "start" (the starting model's own) or "shrinkage S"
    measures: dict
    details: dict = field(default_factory=dict)

    @property
    def score(self) -> float:
        return float(self.measures["score"])

    def label(self) -> str:
        return f"step {self.step}, whitening {self.whitening}"

    def text(self) -> str:
        vm = self.measures.get("view_map")
        return f"{self.label()}: {self.score:.4f}" + (f" / view mAP {vm:.4f}" if vm is not None else "")


def select(candidates: Sequence[Candidate], reference: Candidate, min_gain: float,
           confidence: float = 0.95) -> tuple[Candidate, str]:
    """The candidate whose gain over ``reference`` is surest: the largest lower end of the
    paired one-sided interval (:func:`paired_gain`) at ``confidence``, Bonferroni-corrected for
    the number of candidates compared (the best of many noisy candidates looks better than it
    is). It replaces the reference only when that lower end is above zero *and* its mean gain is
    more than ``min_gain``, on both measures; else the reference; with the reason, in words."""
    if not 0 < confidence < 1:
        raise ValueError(f"the confidence of the selection must be between 0 and 1, got {confidence}")
    others = [c for c in candidates if c is not reference]
    if not others:
        return reference, f"no candidate besides the starting model ({reference.text()}): keeping it"
    alpha = (1.0 - confidence) / len(others)
    gains = {id(c): paired_gain(c.measures, reference.measures, alpha) for c in others}
    for c in others:
        c.details["paired_gain"] = gains[id(c)]
    best = max(others, key=lambda c: (gains[id(c)]["lower"], gains[id(c)]["mean"]))
    g = gains[id(best)]
    sure = (f"mean gain {g['mean']:+.4f}, lower end {g['lower']:+.4f} of its one-sided {confidence:.0%} interval "
            f"over {g['images']} held-out items, corrected for {len(others)} candidates")
    if g["mean"] <= 0:
        return reference, (f"nothing beats the starting model ({reference.text()}) on the held-out validation "
                           f"signal (best: {best.text()}, {sure}): keeping it")
    if g["lower"] <= 0:
        return reference, (f"the best candidate ({best.text()}) is not surely better than the starting model "
                           f"({reference.text()}) on both measures ({sure}): within the signal's noise, "
                           f"keeping the starting model")
    if g["mean"] <= min_gain:
        return reference, (f"the best candidate ({best.text()}) does not beat the starting model "
                           f"({reference.text()}) by more than {min_gain} on both measures ({sure}): "
                           f"keeping the starting model")
    return best, (f"{best.text()} beats the starting model ({reference.text()}) on both held-out measures: "
                  f"{sure}")
