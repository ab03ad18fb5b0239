r"""The gradient noise scale B_simple (training/noise_scale.py).

The least-squares toy, whose gradient noise is known in closed form: x ~ N(0, I_d),
y = x . theta* + eps with eps ~ N(0, sigma^2), per-example loss 1/2 (x . theta - y)^2 at
theta = theta* + r. The per-example gradient is g = x (x . theta - y) = x (x . r - eps), so

    G = E[g] = E[x x^T] r = r,
    E[g g^T] = E[(x . r)^2 x x^T] - 2 E[eps (x . r) x x^T] + E[eps^2 x x^T]
             = (|r|^2 I + 2 r r^T) + 0 + sigma^2 I

(Isserlis: E[x_a x_b x_c x_d] = d_ab d_cd + d_ac d_bd + d_ad d_bc, contracted with r_c r_d;
eps is independent of x with mean 0). Hence Sigma = E[g g^T] - G G^T = (|r|^2 + sigma^2) I +
r r^T and tr(Sigma) = (d + 1) |r|^2 + d sigma^2, B_simple = tr(Sigma) / |r|^2.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import Tensor, nn

from batchscale.training import Objective, TrainingSet
from batchscale.training.config import LossConfig
from batchscale.training.noise_scale import (
    NoiseScale,
    NoiseScaleAccumulator,
    measure_noise_scale,
    probe_gradients,
    probe_indices,
    two_batch_estimate,
)

D, SIGMA = 8, 1.0


def _toy_truth(r: Tensor) -> tuple[float, float]:
    """(|G|^2, tr(Sigma)) of the toy in closed form."""
    rr = float(r.pow(2).sum())
    return rr, (D + 1) * rr + D * SIGMA**2


def _toy_r() -> Tensor:
    g = torch.Generator().manual_seed(0)
    r = torch.randn(D, generator=g, dtype=torch.float64)
    return r / r.norm()  # |r| = 1: |G|^2 = 1, tr(Sigma) = 17, B_simple = 17


# -- the estimator ------------------------------------------------------------------------
def test_two_batch_estimate_recovers_the_toy_noise_scale() -> None:
    """Simulated per-example gradients, batches of 256 split into 4 chunks of 64."""
    r = _toy_r()
    grad_sq, trace = _toy_truth(r)
    g = torch.Generator().manual_seed(1)
    n_batches, big, chunks = 2000, 256, 4
    small = big // chunks
    x = torch.randn(n_batches, big, D, generator=g, dtype=torch.float64)
    eps = SIGMA * torch.randn(n_batches, big, generator=g, dtype=torch.float64)
    per_example = x * ((x @ r) - eps).unsqueeze(-1)  # g = x (x . r - eps)
    g_chunks = per_example.reshape(n_batches, chunks, small, D).mean(dim=2)
    g_big = g_chunks.mean(dim=1)
    acc = NoiseScaleAccumulator()
    for b in range(n_batches):
        acc.add_norms(g_chunks[b].pow(2).sum(-1).tolist(), float(g_big[b].pow(2).sum()),
                      small, big)
    got = acc.result()
    assert got.probes == n_batches
    assert got.grad_sq == pytest.approx(grad_sq, rel=0.1)
    assert got.trace_sigma == pytest.approx(trace, rel=0.1)
    assert got.b_simple == pytest.approx(trace / grad_sq, rel=0.1)


def test_two_batch_estimate_formulas() -> None:
    # E|G_B|^2 = |G|^2 + tr(Sigma) / B, exactly: both parts come back.
    grad_sq, trace = 2.0, 30.0
    small = [grad_sq + trace / 4, grad_sq + trace / 4 + 1.0, grad_sq + trace / 4 - 1.0]
    got = two_batch_estimate(small, grad_sq + trace / 16, 4, 16)
    assert got == pytest.approx((grad_sq, trace), rel=1e-12)
    assert two_batch_estimate(grad_sq + trace / 4, grad_sq + trace / 16, 4, 16) == \
        pytest.approx((grad_sq, trace), rel=1e-12)
    assert two_batch_estimate(np.float64(grad_sq + trace / 4), torch.tensor(2.0 + 30 / 16),
                              4, 16) == pytest.approx((grad_sq, trace), rel=1e-12)
    with pytest.raises(ValueError, match="b_small < b_big"):
        two_batch_estimate([1.0], 1.0, 8, 8)
    with pytest.raises(ValueError, match="no small"):
        two_batch_estimate([], 1.0, 4, 8)


def test_accumulator_is_a_ratio_of_averages() -> None:
    acc = NoiseScaleAccumulator()
    acc.add(1.0, 10.0)
    acc.add(3.0, 50.0)
    got = acc.result()
    assert (got.grad_sq, got.trace_sigma, got.probes) == (2.0, 30.0, 2)
    assert got.b_simple == 15.0  # 30 / 2, not the mean of 10 and 50 / 3
    assert got.as_dict() == {"b_simple": 15.0, "trace_sigma": 30.0, "grad_sq": 2.0,
                             "probes": 2}
    ema = NoiseScaleAccumulator(decay=0.5)
    ema.add(1.0, 10.0)
    assert ema.result().grad_sq == pytest.approx(1.0)  # bias-corrected: not 0.5
    ema.add(3.0, 50.0)  # weights 0.25 and 0.5 of 0.75
    assert ema.result().grad_sq == pytest.approx((0.25 * 1 + 0.5 * 3) / 0.75)
    assert ema.result().trace_sigma == pytest.approx((0.25 * 10 + 0.5 * 50) / 0.75)
    noisy = NoiseScaleAccumulator()
    noisy.add(-0.1, 5.0)  # the |G|^2 estimate below zero: noise swamps the signal
    assert noisy.result().b_simple == math.inf
    with pytest.raises(ValueError):
        NoiseScaleAccumulator().result()
    with pytest.raises(ValueError):
        NoiseScaleAccumulator(decay=1.0)


# -- the toy through measure_noise_scale -------------------------------------------------
class LinearToy(nn.Module):
    """An encoder with SentenceEncoder's interface whose 'embedding' of example i (its text is
    str(i)) is the prediction x_i . theta, as a (1,)-vector."""

    def __init__(self, x: Tensor, theta: Tensor) -> None:
        super().__init__()
        self.register_buffer("x", x)
        self.theta = nn.Parameter(theta.clone())

    @property
    def device(self) -> torch.device:
        return self.theta.device

    def tokenize(self, texts) -> dict[str, Tensor]:
        return {"index": torch.tensor([int(t) for t in texts])}

    def forward(self, features: dict[str, Tensor]) -> Tensor:
        return (self.x[features["index"]] @ self.theta).unsqueeze(-1)


class SquaredError:
    """The toy's objective: mean over the batch of 1/2 (prediction - y)^2; y are the labels."""

    needs_labels = True

    def __init__(self) -> None:
        self._stats: dict[str, list[float]] = {}

    def __call__(self, embeddings, labels: Tensor) -> Tensor:
        return 0.5 * (embeddings[0][:, 0] - labels.double()).pow(2).mean()


