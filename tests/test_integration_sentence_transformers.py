"""batchscale losses as sentence-transformers loss modules
(``batchscale.integrations.sentence_transformers``), on a tiny BERT built here.

References: sentence-transformers' own losses (MultipleNegativesSymmetricRankingLoss = BSC,
MultipleNegativesRankingLoss = InfoNCE, CosineSimilarityLoss = the MSE part of BSC + MSE),
formulas written out in the test (label masking, VRNS), and for the gradient cache the plain
full-graph computation. Training: ``SentenceTransformerTrainer`` itself when its extras
(accelerate, datasets) are installed, and always the loop the Trainer runs (its collator and
feature split, ``loss(features, labels).backward()``, an optimiser step).
"""

from __future__ import annotations

import json
import math
import os
import sys
import warnings
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torch import Tensor, nn

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

st = pytest.importorskip("sentence_transformers")

from sentence_transformers import SentenceTransformer  # noqa: E402
from sentence_transformers.sentence_transformer.data_collator import (  # noqa: E402
    SentenceTransformerDataCollator,
)
from sentence_transformers.sentence_transformer.losses import (  # noqa: E402
    CosineSimilarityLoss,
    MultipleNegativesRankingLoss,
    MultipleNegativesSymmetricRankingLoss,
)
from sentence_transformers.sentence_transformer.modules import Pooling, Transformer  # noqa: E402

from batchscale.integrations.sentence_transformers import (  # noqa: E402
    BatchscaleLoss,
    BSCLoss,
    InfoNCELoss,
    VRNSLoss,
    WEINCELoss,
)
from batchscale.losses import LearnableTemperature, WeinceConfig  # noqa: E402
from ranks import run_ranks  # noqa: E402

Features = list[dict[str, object]]
WORDS = [f"w{i}" for i in range(60)]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The models here are tiny: intra-op threads only add synchronisation (measured 10x
    slower with 2 threads on a loaded 2-core machine). Restored for the other modules."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random 2-layer BERT (hidden 32) with a word-piece vocabulary of the toy words."""
    from transformers import BertConfig, BertModel, BertTokenizerFast

    path = tmp_path_factory.mktemp("tiny-bert")
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]
    (path / "vocab.txt").write_text("\n".join(vocab) + "\n", encoding="utf-8")
    BertTokenizerFast(vocab_file=str(path / "vocab.txt"), do_lower_case=True,
                      model_max_length=32).save_pretrained(str(path))
    config = BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2,
                        num_attention_heads=2, intermediate_size=64, max_position_embeddings=32)
    torch.manual_seed(0)
    BertModel(config, add_pooling_layer=False).save_pretrained(str(path))
    return path


def make_model(bert_dir: Path, dtype: torch.dtype = torch.float64, *,
               train: bool = False) -> SentenceTransformer:
    """Transformer + mean Pooling; eval mode (dropout off) unless ``train``."""
    transformer = Transformer(str(bert_dir), max_seq_length=32)
    model = SentenceTransformer(
        modules=[transformer, Pooling(transformer.get_embedding_dimension(), "mean")],
        device="cpu",
    )
    return model.to(dtype).train(train)


def toy_rows(n: int = 32, *, negatives: bool = False,
             scores: list[float] | None = None) -> list[dict[str, object]]:
    """Pairs of overlapping word windows of different lengths (so batches have padding); the
    negative of pair i is a window far away; an optional ``score`` column."""
    rows: list[dict[str, object]] = []
    for i in range(n):
        width = 2 + i % 4
        row: dict[str, object] = {
            "anchor": " ".join(WORDS[(i + k) % 60] for k in range(width)),
            "positive": " ".join(WORDS[(i + k) % 60] for k in range(width - 1, -1, -1)),
        }
        if negatives:
            row["negative"] = " ".join(WORDS[(i + 30 + k) % 60] for k in range(3))
        if scores is not None:
            row["score"] = scores[i]
        rows.append(row)
    return rows


def collate(model: SentenceTransformer, rows: list[dict[str, object]]
            ) -> tuple[Features, Tensor | None]:
    """What SentenceTransformerTrainer hands its loss: its collator's batch, split into one
    feature dict per text column by its ``collect_features`` (which does not use ``self``)."""
    from sentence_transformers import SentenceTransformerTrainer

    batch = SentenceTransformerDataCollator(preprocess_fn=model.preprocess)(rows)
    return SentenceTransformerTrainer.collect_features(None, batch)  # type: ignore[arg-type]


