"""BROSTrainer through the real transformers Trainer on the 3-domain toy (CPU, seconds each)."""

from __future__ import annotations

import json
import math
import os

import pytest
import torch
from transformers import TrainerCallback

from bros_hf import BROSConfig, BROSTrainer
from tests.toy import TinyClassifier, three_domain_toy


@pytest.fixture(scope="module")
def toy():
    return three_domain_toy()


def make_args(tmp_path, **overrides) -> BROSConfig:
    settings = dict(
        output_dir=str(tmp_path / "out"),
        subspace_rank=8,
        max_steps=120,
        per_device_train_batch_size=24,
        learning_rate=3e-3,
        logging_steps=20,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
        seed=0,
    )
    settings.update(overrides)
    return BROSConfig(**settings)


def train(args, train_ds, target_ds, model=None, **kwargs) -> BROSTrainer:
    torch.manual_seed(args.seed)
    trainer = BROSTrainer(
        model=model or TinyClassifier(), args=args, train_dataset=train_ds, upper_dataset=target_ds, **kwargs
    )
    trainer.train()
    return trainer


class LogCapture(TrainerCallback):
    def __init__(self):
        self.logs: list[dict] = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.logs.append(dict(logs or {}))


@pytest.mark.parametrize("method", ["bros", "masoba"])
def test_three_domain_toy_puts_weight_on_target_domain(tmp_path, toy, method):
    """Target = domain A; B has random labels, C permuted labels: A must get ≥ 0.6 of the mixture."""
    capture = LogCapture()
    trainer = train(make_args(tmp_path, bilevel_method=method), *toy, callbacks=[capture])
    weights = trainer.mixture_weights()
    assert set(weights) == {"A", "B", "C"}
    assert math.isclose(sum(weights.values()), 1.0, abs_tol=1e-5)
    assert weights["A"] >= 0.6, weights
    assert max(weights, key=weights.get) == "A"

    exported = json.loads((tmp_path / "out" / "mixture_weights.json").read_text())
    assert exported["domains"] == ["A", "B", "C"]
    assert exported["step"] == 120
    assert exported["upper_updates"] == 120
    for key in ("final", "average"):
        assert math.isclose(sum(exported[key].values()), 1.0, abs_tol=1e-5)
    assert exported["weights"] == exported["average"] == pytest.approx(weights)
    assert exported["final"] == pytest.approx(trainer.final_mixture_weights())
    assert exported["final"]["A"] > 1 / 3
    assert (tmp_path / "out" / "mixture_weights.png").stat().st_size > 0

    logged = [entry for entry in capture.logs if "mixture/A" in entry]
    assert logged, "bilevel metrics must reach the Trainer's log/report_to pipeline"
    for key in ("bilevel/upper_loss", "bilevel/hypergrad_norm", "bilevel/z_norm", "bilevel/lower_loss", "loss"):
        assert math.isfinite(logged[-1][key]), key
    assert logged[-1]["bilevel/upper_loss"] < logged[0]["bilevel/upper_loss"]


def test_bf16_autocast_on_cpu(tmp_path, toy):
    trainer = train(make_args(tmp_path, bf16=True, max_steps=60), *toy)
    weights = trainer.mixture_weights()
    assert all(math.isfinite(w) for w in weights.values())
    assert max(weights, key=weights.get) == "A"
    assert all(bool(torch.isfinite(z).all()) for z in trainer.engine.z.values())


@pytest.mark.parametrize("mode", ["autograd", "finite_difference"])
def test_gradient_accumulation_matches_larger_batch(tmp_path, toy, mode):
    """2 micro-batches of 12 (+ 2 upper micro-batches of 12) == one batch of 24 (+ upper batch of 24).

    10 steps keep the 256-example upper stream inside its first pass, where both read the same order."""
    common = dict(max_steps=10, hessian_mode=mode, optim="sgd", learning_rate=0.05)
    big = train(make_args(tmp_path / "big", per_device_train_batch_size=24, upper_batch_size=24, **common), *toy)
    accumulated = train(
        make_args(
            tmp_path / "acc",
            per_device_train_batch_size=12,
            upper_batch_size=12,
            gradient_accumulation_steps=2,
            **common,
        ),
        *toy,
    )
    assert accumulated.state.global_step == big.state.global_step == 10
    # λ moves by about α = 5/10 per step whatever D's size (normalized rule: D's float round-off between the
    # two summation orders is not scaled down with D), so λ agrees to 1e-3 relative (measured 1.9e-4 with
    # finite differences); z and θ, which do not go through that normalisation, to 1e-4.
    torch.testing.assert_close(accumulated.upper.logits, big.upper.logits, rtol=1e-3, atol=1e-5)
    for name, z in big.engine.z.items():
        torch.testing.assert_close(accumulated.engine.z[name], z, rtol=1e-4, atol=1e-6)
    for (name, p_big), (_, p_acc) in zip(big.model.named_parameters(), accumulated.model.named_parameters(), strict=True):
        torch.testing.assert_close(p_acc, p_big, rtol=1e-4, atol=1e-6, msg=name)


