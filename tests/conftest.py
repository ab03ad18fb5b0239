"""Shared fixtures: the shared data folder, a tiny BERT sentence-transformers model."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

SHARED_DATA = (Path(__file__).resolve().parents[1] / ".." / "shared" / "data").resolve()

# A word-piece vocabulary big enough to tokenise the test sentences into more than [UNK].
_WORD_TEXT = """the a an of to and in is are was were on for with as by at from that this it be
man woman men women girl boy dog cat child people person group playing plays play playing
guitar piano soccer ball running runs walk walking street beach water riding horse car bike
eating food cooking kitchen sitting standing table chair dancing singing music red blue green
black white small large big two three one young old new is not no yes what where who how
hair cutting slicing onion potato tomato meat bread cell cells protein gene genes cancer
mice patients study studies results increased reduced risk expression human brain"""
_WORDS = _WORD_TEXT.split()


def _vocab() -> list[str]:
    special = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)]
    digits = [str(d) for d in range(10)]
    punct = list(".,;:!?'\"()-/%")
    pieces = ["##" + x for x in letters + digits + ["s", "ing", "ed", "er", "ly"]]
    seen: dict[str, None] = {}
    for tok in special + sorted(set(_WORDS)) + letters + digits + punct + pieces:
        seen.setdefault(tok, None)
    return list(seen)


def build_tiny_bert(path: Path, *, hidden: int = 32, layers: int = 2, seed: int = 0) -> Path:
    """A randomly initialised BERT with a word-piece tokenizer, saved as a plain Hugging
    Face model directory (safetensors)."""
    import torch
    from transformers import BertConfig, BertModel, BertTokenizerFast

    path.mkdir(parents=True, exist_ok=True)
    (path / "vocab.txt").write_text("\n".join(_vocab()) + "\n", encoding="utf-8")
    # The vocabulary passed as a dict: transformers 5's BertTokenizerFast(vocab_file=...)
    # builds a 5-token vocabulary (the specials), which turned every test word into [UNK].
    vocab = {tok: i for i, tok in enumerate(_vocab())}
    tokenizer = BertTokenizerFast(vocab=vocab, do_lower_case=True, model_max_length=128)
    assert tokenizer.vocab_size == len(vocab), tokenizer.vocab_size
    tokenizer.save_pretrained(str(path))
    config = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=hidden,
                        num_hidden_layers=layers, num_attention_heads=2,
                        intermediate_size=2 * hidden, max_position_embeddings=128)
    torch.manual_seed(seed)
    BertModel(config).eval().save_pretrained(str(path), safe_serialization=True)
    return path


def tiny_mean_pooled_bert(dtype, *, seq: int, dropout: float = 0.1):
    """A tiny random BERT (seed 0), mean-pooled over the attention mask: an encoder module
    for gradient tests that need no tokenizer."""
    import torch
    from torch import nn
    from transformers import BertConfig, BertModel

    class MeanPooled(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            config = BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2,
                                num_attention_heads=2, intermediate_size=64,
                                max_position_embeddings=seq, hidden_dropout_prob=dropout,
                                attention_probs_dropout_prob=dropout)
            self.bert = BertModel(config, add_pooling_layer=False).to(dtype)

        def forward(self, inputs):
            hidden = self.bert(**inputs).last_hidden_state
            mask = inputs["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            return (hidden * mask).sum(1) / mask.sum(1)

    return MeanPooled()


def random_token_batch(n: int, seed: int, *, seq: int) -> dict:
    """Right-padded random token ids (1..99) of lengths 2..seq, with their attention mask."""
    import torch

    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(2, seq + 1, (n,), generator=g)
    mask = (torch.arange(seq)[None, :] < lengths[:, None]).long()
    ids = torch.randint(1, 100, (n, seq), generator=g) * mask
    return {"input_ids": ids, "attention_mask": mask}


def corrupt_copy(src: Path, dst: Path, line: int, edit) -> Path:
    """Copy ``src`` to ``dst`` with line ``line`` (1-based) replaced by ``edit(bytes)``
    (the line without its end); returns ``dst``."""
    lines = src.read_bytes().split(b"\n")
    lines[line - 1] = edit(lines[line - 1].rstrip(b"\r"))
    dst.parent.mkdir(parents=True, exist_ok=True)
    dst.write_bytes(b"\n".join(lines))
    return dst


DROP = object()  # for the edits below: remove instead of replace


def field_edit(i: int, value, sep: bytes = b"\t"):
    """A ``corrupt_copy`` edit: field ``i`` of a ``sep``-separated line set to ``value``
    (``DROP``: the fields from ``i`` on removed)."""
    def edit(line: bytes) -> bytes:
        cols = line.split(sep)
        if value is DROP:
            cols = cols[:i]
        else:
            cols[i] = value
        return sep.join(cols)
    return edit


def json_edit(key: str, value):
    """A ``corrupt_copy`` edit: key ``key`` of a JSON-object line set to ``value`` (``DROP``:
    removed)."""
    def edit(line: bytes) -> bytes:
        obj = json.loads(line)
        if value is DROP:
            del obj[key]
        else:
            obj[key] = value
        return json.dumps(obj).encode()
    return edit


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        if os.environ.get("CI"):  # CI has the data beside the clone: missing is a failure
            pytest.fail(f"shared data not found at {SHARED_DATA} (CI={os.environ['CI']})")
        pytest.skip(f"shared data not found at {SHARED_DATA}")
    return SHARED_DATA


@pytest.fixture(scope="session")
def tiny_hf_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A plain Hugging Face BERT directory (no modules.json)."""
    return build_tiny_bert(tmp_path_factory.mktemp("tiny-hf"))


@pytest.fixture(scope="session")
def tiny_st_dir(tmp_path_factory: pytest.TempPathFactory, tiny_hf_dir: Path) -> Path:
    """The tiny BERT as a sentence-transformers directory (Transformer + mean Pooling)."""
    from sentence_transformers import SentenceTransformer

    from batchscale.encoders.encoder import _st_modules, _token_dim

    Transformer, Pooling, _, _ = _st_modules()
    out = tmp_path_factory.mktemp("tiny-st")
    transformer = Transformer(str(tiny_hf_dir), max_seq_length=64)
    st = SentenceTransformer(modules=[transformer, Pooling(_token_dim(transformer), "mean")],
                             device="cpu")
    st.save(str(out), safe_serialization=True, create_model_card=False)
    return out


@pytest.fixture(scope="session")
def tiny_encoder(tiny_st_dir: Path):
    from batchscale.encoders import SentenceEncoder

    return SentenceEncoder.load(tiny_st_dir, device="cpu")


@pytest.fixture(scope="session")
def default_encoder():
    """The packaged all-MiniLM-L6-v2 (loads in a few seconds; encode small sets only)."""
    from batchscale.encoders import SentenceEncoder

    return SentenceEncoder.load("default", device="cpu")


@pytest.fixture
def corrupt():
    """:func:`corrupt_copy`, for tests that damage a copy of a real file."""
    return corrupt_copy
