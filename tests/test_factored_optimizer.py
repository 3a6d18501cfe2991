"""``optim="adafactor"``: transformers' Adafactor as the lower optimizer, whose factored second moment keeps m + n
floats for an [m, n] tensor (the full-space embeddings' AdamW state is 2mn).

Each optimizer step is checked against a fresh transformers ``Adafactor`` stepped on copies of the same tensors,
gradients and state: full-space tensors (GPT-2's tied embedding) must end where it puts them, sketched tensors at
θ + U a with a its step from zero coordinates. Optimizers whose step is relative to the parameter's scale are refused.
"""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, TrainerCallback
from transformers.optimization import Adafactor

from bros_hf import BROSTrainer
from tests.test_trainer import make_args
from tests.test_trainer_lm import VOCAB, lm_args, token_domains
from tests.toy import TinyClassifier, three_domain_toy

STEPS = 4


class AdafactorReference(TrainerCallback):
    """Before each optimizer step, a fresh ``Adafactor`` with the trainer's kwargs takes the step on copies of the
    parameters, gradients and state; after it, the trainer's weights are compared with the reference's."""

    def __init__(self, trainer: BROSTrainer):
        self.trainer = trainer
        self.checked_steps = 0

    def on_train_begin(self, args, state, control, **kwargs):
        optimizer = getattr(self.trainer.optimizer, "optimizer", self.trainer.optimizer)
        assert type(optimizer) is Adafactor
        optimizer.register_step_pre_hook(self._reference_step)

    def _reference_step(self, optimizer, *_):
        group = optimizer.param_groups[0]
        settings = {k: v for k, v in group.items() if k != "params"}
        copies = [p.detach().clone() for p in group["params"]]
        for original, twin in zip(group["params"], copies, strict=True):
            twin.grad = original.grad.clone()
        reference = Adafactor([{"params": copies, **settings}])
        for original, twin in zip(group["params"], copies, strict=True):
            if original in optimizer.state:
                reference.state[twin] = copy.deepcopy(optimizer.state[original])
        reference.step()
        coordinates = self.trainer._coordinates
        before = {n: p.detach().clone() for n, p in self.trainer.engine.params.items()}
        self.expected = {}
        for (name, coordinate), original, twin in zip(coordinates.items(), group["params"], copies, strict=True):
            assert coordinate is original, "the optimizer's parameters are the coordinates, in order"
            matrix = self.trainer.engine.sketch_u.matrices[name]
            if matrix is None:
                self.expected[name] = twin
            else:
                shift = (twin @ matrix.T).reshape(before[name].shape)
                self.expected[name] = before[name] + shift

    def on_step_end(self, args, state, control, **kwargs):
        for name, param in self.trainer.engine.params.items():
            torch.testing.assert_close(param.detach(), self.expected[name], rtol=1e-5, atol=1e-7, msg=name)
        self.checked_steps += 1


def test_adafactor_steps_are_transformers_adafactor_and_its_state_is_factored(tmp_path):
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    args = lm_args(
        tmp_path, optim="adafactor", max_steps=STEPS, weight_decay=0.0, max_grad_norm=0.0, lr_scheduler_type="constant"
    )
    train_ds, upper_ds = token_domains()
    trainer = BROSTrainer(model=model, args=args, train_dataset=train_ds, upper_dataset=upper_ds)
    reference = AdafactorReference(trainer)
    trainer.add_callback(reference)
    trainer.train()

    assert reference.checked_steps == STEPS
    for name, param in model.named_parameters():
        assert not torch.equal(param.detach(), before[name]), f"{name} did not move: the check is vacuous"
    optimizer = getattr(trainer.optimizer, "optimizer", trainer.optimizer)
    embedding = "transformer.wte.weight"
    assert trainer._coordinates[embedding] is trainer.engine.params[embedding], "the embedding is full-space"
    state = optimizer.state[trainer.engine.params[embedding]]
    assert "exp_avg" not in state and "exp_avg_sq" not in state, sorted(state)
    assert state["exp_avg_sq_row"].shape == (VOCAB,) and state["exp_avg_sq_col"].shape == (32,)


@pytest.mark.parametrize(
    "optimizer_cls_and_kwargs",
    [
        (torch.optim.Adafactor, {"lr": 1e-2}),
        (Adafactor, {"lr": 1e-2, "relative_step": False}),  # scale_parameter defaults to True
        (Adafactor, {"lr": None}),  # relative_step defaults to True
    ],
    ids=["torch", "scale_parameter", "relative_step"],
)
def test_parameter_relative_steps_are_refused(tmp_path, optimizer_cls_and_kwargs):
    train_ds, upper_ds = three_domain_toy(n_per_domain=32, n_target=32)
    trainer = BROSTrainer(
        model=TinyClassifier(),
        args=make_args(tmp_path, max_steps=1),
        train_dataset=train_ds,
        upper_dataset=upper_ds,
        optimizer_cls_and_kwargs=optimizer_cls_and_kwargs,
    )
    with pytest.raises(ValueError, match="root mean square.*optim='adafactor'"):
        trainer.create_optimizer()


def test_parameter_relative_steps_are_right_where_nothing_is_sketched(tmp_path):
    """MA-SOBA steps θ itself (U = I everywhere), as a plain Trainer does: transformers' Adafactor with its step
    scaled by each parameter's RMS (``scale_parameter``, its default) is accepted and each step is its step on θ."""
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    args = lm_args(tmp_path, bilevel_method="masoba", max_steps=STEPS, weight_decay=0.0, max_grad_norm=0.0)
    train_ds, upper_ds = token_domains()
    trainer = BROSTrainer(
        model=model,
        args=args,
        train_dataset=train_ds,
        upper_dataset=upper_ds,
        optimizer_cls_and_kwargs=(Adafactor, {"lr": 1e-2, "relative_step": False}),
    )
    reference = AdafactorReference(trainer)
    trainer.add_callback(reference)
    trainer.train()

    assert reference.checked_steps == STEPS
    optimizer = getattr(trainer.optimizer, "optimizer", trainer.optimizer)
    assert optimizer.param_groups[0]["scale_parameter"]
    for name, param in model.named_parameters():
        assert not torch.equal(param.detach(), before[name]), f"{name} did not move: the check is vacuous"
