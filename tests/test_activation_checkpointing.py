"""Activation checkpointing recomputes the forward during backward: the bilevel passes must give the same
run with it as without it, in both Hessian modes, whichever way it is switched on."""

from __future__ import annotations

import datasets
import pytest
import torch

from bros_hf import BROSConfig, BROSTrainer
from tests.toy import tiny_llama


def _run(tmp_path, mode: str, checkpointing: str | None):
    torch.manual_seed(0)
    model = tiny_llama(vocab=64, hidden=32, layers=2, heads=2, kv_heads=1)
    if checkpointing == "model":
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    ids = torch.randint(0, 64, (16, 16), generator=torch.Generator().manual_seed(0))
    rows = {"input_ids": ids.tolist(), "labels": ids.tolist(), "domain": ["A", "B"] * 8}
    train = datasets.Dataset.from_dict(rows).with_format("torch")
    args = BROSConfig(
        output_dir=str(tmp_path / str(checkpointing)), max_steps=3, per_device_train_batch_size=4, subspace_rank=4,
        report_to=[], use_cpu=True, disable_tqdm=True, save_strategy="no", hessian_mode=mode, seed=0,
        gradient_checkpointing=checkpointing == "trainer",
    )
    trainer = BROSTrainer(model=model, args=args, train_dataset=train, upper_dataset=train)
    trainer.train()
    return trainer


@pytest.mark.parametrize(("mode", "switch"), [("finite_difference", "trainer"), ("autograd", "model")])
def test_checkpointed_run_equals_the_plain_run(tmp_path, mode, switch):
    """``gradient_checkpointing=True`` (Trainer) or ``model.gradient_checkpointing_enable()``: same λ, z, θ."""
    plain = _run(tmp_path, mode, None)
    checkpointed = _run(tmp_path, mode, switch)
    assert checkpointed.model.is_gradient_checkpointing
    torch.testing.assert_close(checkpointed.upper.logits, plain.upper.logits, rtol=1e-6, atol=1e-9)
    for name, z in plain.engine.z.items():
        torch.testing.assert_close(checkpointed.engine.z[name], z, rtol=1e-6, atol=1e-9, msg=name)
        torch.testing.assert_close(
            checkpointed.engine.params[name].detach(), plain.engine.params[name].detach(), rtol=1e-6, atol=1e-9
        )
    assert not torch.equal(plain.upper.logits, torch.zeros(2)), "λ moved: the comparison is not vacuous"
