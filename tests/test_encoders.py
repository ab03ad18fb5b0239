"""Encoders: loading (safetensors only, no remote code), tokenize / forward / encode,
static embeddings, save in sentence-transformers format."""

from __future__ import annotations

import contextlib
import json
import shutil

import pytest
import torch

from batchscale.encoders import EncoderLoadError, SentenceEncoder, load_encoder

TEXTS = ["A man is playing a guitar.", "The dog runs on the beach with a red ball.", "Cells.",
         "Two women are cooking food in a small kitchen while a child is sitting at the table.",
         "a", "Results: increased risk of cancer in old mice."]


def test_plain_hf_directory_gets_mean_pooling(tiny_hf_dir) -> None:
    enc = SentenceEncoder.load(tiny_hf_dir, device="cpu")
    feats = enc.tokenize(TEXTS[:2])
    hidden = enc.st[0].auto_model(**feats).last_hidden_state
    mask = feats["attention_mask"].unsqueeze(-1).float()
    mean = (hidden * mask).sum(1) / mask.sum(1)
    torch.testing.assert_close(enc(feats), mean)
    cls = SentenceEncoder.load(tiny_hf_dir, pooling="cls", device="cpu")
    torch.testing.assert_close(cls(feats), hidden[:, 0])


def test_forward_has_gradient_and_keeps_features(tiny_encoder) -> None:
    feats = tiny_encoder.tokenize(TEXTS)
    before = {k: v.clone() for k, v in feats.items()}
    tiny_encoder.train()
    try:
        emb = tiny_encoder(feats)
        emb.pow(2).sum().backward()
    finally:
        tiny_encoder.eval()
        tiny_encoder.zero_grad(set_to_none=True)
    assert emb.shape == (len(TEXTS), tiny_encoder.dim) and emb.requires_grad
    assert set(feats) == set(before) and all(torch.equal(feats[k], before[k]) for k in feats)
    assert all(v.shape[0] == len(TEXTS) and v.ndim == 2 for v in feats.values())


