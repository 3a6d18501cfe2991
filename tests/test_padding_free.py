"""Padding-free batches (DataCollatorWithFlattening: several examples in one row) against padded ones, and the
Trainer's loss options: label smoothing, compute_loss_func, per-token normalisation (num_items_in_batch)."""

from __future__ import annotations

import datasets
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers import DataCollatorWithFlattening
from transformers.modeling_outputs import CausalLMOutput
from transformers.trainer_pt_utils import LabelSmoother

from bros_hf import BROSTrainer
from bros_hf.data import KEY_COLUMN
from bros_hf.losses import packed_segments, packed_sequence_losses, per_example_losses, target_counts
from tests import toy
from tests.test_trainer import make_args

VOCAB = 64


def pad_collator(features: list[dict]) -> dict[str, torch.Tensor]:
    """Right-padded rows: labels −100 and attention_mask 0 on padding."""
    length = max(len(f["input_ids"]) for f in features)
    ids = torch.zeros(len(features), length, dtype=torch.long)
    labels = torch.full((len(features), length), -100)
    mask = torch.zeros(len(features), length, dtype=torch.long)
    for row, feature in enumerate(features):
        n = len(feature["input_ids"])
        ids[row, :n] = torch.tensor(feature["input_ids"])
        labels[row, :n] = torch.tensor(feature["labels"])
        mask[row, :n] = 1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}


def variable_length_domains(seed: int = 0) -> tuple[datasets.Dataset, datasets.Dataset]:
    """'count': arithmetic sequences (learnable), 'noise': random tokens; lengths 8–24. Target: 'count'."""
    generator = torch.Generator().manual_seed(seed)

    def lengths(n: int) -> list[int]:
        return torch.randint(8, 25, (n,), generator=generator).tolist()

    def counting(n: int) -> list[list[int]]:
        rows = []
        for length in lengths(n):
            start, step = torch.randint(0, VOCAB, (1,), generator=generator), torch.randint(1, 4, (1,), generator=generator)
            rows.append(((start + step * torch.arange(length)) % VOCAB).tolist())
        return rows

    noise = [torch.randint(0, VOCAB, (n,), generator=generator).tolist() for n in lengths(48)]
    train_ids = counting(48) + noise
    train = datasets.Dataset.from_dict(
        {"input_ids": train_ids, "labels": train_ids, "domain": ["count"] * 48 + ["noise"] * 48}
    )
    target_ids = counting(24)
    return train, datasets.Dataset.from_dict({"input_ids": target_ids, "labels": target_ids})


def tiny_llama():
    return toy.tiny_llama(vocab=VOCAB, hidden=32, layers=2, heads=4, kv_heads=2)


