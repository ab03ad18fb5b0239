"""Bad input raises ValueError naming the argument and the value."""

import pytest
import torch

from batchscale.losses import (
    LearnableTemperature,
    WeinceConfig,
    bsc_loss,
    bsc_mse_loss,
    cosent_loss,
    cosine_mse_loss,
    infonce_loss,
    nt_xent,
    triplet_loss,
    vrns_penalty,
    weince_loss,
)

Q = torch.randn(4, 3)
A = torch.randn(4, 3)
Y = torch.rand(4)


def _with(x: torch.Tensor, value: float) -> torch.Tensor:
    x = x.clone()
    x[1, 2] = value
    return x


PAIR_LOSSES = [bsc_loss, infonce_loss, weince_loss, nt_xent]


@pytest.mark.parametrize("fn", PAIR_LOSSES, ids=lambda f: f.__name__)
@pytest.mark.parametrize(
    ("args", "kwargs", "pattern"),
    [
        ((Q, torch.randn(5, 3), 0.1), {}, r"same shape.*\(4, 3\) and \(5, 3\)"),
        ((Q, A.double(), 0.1), {}, r"same dtype.*float32 and torch.float64"),
        ((Q[:1], A[:1], 0.1), {}, r"batch of at least 2, got batch 1"),
        ((_with(Q, float("nan")), A, 0.1), {}, r"NaN or Inf.*rows \[1\]"),
        ((Q, _with(A, float("inf")), 0.1), {}, r"`.*` holds NaN or Inf"),
        ((Q, A, 0.0), {}, r"`temperature` must be finite and > 0, got 0.0"),
        ((Q, A, -1.0), {}, r"`temperature` must be finite and > 0, got -1.0"),
        ((Q, A, torch.tensor(-0.5)), {}, r"`temperature`.*got -0.5"),
        ((Q, A, float("nan")), {}, r"`temperature`.*got nan"),
        ((Q.int(), A.int(), 0.1), {}, r"must be floating point, got dtype torch.int32"),
        ((Q[0], A[0], 0.1), {}, r"must be 2-D \(batch, dim\), got shape \(3,\)"),
    ],
)
def test_pair_losses_reject_bad_input(fn, args, kwargs, pattern) -> None:
    with pytest.raises(ValueError, match=pattern):
        fn(*args, **kwargs)


@pytest.mark.parametrize("fn", [bsc_loss, infonce_loss, weince_loss], ids=lambda f: f.__name__)
def test_label_errors(fn) -> None:
    with pytest.raises(ValueError, match=r"`labels` must have shape \(4,\), got \(3,\)"):
        fn(Q, A, 0.1, labels=torch.tensor([1, 0, 1]))
    with pytest.raises(ValueError, match=r"`labels` must be 0/1.*\[0\.5"):
        fn(Q, A, 0.1, labels=torch.tensor([1, 0.5, 1, 1]))
    with pytest.raises(ValueError, match=r"scaled to \[0, 1\], got values \[4\.0\]"):
        fn(Q, A, 0.1, labels=torch.tensor([1, 4.0, 1, 1]), label_threshold=0.6)
    with pytest.raises(ValueError, match=r"`label_threshold` must be in \[0, 1\], got 3"):
        fn(Q, A, 0.1, labels=torch.tensor([1, 0, 1, 1]), label_threshold=3)


def test_other_argument_errors() -> None:
    with pytest.raises(ValueError, match=r"`directions` must be one of .*got 'rows'"):
        bsc_loss(Q, A, 0.1, directions="rows")
    with pytest.raises(ValueError, match=r"`normalization` must be one of .*got 'l1'"):
        bsc_loss(Q, A, 0.1, normalization="l1")
    with pytest.raises(ValueError, match=r"`hard_negatives` must have the same embedding dim"):
        bsc_loss(Q, A, 0.1, hard_negatives=torch.randn(2, 5))
    with pytest.raises(ValueError, match=r"`answer_ids` must have shape \(6,\)"):
        bsc_loss(Q, A, 0.1, hard_negatives=torch.randn(2, 3), answer_ids=torch.arange(4))
    with pytest.raises(ValueError, match=r"`query_ids` must hold integer ids"):
        bsc_loss(Q, A, 0.1, query_ids=torch.rand(4))
    with pytest.raises(ValueError, match=r"`method` must be one of .*got 'simclr'"):
        nt_xent(Q, A, 0.1, method="simclr")
    with pytest.raises(ValueError, match=r"`mu` must be in \[0, 1\], got 1.5"):
        bsc_mse_loss(Q, A, Y, 0.1, mu=1.5)
    with pytest.raises(ValueError, match=r"`mu` must be in \[0, 1\], got -0.1"):
        bsc_mse_loss(Q, A, Y, 0.1, mu=-0.1)
    with pytest.raises(ValueError, match=r"`scores` must have shape \(4,\), got \(2,\)"):
        cosine_mse_loss(Q, A, Y[:2])
    with pytest.raises(ValueError, match=r"`scores` must be scaled to \[0, 1\]"):
        cosine_mse_loss(Q, A, Y * 5 + 1)
    with pytest.raises(ValueError, match=r"`scale` must be > 0, got 0"):
        cosent_loss(Q, A, Y, scale=0)
    with pytest.raises(ValueError, match=r"`margin` must be >= 0, got -1"):
        triplet_loss(Q, A, A, margin=-1)
    with pytest.raises(ValueError, match=r"`n` \(training-set size\) must be an integer >= 2, "
                                         r"got 1"):
        vrns_penalty(Q, A, 1)
    with pytest.raises(ValueError, match=r"`initial` must be finite and > 0, got -0.1"):
        LearnableTemperature(initial=-0.1)


@pytest.mark.parametrize("q", [-0.1, 1.2, float("nan")])
def test_weince_quantile_outside_unit_interval(q: float) -> None:
    with pytest.raises(ValueError, match=r"`quantile` must be in \[0, 1\], got"):
        weince_loss(Q, A, 0.1, quantile=q)
    with pytest.raises(ValueError, match=r"`quantile` must be in \[0, 1\]"):
        nt_xent(Q, A, 0.1, method="weince", quantile=q)
    with pytest.raises(ValueError, match=r"`quantile` must be in \[0, 1\]"):
        WeinceConfig(quantile=q)


def test_weince_unknown_option_and_bad_constants() -> None:
    with pytest.raises(ValueError, match=r"unknown WEINCE option\(s\) \['kapa_rho'\]"):
        weince_loss(Q, A, 0.1, kapa_rho=3.0)
    with pytest.raises(ValueError, match=r"`factors` must be one of .*got 'tail'"):
        weince_loss(Q, A, 0.1, factors="tail")
    with pytest.raises(ValueError, match=r"`kappa_rho` must be > 0, got 0"):
        WeinceConfig(kappa_rho=0)
    with pytest.raises(ValueError, match=r"WEINCE options given with method='infonce'"):
        nt_xent(Q, A, 0.1, margin=3.0)
