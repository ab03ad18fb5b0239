"""BSC+MSE, cosine MSE, CoSENT, triplet and VRNS against formulas written here."""

import math

import numpy as np
import pytest
import torch

from batchscale.losses import (
    bsc_loss,
    bsc_mse_loss,
    cosent_loss,
    cosine_mse_loss,
    triplet_loss,
    vrns_penalty,
)
from loss_reference import cos, pair_loss_reference


def _data(m: int = 7, d: int = 5, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(m, d, generator=g, dtype=torch.float64)
    a = q + torch.randn(m, d, generator=g, dtype=torch.float64)
    n = torch.randn(m, d, generator=g, dtype=torch.float64)
    y = torch.rand(m, generator=g, dtype=torch.float64)
    return q, a, n, y


def test_cosine_mse() -> None:
    q, a, _, y = _data()
    ref = np.mean([(cos(q[i].numpy(), a[i].numpy()) - y[i].item()) ** 2 for i in range(7)])
    assert cosine_mse_loss(q, a, y).item() == pytest.approx(ref, rel=1e-12)


def test_cosent() -> None:
    q, a, _, y = _data(seed=1)
    c = [20 * cos(q[i].numpy(), a[i].numpy()) for i in range(7)]
    ref = math.log(1 + sum(math.exp(c[j] - c[i]) for i in range(7) for j in range(7)
                           if y[i] > y[j]))
    assert cosent_loss(q, a, y).item() == pytest.approx(ref, rel=1e-12)


@pytest.mark.parametrize("distance", ["euclidean", "cosine"])
def test_triplet(distance: str) -> None:
    x, p, n, _ = _data(seed=2)
    x, p, n = (t.numpy() for t in (x, p, n))
    if distance == "euclidean":
        def dist(u, v):
            return float(np.linalg.norm(u - v))
        margin = 1.0
    else:
        def dist(u, v):
            return 1 - cos(u, v)
        margin = 0.3
    ref = np.mean([max(0.0, dist(x[i], p[i]) - dist(x[i], n[i]) + margin) for i in range(7)])
    got = triplet_loss(*(torch.from_numpy(t) for t in (x, p, n)), margin=margin,
                       distance=distance)
    assert ref > 0
    assert got.item() == pytest.approx(ref, rel=1e-12)


def test_vrns() -> None:
    q, a, _, _ = _data(seed=3)
    n_train = 1000
    ref = sum((cos(q[i].numpy(), a[j].numpy()) + 1 / (n_train - 1)) ** 2
              for i in range(7) for j in range(7) if i != j) / (7 * 6)
    assert vrns_penalty(q, a, n_train).item() == pytest.approx(ref, rel=1e-12)


def test_bsc_mse_is_eq6() -> None:
    q, a, _, y = _data(seed=4)
    mu = 0.1
    labels = [int(v > 0.6) for v in y.tolist()]
    bsc = pair_loss_reference(q.numpy(), a.numpy(), 0.05, labels=labels)
    mse = np.mean([(cos(q[i].numpy(), a[i].numpy()) - y[i].item()) ** 2 for i in range(7)])
    got = bsc_mse_loss(q, a, y, 0.05, mu=mu)
    assert got.item() == pytest.approx(mu * bsc + (1 - mu) * mse, rel=1e-12)
    assert bsc_mse_loss(q, a, y, 0.05, mu=1.0).item() == pytest.approx(
        bsc_loss(q, a, 0.05, labels=y, label_threshold=0.6).item(), rel=1e-14)


def test_gradcheck_pointwise_family() -> None:
    q, a, n, y = _data(m=5, d=3, seed=5)
    for fn in (
        lambda q, a, n: cosine_mse_loss(q, a, y),
        lambda q, a, n: cosent_loss(q, a, y),
        lambda q, a, n: triplet_loss(q, a, n, margin=2.0),
        lambda q, a, n: triplet_loss(q, a, n, margin=0.5, distance="cosine"),
        lambda q, a, n: vrns_penalty(q, a, 50),
        lambda q, a, n: bsc_mse_loss(q, a, y, 0.1, mu=0.5),
    ):
        inputs = tuple(t.clone().requires_grad_(True) for t in (q, a, n))
        assert torch.autograd.gradcheck(fn, inputs)


def test_vrns_in_float32_at_a_large_batch_equals_the_float64_brute_force() -> None:
    """The closed form (Gram matrices, no m x m similarities) in float32 at m = 2,048 against
    every off-diagonal cosine in float64; embeddings clustered so that the negatives' cosines
    are large and the penalty small."""
    g = torch.Generator().manual_seed(6)
    centre = torch.randn(1, 64, generator=g, dtype=torch.float64)
    q = centre + 0.5 * torch.randn(2048, 64, generator=g, dtype=torch.float64)
    a = q + 0.3 * torch.randn(2048, 64, generator=g, dtype=torch.float64)
    qn, an = q / q.norm(dim=1, keepdim=True), a / a.norm(dim=1, keepdim=True)
    gap = qn @ an.T + 1 / (10_000 - 1)
    gap.fill_diagonal_(0.0)
    ref = (gap * gap).sum().item() / (2048 * 2047)
    got = vrns_penalty(q.float(), a.float(), 10_000)
    assert got.dtype == torch.float32
    assert got.item() == pytest.approx(ref, rel=1e-6)