def test_fused_and_unfused_adamw_take_the_same_lower_steps(tmp_path, toy):
    """The Trainer's default optim (fused AdamW) and the unfused one move θ alike. Regression: a strided
    coordinate gradient (a column view of the probes' shared buffer) made torch's fused CPU kernel read the
    wrong entries, silently (found as diverging DDP ranks)."""
    runs = [
        train(make_args(tmp_path / optim, max_steps=3, optim=optim, sketch_resample_interval=40), *toy)
        for optim in ("adamw_torch_fused", "adamw_torch")
    ]
    for (name, fused), (_, unfused) in zip(
        runs[0].model.named_parameters(), runs[1].model.named_parameters(), strict=True
    ):
        torch.testing.assert_close(fused, unfused, rtol=1e-5, atol=1e-7, msg=name)


@pytest.mark.parametrize("optim", ["adamw_torch", "sgd", "adafactor"])
def test_resume_reproduces_uninterrupted_run(tmp_path, toy, optim):
    common = dict(max_steps=30, save_strategy="steps", save_steps=10, optim=optim, sketch_resample_interval=4)
    full = train(make_args(tmp_path / "full", **common), *toy)

    partial_args = make_args(tmp_path / "part", **common)
    checkpoint = tmp_path / "part" / "out" / "checkpoint-10"
    first = train(partial_args, *toy)
    assert (checkpoint / "bros_state_rank0.pt").exists()
    assert (checkpoint / "mixture_weights.json").exists()
    del first
    torch.manual_seed(123)  # a different global RNG state must not matter
    resumed = BROSTrainer(
        model=TinyClassifier(), args=make_args(tmp_path / "part", **common), train_dataset=toy[0], upper_dataset=toy[1]
    )
    resumed.train(resume_from_checkpoint=str(checkpoint))

    final_full, final_resumed = full.mixture_weights(), resumed.mixture_weights()
    for name in final_full:
        assert abs(final_full[name] - final_resumed[name]) < 1e-6, (final_full, final_resumed)
    torch.testing.assert_close(resumed.upper.momentum, full.upper.momentum, rtol=0, atol=1e-6)
    for name, z in full.engine.z.items():
        torch.testing.assert_close(resumed.engine.z[name], z, rtol=0, atol=1e-6)
    for (name, p_full), (_, p_res) in zip(full.model.named_parameters(), resumed.model.named_parameters(), strict=True):
        torch.testing.assert_close(p_res, p_full, rtol=0, atol=1e-6, msg=name)
    torch.testing.assert_close(
        torch.tensor(resumed.mixture_history), torch.tensor(full.mixture_history), rtol=0, atol=1e-6
    )


def test_non_finite_loss_skips_updates_and_keeps_state_finite(tmp_path, toy):
    train_ds, target_ds = toy
    poisoned = train_ds.with_format(None).map(  # every batch of 24 holds poisoned examples
        lambda example, i: {"features": [float("nan")] * 16} if i % 7 == 0 else {}, with_indices=True
    ).with_format("torch")
    model = TinyClassifier()
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.warns(RuntimeWarning, match="Non-finite"):
        trainer = train(make_args(tmp_path, max_steps=5, logging_steps=1), poisoned, target_ds, model=model)
    assert torch.isfinite(trainer.upper.logits).all() and torch.isfinite(trainer.upper.momentum).all()
    assert trainer.upper.num_updates == 0 and bool((trainer.upper.logits == 0).all())
    assert all(bool(torch.isfinite(z).all()) for z in trainer.engine.z.values())
    for initial, current in zip(before, trainer.model.parameters(), strict=True):
        assert torch.equal(initial, current), "a skipped step must not move θ"


