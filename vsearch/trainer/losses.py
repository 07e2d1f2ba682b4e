"""Contrastive losses with in-batch negatives.

* :func:`nt_xent` (SimCLR): 2N views, each view's positive is its twin, the other 2N-2 views
  are negatives.
* :func:`info_nce` (click pairs): N queries against N keys, key i is query i's positive, the
  other keys (and optional extra hard negatives) are negatives; symmetric by default.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float = 0.2) -> torch.Tensor:
    """Normalised-temperature cross entropy over the 2N views of N images."""
    if z1.shape != z2.shape or z1.dim() != 2:
        raise ValueError(f"nt_xent needs two [N, D] tensors of one shape, got {tuple(z1.shape)} "
                         f"and {tuple(z2.shape)}")
    n = z1.shape[0]
    z = F.normalize(torch.cat([z1, z2]).float(), dim=1)
    logits = z @ z.t() / temperature
    logits.fill_diagonal_(float("-inf"))            # a view is not its own negative
    targets = torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)]).to(z.device)
    return F.cross_entropy(logits, targets)


def info_nce(queries: torch.Tensor, keys: torch.Tensor, temperature: float = 0.07,
             hard_negatives: torch.Tensor | None = None, symmetric: bool = True) -> torch.Tensor:
    """InfoNCE: query i should pick key i among all keys (+ hard negatives [M, D])."""
    if queries.shape != keys.shape or queries.dim() != 2:
        raise ValueError(f"info_nce needs queries and keys of one shape [N, D], got "
                         f"{tuple(queries.shape)} and {tuple(keys.shape)}")
    q = F.normalize(queries.float(), dim=1)
    k = F.normalize(keys.float(), dim=1)
    candidates = k
    if hard_negatives is not None and len(hard_negatives):
        candidates = torch.cat([k, F.normalize(hard_negatives.float(), dim=1)])
    targets = torch.arange(q.shape[0], device=q.device)
    loss = F.cross_entropy(q @ candidates.t() / temperature, targets)
    if symmetric:
        loss = 0.5 * (loss + F.cross_entropy(k @ q.t() / temperature, targets))
    return loss