def value(t: Tensor) -> float:
    return float(t.detach())


def fresh(features: Features) -> Features:
    # sentence-transformers modules write their outputs into the feature dicts.
    return [dict(f) for f in features]


def mnsrl(model: SentenceTransformer, scale: float = 20.0) -> nn.Module:
    with warnings.catch_warnings():  # deprecated in favour of MNRL(directions=...): same maths
        warnings.simplefilter("ignore")
        return MultipleNegativesSymmetricRankingLoss(model, scale=scale)


def loss_and_grads(model: nn.Module, loss_fn: Callable[[], Tensor], scale: float = 1.0
                   ) -> tuple[float, dict[str, Tensor]]:
    """The loss and the parameter gradients of ``scale * loss`` (the Trainer scales the loss
    for gradient accumulation before its backward)."""
    model.zero_grad(set_to_none=True)
    loss = loss_fn()
    (scale * loss).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return float(loss.detach()), grads


def assert_grads_close(got: dict[str, Tensor], want: dict[str, Tensor], rtol: float) -> None:
    assert got.keys() == want.keys()
    assert len(want) > 10  # the whole encoder is reached, not just the embeddings
    for name, w in want.items():
        err = float((got[name] - w).abs().max())
        assert err <= rtol * max(float(w.abs().max()), 1.0), (name, err)


# --- the same numbers as sentence-transformers' losses --------------------------------------


@pytest.mark.parametrize("tile_size", [None, 4], ids=["dense", "tiled"])
@pytest.mark.parametrize("negatives", [False, True], ids=["pairs", "triplets"])
@pytest.mark.parametrize(("dtype", "tol"), [(torch.float32, 1e-6), (torch.float64, 1e-12)],
                         ids=["float32", "float64"])
def test_bsc_equals_multiple_negatives_symmetric_ranking(
    bert_dir: Path, negatives: bool, tile_size: int | None, dtype: torch.dtype, tol: float
) -> None:
    """Dropout off: BSC at tau = 0.05 is MNSRL at scale 20, dense and tiled; a negative column
    is extra candidates of the anchor rows. The loss to 1e-6 in float32 (measured: <= 4.8e-7);
    the gradients in float64 (in float32 they differ by up to 1.6e-5, the rounding of sums
    over all tokens, which sentence-transformers orders differently: it encodes the candidate
    columns together)."""
    model = make_model(bert_dir, dtype)
    features, labels = collate(model, toy_rows(16, negatives=negatives))
    ref = mnsrl(model, scale=20.0)
    want, want_grads = loss_and_grads(model, lambda: ref(fresh(features), labels))
    ours = BSCLoss(model, temperature=0.05, tile_size=tile_size)
    got, got_grads = loss_and_grads(model, lambda: ours(fresh(features), labels))
    assert abs(got - want) <= tol, (got, want)
    if dtype == torch.float64:
        assert_grads_close(got_grads, want_grads, 1e-10)


@pytest.mark.parametrize("negatives", [False, True], ids=["pairs", "triplets"])
def test_infonce_equals_multiple_negatives_ranking(bert_dir: Path, negatives: bool) -> None:
    model = make_model(bert_dir, torch.float32)
    features, labels = collate(model, toy_rows(16, negatives=negatives))
    want = MultipleNegativesRankingLoss(model, scale=25.0)(fresh(features), labels)
    got = InfoNCELoss(model, temperature=1 / 25)(fresh(features), labels)
    assert abs(value(got) - value(want)) <= 1e-6


def test_bsc_mse_equals_mnsrl_plus_cosine_similarity_loss(bert_dir: Path) -> None:
    """Every score above the threshold: no pair is masked, so BSC + MSE (eq. 6) is
    mu * MNSRL + (1 - mu) * CosineSimilarityLoss (the MSE of the pair cosines)."""
    model = make_model(bert_dir)
    scores = [0.65 + 0.01 * i for i in range(16)]
    features, labels = collate(model, toy_rows(16, scores=scores))
    assert labels is not None and labels.shape == (16,)
    want = (0.1 * mnsrl(model)(fresh(features), labels)
            + 0.9 * CosineSimilarityLoss(model)(fresh(features), labels))
    got = BSCLoss(model, mu=0.1)(fresh(features), labels)
    assert abs(value(got) - value(want)) <= 1e-10


