"""Contrastive losses: in-batch negatives, temperature, hard negatives."""

from __future__ import annotations

import math

import pytest
import torch

from vsearch.trainer.losses import info_nce, nt_xent


def test_nt_xent_rewards_matching_views_and_punishes_confusion():
    torch.manual_seed(0)
    z = torch.randn(8, 16)
    aligned = nt_xent(z, z + 0.01 * torch.randn(8, 16), temperature=0.1)
    shuffled = nt_xent(z, z[torch.randperm(8)], temperature=0.1)
    assert aligned < 0.1 < shuffled
    # all views identical: the positive is no better than the 2N-2 negatives
    same = nt_xent(torch.ones(4, 3), torch.ones(4, 3))
    assert same.item() == pytest.approx(math.log(7), rel=1e-5)


def test_info_nce_hard_negatives_make_it_harder():
    torch.manual_seed(1)
    q = torch.randn(6, 8)
    k = q + 0.3 * torch.randn(6, 8)
    plain = info_nce(q, k, temperature=0.1)
    hard = info_nce(q, k, temperature=0.1, hard_negatives=q + 0.2 * torch.randn(6, 8))
    assert hard > plain
    assert info_nce(q, k, symmetric=False) > 0


def test_shapes_are_checked():
    with pytest.raises(ValueError, match="one shape"):
        nt_xent(torch.ones(3, 4), torch.ones(2, 4))
    with pytest.raises(ValueError, match="one shape"):
        info_nce(torch.ones(3), torch.ones(3))
