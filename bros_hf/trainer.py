"""BROSTrainer: the bilevel step inside the Hugging Face Trainer's loop.

The lower level is the model's trainable parameters θ (with PEFT, the adapters); the upper level
is a domain mixture or per-example weights (:mod:`bros_hf.upper`). Each optimizer step
(``gradient_accumulation_steps`` micro-batches) runs, through :class:`~bros_hf.solver.BilevelEngine`:

- on every micro-batch ξ: Uᵀ∇g, Pᵀ H Q Qᵀ z and ∂_λ⟨∇_θ g, S_Q z⟩ (one lower pass), and on an
  upper micro-batch ζ from the endless upper stream: Pᵀ∇f; all averaged over micro-batches;
- at the accumulation boundary: an all-reduce (mean over processes) of these small tensors, then
  z ← Π_R(z − γ_n P(·)), h and λ (MA-SOBA), and the lower update through the Trainer's optimizer,
  which holds its state in the r-dim coordinates a of U and is folded into θ ← θ + U Δa after each step.

The extra passes run on the unwrapped model (no DDP, no torch.compile wrapper): DDP's hooks would
all-reduce full gradients, and DDP/compile break double backward (DESIGN.md §4).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import math
import os
import re
import shutil
import warnings
from collections import defaultdict
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.func import functional_call
from torch.nn.attention import SDPBackend, sdpa_kernel
from transformers import Trainer
from transformers.trainer import TRAINER_STATE_NAME
from transformers.trainer_callback import ExportableState
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, SaveStrategy, rotate_checkpoints

from bros_hf.callbacks import BilevelExportCallback, save_plot, write_json_atomic
from bros_hf.config import BROSConfig
from bros_hf.data import (
    KEY_COLUMN,
    BalancedDomainSampler,
    KeyedCollator,
    UpperStream,
    attach_keys,
)
from bros_hf.estimators import global_norm
from bros_hf.losses import per_example_losses
from bros_hf.lowrank import LowRankPerturber
from bros_hf.modules import full_space_parameter_names
from bros_hf.solver import BilevelEngine
from bros_hf.upper import DomainMixture, SampleWeights, UpperVariable
from bros_hf.validation import DomainPresenceMonitor, LabelSpace, check_subspace_coverage

STATE_FILE = "bros_state_rank{rank}.pt"
# Checkpoints are written under this prefix and renamed when complete: "tmp-checkpoint-N" never matches
# transformers' ^checkpoint-(\d+)$, so get_last_checkpoint, sort_checkpoints and rotation never see it.
STAGING_PREFIX = "tmp-"
_STAGING_FOLDER = re.compile(rf"^{STAGING_PREFIX}{PREFIX_CHECKPOINT_DIR}-\d+(\.replaced)?$")


class BROSTrainer(Trainer):
    """Drop-in ``Trainer`` that learns a data mixture or example weights against ``upper_dataset``.

    Example::

        args = BROSConfig(output_dir="out", upper_level="domain", domain_column="domain")
        trainer = BROSTrainer(model=model, args=args, train_dataset=train_ds, upper_dataset=target_ds)
        trainer.train()
        trainer.mixture_weights()   # {domain: weight}, sums to 1
    """

    def __init__(
        self,
        model: nn.Module | None = None,
        args: BROSConfig | None = None,
        train_dataset: Any = None,
        upper_dataset: Any = None,
        eval_dataset: Any = None,
        data_collator: Any = None,
        **kwargs: Any,
    ):
        if args is None:
            args = BROSConfig(output_dir="bros_output")
        if not isinstance(args, BROSConfig):
            raise TypeError(f"BROSTrainer needs a BROSConfig, got {type(args).__name__}.")
        if train_dataset is None:
            raise ValueError("BROSTrainer needs a train_dataset.")
        if upper_dataset is None:
            raise ValueError("BROSTrainer needs an upper_dataset (the target set the upper level is learned on).")
        keyed_train, names = attach_keys(train_dataset, args.upper_level, args.domain_column, args.domains)
        self.domains = names
        super().__init__(
            model=model,
            args=args,
            train_dataset=keyed_train,
            eval_dataset=eval_dataset,
            data_collator=data_collator,
            **kwargs,
        )
        self._check_backend()
        self._train_keys = self._read_keys(keyed_train)
        self._label_space = self._check_label_space(train_dataset, upper_dataset)
        self._domain_monitor = self._build_domain_monitor()
        self.upper = self._build_upper_variable(upper_dataset)
        self.upper_stream = UpperStream(
            self._prepare_upper_dataset(upper_dataset),
            self._upper_collator(upper_dataset),
            args.upper_batch_size or args.per_device_train_batch_size,
            seed=args.data_seed if args.data_seed is not None else args.seed,
            rank=args.process_index,
            world_size=args.world_size,
        )
        self.data_collator = KeyedCollator(
            self.data_collator,
            drop=self._dropped_columns(),
            # The Trainer's eval loader collates with this one too.
            check=functools.partial(self._label_space.check_batch, where="training (or evaluation) set"),
        )
        self.engine: BilevelEngine | None = None
        self._coordinates: dict[str, nn.Parameter] = {}
        self._accumulated: dict[str, Any] = {}
        self._micro_steps = 0
        self._skip_lower = False
        self.mixture_history: list[list[float]] = []
        self._metrics: dict[str, list[float]] = defaultdict(list)
        self.add_callback(BilevelExportCallback(self))

    # ------------------------------------------------------------------ setup and validation
    def _check_backend(self) -> None:
        if self.is_fsdp_enabled or self.is_deepspeed_enabled:
            raise ValueError(
                "FSDP and DeepSpeed are not supported by BROSTrainer (parameters are sharded or freed after "
                "backward, which breaks the second-order passes). Use DDP: accelerate launch --multi_gpu."
            )

    def _check_label_space(self, train_dataset: Any, upper_dataset: Any) -> LabelSpace:
        """Refuse labels / token ids outside the model's label space now, for whole ``datasets``
        columns; the returned space also checks every collated batch. A custom per_example_loss
        defines its own label semantics, so then only input_ids are checked."""
        default_loss = type(self).per_example_loss is BROSTrainer.per_example_loss
        space = LabelSpace.of(self.model, check_labels=default_loss)
        space.check_dataset(train_dataset, "training set")
        space.check_dataset(upper_dataset, "upper (target) set")
        return space

    def _build_domain_monitor(self) -> DomainPresenceMonitor | None:
        if self.args.upper_level != "domain":
            return None
        args = self.args
        per_step = args.per_device_train_batch_size * args.gradient_accumulation_steps * args.world_size
        return DomainPresenceMonitor(self.domains, per_step, balanced=args.balanced_domain_batches)

    @staticmethod
    def _read_keys(dataset: Any) -> list[int]:
        if hasattr(dataset, "column_names"):
            return list(dataset.with_format(None)[KEY_COLUMN])
        return list(dataset.keys)

    def _build_upper_variable(self, upper_dataset: Any) -> UpperVariable:
        args = self.args
        if args.upper_level == "sample":
            return SampleWeights(len(self._train_keys)).to(args.device)
        column = args.domain_column
        if hasattr(upper_dataset, "column_names") and column in upper_dataset.column_names:
            unseen = sorted({str(v) for v in upper_dataset.with_format(None)[column]} - set(self.domains))
            if unseen:
                raise ValueError(
                    f"The upper (target) set has domains {unseen} that the training set never contains "
                    f"(training domains: {self.domains}). Add training data for them or filter the target set."
                )
        return DomainMixture(self.domains, floor=args.mixture_floor).to(args.device)

    def _dropped_columns(self) -> list[str]:
        return [self.args.domain_column] if self.args.upper_level == "domain" else []

    def _prepare_upper_dataset(self, dataset: Any) -> Any:
        if not hasattr(dataset, "__len__") or not hasattr(dataset, "__getitem__"):
            raise ValueError(
                f"upper_dataset must be map-style (support len() and [i]), got {type(dataset).__name__}. "
                "Materialise it first, e.g. datasets.Dataset.from_generator(lambda: (yield from ds))."
            )
        if len(dataset) == 0:
            raise ValueError("The upper (target) set is empty: pass a non-empty upper_dataset.")
        if hasattr(dataset, "column_names"):
            return self._remove_unused_columns(dataset, description="upper")
        return dataset

    def _upper_collator(self, upper_dataset: Any):
        """The training collator; non-``datasets`` upper sets get unused keys removed at collation."""
        collator = self.data_collator
        if not hasattr(upper_dataset, "column_names"):
            collator = self._get_collator_with_removed_columns(collator, description="upper")
        check = functools.partial(self._label_space.check_batch, where="upper (target) set")
        return KeyedCollator(collator, drop=self._dropped_columns(), check=check)

    def _set_signature_columns_if_needed(self) -> None:
        if self._signature_columns is None and hasattr(self.model, "_orig_mod"):
            # A torch.compile'd model exposes forward(*args, **kwargs); read the original signature.
            compiled, self.model = self.model, self.model._orig_mod
            try:
                super()._set_signature_columns_if_needed()
            finally:
                self.model = compiled
        super()._set_signature_columns_if_needed()
        if KEY_COLUMN not in self._signature_columns:
            self._signature_columns.append(KEY_COLUMN)

    def _get_train_sampler(self, train_dataset: Any = None):
        if self.args.upper_level == "domain" and self.args.balanced_domain_batches:
            seed = self.args.data_seed if self.args.data_seed is not None else self.args.seed
            return BalancedDomainSampler(self._train_keys, len(self.domains), seed=seed)
        return super()._get_train_sampler(train_dataset)

    # ------------------------------------------------------------------ optimizer in coordinates
    def _bilevel_model(self) -> nn.Module:
        return self.accelerator.unwrap_model(self.model, keep_torch_compile=False)

    def _trainable_parameters(self) -> dict[str, nn.Parameter]:
        params = {n: p for n, p in self._bilevel_model().named_parameters() if p.requires_grad}
        if not params:
            raise ValueError("The model has no trainable parameters (requires_grad=True).")
        return params

    def create_optimizer(self, model: nn.Module | None = None) -> torch.optim.Optimizer:
        """The Trainer's optimizer class and kwargs, over r-dim coordinates of U instead of θ
        (over θ itself for tensors whose U is the identity: 1-D and small tensors, and
        ``lower_full_space_modules``).

        Weight decay is applied to θ directly (θ ← θ(1 − lr·wd) for the Trainer's decay parameters),
        since coordinates are zero before every step.
        """
        if self.optimizer is not None:
            return self.optimizer
        params = self._trainable_parameters()
        check_subspace_coverage(params, self.args.subspace_rank, self.args.bilevel_method)
        hparams = self.args.bilevel_hyperparameters()
        if self.args.bilevel_method == "bros":
            modules = self.args.lower_full_space_modules
            full = full_space_parameter_names(self._bilevel_model(), modules, params)
            hparams = dataclasses.replace(hparams, lower_full_space=tuple(full))
        perturber = LowRankPerturber(self._bilevel_model())
        self.engine = BilevelEngine(params, self.upper, hparams, seed=self.args.seed, perturber=perturber)
        # Sketched tensors: r-dim coordinates a of U, zero before every step. Full-space ones (U = I):
        # θ itself, as in a plain Trainer (a zero copy of θ would only add its size in memory).
        self._coordinates = {
            n: p
            if self.engine.sketch_u.matrices[n] is None
            else nn.Parameter(torch.zeros(self.engine.sketch_u.coordinate_shape(n, p), device=p.device))
            for n, p in params.items()
        }
        decay_names = set(self.get_decay_parameter_names(self._bilevel_model()))
        self._decay_names = [n for n in params if n in decay_names]
        optimizer_cls, optimizer_kwargs = self.get_optimizer_cls_and_kwargs(self.args, self._bilevel_model())
        optimizer_kwargs = {k: v for k, v in optimizer_kwargs.items() if k != "weight_decay"}
        groups = [{"params": list(self._coordinates.values()), "weight_decay": 0.0}]
        self.optimizer = optimizer_cls(groups, **optimizer_kwargs)
        self.optimizer.register_step_post_hook(self._fold_coordinates)
        return self.optimizer

    @torch.no_grad()
    def _fold_coordinates(self, optimizer: torch.optim.Optimizer, *_: Any) -> None:
        """After the optimizer moved the coordinates a from 0: θ ← θ(1 − lr·wd) + U a, then a ← 0.

        (Full-space tensors were updated in place by the optimizer; they only take the decay.)"""
        if self._skip_lower:
            return
        lr = optimizer.param_groups[0]["lr"]
        if self.args.weight_decay > 0:
            for name in self._decay_names:
                self.engine.params[name].mul_(1.0 - lr * self.args.weight_decay)
        sketched = {n: c for n, c in self._coordinates.items() if c is not self.engine.params[n]}
        self.engine.apply_coordinates({n: c.detach() for n, c in sketched.items()})
        for coordinate in sketched.values():
            coordinate.zero_()

    def _reset_subspace_optimizer_state(self) -> None:
        """A new lower subspace U: coordinates of sketched tensors now mean something else; drop their state."""
        inner = getattr(self.optimizer, "optimizer", self.optimizer)
        for name, coordinate in self._coordinates.items():
            if self.engine.sketch_u.matrices[name] is not None:
                inner.state.pop(coordinate, None)

    def _clip_grad_norm(self, model: nn.Module) -> Tensor:
        return torch.nn.utils.clip_grad_norm_(list(self._coordinates.values()), self.args.max_grad_norm)

    def _get_grad_norm(self, model: nn.Module, grad_norm: Tensor | None = None) -> Tensor:
        if grad_norm is None:
            grads = {n: c.grad for n, c in self._coordinates.items() if c.grad is not None}
            grad_norm = global_norm(grads)
        return grad_norm

    # ------------------------------------------------------------------ losses
    def per_example_loss(self, outputs: Any, labels: Tensor) -> Tensor:
        """ℓ_i for every example of the batch; override for heads other than causal LM / classification."""
        return per_example_losses(outputs, labels)

    def _second_order_context(self) -> contextlib.AbstractContextManager:
        if self.args.hessian_mode == "autograd":
            # SDPA's fused CPU/CUDA kernels have no double backward; the math kernel does.
            return sdpa_kernel(SDPBackend.MATH)
        return contextlib.nullcontext()

    def _losses(self, params: Mapping[str, Tensor], inputs: Mapping[str, Any]) -> Tensor:
        model_inputs = {k: v for k, v in inputs.items() if k not in ("labels", KEY_COLUMN)}
        if "labels" not in inputs:
            raise ValueError(
                "Bilevel training needs `labels` in every training and upper batch (per-example losses for g and "
                f"f); this batch has {sorted(k for k in inputs if k != KEY_COLUMN)}. Add a labels column (causal LM: "
                "labels = input_ids, e.g. DataCollatorForLanguageModeling(tokenizer, mlm=False)) or a collator that "
                "builds it."
            )
        with self.compute_loss_context_manager():
            outputs = functional_call(self._bilevel_model(), dict(params), args=(), kwargs=model_inputs, strict=False)
        return self.per_example_loss(outputs, inputs["labels"])

    # ------------------------------------------------------------------ the bilevel step
    def training_step(
        self, model: nn.Module, inputs: dict[str, Any], num_items_in_batch: Any = None
    ) -> Tensor:
        model.train()
        inputs = self._prepare_inputs(inputs)
        engine = self.engine
        if self._micro_steps == 0:
            if engine.begin_step():
                self._reset_subspace_optimizer_state()
            self._accumulated = {}
        keys = inputs[KEY_COLUMN]
        upper_batch = self._prepare_inputs(self.upper_stream.next_batch())

        def lower_loss(lam: Tensor, params: dict[str, Tensor]) -> Tensor:
            losses = self._losses(params, inputs)
            return (self.upper.coefficients(keys, lam).to(losses.dtype) * losses).mean()

        def upper_pass() -> tuple[Tensor, dict[str, Tensor]]:
            return engine.upper_terms(lambda p: self._losses(p, upper_batch).mean())

        # Whatever a pass returns is held through the passes after it, so the pass with the highest peak runs
        # first: the double backward (autograd); with finite differences, the upper pass, so that no full-size
        # lower gradient (full-space tensors) is held through another pass.
        with self._second_order_context():
            if self.args.hessian_mode == "autograd":
                lower = engine.lower_terms(lower_loss)
                upper_loss, upper_grad = upper_pass()
            else:
                upper_loss, upper_grad = upper_pass()
                lower = engine.lower_terms(lower_loss)

        scale = 1.0 / self.current_gradient_accumulation_steps
        terms = {
            "grad": lower.grad,
            "hessian_action": lower.hessian_action,
            "upper_grad": upper_grad,
            "cross": {"cross": lower.cross},
            "losses": {"lower": lower.loss.reshape(1).float(), "upper": upper_loss.reshape(1).float()},
        }
        if self._domain_monitor is not None:  # all-reduced with the rest: presence counts over all processes
            terms["domain_counts"] = {"counts": torch.bincount(keys, minlength=len(self.domains))}
        for group, tensors in terms.items():
            acc = self._accumulated.setdefault(group, {})
            for name, value in tensors.items():
                value = value.detach().float() * scale
                acc[name] = acc[name] + value if name in acc else value
        self._micro_steps += 1
        if self.accelerator.sync_gradients:
            self._finish_step()
        return lower.loss.detach().to(self.args.device) * scale

    def _all_reduce_mean(self, groups: dict[str, dict[str, Tensor]]) -> None:
        """Average every accumulated tensor over processes with one flat all-reduce (in place)."""
        world = self.accelerator.num_processes
        if world == 1:
            return
        tensors = [t for group in groups.values() for t in group.values()]
        flat = torch.cat([t.reshape(-1) for t in tensors])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        flat /= world
        offset = 0
        for group in groups.values():
            for name, t in group.items():
                group[name] = flat[offset : offset + t.numel()].view_as(t)
                offset += t.numel()

    def _finish_step(self) -> None:
        acc = self._accumulated
        self._micro_steps = 0
        self._all_reduce_mean(acc)
        engine = self.engine
        lower_loss = float(acc["losses"]["lower"])
        upper_loss = float(acc["losses"]["upper"])
        finite = (
            math.isfinite(lower_loss)
            and math.isfinite(upper_loss)
            and all(
                bool(torch.isfinite(t).all())
                for group in ("grad", "hessian_action", "upper_grad", "cross")
                for t in acc[group].values()
            )
        )
        hypergradient = -acc["cross"]["cross"]
        self._skip_lower = not finite
        if self._domain_monitor is not None:
            self._domain_monitor.observe(acc["domain_counts"]["counts"], step=self.state.global_step + 1)
        if finite:
            engine.update_auxiliary(acc["hessian_action"], acc["upper_grad"])
            engine.update_upper(hypergradient)
            for name, coordinate in self._coordinates.items():
                coordinate.grad = acc["grad"][name].to(coordinate.dtype)
        else:
            warnings.warn(
                f"Non-finite bilevel quantities at optimizer step {self.state.global_step + 1} (lower loss "
                f"{lower_loss}, upper loss {upper_loss}): skipping the lower, auxiliary and upper updates of this "
                "step. Look for NaN/inf in that step's training or upper batch; if the losses overflow, lower "
                "learning_rate / aux_learning_rate or train in bf16 instead of fp16.",
                RuntimeWarning,
                stacklevel=2,
            )
            for coordinate in self._coordinates.values():
                coordinate.grad = None
        engine.end_step()
        if self.args.upper_level == "domain":
            self.mixture_history.append(self.upper.weights().tolist())
        self._record_metrics(lower_loss, upper_loss, hypergradient, finite)

    def _record_metrics(self, lower_loss: float, upper_loss: float, hypergradient: Tensor, finite: bool) -> None:
        m = self._metrics
        m["bilevel/upper_loss"].append(upper_loss)
        m["bilevel/lower_loss"].append(lower_loss)
        m["bilevel/hypergrad_norm"].append(float(hypergradient.norm()) if finite else float("nan"))
        m["bilevel/z_norm"].append(float(global_norm(self.engine.z)))
        m["bilevel/skipped_steps"].append(0.0 if finite else 1.0)
        if self.args.upper_level == "domain":
            for name, weight in self.upper.as_dict().items():
                m[f"mixture/{name}"].append(weight)
        else:
            weights = self.upper.weights()
            m["sample_weights/mean"].append(float(weights.mean()))
            m["sample_weights/min"].append(float(weights.min()))

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """Add the bilevel metrics (already averaged over processes) averaged since the last log."""
        if self._metrics:
            for key, values in self._metrics.items():
                finite = [v for v in values if math.isfinite(v)]
                logs[key] = sum(finite) / len(finite) if finite else float("nan")
            self._metrics.clear()
        super().log(logs, start_time)

    # ------------------------------------------------------------------ results
    def mixture_weights(self) -> dict[str, float]:
        """Domain mode: the learned mixture {domain: weight}, summing to 1."""
        if self.args.upper_level != "domain":
            raise ValueError("mixture_weights() is for upper_level='domain'; use sample_weights().")
        return self.upper.as_dict()

    def average_mixture_weights(self) -> dict[str, float]:
        """Domain mode: the time-averaged mixture (1/k) Σ_j w(λ_j) over upper updates."""
        if self.args.upper_level != "domain":
            raise ValueError("average_mixture_weights() is for upper_level='domain'.")
        return self.upper.as_dict(self.upper.average_weights())

    def sample_weights(self) -> Tensor:
        """Sample mode: σ(λ_i) for every training example, aligned with train_dataset order."""
        if self.args.upper_level != "sample":
            raise ValueError("sample_weights() is for upper_level='sample'; use mixture_weights().")
        return self.upper.weights().detach().cpu()

    # ------------------------------------------------------------------ checkpoints
    def _bilevel_state(self) -> dict[str, Any]:
        coordinate_shapes = {n: list(c.shape) for n, c in self._coordinates.items()}
        return {
            "engine": self.engine.state_dict(),
            "upper_stream": self.upper_stream.state_dict(),
            "mixture_history": torch.tensor(self.mixture_history, dtype=torch.float64),
            "coordinate_shapes": coordinate_shapes,
            "upper_level": self.args.upper_level,
            "domains": list(self.domains or []),
        }

    def _save_checkpoint(self, model: nn.Module, trial: Any) -> None:
        """``Trainer._save_checkpoint`` made atomic: write ``tmp-checkpoint-N``, rename it ``checkpoint-N``.

        transformers (5.x) writes ``checkpoint-N`` in place and has no atomic save: a process killed
        mid-save leaves a half-written folder that ``get_last_checkpoint`` resumes from. So this is
        the same sequence of steps, hand-written, into a staging folder that only becomes
        ``checkpoint-N`` (one ``os.replace`` by the saving process) once every rank has written its
        files. Before anything is written, the ranks must agree bit for bit on λ, h, z and θ.
        """
        self._check_ranks_agree()
        if self.hp_search_backend is None and trial is None:
            self.store_flos()
        run_dir = self._get_output_dir(trial=trial)
        final_dir = os.path.join(run_dir, f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}")
        staging_dir = os.path.join(run_dir, STAGING_PREFIX + os.path.basename(final_dir))
        if self.args.should_save:
            remove_staging_folders(run_dir)  # left by a crashed save; nobody writes into them now
        self.accelerator.wait_for_everyone()
        self._track_best_checkpoint(run_dir)
        self._write_checkpoint(staging_dir)
        self.accelerator.wait_for_everyone()  # every rank's files are in the staging folder
        if self.args.should_save:
            publish_folder(staging_dir, final_dir)
        self.accelerator.wait_for_everyone()  # nobody rotates, pushes or reads before the rename
        if self.args.push_to_hub:
            self._push_from_checkpoint(final_dir)
        if self.args.should_save:
            rotate_checkpoints(
                output_dir=run_dir,
                save_total_limit=self.args.save_total_limit,
                best_model_checkpoint=self.state.best_model_checkpoint,
                use_mtime=True,
            )

    def _write_checkpoint(self, output_dir: str) -> None:
        """Every file of a checkpoint, as ``Trainer._save_checkpoint`` writes them, plus the learned weights."""
        self.save_model(output_dir, _internal_call=True)
        if not self.args.save_only_model:
            self._save_optimizer_and_scheduler(output_dir)
            self._save_scaler(output_dir)
            self._save_rng_state(output_dir)
        if self.args.should_save:
            self._store_callback_states()
            self.state.save_to_json(os.path.join(output_dir, TRAINER_STATE_NAME))
            if self.engine is not None:
                self.export_weights(output_dir)
                save_plot(self, output_dir)

    def _track_best_checkpoint(self, run_dir: str) -> None:
        """As the Trainer does, but by final folder name: the current step's folder does not exist yet."""
        best_step = self.state.best_global_step
        saving_steps = (SaveStrategy.STEPS, SaveStrategy.EPOCH, SaveStrategy.BEST)
        if not best_step or self.args.save_strategy not in saving_steps:
            return
        best_dir = os.path.join(run_dir, f"{PREFIX_CHECKPOINT_DIR}-{best_step}")
        if best_step == self.state.global_step or os.path.exists(best_dir):
            self.state.best_model_checkpoint = best_dir

    def _store_callback_states(self) -> None:
        """As the Trainer does: record stateful callbacks (and the TrainerControl) in the trainer state."""
        candidates = [*self.callback_handler.callbacks, self.control]
        for callback in (cb for cb in candidates if isinstance(cb, ExportableState)):
            name = callback.__class__.__name__
            if isinstance(self.state.stateful_callbacks[name], list):
                self.state.stateful_callbacks[name].append(callback.state())
            else:
                self.state.stateful_callbacks[name] = callback.state()

    def _consistency_fingerprints(self) -> dict[str, dict[str, str]]:
        """SHA-256 per tensor of λ, h, z and θ (trainable parameters), keyed by quantity then tensor name."""
        quantities = {
            "λ (upper.logits)": {"logits": self.upper.logits},
            "h (upper.momentum)": {"momentum": self.upper.momentum},
            "z (engine.z)": self.engine.z,
            "θ (trainable parameters)": self.engine.params,
        }
        return {q: {n: tensor_digest(t) for n, t in tensors.items()} for q, tensors in quantities.items()}

    def _check_ranks_agree(self) -> None:
        """Raise if λ, h, z or θ differ in any bit across processes (no-op on one process).

        Every update is computed from all-reduced quantities, so any difference is a bug (or a
        non-deterministic kernel); a checkpoint saved then would resume each rank differently.
        Every rank receives all fingerprints and raises the same error, so none waits in a barrier.
        """
        if self.engine is None or self.accelerator.num_processes == 1:
            return
        gathered: list[Any] = [None] * self.accelerator.num_processes
        dist.all_gather_object(gathered, self._consistency_fingerprints())
        mismatches = rank_mismatches(gathered)
        if mismatches:
            raise RuntimeError(
                f"Cross-rank consistency check failed at step {self.state.global_step}; no checkpoint was saved "
                "for this step. " + " ".join(mismatches)
            )

    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        super()._save_optimizer_and_scheduler(output_dir)
        os.makedirs(output_dir, exist_ok=True)
        if self.engine is None:
            return
        path = os.path.join(output_dir, STATE_FILE.format(rank=self.args.process_index))
        tmp = f"{path}.tmp"
        torch.save(self._bilevel_state(), tmp)
        os.replace(tmp, path)

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        super()._load_optimizer_and_scheduler(checkpoint)
        if checkpoint is None or self.engine is None:
            return
        path = os.path.join(checkpoint, STATE_FILE.format(rank=self.args.process_index))
        if not os.path.exists(path):
            path = os.path.join(checkpoint, STATE_FILE.format(rank=0))
        if not os.path.exists(path):
            raise FileNotFoundError(
                f"{checkpoint} has no bilevel state ({STATE_FILE.format(rank=0)}): it was not written by "
                "BROSTrainer, so λ, h and z cannot be restored."
            )
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as error:  # truncated or tampered files: say which file, never unpickle code
            raise ValueError(f"Cannot read bilevel state {path}: {error}") from error
        domains = list(self.domains or [])
        if state["upper_level"] != self.args.upper_level or list(state["domains"]) != domains:
            raise ValueError(
                f"Refusing to resume: the checkpoint has upper_level={state['upper_level']!r}, domains="
                f"{state['domains']}, this run has upper_level={self.args.upper_level!r}, domains={self.domains}."
            )
        self.engine.load_state_dict(state["engine"])
        self.upper_stream.load_state_dict(state["upper_stream"])
        self.mixture_history = state["mixture_history"].tolist()

    def export_weights(self, output_dir: str) -> str:
        """Write mixture_weights.json / sample_weights.json (atomically) and a PNG plot into ``output_dir``."""
        os.makedirs(output_dir, exist_ok=True)
        step = self.state.global_step
        if self.args.upper_level == "domain":
            payload = {
                "domains": list(self.domains),
                "final": self.mixture_weights(),
                "average": self.average_mixture_weights(),
                "step": step,
            }
            path = os.path.join(output_dir, "mixture_weights.json")
        else:
            weights = self.sample_weights().tolist()
            payload = {"step": step, "weights": {str(i): w for i, w in enumerate(weights)}}
            path = os.path.join(output_dir, "sample_weights.json")
        write_json_atomic(path, payload)
        return path


def tensor_digest(tensor: Tensor) -> str:
    """SHA-256 of a tensor's dtype, shape and raw bytes: equal digests mean bit-identical tensors."""
    flat = tensor.detach().contiguous().reshape(-1).cpu()
    digest = hashlib.sha256(f"{flat.dtype}{tuple(tensor.shape)}".encode())
    digest.update(flat.view(torch.uint8).numpy())
    return digest.hexdigest()


def rank_mismatches(fingerprints: Sequence[Mapping[str, Mapping[str, str]]], shown: int = 3) -> list[str]:
    """One sentence per quantity whose tensors differ across ranks, naming the tensors and the ranks.

    ``fingerprints[rank][quantity][tensor name]`` is a digest; ranks are grouped by equal digests,
    e.g. "z (engine.z) differs across ranks: net.0.weight (ranks [0] vs [1])".
    """
    sentences = []
    for quantity in fingerprints[0]:
        names = dict.fromkeys(name for ranks in fingerprints for name in ranks[quantity])
        differing = []
        for name in names:
            groups: dict[str | None, list[int]] = defaultdict(list)
            for rank, ranks in enumerate(fingerprints):
                groups[ranks[quantity].get(name)].append(rank)
            if len(groups) > 1:
                differing.append(f"{name} (ranks " + " vs ".join(str(r) for r in groups.values()) + ")")
        if differing:
            more = f" and {len(differing) - shown} more tensors" if len(differing) > shown else ""
            sentences.append(f"{quantity} differs across ranks: {', '.join(differing[:shown])}{more}.")
    return sentences


def remove_staging_folders(run_dir: str) -> None:
    """Delete ``tmp-checkpoint-*`` folders: leftovers of saves that crashed before their rename."""
    if not os.path.isdir(run_dir):
        return
    for name in os.listdir(run_dir):
        path = os.path.join(run_dir, name)
        if _STAGING_FOLDER.match(name) and os.path.isdir(path):
            shutil.rmtree(path)


def publish_folder(staging_dir: str, final_dir: str) -> None:
    """Rename a complete staging folder to its final name, replacing an existing folder of that name.

    ``os.replace`` cannot replace a non-empty folder, so an existing one (a re-run of the same step
    after resuming from an earlier checkpoint) is first renamed aside, under a staging name, and
    deleted last: at every instant ``final_dir`` is absent or a complete checkpoint.
    """
    if os.path.isdir(final_dir):
        aside = f"{staging_dir}.replaced"
        shutil.rmtree(aside, ignore_errors=True)
        os.replace(final_dir, aside)
        os.replace(staging_dir, final_dir)
        shutil.rmtree(aside)
    else:
        os.replace(staging_dir, final_dir)
