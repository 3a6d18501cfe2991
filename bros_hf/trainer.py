"""BROSTrainer: the bilevel step inside the Hugging Face Trainer's loop.

The lower level is the model's trainable parameters θ (with PEFT, the adapters); the upper level
is a domain mixture or per-example weights (:mod:`bros_hf.upper`). Each optimizer step
(``gradient_accumulation_steps`` micro-batches) runs, through :class:`~bros_hf.solver.BilevelEngine`:

- on every micro-batch ξ: Pᵀ∇g, Pᵀ H Q Qᵀ z and ∂_λ⟨∇_θ g, S_P z⟩ (one lower pass), and on an
  upper micro-batch ζ from the endless upper stream: Pᵀ∇f; all averaged over micro-batches;
- at the accumulation boundary: an all-reduce (mean over processes) of these small tensors, then
  z ← Π_R(z − γ_n P(·)), h and λ (MA-SOBA), and the lower update through the Trainer's optimizer,
  which holds its state in the r-dim coordinates a and is folded into θ ← θ + P Δa after each step.

The extra passes run on the unwrapped model (no DDP, no torch.compile wrapper): DDP's hooks would
all-reduce full gradients, and DDP/compile break double backward (DESIGN.md §4).
"""

from __future__ import annotations

import contextlib
import math
import os
import warnings
from collections import defaultdict
from collections.abc import Mapping
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.func import functional_call
from torch.nn.attention import SDPBackend, sdpa_kernel
from transformers import Trainer

from bros_hf.callbacks import BilevelExportCallback, write_json_atomic
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
from bros_hf.solver import BilevelEngine
from bros_hf.upper import DomainMixture, SampleWeights, UpperVariable

STATE_FILE = "bros_state_rank{rank}.pt"


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
        self.upper = self._build_upper_variable(upper_dataset)
        self.upper_stream = UpperStream(
            self._prepare_upper_dataset(upper_dataset),
            self._upper_collator(upper_dataset),
            args.upper_batch_size or args.per_device_train_batch_size,
            seed=args.data_seed if args.data_seed is not None else args.seed,
            rank=args.process_index,
            world_size=args.world_size,
        )
        self.data_collator = KeyedCollator(self.data_collator, drop=self._dropped_columns())
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
            raise ValueError("upper_dataset must be map-style (support len() and [i]).")
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
        return KeyedCollator(collator, drop=self._dropped_columns())

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
        """The Trainer's optimizer class and kwargs, over r-dim coordinates instead of θ.

        Weight decay is applied to θ directly (θ ← θ(1 − lr·wd) for the Trainer's decay parameters),
        since coordinates are zero before every step.
        """
        if self.optimizer is not None:
            return self.optimizer
        params = self._trainable_parameters()
        self.engine = BilevelEngine(
            params,
            self.upper,
            self.args.bilevel_hyperparameters(),
            seed=self.args.seed,
            perturber=LowRankPerturber(self._bilevel_model()),
        )
        shapes = {n: self.engine.sketch_p.coordinate_shape(n, p) for n, p in params.items()}
        self._coordinates = {
            n: nn.Parameter(torch.zeros(shapes[n], device=p.device, dtype=torch.float32)) for n, p in params.items()
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
        """After the optimizer moved the coordinates a from 0: θ ← θ(1 − lr·wd) + P a, then a ← 0."""
        if self._skip_lower:
            return
        lr = optimizer.param_groups[0]["lr"]
        if self.args.weight_decay > 0:
            for name in self._decay_names:
                self.engine.params[name].mul_(1.0 - lr * self.args.weight_decay)
        self.engine.apply_coordinates({n: c.detach() for n, c in self._coordinates.items()})
        for coordinate in self._coordinates.values():
            coordinate.zero_()

    def _reset_subspace_optimizer_state(self) -> None:
        """New sketches: coordinates of sketched tensors now mean something else; drop their state."""
        inner = getattr(self.optimizer, "optimizer", self.optimizer)
        for name, coordinate in self._coordinates.items():
            if self.engine.sketch_p.matrices[name] is not None:
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
            raise ValueError("Bilevel training needs `labels` in every batch (for g and f).")
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

        with self._second_order_context():
            lower = engine.lower_terms(lower_loss)
            upper_loss, upper_grad = engine.upper_terms(lambda p: self._losses(p, upper_batch).mean())

        scale = 1.0 / self.current_gradient_accumulation_steps
        terms = {
            "grad": lower.grad,
            "hessian_action": lower.hessian_action,
            "upper_grad": upper_grad,
            "cross": {"cross": lower.cross},
            "losses": {"lower": lower.loss.reshape(1).float(), "upper": upper_loss.reshape(1).float()},
        }
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
        finite = math.isfinite(lower_loss) and math.isfinite(upper_loss) and all(
            bool(torch.isfinite(t).all()) for group in ("grad", "hessian_action", "upper_grad", "cross")
            for t in acc[group].values()
        )
        hypergradient = -acc["cross"]["cross"]
        self._skip_lower = not finite
        if finite:
            engine.update_auxiliary(acc["hessian_action"], acc["upper_grad"])
            engine.update_upper(hypergradient)
            for name, coordinate in self._coordinates.items():
                coordinate.grad = acc["grad"][name].to(coordinate.dtype)
        else:
            warnings.warn(
                f"Non-finite bilevel quantities at step {self.state.global_step} (lower loss {lower_loss}, upper "
                f"loss {upper_loss}): skipping the lower, auxiliary and upper updates of this step.",
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
        if state["upper_level"] != self.args.upper_level or list(state["domains"]) != list(self.domains or []):
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