def test_measure_noise_scale_recovers_the_toy_noise_scale() -> None:
    r = _toy_r()
    grad_sq, trace = _toy_truth(r)
    n = 100_000  # a finite population: its own G is r within ~1% (tr(Sigma) / n)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(n, D, generator=g, dtype=torch.float64)
    theta_star = torch.randn(D, generator=g, dtype=torch.float64)
    y = x @ theta_star + SIGMA * torch.randn(n, generator=g, dtype=torch.float64)
    texts = tuple(str(i) for i in range(n))
    data = TrainingSet((texts, texts), tuple(y.tolist()))
    toy = LinearToy(x, theta_star + r)
    got = measure_noise_scale(toy, SquaredError(), data, 256, batches=300, chunks=4, seed=3)
    assert got.probes == 300
    assert got.grad_sq == pytest.approx(grad_sq, rel=0.1)
    assert got.trace_sigma == pytest.approx(trace, rel=0.1)
    assert got.b_simple == pytest.approx(trace / grad_sq, rel=0.1)


# -- the chunk decomposition on a real encoder and objective --------------------------------
_WORD_TEXT = ("man woman dog cat child girl boy playing guitar piano soccer ball running street "
              "beach water riding horse car bike eating food cooking kitchen red blue green "
              "black white small large old young music dancing singing")
