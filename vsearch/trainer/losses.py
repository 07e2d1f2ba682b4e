"""Contrastive losses with in-batch negatives, from every rank when training runs on several.

* :func:`nt_xent` (SimCLR): 2N views, each view's positive is its twin, the other 2N-2 views
  are negatives.
* :func:`info_nce` (click pairs): N queries against N keys, key i is query i's positive, the
  other keys (and optional extra hard negatives) are negatives; symmetric by default; optional
  per-pair weights (inverse propensities of the clicks).

Under DDP each rank passes its own rows; the columns (the negatives) are gathered from every
rank with gradients (:func:`vsearch.trainer.distributed.gather`), the loss is the mean over the
rank's own rows, and DDP's averaging of the gradients makes the step that of the global batch
(see :mod:`vsearch.trainer.distributed`). In one process the gather is the identity.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .distributed import gather, gather_varying


def nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float = 0.2) -> torch.Tensor:
    """Normalised-temperature cross entropy over the 2N views of N images."""
    if z1.shape != z2.shape or z1.dim() != 2:
        raise ValueError(f"nt_xent needs two [N, D] tensors of one shape, got {tuple(z1.shape)} "
                         f"and {tuple(z2.shape)}")
    n = z1.shape[0]
    a, b = F.normalize(z1.float(), dim=1), F.normalize(z2.float(), dim=1)
    all_a, start = gather(a)
    all_b, _ = gather(b)
    total = all_a.shape[0]
    rows = torch.cat([a, b])                                   # this rank's 2n views
    logits = rows @ torch.cat([all_a, all_b]).t() / temperature  # against all 2N
    own = torch.arange(start, start + n, device=a.device)
    self_col = torch.cat([own, own + total])
    logits[torch.arange(2 * n, device=a.device), self_col] = float("-inf")   # not its own negative
    targets = torch.cat([own + total, own])
    return F.cross_entropy(logits, targets)


def info_nce(queries: torch.Tensor, keys: torch.Tensor, temperature: float = 0.07,
             hard_negatives: torch.Tensor | None = None, symmetric: bool = True,
             weights: torch.Tensor | None = None) -> torch.Tensor:
    """InfoNCE: query i should pick key i among all keys (+ hard negatives [M, D]); with
    ``weights`` [N] the per-pair losses are weighted (mean of weight x loss)."""
    if queries.shape != keys.shape or queries.dim() != 2:
        raise ValueError(f"info_nce needs queries and keys of one shape [N, D], got "
                         f"{tuple(queries.shape)} and {tuple(keys.shape)}")
    if weights is not None and weights.shape != queries.shape[:1]:
        raise ValueError(f"info_nce weights must be [N] = [{queries.shape[0]}], got {tuple(weights.shape)}")
    q = F.normalize(queries.float(), dim=1)
    k = F.normalize(keys.float(), dim=1)
    all_q, start = gather(q)
    all_k, _ = gather(k)
    candidates = all_k
    if hard_negatives is not None:
        negs = gather_varying(F.normalize(hard_negatives.float(), dim=1))
        if len(negs):
            candidates = torch.cat([all_k, negs])
    targets = torch.arange(start, start + q.shape[0], device=q.device)
    loss = F.cross_entropy(q @ candidates.t() / temperature, targets, reduction="none")
    if symmetric:
        loss = 0.5 * (loss + F.cross_entropy(k @ all_q.t() / temperature, targets, reduction="none"))
    if weights is not None:
        loss = loss * weights.to(loss.dtype)
    return loss.mean()