def test_bsc_label_masking_against_formula(bert_dir: Path) -> None:
    """Pairs scoring <= the threshold are no anchor in either direction, still a candidate, and
    the mean divides by m (BSC eq. 5), written out here on the model's embeddings."""
    model = make_model(bert_dir)
    scores = [0.9 if i % 3 else 0.2 for i in range(12)]
    features, labels = collate(model, toy_rows(12, scores=scores))
    got = BSCLoss(model, temperature=0.05, label_threshold=0.5)(fresh(features), labels)

    q, a = (model(f)["sentence_embedding"] for f in fresh(features))
    s = nn.functional.normalize(q, dim=1) @ nn.functional.normalize(a, dim=1).T / 0.05
    anchors = [i for i in range(12) if scores[i] > 0.5]
    l0 = -sum(torch.log_softmax(s[i], 0)[i] for i in anchors) / 12
    l1 = -sum(torch.log_softmax(s[:, i], 0)[i] for i in anchors) / 12
    assert abs(value(got) - value((l0 + l1) / 2)) <= 1e-10


def test_vrns_adds_the_penalty_on_the_same_embeddings(bert_dir: Path) -> None:
    """VRNS(BSC) = MNSRL + 30 * mean_{i != j} (cos(q_i, a_j) + 1/(n - 1))^2, with each column
    embedded once."""
    model = make_model(bert_dir)
    features, labels = collate(model, toy_rows(10))
    calls = []
    handle = model.register_forward_hook(lambda *_: calls.append(1))
    got = VRNSLoss(BSCLoss(model), n=1000, weight=30.0)(fresh(features), labels)
    handle.remove()
    assert len(calls) == 2

    q, a = (model(f)["sentence_embedding"] for f in fresh(features))
    cos = nn.functional.normalize(q, dim=1) @ nn.functional.normalize(a, dim=1).T
    off = ~torch.eye(10, dtype=torch.bool)
    penalty = ((cos[off] + 1 / 999) ** 2).mean()
    want = mnsrl(model)(fresh(features), labels) + 30.0 * penalty
    assert abs(value(got) - value(want)) <= 1e-10


# --- the gradient cache ----------------------------------------------------------------------


CACHED_CASES: dict[str, tuple[Callable[..., BatchscaleLoss], dict[str, object]]] = {
    "bsc-triplets": (lambda m, **kw: BSCLoss(m, **kw), {"negatives": True}),
    "bsc-mse": (lambda m, **kw: BSCLoss(m, mu=0.1, **kw),
                {"scores": [0.3 + 0.04 * i for i in range(16)]}),
    "infonce-tiled": (lambda m, **kw: InfoNCELoss(m, tile_size=5, **kw), {}),
    "weince": (lambda m, **kw: WEINCELoss(m, **kw), {}),
    "vrns-weince": (lambda m, **kw: VRNSLoss(WEINCELoss(m, **kw), n=64), {"negatives": True}),
}


@pytest.mark.parametrize("case", list(CACHED_CASES))
def test_cached_gradients_equal_plain(bert_dir: Path, case: str) -> None:
    """float64, dropout off, 16 pairs in mini-batches of 3 (the last one short): the cached
    module's loss and parameter gradients are the plain module's, through a scaled backward
    (the Trainer's gradient-accumulation division reaches the replay)."""
    build, data = CACHED_CASES[case]
    model = make_model(bert_dir)
    features, labels = collate(model, toy_rows(16, **data))  # type: ignore[arg-type]
    plain, cached = build(model), build(model, mini_batch_size=3)
    want, want_grads = loss_and_grads(model, lambda: plain(fresh(features), labels), 0.25)
    got, got_grads = loss_and_grads(model, lambda: cached(fresh(features), labels), 0.25)
    assert abs(got - want) <= 1e-12 * max(1.0, abs(want))
    assert_grads_close(got_grads, want_grads, 1e-10)