WORDS = _WORD_TEXT.split()


def _training_set(n: int, seed: int, *, columns: int = 2) -> TrainingSet:
    rng = np.random.default_rng(seed)

    def sentence() -> str:
        return " ".join(rng.choice(WORDS, size=int(rng.integers(2, 9))))

    cols = tuple(tuple(sentence() for _ in range(n)) for _ in range(columns))
    labels = tuple(float(v) for v in rng.uniform(0, 1, n)) if columns == 2 else None
    return TrainingSet(cols, labels)


def _static64(tiny_hf_dir):
    from batchscale.encoders import SentenceEncoder

    return SentenceEncoder.static(tiny_hf_dir).double()


def _plain_gradient(encoder, objective, data: TrainingSet, rows) -> list[Tensor]:
    """The trainer's plain path: every side encoded whole, the loss, ``backward``."""
    params = [p for p in encoder.parameters() if p.requires_grad]
    for p in params:
        p.grad = None
    sides, labels = data.batch(list(rows))
    loss = objective([encoder(encoder.tokenize(s)) for s in sides], labels)
    loss.backward()
    out = [p.grad.clone() for p in params]
    for p in params:
        p.grad = None
    return out


@pytest.mark.parametrize("columns", [2, 3])
def test_chunk_gradients_sum_to_the_batch_gradient(tiny_hf_dir, columns: int) -> None:
    encoder = _static64(tiny_hf_dir)
    encoder.train()
    data = _training_set(40, seed=4, columns=columns)
    objective = Objective(LossConfig(name="bsc", temperature=0.1), len(data))
    rows = probe_indices(len(data), 24, 1, seed=7)[0]
    sides, labels = data.batch(rows.tolist())
    probe = probe_gradients(encoder, objective, sides, labels, chunks=4)
    plain = _plain_gradient(encoder, objective, data, rows)
    assert (probe.b_small, probe.b_big) == (6, 24) and len(probe.small_sq_norms) == 4
    for got, want in zip(probe.big, plain, strict=True):
        assert got.dtype == torch.float64
        torch.testing.assert_close(got, want, rtol=0, atol=1e-10)
    assert probe.big_sq_norm == pytest.approx(sum(float(g.pow(2).sum()) for g in plain),
                                              rel=1e-10)
    # |G_small|^2 >= |G_big|^2: the mean of the G_c is G_big (Jensen)
    assert np.mean(probe.small_sq_norms) >= probe.big_sq_norm


class TableEncoder(nn.Module):
    """Example i (its text is str(i)) embeds as row i of a trainable float64 table."""

    def __init__(self, n: int, d: int, seed: int) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.table = nn.Parameter(torch.randn(n, d, generator=g, dtype=torch.float64))

    @property
    def device(self) -> torch.device:
        return self.table.device

    def tokenize(self, texts) -> dict[str, Tensor]:
        return {"index": torch.tensor([int(t) for t in texts])}

    def forward(self, features: dict[str, Tensor]) -> Tensor:
        return self.table[features["index"]]