def test_sample_mode_weights_align_with_dataset(tmp_path, toy):
    trainer = train(make_args(tmp_path, upper_level="sample", max_steps=40), *toy)
    weights = trainer.sample_weights()
    assert weights.shape == (len(toy[0]),)
    assert bool(((weights > 0) & (weights < 1)).all())
    domains = toy[0]["domain"]
    mean = {d: float(weights[[i for i, x in enumerate(domains) if x == d]].mean()) for d in "ABC"}
    assert mean["A"] > mean["B"] and mean["A"] > mean["C"], mean
    exported = json.loads((tmp_path / "out" / "sample_weights.json").read_text())
    assert len(exported["weights"]) == len(exported["final"]) == len(toy[0])
    final = trainer.final_sample_weights()
    assert torch.equal(final, trainer.upper.weights().cpu()), "final_sample_weights is the last iterate"
    assert not torch.equal(weights, final), "sample_weights is the tail average, not the last iterate"
    assert [exported["weights"][str(i)] for i in range(3)] == pytest.approx(weights[:3].tolist())
    assert [exported["final"][str(i)] for i in range(3)] == pytest.approx(final[:3].tolist())
    assert os.path.exists(tmp_path / "out" / "sample_weights.png")


def test_trainer_step_is_the_engine_step(tmp_path, toy, monkeypatch):
    """One definition of the step: BROSTrainer with plain SGD (constant lr, no clipping, no decay) moves θ,
    z and λ exactly as ``BilevelEngine.step`` does on the same batches, from the same initial state."""
    from bros_hf import BilevelEngine
    from bros_hf.modules import model_perturber

    recorded = []
    original = BilevelEngine.compute_terms

    def recording(engine, lower_loss_fn, upper_loss_fn):
        recorded.append((lower_loss_fn, upper_loss_fn))
        return original(engine, lower_loss_fn, upper_loss_fn)

    monkeypatch.setattr(BilevelEngine, "compute_terms", recording)
    args = make_args(
        tmp_path, max_steps=6, optim="sgd", lr_scheduler_type="constant", max_grad_norm=0.0, weight_decay=0.0
    )
    torch.manual_seed(args.seed)
    model = TinyClassifier()
    initial = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer = BROSTrainer(model=model, args=args, train_dataset=toy[0], upper_dataset=toy[1])
    trainer.train()
    monkeypatch.undo()
    assert len(recorded) == 6

    # Replay: a fresh engine over a copy of the initial weights, driven by the recorded batch closures.
    params = {n: p.clone() for n, p in initial.items()}
    engine = BilevelEngine(
        params,
        type(trainer.upper)(trainer.domains),
        trainer.engine.hparams,
        seed=args.seed,
        perturber=model_perturber(trainer.model),
    )
    for lower_loss_fn, upper_loss_fn in recorded:
        assert not engine.step(lower_loss_fn, upper_loss_fn, args.learning_rate).skipped
    for name, param in trainer.engine.params.items():
        torch.testing.assert_close(params[name], param.detach(), rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(engine.z[name], trainer.engine.z[name], rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(engine.upper.logits, trainer.upper.logits, rtol=1e-6, atol=1e-7)
    assert not torch.equal(trainer.upper.logits, torch.zeros(3)), "λ moved: the comparison is not vacuous"


@pytest.mark.parametrize("upper_level", ["domain", "sample"])
def test_run_shorter_than_the_upper_warmup_says_so(tmp_path, toy, upper_level):
    """A run in which λ never moved warns at the end and records upper_updates = 0 in the export."""
    args = make_args(tmp_path, max_steps=4, upper_warmup_steps=10, upper_level=upper_level)
    with pytest.warns(UserWarning, match="upper level never moved.*upper_warmup_steps=10"):
        train(args, *toy)
    name = "mixture_weights.json" if upper_level == "domain" else "sample_weights.json"
    exported = json.loads((tmp_path / "out" / name).read_text())
    assert exported["upper_updates"] == 0 and exported["step"] == 4


def test_per_step_mixtures_are_read_at_each_training_log(tmp_path, toy):
    # Every step's mixture stays on the device until a training log, where all of them are read in one transfer.
    # Before, they waited for someone to read mixture_history: one tensor per step for the whole run (found by the
    # soak test's live-tensor count, +2500 over 2500 steps).
    pending: list[int] = []

    class CountPending(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):  # before that step's log
            pending.append(len(trainer._unread_mixtures))

    torch.manual_seed(0)
    trainer = BROSTrainer(
        model=TinyClassifier(), args=make_args(tmp_path, max_steps=12, logging_steps=4), train_dataset=toy[0],
        upper_dataset=toy[1], callbacks=[CountPending()],
    )  # fmt: skip
    trainer.train()
    assert pending == [1, 2, 3, 4] * 3
    assert len(trainer.mixture_history) == 12