def test_learnable_temperature_trains_through_both_paths(bert_dir: Path) -> None:
    """A LearnableTemperature is a parameter of the loss module (the Trainer's optimiser takes
    it); at tau = 0.05 the loss is MNSRL's, and its gradient is the same cached or not."""
    model = make_model(bert_dir)
    features, labels = collate(model, toy_rows(12))
    temperature = LearnableTemperature(0.05).double()
    plain, cached = BSCLoss(model, temperature), BSCLoss(model, temperature, mini_batch_size=5)
    assert [p for p in plain.parameters() if p.ndim == 0] == [temperature.inverse_temperature]
    want = mnsrl(model)(fresh(features), labels)
    results = []
    for loss_fn in (plain, cached):
        temperature.zero_grad()
        got, grads = loss_and_grads(model, lambda loss_fn=loss_fn: loss_fn(fresh(features),
                                                                          labels))
        assert abs(got - value(want)) <= 1e-10
        assert temperature.inverse_temperature.grad is not None
        results.append((float(temperature.inverse_temperature.grad), grads))
    assert results[0][0] != 0.0
    assert abs(results[1][0] - results[0][0]) <= 1e-10 * abs(results[0][0])
    assert_grads_close(results[1][1], results[0][1], 1e-10)


def _rows_of(features: dict[str, object], begin: int, end: int) -> dict[str, object]:
    """Rows begin:end without the trailing padding columns none of them uses (what a cached
    loss encodes: sentence-transformers' CachedMultipleNegativesRankingLoss cuts them too)."""
    mask = features["attention_mask"]
    assert isinstance(mask, Tensor)
    width = int(mask[begin:end].any(dim=0).nonzero().max()) + 1
    return {k: v[begin:end, :width] if isinstance(v, Tensor) and v.ndim == 2
            else v[begin:end] if isinstance(v, Tensor) else v
            for k, v in features.items()}


def test_cached_replays_dropout(bert_dir: Path) -> None:
    """Dropout on: the cached gradients are those of the very loss the forward returned, i.e.
    the full-graph computation drawing the same masks (mini-batches encoded in the same order
    from the same seed); the replay puts the generator back where it was."""
    model = make_model(bert_dir, train=True)
    features, labels = collate(model, toy_rows(16))
    size = 5

    def full_graph() -> Tensor:
        columns = [torch.cat([model(_rows_of(f, b, b + size))["sentence_embedding"]
                              for b in range(0, 16, size)]) for f in fresh(features)]
        return BSCLoss(model).compute_loss_from_embeddings(columns, labels)

    torch.manual_seed(1)
    want, want_grads = loss_and_grads(model, full_graph)
    after_plain = torch.rand(1)
    torch.manual_seed(1)
    cached = BSCLoss(model, mini_batch_size=size)
    got, got_grads = loss_and_grads(model, lambda: cached(fresh(features), labels))
    assert torch.equal(torch.rand(1), after_plain)
    assert abs(got - want) <= 1e-12
    assert_grads_close(got_grads, want_grads, 1e-10)
    # The masks matter: another seed gives another loss, so the match above is not vacuous.
    torch.manual_seed(2)
    assert abs(value(cached(fresh(features), labels)) - want) > 1e-6


def test_cached_without_grad_returns_the_loss(bert_dir: Path) -> None:
    """Evaluation (no grad): the cached module computes the loss only."""
    model = make_model(bert_dir)
    features, labels = collate(model, toy_rows(8))
    with torch.no_grad():
        got = BSCLoss(model, mini_batch_size=3)(fresh(features), labels)
        want = mnsrl(model)(fresh(features), labels)
    assert not got.requires_grad
    assert abs(value(got) - value(want)) <= 1e-10


# --- training ----------------------------------------------------------------------------------

STEPS = 6
TRAIN_CASES: dict[str, tuple[Callable[[nn.Module], BatchscaleLoss], dict[str, object]]] = {
    "bsc": (lambda m: BSCLoss(m), {}),
    "bsc-cached": (lambda m: BSCLoss(m, mini_batch_size=8), {}),
    "bsc-mse": (lambda m: BSCLoss(m, mu=0.5),
                {"scores": [1.0 if i % 4 else 0.2 for i in range(32)]}),
    "infonce-tiled": (lambda m: InfoNCELoss(m, tile_size=8), {"negatives": True}),
    "weince": (lambda m: WEINCELoss(m), {}),
    "vrns": (lambda m: VRNSLoss(InfoNCELoss(m), n=32), {}),
}