def test_probe_masks_false_negatives_as_training_does() -> None:
    """With a batch's false-negative ids the chunk gradients sum to the gradient of the
    masked loss (objective(embeddings, labels, ids), taken whole), not the unmasked one."""
    from batchscale.batching.false_negatives import batch_ids, unit_ids

    encoder = TableEncoder(80, 8, seed=3)
    queries = tuple(str(i) for i in range(40))
    answers = tuple(str(40 + i) for i in range(40))
    data = TrainingSet((queries, answers), groups=tuple(f"g{i % 7}" for i in range(40)))
    units = torch.from_numpy(unit_ids(data.columns, data.groups, "group"))
    objective = Objective(LossConfig(name="bsc", temperature=0.1), len(data))
    rows = probe_indices(len(data), 24, 1, seed=7)[0].tolist()
    ids = batch_ids(units, rows)
    sides, labels = data.batch(rows)
    probe = probe_gradients(encoder, objective, sides, labels, chunks=4, ids=ids)
    embeddings = [encoder(encoder.tokenize(s)) for s in sides]
    (masked,) = torch.autograd.grad(objective(embeddings, labels, ids), [encoder.table])
    unmasked = _plain_gradient(encoder, objective, data, rows)[0]
    torch.testing.assert_close(probe.big[0], masked, rtol=0, atol=1e-10)
    assert float((masked - unmasked).abs().max()) > 1e-3
    # measure_noise_scale hands each probe batch's ids to the objective
    got = measure_noise_scale(encoder, objective, data, 24, batches=1, chunks=4, seed=7,
                              false_negatives=lambda r: batch_ids(units, r))
    assert got.grad_sq == pytest.approx(
        (4 * probe.big_sq_norm - float(np.mean(probe.small_sq_norms))) / 3, rel=1e-9)


def test_chunk_gradients_replay_the_dropout_masks(tiny_st_dir) -> None:
    """A transformer with dropout in training mode: the replayed chunks draw the masks of the
    first pass, so the chunk gradients sum to the gradient of the embeddings the loss saw
    (the same chunk-by-chunk forward, with a graph, from the same random state)."""
    from batchscale.encoders import SentenceEncoder

    encoder = SentenceEncoder.load(tiny_st_dir, device="cpu", dtype=torch.float64)
    encoder.train()
    data = _training_set(16, seed=5)
    objective = Objective(LossConfig(name="infonce", temperature=0.1), len(data))
    sides, labels = data.batch(list(range(12)))
    params = [p for p in encoder.parameters() if p.requires_grad]
    torch.manual_seed(11)
    probe = probe_gradients(encoder, objective, sides, labels, chunks=3)
    torch.manual_seed(11)  # the probe's first pass, as the gradient cache's: side by side
    feats = [encoder.tokenize(s) for s in sides]
    embs = [[], []]
    for side in range(2):
        for c in range(3):
            chunk = {k: v[4 * c:4 * c + 4] for k, v in feats[side].items()}
            # without the padding columns no row of the chunk uses (right padding), as the
            # chunks are encoded: the dropout masks are drawn for that width
            width = int(chunk["attention_mask"].sum(dim=1).max())
            embs[side].append(encoder({k: v[:, :width] for k, v in chunk.items()}))
    loss = objective([torch.cat(e) for e in embs], labels)
    want = torch.autograd.grad(loss, params, allow_unused=True)
    for got, w in zip(probe.big, want, strict=True):
        torch.testing.assert_close(got, torch.zeros_like(got) if w is None else w,
                                   rtol=0, atol=1e-10)
    assert any(float(g.abs().max()) > 0 for g in probe.big)


