"""bros_hf.packing: run_clm-style blocks that never mix domains, map-style and streamed alike."""

from __future__ import annotations

import datasets
import pytest

from bros_hf.packing import group_texts_by_domain


def tokenized(rows: list[tuple[str, list[int]]]) -> datasets.Dataset:
    return datasets.Dataset.from_dict(
        {
            "domain": [domain for domain, _ in rows],
            "input_ids": [ids for _, ids in rows],
            "attention_mask": [[1] * len(ids) for _, ids in rows],
            "text": ["unused"] * len(rows),
        }
    )


ROWS = [
    ("code", [1, 2, 3]),
    ("docs", [100, 101, 102, 103, 104]),
    ("code", [4, 5, 6, 7]),
    ("docs", [105]),
    ("code", [8, 9]),
]


def test_blocks_have_one_domain_and_follow_each_domains_token_stream():
    packed = group_texts_by_domain(tokenized(ROWS), block_size=4)
    assert sorted(packed.column_names) == ["attention_mask", "domain", "input_ids", "labels"]
    rows = list(packed)
    assert [(r["domain"], r["input_ids"]) for r in rows] == [
        ("code", [1, 2, 3, 4]),
        ("code", [5, 6, 7, 8]),  # 9 is the code remainder: dropped, as run_clm drops its remainder
        ("docs", [100, 101, 102, 103]),  # 104, 105: docs remainder
    ]
    assert all(r["labels"] == r["input_ids"] and r["attention_mask"] == [1] * 4 for r in rows)


def test_streamed_dataset_packs_the_same_blocks():
    ds = tokenized(ROWS)
    mapped = list(group_texts_by_domain(ds, block_size=4, batch_size=2))
    streamed = list(group_texts_by_domain(ds.to_iterable_dataset(), block_size=4, batch_size=2))
    assert streamed == mapped
    assert all(len(r["input_ids"]) == 4 for r in streamed)


def test_stream_without_declared_features_drops_its_other_columns():
    def rows():
        for domain, ids in ROWS:
            yield {"domain": domain, "input_ids": ids, "text": "unused"}

    stream = datasets.IterableDataset.from_generator(rows)
    assert stream.column_names is None
    packed = list(group_texts_by_domain(stream, block_size=4))
    assert all(set(r) == {"domain", "input_ids", "labels"} for r in packed), packed
    assert [r["input_ids"] for r in packed] == [[1, 2, 3, 4], [5, 6, 7, 8], [100, 101, 102, 103]]


def test_bad_inputs_name_the_problem():
    with pytest.raises(ValueError, match=r"no column\(s\) \['input_ids'\]"):
        group_texts_by_domain(datasets.Dataset.from_dict({"text": ["a"], "domain": ["x"]}), block_size=4)
    with pytest.raises(ValueError, match="block_size must be"):
        group_texts_by_domain(tokenized(ROWS), block_size=0)
    empty = datasets.IterableDataset.from_generator(lambda: iter(()))
    with pytest.raises(ValueError, match="empty stream"):
        group_texts_by_domain(empty, block_size=4)
    listed = datasets.Dataset.from_dict({"input_ids": [[1, 2]], "domain": [["x", "x"]]})
    with pytest.raises(ValueError, match="holds a list"):
        group_texts_by_domain(listed, block_size=1)