def test_packed_segment_losses_equal_padded_example_losses(one_thread):
    model = tiny_llama().eval()
    train, _ = variable_length_domains()
    features = [train[i] for i in (0, 50, 3, 60)]
    padded, flat = pad_collator(features), DataCollatorWithFlattening()(features)
    assert flat["input_ids"].shape[0] == 1
    segments, count = packed_segments(flat["position_ids"])
    assert count == 4
    with torch.no_grad():
        expected = per_example_losses(model(input_ids=padded["input_ids"], attention_mask=padded["attention_mask"]),
                                      padded["labels"])
        packed = model(input_ids=flat["input_ids"], position_ids=flat["position_ids"], use_cache=False)
        got = packed_sequence_losses(packed, flat["labels"], segments, count)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    # The boundary is respected even when the collator does not mask the first label of each example.
    unmasked = torch.tensor([sum((f["labels"] for f in features), [])])
    torch.testing.assert_close(packed_sequence_losses(packed, unmasked, segments, count), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(target_counts(flat["labels"], segments=segments, num_segments=count),
                               target_counts(padded["labels"]))


def run(tmp_path, collator, **overrides):
    train, target = variable_length_domains()
    settings = dict(max_steps=30, per_device_train_batch_size=8, learning_rate=3e-3, remove_unused_columns=False)
    settings.update(overrides)
    trainer = BROSTrainer(model=tiny_llama(), args=make_args(tmp_path, **settings), train_dataset=train,
                          upper_dataset=target, data_collator=collator)
    trainer.train()
    return trainer


def test_padding_free_run_learns_the_padded_runs_mixture(tmp_path, one_thread):
    padded = run(tmp_path / "padded", pad_collator).mixture_weights()
    flat_trainer = run(tmp_path / "flat", DataCollatorWithFlattening())
    flat = flat_trainer.mixture_weights()
    assert flat_trainer._packed_attention_checked
    assert flat["count"] > 0.6, flat
    tv = 0.5 * sum(abs(padded[d] - flat[d]) for d in padded)
    assert tv < 0.05, (padded, flat)


class PooledLM(nn.Module):
    """A causal LM whose every position sees the mean embedding of the whole row: it takes position_ids and
    ignores them, so packed examples leak into each other."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed, self.head = nn.Embedding(VOCAB, 16), nn.Linear(16, VOCAB)

    def forward(self, input_ids, position_ids=None, attention_mask=None):
        hidden = self.embed(input_ids)
        return CausalLMOutput(logits=self.head(hidden + hidden.mean(dim=1, keepdim=True)))


def test_attention_that_leaks_across_packed_examples_is_an_error(tmp_path, one_thread):
    with pytest.raises(ValueError, match="PooledLM.*does not keep packed examples apart"):
        train, target = variable_length_domains()
        args = make_args(tmp_path, max_steps=2, per_device_train_batch_size=4, remove_unused_columns=False)
        BROSTrainer(model=PooledLM(), args=args, train_dataset=train, upper_dataset=target,
                    data_collator=DataCollatorWithFlattening()).train()


def test_packed_keys_must_match_the_packed_examples(tmp_path, one_thread):
    train, target = variable_length_domains()
    trainer = BROSTrainer(model=tiny_llama(), args=make_args(tmp_path, max_steps=1, remove_unused_columns=False),
                          train_dataset=train, upper_dataset=target, data_collator=DataCollatorWithFlattening())
    flat = DataCollatorWithFlattening()([train[i] for i in range(3)])
    with pytest.raises(ValueError, match="start 3 sequences but it has 2 example keys"):
        trainer._packing({**flat, KEY_COLUMN: torch.tensor([0, 1])})
    no_positions = {"input_ids": flat["input_ids"], "labels": flat["labels"], KEY_COLUMN: torch.tensor([0, 1, 0])}
    with pytest.raises(ValueError, match="no position_ids"):
        trainer._packing(no_positions)


def trainer_for_losses(tmp_path, **overrides):
    train, target = variable_length_domains()
    args = make_args(tmp_path, max_steps=1, remove_unused_columns=False, **overrides)
    return BROSTrainer(model=tiny_llama(), args=args, train_dataset=train, upper_dataset=target,
                       data_collator=pad_collator)


def params_of(trainer):
    return dict(trainer.model.named_parameters())


def test_label_smoothing_matches_the_trainers_label_smoother(tmp_path, one_thread):
    trainer = trainer_for_losses(tmp_path, label_smoothing_factor=0.1)
    train, _ = variable_length_domains()
    for i in (0, 70):
        batch = pad_collator([train[i]])
        with torch.no_grad():
            ours = trainer._losses(params_of(trainer), batch, trainer._packing(batch))
            outputs = trainer.model(input_ids=batch["input_ids"])
        reference = LabelSmoother(epsilon=0.1)(outputs, batch["labels"], shift_labels=True)
        torch.testing.assert_close(ours, reference.reshape(1), rtol=1e-5, atol=1e-6)
        assert not torch.allclose(ours, per_example_losses(outputs, batch["labels"]))


def test_compute_loss_func_gives_each_examples_loss(tmp_path, one_thread):
    def doubled_causal_loss(outputs, labels, num_items_in_batch=None):
        logits = outputs.logits[:, :-1].flatten(0, 1)
        return 2.0 * F.cross_entropy(logits, labels[:, 1:].flatten(), ignore_index=-100)

    train, target = variable_length_domains()
    args = make_args(tmp_path, max_steps=1, remove_unused_columns=False)
    trainer = BROSTrainer(model=tiny_llama(), args=args, train_dataset=train, upper_dataset=target,
                          data_collator=pad_collator, compute_loss_func=doubled_causal_loss)
    batch = pad_collator([train[i] for i in (0, 1, 60)])
    with torch.no_grad():
        ours = trainer._losses(params_of(trainer), batch, trainer._packing(batch))
        plain = per_example_losses(trainer.model(**{k: v for k, v in batch.items() if k != "labels"}), batch["labels"])
    torch.testing.assert_close(ours, 2.0 * plain, rtol=1e-5, atol=1e-6)


def test_token_normalisation_is_the_models_token_mean(tmp_path, one_thread):
    trainer = trainer_for_losses(tmp_path, loss_normalization="token")
    train, _ = variable_length_domains()
    batch = pad_collator([train[i] for i in (0, 1, 60, 61)])
    with torch.no_grad():
        ours = trainer._losses(params_of(trainer), batch, trainer._packing(batch)).mean()
        model_loss = trainer.model(**batch).loss  # transformers' causal LM loss: mean over all target tokens
    torch.testing.assert_close(ours, model_loss, rtol=1e-5, atol=1e-6)
    sequence = trainer_for_losses(tmp_path / "sequence")
    with torch.no_grad():
        assert not torch.allclose(sequence._losses(params_of(sequence), batch, sequence._packing(batch)).mean(), model_loss)


def test_token_normalisation_counts_the_whole_optimizer_step(tmp_path, one_thread):
    """With accumulation, every micro-batch is normalised by the step's tokens per micro-batch."""
    trainer = trainer_for_losses(tmp_path, loss_normalization="token", gradient_accumulation_steps=2)
    train, _ = variable_length_domains()
    batches = [pad_collator([train[i] for i in (0, 1)]), pad_collator([train[i] for i in (60, 61)])]
    trainer._get_num_items_in_batch(batches, torch.device("cpu"))
    total = sum(float(target_counts(b["labels"]).sum()) for b in batches)
    assert trainer._tokens_per_micro_batch == total / 2
    with torch.no_grad():
        step_loss = sum(trainer._losses(params_of(trainer), b, trainer._packing(b), trainer._tokens_per_micro_batch).mean() for b in batches) / 2
        token_sum = sum(trainer.model(**b).loss * target_counts(b["labels"]).sum() for b in batches)
    torch.testing.assert_close(step_loss, token_sum / total, rtol=1e-5, atol=1e-6)


def test_packed_rows_for_an_encoder_decoder_are_refused(tmp_path, one_thread):
    from tests.test_model_families import FAMILIES

    rows = {"input_ids": [[5, 6, 7, 8]] * 4, "labels": [[5, 6, 7, 8]] * 4, "domain": ["a", "b"] * 2}
    data = datasets.Dataset.from_dict(rows)
    trainer = BROSTrainer(model=FAMILIES["t5"](), args=make_args(tmp_path, max_steps=1, remove_unused_columns=False),
                          train_dataset=data, upper_dataset=data)
    flat = DataCollatorWithFlattening()([{"input_ids": [5, 6, 7], "labels": [5, 6, 7]}] * 2)
    with pytest.raises(ValueError, match="only supported for decoder-only models; T5ForConditionalGeneration"):
        trainer._packing({**flat, KEY_COLUMN: torch.tensor([0, 1])})


def test_compute_loss_func_on_outputs_that_cannot_be_sliced_is_an_error(tmp_path, one_thread):
    train, target = variable_length_domains()
    args = make_args(tmp_path, max_steps=1, remove_unused_columns=False)
    trainer = BROSTrainer(model=tiny_llama(), args=args, train_dataset=train, upper_dataset=target,
                          data_collator=pad_collator, compute_loss_func=lambda outputs, labels, **_: outputs.sum())
    with pytest.raises(ValueError, match="needs the model's outputs as a dict or ModelOutput.*returned Tensor"):
        trainer.per_example_loss(torch.zeros(2, 5, VOCAB), torch.zeros(2, 5, dtype=torch.long))