def test_measure_noise_scale_is_the_mean_over_its_probes(tiny_hf_dir) -> None:
    encoder = _static64(tiny_hf_dir)
    data = _training_set(60, seed=6)
    objective = Objective(LossConfig(name="bsc", temperature=0.1), len(data))
    got = measure_noise_scale(encoder, objective, data, 16, batches=3, chunks=4, seed=8)
    acc = NoiseScaleAccumulator()
    encoder.train()
    for rows in probe_indices(len(data), 16, 3, seed=8):
        sides, labels = data.batch(rows.tolist())
        p = probe_gradients(encoder, objective, sides, labels, chunks=4)
        acc.add_norms(p.small_sq_norms, p.big_sq_norm, 4, 16)
    want = acc.result()
    assert isinstance(got, NoiseScale) and got.probes == 3
    assert got.as_dict() == pytest.approx(want.as_dict(), rel=1e-12)
    assert set(got.as_dict()) == {"b_simple", "trace_sigma", "grad_sq", "probes"}
    assert got.trace_sigma > 0 and math.isfinite(got.b_simple)
    again = measure_noise_scale(encoder, objective, data, 16, batches=3, chunks=4, seed=8)
    assert again == got  # the same probe batches from the same seed


def test_measure_noise_scale_leaves_training_untouched(tiny_st_dir) -> None:
    from batchscale.encoders import SentenceEncoder

    encoder = SentenceEncoder.load(tiny_st_dir, device="cpu")  # dropout 0.1
    encoder.eval()
    data = _training_set(32, seed=7)
    objective = Objective(LossConfig(name="weince", temperature=0.1,
                                     learnable_temperature=True), len(data))
    objective.pop_diagnostics()
    objective._record(temperature=0.25)  # a diagnostic the trainer recorded before
    stats = {k: list(v) for k, v in objective._stats.items()}
    params = [p for p in encoder.parameters() if p.requires_grad]
    for i, p in enumerate(params):  # half the parameters hold a gradient, half none
        p.grad = torch.randn_like(p) if i % 2 else None
    grads = [None if p.grad is None else p.grad.clone() for p in params]
    grad_ids = [id(p.grad) for p in params]
    weights = [p.detach().clone() for p in encoder.parameters()]
    torch.manual_seed(123)
    rng = torch.get_rng_state()
    got = measure_noise_scale(encoder, objective, data, 8, batches=2, chunks=2, seed=0)
    assert got.probes == 2 and math.isfinite(got.trace_sigma)
    assert torch.equal(torch.get_rng_state(), rng)
    assert encoder.training is False
    for p, want, ident in zip(params, grads, grad_ids, strict=True):
        assert id(p.grad) == ident
        assert (p.grad is None) == (want is None)
        if want is not None:
            assert torch.equal(p.grad, want)
    for p, w in zip(encoder.parameters(), weights, strict=True):
        assert torch.equal(p.detach(), w)
    assert objective.temperature_module is not None
    assert all(p.grad is None for p in objective.parameters())
    assert objective._stats == stats  # WEINCE's lambdas of the probes were discarded
    assert objective.pop_diagnostics() == {"temperature": 0.25}
    encoder.train()
    measure_noise_scale(encoder, objective, data, 8, batches=1, chunks=2, seed=0)
    assert encoder.training is True


def test_measure_noise_scale_refuses_what_it_cannot_measure(tiny_hf_dir) -> None:
    encoder = _static64(tiny_hf_dir)
    data = _training_set(20, seed=8)
    objective = Objective(LossConfig(name="bsc"), len(data))
    with pytest.raises(ValueError, match="equal chunks"):
        measure_noise_scale(encoder, objective, data, 10, batches=1, chunks=4, seed=0)
    with pytest.raises(ValueError, match="equal chunks"):
        measure_noise_scale(encoder, objective, data, 10, batches=1, chunks=1, seed=0)
    with pytest.raises(ValueError, match="training set has 20"):
        measure_noise_scale(encoder, objective, data, 24, batches=1, chunks=4, seed=0)
    with pytest.raises(ValueError, match="batches"):
        measure_noise_scale(encoder, objective, data, 8, batches=0, chunks=4, seed=0)
    for p in encoder.parameters():
        p.requires_grad_(False)
    with pytest.raises(ValueError, match="requires grad"):
        measure_noise_scale(encoder, objective, data, 8, batches=1, chunks=4, seed=0)
