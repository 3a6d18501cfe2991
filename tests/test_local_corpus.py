"""Tests for recipes/local_corpus.py: the offline multi-domain corpus, tokenizer and block grouping."""

from __future__ import annotations

import datasets
import local_corpus
import pytest
from local_corpus import DOMAINS, SPLITS, build_local_corpus, tokenize_and_group, train_bpe_tokenizer

SMALL = {"max_docs_per_domain": 30, "chunk_chars": 1000}


@pytest.fixture(scope="module")
def corpus() -> datasets.DatasetDict:
    return build_local_corpus(**SMALL)


@pytest.fixture(scope="module")
def tokenizer(corpus, tmp_path_factory):
    return train_bpe_tokenizer(
        corpus["train"]["text"], vocab_size=300, save_dir=tmp_path_factory.mktemp("tok")
    )


def test_splits_columns_and_domains(corpus):
    assert set(corpus) == set(SPLITS)
    for split in SPLITS:
        ds = corpus[split]
        assert ds.column_names == ["text", "domain"]
        assert ds.features["text"].dtype == "string" and ds.features["domain"].dtype == "string"
        assert set(ds["domain"]) == set(DOMAINS), split
    per_domain = {d: sum(corpus[s]["domain"].count(d) for s in SPLITS) for d in DOMAINS}
    assert all(3 <= n <= SMALL["max_docs_per_domain"] for n in per_domain.values()), per_domain
    assert all(len(text) <= 2 * SMALL["chunk_chars"] for s in SPLITS for text in corpus[s]["text"])


def test_splits_disjoint_and_no_duplicate_chunks(corpus):
    normalized = [" ".join(text.split()) for s in SPLITS for text in corpus[s]["text"]]
    assert len(normalized) == len(set(normalized))
    train, target, eval_ = (set(corpus[s]["text"]) for s in SPLITS)
    assert not train & target and not train & eval_ and not target & eval_


def test_split_fractions():
    ds = build_local_corpus(domains=["code"], max_docs_per_domain=50, target_fraction=0.2, eval_fraction=0.1)
    assert (ds["train"].num_rows, ds["target"].num_rows, ds["eval"].num_rows) == (35, 10, 5)


def test_deterministic_and_seed_dependent(corpus):
    again = build_local_corpus(**SMALL)
    for split in SPLITS:
        assert again[split].to_dict() == corpus[split].to_dict()
    other = build_local_corpus(**SMALL, seed=1)
    assert other["train"]["text"] != corpus["train"]["text"]


def test_domain_subset_and_order():
    ds = build_local_corpus(domains=["legal", "docs"], max_docs_per_domain=10)
    assert ds["train"]["domain"] == sorted(ds["train"]["domain"])  # grouped, in DOMAINS order
    assert set(ds["eval"]["domain"]) == {"docs", "legal"}


def test_unknown_domain_raises():
    with pytest.raises(ValueError, match="poetry"):
        build_local_corpus(domains=["code", "poetry"])


def test_empty_domain_raises(monkeypatch):
    monkeypatch.setitem(local_corpus._SOURCES, "docs", lambda rng: iter(()))
    with pytest.raises(ValueError, match="'docs'"):
        build_local_corpus(domains=["docs"], max_docs_per_domain=10)


def test_cache_hit_does_not_rebuild(tmp_path, monkeypatch):
    first = build_local_corpus(tmp_path, domains=["docs", "code"], max_docs_per_domain=20)
    entries = [p for p in tmp_path.iterdir()]
    assert len(entries) == 1 and entries[0].name.startswith("local_corpus-")  # no temp dir left behind

    def fail(*args, **kwargs):
        raise AssertionError("corpus was rebuilt instead of loaded from the cache")

    monkeypatch.setattr(local_corpus, "_build_corpus", fail)
    second = build_local_corpus(tmp_path, domains=["code", "docs"], max_docs_per_domain=20)
    for split in SPLITS:
        assert second[split].to_dict() == first[split].to_dict()
    with pytest.raises(AssertionError, match="rebuilt"):  # other arguments: other cache entry
        build_local_corpus(tmp_path, domains=["code", "docs"], max_docs_per_domain=20, seed=3)


def test_tokenizer_round_trip_and_reload(tokenizer, tmp_path):
    assert len(tokenizer) <= 300
    assert tokenizer.eos_token == tokenizer.bos_token == tokenizer.pad_token == "<|endoftext|>"
    text = "def f(x):\n    return x  # wörld ✓"
    ids = tokenizer(text)["input_ids"]
    assert tokenizer.eos_token_id not in ids
    assert tokenizer.decode(ids) == text

    tokenizer.save_pretrained(tmp_path)
    reloaded = train_bpe_tokenizer(["not used"], vocab_size=300, save_dir=tmp_path)
    assert reloaded(text)["input_ids"] == ids
    assert reloaded.eos_token_id == tokenizer.eos_token_id


def test_tokenize_and_group_blocks(corpus, tokenizer):
    block_size = 64
    grouped = tokenize_and_group(corpus["eval"], tokenizer, block_size)
    assert grouped.column_names == ["input_ids", "attention_mask", "labels", "domain"]
    assert grouped.num_rows > 0
    assert set(grouped["domain"]) == set(DOMAINS)
    for row in grouped:
        assert len(row["input_ids"]) == block_size
        assert row["attention_mask"] == [1] * block_size
        assert row["labels"] == row["input_ids"]


def test_tokenize_and_group_never_mixes_domains(tokenizer):
    # Interleaved domains with distinct vocabularies: every block must hold text of one domain only.
    eos = tokenizer.eos_token_id
    docs = {"a": "aaaa " * 40, "b": "zzzz " * 40}
    rows = {"text": [docs["a"], docs["b"]] * 5, "domain": ["a", "b"] * 5}
    grouped = tokenize_and_group(datasets.Dataset.from_dict(rows), tokenizer, block_size=16)
    assert grouped["domain"].count("a") > 0 and grouped["domain"].count("b") > 0
    for row in grouped:
        text = tokenizer.decode([t for t in row["input_ids"] if t != eos])
        other = "zzzz" if row["domain"] == "a" else "aaaa"
        assert other not in text
    # Within a domain, all tokens (eos after every document) are used except the final remainder.
    n_tokens_a = 5 * (len(tokenizer(docs["a"])["input_ids"]) + 1)
    assert grouped["domain"].count("a") == n_tokens_a // 16
