"""The click-pair loss on a batch split over ranks: ``torchrun --nproc-per-node 2 ddp_losses.py
OUT`` writes each rank's gradients of its slice of the inputs to OUT.RANK; :func:`gradients`
in one process gives those of the whole batch. Weighted InfoNCE with hard negatives of uneven
counts per rank, plus NT-Xent."""

from __future__ import annotations

import os
import sys

import torch

from vsearch.trainer import distributed
from vsearch.trainer.losses import info_nce, nt_xent


def gradients(ranks: distributed.Ranks) -> list[torch.Tensor]:
    n, d = 8, 5
    gen = torch.Generator().manual_seed(0)
    q, k, negs = (torch.randn(n, d, generator=gen) for _ in range(3))
    w = torch.rand(n, generator=gen) + 0.5
    has_neg = torch.tensor([1, 1, 1, 0, 0, 0, 0, 1], dtype=torch.bool)      # 3 on rank 0, 1 on rank 1
    part = slice(ranks.rank * n // ranks.world, (ranks.rank + 1) * n // ranks.world)
    inputs = [t[part].clone().requires_grad_() for t in (q, k, negs)]
    loss = (info_nce(inputs[0], inputs[1], 0.1, hard_negatives=inputs[2][has_neg[part]], weights=w[part])
            + nt_xent(inputs[0], inputs[1], 0.2))
    loss.backward()
    return [t.grad for t in inputs]


if __name__ == "__main__":
    ranks, _ = distributed.init("cpu")
    torch.save(gradients(ranks), f"{sys.argv[1]}.{os.environ['RANK']}")
    distributed.shutdown()