def test_encode_sorts_by_length_and_restores_order(tiny_encoder) -> None:
    one_by_one = torch.cat([tiny_encoder.encode([t], show_progress=False) for t in TEXTS])
    batched = tiny_encoder.encode(TEXTS, batch_size=3, show_progress=False)
    budget = tiny_encoder.encode(TEXTS, max_tokens=20, show_progress=False)
    torch.testing.assert_close(batched, one_by_one, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(budget, one_by_one, atol=1e-5, rtol=1e-5)
    assert not torch.is_inference(batched) or batched.dtype == torch.float32
    assert tiny_encoder.encode([], show_progress=False).shape == (0, tiny_encoder.dim)


def test_max_length_is_honoured(tiny_encoder) -> None:
    long = " ".join(["cells"] * 200)
    assert tiny_encoder.max_seq_length == 64
    assert tiny_encoder.token_lengths([long]) == [64]
    assert tiny_encoder.tokenize([long], max_length=8)["input_ids"].shape == (1, 8)
    cut = tiny_encoder.encode([long], max_length=8, show_progress=False)
    same = tiny_encoder.encode([" ".join(["cells"] * 6)], show_progress=False)
    torch.testing.assert_close(cut, same, atol=1e-5, rtol=1e-5)  # [CLS] + 6 + [SEP] = 8


def test_save_loads_in_sentence_transformers(tiny_encoder, tmp_path) -> None:
    from sentence_transformers import SentenceTransformer

    path = tiny_encoder.save(tmp_path / "model")
    assert (path / "modules.json").is_file() and (path / "model.safetensors").is_file()
    assert not list(path.rglob("*.bin"))
    ours = tiny_encoder.encode(TEXTS, show_progress=False)
    theirs = SentenceTransformer(str(path), device="cpu").encode(TEXTS, convert_to_tensor=True)
    torch.testing.assert_close(theirs.cpu(), ours, atol=1e-5, rtol=1e-5)
    again = load_encoder(path, device="cpu")
    assert again.max_seq_length == 64
    torch.testing.assert_close(again.encode(TEXTS, show_progress=False), ours)


def test_static_encoder_trains_and_saves(tiny_hf_dir, tmp_path) -> None:
    from sentence_transformers import SentenceTransformer

    enc = SentenceEncoder.static(tiny_hf_dir)
    assert enc.is_static and enc.max_seq_length is None
    table = enc.st[0].embedding.weight
    from transformers import AutoModel

    source = AutoModel.from_pretrained(str(tiny_hf_dir)).get_input_embeddings().weight
    torch.testing.assert_close(table.detach(), source.detach())  # initialised from the transformer

    feats = enc.tokenize(TEXTS[:3])
    ids, mask = feats["input_ids"], feats["attention_mask"]
    expected = torch.stack([table[ids[i][mask[i].bool()]].mean(0) for i in range(3)])
    enc.train()
    emb = enc(feats)
    torch.testing.assert_close(emb, expected)  # a mean of token embeddings
    emb.sum().backward()
    used = torch.unique(ids[mask.bool()])
    assert table.grad is not None and table.grad[used].abs().sum() > 0
    unused = torch.ones(table.shape[0], dtype=torch.bool)
    unused[used] = False
    assert table.grad[unused].abs().sum() == 0

    with torch.no_grad():
        table.add_(0.01)  # a "trained" table
    enc.eval()
    path = enc.save(tmp_path / "static")
    ours = enc.encode(TEXTS, show_progress=False)
    theirs = SentenceTransformer(str(path), device="cpu").encode(TEXTS, convert_to_tensor=True)
    torch.testing.assert_close(theirs.cpu(), ours, atol=1e-6, rtol=1e-6)
    again = load_encoder(path, device="cpu")
    assert again.is_static
    torch.testing.assert_close(again.encode(TEXTS, show_progress=False), ours)


def test_static_max_length(tiny_hf_dir) -> None:
    enc = SentenceEncoder.static(tiny_hf_dir)
    long = " ".join(["cells"] * 50)
    assert enc.token_lengths([long]) == [50] and enc.token_lengths([long], max_length=7) == [7]
    enc.max_seq_length = 5
    assert enc.tokenize([long])["input_ids"].shape == (1, 5)


def test_pickle_weights_are_refused(tiny_st_dir, tmp_path) -> None:
    from safetensors.torch import load_file

    bad = tmp_path / "pickled"
    shutil.copytree(tiny_st_dir, bad)
    weights = load_file(str(bad / "model.safetensors"))
    (bad / "model.safetensors").unlink()
    torch.save(weights, bad / "pytorch_model.bin")
    with pytest.raises(EncoderLoadError, match="only safetensors"):
        SentenceEncoder.load(bad)


def test_foreign_module_types_are_refused(tiny_st_dir, tmp_path) -> None:
    bad = tmp_path / "remote"
    shutil.copytree(tiny_st_dir, bad)
    modules = json.loads((bad / "modules.json").read_text())
    modules[1]["type"] = "my_package.custom.Pooling"
    (bad / "modules.json").write_text(json.dumps(modules))
    with pytest.raises(EncoderLoadError, match="no remote code"):
        SentenceEncoder.load(bad)


def test_remote_code_is_not_run(tiny_hf_dir, tmp_path) -> None:
    bad = tmp_path / "auto_map"
    shutil.copytree(tiny_hf_dir, bad)
    marker = tmp_path / "ran"
    (bad / "modeling_evil.py").write_text(f"open({str(marker)!r}, 'w').write('x')\n")
    config = json.loads((bad / "config.json").read_text())
    config["auto_map"] = {"AutoModel": "modeling_evil.EvilModel"}
    (bad / "config.json").write_text(json.dumps(config))
    with contextlib.suppress(EncoderLoadError):  # refusing is fine, running it is not
        SentenceEncoder.load(bad, device="cpu")
    assert not marker.exists()


def test_missing_directory(tmp_path) -> None:
    with pytest.raises(EncoderLoadError, match="not a model directory"):
        SentenceEncoder.load(tmp_path / "nowhere")


def test_default_model_loads_offline(default_encoder) -> None:
    assert default_encoder.dim == 384 and default_encoder.max_seq_length == 256
    assert not default_encoder.is_static
    emb = default_encoder.encode(["A man is playing a guitar.", "Someone plays guitar.",
                                  "The stock market fell."], show_progress=False)
    cos = torch.nn.functional.normalize(emb, dim=-1) @ torch.nn.functional.normalize(emb, dim=-1).T
    assert cos[0, 1] > 0.6 > cos[0, 2]


def test_dtype(tiny_st_dir) -> None:
    from batchscale.encoders.encoder import resolve_dtype

    cpu = torch.device("cpu")
    assert resolve_dtype(None, cpu) == resolve_dtype("float32", cpu) == torch.float32
    assert resolve_dtype("auto", torch.device("cuda")) == torch.float32
    assert resolve_dtype("auto", cpu) in (torch.float32, torch.bfloat16)
    with pytest.raises(ValueError, match="dtype"):
        resolve_dtype("float8", cpu)
    exact = SentenceEncoder.load(tiny_st_dir, device="cpu").encode(TEXTS, show_progress=False)
    half = SentenceEncoder.load(tiny_st_dir, device="cpu", dtype="bfloat16")
    assert next(half.parameters()).dtype == torch.bfloat16
    emb = half.encode(TEXTS, show_progress=False)
    assert emb.dtype == torch.float32
    cos = torch.nn.functional.cosine_similarity(emb, exact)
    assert bool((cos > 0.99).all())