def check_training(losses: list[float]) -> None:
    assert len(losses) == STEPS
    assert all(math.isfinite(x) for x in losses), losses
    assert losses[-1] < 0.98 * losses[0], losses  # measured: 4 to 12 % lower after 6 steps


@pytest.mark.parametrize("case", list(TRAIN_CASES))
def test_training_loop_of_the_trainer(bert_dir: Path, case: str) -> None:
    """The step SentenceTransformerTrainer takes, on one batch of all 32 pairs with dropout on:
    its collator and feature split, ``loss(features, labels)``, backward, AdamW."""
    build, data = TRAIN_CASES[case]
    torch.manual_seed(0)
    model = make_model(bert_dir, torch.float32, train=True)
    loss_fn = build(model)
    features, labels = collate(model, toy_rows(32, **data))  # type: ignore[arg-type]
    optimizer = torch.optim.AdamW(loss_fn.parameters(), lr=1e-3)
    losses = []
    for _ in range(STEPS):
        loss = loss_fn(fresh(features), labels)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(float(loss.detach()))
    check_training(losses)


@pytest.mark.parametrize("case", list(TRAIN_CASES))
def test_sentence_transformer_trainer_trains(bert_dir: Path, tmp_path: Path, case: str) -> None:
    """SentenceTransformerTrainer itself, a few steps on the toy set (one batch of 32)."""
    pytest.importorskip("accelerate", reason="SentenceTransformerTrainer needs accelerate")
    datasets = pytest.importorskip("datasets", reason="SentenceTransformerTrainer needs datasets")
    from sentence_transformers import (
        SentenceTransformerTrainer,
        SentenceTransformerTrainingArguments,
    )

    build, data = TRAIN_CASES[case]
    torch.manual_seed(0)
    model = make_model(bert_dir, torch.float32, train=True)
    args = SentenceTransformerTrainingArguments(
        output_dir=str(tmp_path), use_cpu=True, report_to="none", save_strategy="no",
        per_device_train_batch_size=32, max_steps=STEPS, learning_rate=1e-3, warmup_steps=0,
        lr_scheduler_type="constant", logging_steps=1, seed=0,
    )
    trainer = SentenceTransformerTrainer(
        model=model, args=args, loss=build(model),
        train_dataset=datasets.Dataset.from_list(toy_rows(32, **data)),  # type: ignore[arg-type]
    )
    trainer.train()
    check_training([h["loss"] for h in trainer.state.log_history if "loss" in h])


# --- negatives from every rank --------------------------------------------------------------

RANK_CASES: dict[str, Callable[[nn.Module], BatchscaleLoss]] = {
    "bsc": lambda m: BSCLoss(m),
    "bsc-cached": lambda m: BSCLoss(m, mini_batch_size=3),
    "vrns-weince-cached": lambda m: VRNSLoss(WEINCELoss(m, mini_batch_size=3), n=64),
}
RANK_ROWS = 16  # the global batch; each of the 2 ranks holds 8 (anchor, positive, negative)


def worker_two_ranks(bert_dir: str, out_dir: str) -> None:
    """One rank under torchrun: its half of the batch, the loss modules with their default
    ``gather_across_ranks``, gradients averaged over the ranks as DDP would."""
    from batchscale.batching.distributed import (
        average_gradients,
        init_distributed,
        shutdown_distributed,
    )

    torch.set_num_threads(1)
    info = init_distributed(backend="gloo", timeout_s=120)
    half = RANK_ROWS // 2
    rows = toy_rows(RANK_ROWS, negatives=True)[info.rank * half:(info.rank + 1) * half]
    results = {}
    for name, build in RANK_CASES.items():
        model = make_model(Path(bert_dir))
        features, labels = collate(model, rows)
        loss_fn = build(model)
        model.zero_grad(set_to_none=True)
        loss = loss_fn(fresh(features), labels)
        loss.backward()
        average_gradients(model.parameters())
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results[name] = {"loss": value(loss), "grads": grads}
    torch.save(results, Path(out_dir) / f"rank{info.rank}.pt")
    shutdown_distributed()


@pytest.fixture(scope="module")
def two_rank_results(bert_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    out = tmp_path_factory.mktemp("two-ranks")
    return run_ranks(__file__, [str(bert_dir), str(out)], out, timeout=300)


@pytest.mark.distributed
@pytest.mark.parametrize("case", list(RANK_CASES))
def test_two_ranks_gather_the_global_batch(bert_dir: Path, two_rank_results: list[dict],
                                           case: str) -> None:
    """2 gloo ranks with 8 triplets each: every rank's loss and averaged gradients are those
    of one process on all 16 (float64, dropout off), so the negatives came from both ranks."""
    model = make_model(bert_dir)
    features, labels = collate(model, toy_rows(RANK_ROWS, negatives=True))
    want, want_grads = loss_and_grads(model, lambda: RANK_CASES[case](model)(fresh(features),
                                                                           labels))
    # Not vacuous: the loss of a rank's own 8 triplets is another number.
    local_features, _ = collate(model, toy_rows(RANK_ROWS, negatives=True)[:8])
    local = value(RANK_CASES[case](model)(fresh(local_features), None))
    assert abs(local - want) > 1e-3
    for rank, results in enumerate(two_rank_results):
        assert abs(results[case]["loss"] - want) <= 1e-10, rank
        assert_grads_close(results[case]["grads"], want_grads, 1e-10)


# --- configuration and errors --------------------------------------------------------------


def test_config_and_citation(bert_dir: Path) -> None:
    model = make_model(bert_dir)
    bsc = BSCLoss(model, temperature=0.02, mu=0.1, mini_batch_size=4, tile_size=None)
    config = bsc.get_config_dict()
    assert config["temperature"] == 0.02 and config["mu"] == 0.1
    assert config["label_threshold"] == 0.6 and config["mini_batch_size"] == 4
    assert config["tile_size"] is None and config["directions"] == "both"
    weince = WEINCELoss(model, quantile=0.3)
    assert weince.get_config_dict()["quantile"] == 0.3
    vrns = VRNSLoss(InfoNCELoss(model), n=100)
    assert vrns.get_config_dict()["loss"] == "InfoNCELoss"
    assert vrns.get_config_dict()["weight"] == 30.0
    for loss in (bsc, weince, vrns):
        json.dumps(loss.get_config_dict())  # the model card writes it as JSON
    assert "2110.15725" in bsc.citation and "2606.00262" in weince.citation
    assert "2506.09781" in vrns.citation and "1807.03748" in vrns.citation
    # The Trainer swaps in its wrapped model wherever a loss holds `model`: VRNS shares it.
    assert vrns.model is vrns.loss.model is model


@pytest.mark.parametrize(
    ("build", "match"),
    [
        (lambda m: BSCLoss(m, temperature=0.0), "temperature"),
        (lambda m: BSCLoss(m, temperature=float("nan")), "temperature"),
        (lambda m: BSCLoss(m, mini_batch_size=0), "mini_batch_size"),
        (lambda m: BSCLoss(m, tile_size=0), "tile_size"),
        (lambda m: BSCLoss(m, directions="rows"), "directions"),
        (lambda m: BSCLoss(m, mu=1.5), "mu"),
        (lambda m: InfoNCELoss(m, normalization="l1"), "normalization"),
        (lambda m: InfoNCELoss(m, label_threshold=2.0), "label_threshold"),
        (lambda m: WEINCELoss(m, kappa=3.0), "kappa"),
        (lambda m: WEINCELoss(m, config=WeinceConfig(), quantile=0.1), "config"),
        (lambda m: VRNSLoss(BSCLoss(m), n=1), "`n`"),
        (lambda m: VRNSLoss(BSCLoss(m), n=10, weight=-1.0), "weight"),
        (lambda m: VRNSLoss(nn.Identity(), n=10), "loss"),  # type: ignore[arg-type]
        (lambda m: BSCLoss(m, gather_across_ranks=1), "gather_across_ranks"),
    ],
)
def test_bad_arguments(bert_dir: Path, build: Callable[[nn.Module], object], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        build(make_model(bert_dir))


def test_bad_batches(bert_dir: Path) -> None:
    model = make_model(bert_dir)
    features, _ = collate(model, toy_rows(4))
    with pytest.raises(ValueError, match="at least 2 input columns"):
        BSCLoss(model)(fresh(features)[:1], None)
    with pytest.raises(ValueError, match="score"):
        BSCLoss(model, mu=0.1)(fresh(features), None)


if __name__ == "__main__":  # a rank of test_two_ranks_gather_the_global_batch, under torchrun
    worker_two_ranks(sys.argv[1], sys.argv[2])
