"""BROSConfig: every bilevel knob on top of ``transformers.TrainingArguments``.

TRL-style dataclass: each field has help text (and choices where they apply), parses with
``HfArgumentParser`` and is validated in ``__post_init__``. The lower level uses the usual
``TrainingArguments`` fields (``learning_rate``, ``optim``, ``weight_decay``, scheduler,
``max_grad_norm``, batch sizes, ``gradient_accumulation_steps``, ``bf16``...).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from transformers import TrainingArguments

from bros_hf.core.engine import BilevelHyperparameters
from bros_hf.core.estimators import DEFAULT_FD_EPS, DEFAULT_FD_EPS_HALF_PRECISION
from bros_hf.core.upper import DEFAULT_RMS_DECAY

# upper_update="normalized": measured on known-answer mixture tasks (interior optima, loss ×1 and ×10, a
# vertex) and noisy-label tasks; see the README's "Tuning" notes.
# Domain mixtures: the logits may travel about this far over the run (α = travel / upper steps; 0.005 at
# 1000 steps). Example weights: a fixed α (an example's logit moves only when it is in the batch); 0.25 rather than
# 0.5 averages more of BROS's noisier per-example hypergradients (ViT recipe AUROC 0.920 vs 0.892; MA-SOBA 0.954 vs
# 0.951; the MLP benchmark and hyper-data cleaning equal or better).
DOMAIN_LOGIT_TRAVEL = 5.0
DEFAULT_SAMPLE_UPPER_LR = 0.25
# Adafactor: transformers' own, as the Trainer builds it for optim="adafactor" (an absolute step size, lr); its
# factored second moment holds m + n floats for an [m, n] tensor instead of AdamW's 2mn.
SUPPORTED_OPTIMIZERS = ("adamw_torch", "adamw_torch_fused", "sgd", "adagrad", "rmsprop", "adafactor")


@dataclass
class BROSConfig(TrainingArguments):
    """Training arguments plus the bilevel (upper level, auxiliary, sketch) configuration."""

    bilevel_method: str = field(
        default="bros",
        metadata={
            "help": "'bros': lower and auxiliary updates in random subspaces with the bi-probe correction. "
            "'masoba': full-space MA-SOBA (identity sketches; the baseline).",
            "choices": ["bros", "masoba"],
        },
    )
    upper_level: str = field(
        default="domain",
        metadata={
            "help": "'domain': learn a mixture over the values of `domain_column`. "
            "'sample': learn one weight per training example.",
            "choices": ["domain", "sample"],
        },
    )
    domain_column: str = field(
        default="domain",
        metadata={"help": "Column of the training set holding each example's domain (name or id)."},
    )
    domains: list[str] | None = field(
        default=None,
        metadata={
            "help": "Fixed list of domain names (default: the sorted distinct values of domain_column). A listed "
            "domain without training examples, or an example of an unlisted domain, is an error."
        },
    )
    subspace_rank: int = field(
        default=16,
        metadata={"help": "Rank r of the random subspaces (bros only). Tensors whose input dimension is ≤ r stay full-space."},
    )
    sketch_kind: str = field(
        default="rademacher",
        metadata={"help": "Distribution of the sketch entries (variance 1/r).", "choices": ["rademacher", "gaussian"]},
    )
    lower_full_space_modules: list[str] = field(
        default_factory=lambda: ["embeddings"],
        metadata={
            "help": "Modules whose lower-level update is full-space (U = I) while their auxiliary probes P, Q stay "
            "random (bros only). 'embeddings': the model's input and output embeddings (get_input_embeddings / "
            "get_output_embeddings), as GaLore keeps them full-rank: they hold per-token rows that a rank-r update "
            "learns slowly (benchmarks/README.md). Other entries match module names like peft's target_modules "
            "(exact or dotted suffix, e.g. 'lm_head'). 'none': every matrix in a rank-r subspace (the paper's setting; "
            "least memory)."
        },
    )
    full_space_modules: list[str] = field(
        default_factory=lambda: ["head"],
        metadata={
            "help": "Modules whose tensors are full-space in every update (P = Q = U = I; bros only): their lower "
            "update and their part of the auxiliary z are exact, at the memory of a full-space tensor. 'head': the "
            "classification head if the model has one (modules named 'classifier' or 'score', which peft also keeps "
            "fully trainable for classification); a head with few classes is no larger than its own sketch, and "
            "learning its part of z exactly ranks examples better in sample mode (README, Example weights). "
            "Other entries match module names as in lower_full_space_modules. 'none': sketch the head too."
        },
    )
    sketch_resample_interval: int = field(
        default=40,
        metadata={
            "help": "The lower update runs in a random subspace U redrawn every T optimizer steps; the lower "
            "optimizer's state lives in U's coordinates and is reset when U changes. The auxiliary probes P, Q "
            "are redrawn every step regardless. T=1 (U = P) is the analysed method; with AdamW, T=40 reached a "
            "lower loss in the same number of steps (target loss vs MA-SOBA: -1.3 vs +1.4 percent at T=1; +49 vs +95 percent "
            "with every matrix sketched; benchmarks/README.md), hence the default."
        },
    )
    hessian_mode: str = field(
        default="auto",
        metadata={
            "help": "How second-order terms are computed: 'finite_difference' (two first-order passes at θ ± δd "
            "give gradient, Hessian action and cross term; O(eps^2) bias; memory of a plain backward and about "
            "2-2.5x a plain step's time), 'autograd' (double backward restricted to the r-dim coordinates, "
            "exact, about 3x the memory) or 'auto' (the default): finite_difference, with finite_difference_eps "
            "chosen for the run's precision.",
            "choices": ["auto", "autograd", "finite_difference"],
        },
    )
    finite_difference_eps: float | None = field(
        default=None,
        metadata={
            "help": "hessian_mode='finite_difference': the passes at θ ± δd use δ‖d‖ = eps · max(‖θ‖, 1). They give "
            "the Hessian action (differences of gradients) and the cross term (differences of losses) at once. "
            f"Default: {DEFAULT_FD_EPS:g} in fp32, {DEFAULT_FD_EPS_HALF_PRECISION:g} when the run is in bf16 (bf16=True, "
            "accelerate's mixed_precision, or bf16/fp16 weights), where round-off swamps smaller differences "
            "(relative error of the Hessian action 0.33 at 2e-3, 0.03-0.05 at 2e-2: python -m benchmarks.fd_accuracy)."
        },
    )
    aux_learning_rate: float = field(
        default=0.05,
        metadata={"help": "Auxiliary step size γ for z ≈ H^{-1} ∇_θ f (before rank scaling)."},
    )
    aux_step_limit: float | None = field(
        default=1.0,
        metadata={
            "help": "Limit c in (0, 2) on the auxiliary step, relative to the step that shrinks z's error most in mean "
            "square (None: no limit). Without its ∇f part the step moves z by u = G P Pᵀ H S_Q z (G = diag(γ_n)); "
            "in mean square it contracts for factors κ < 2 E⟨z, u⟩ / E‖u‖² (norm weighted by G⁻¹) and diverges "
            "beyond, as when γ is too large for the model's curvature or for the variance of the sketched step (z "
            "then sits at z_norm_bound). Every γ_n is multiplied by κ = min(1, c · ⟨z, u⟩ / ‖u‖²) from running "
            "means of both, which the passes already give; logged as bilevel/aux_step_factor. It never lengthens "
            "a step, so runs whose γ was already stable are nearly unchanged."
        },
    )
    aux_step_scaling: str = field(
        default="rank_ratio",
        metadata={
            "help": "'rank_ratio': use γ·r/n for a tensor sketched along a dimension of size n (the variance of the "
            "bi-probe Hessian action grows like (n/r)^2); 'none': use γ everywhere.",
            "choices": ["rank_ratio", "none"],
        },
    )
    upper_update: str = field(
        default="normalized",
        metadata={
            "help": "How λ moves with the hypergradient D. 'normalized' (default): exponentiated gradient on the "
            "weights w with a normalised step: G = ∂F/∂w from D by the chain rule, h ← (1-ρ)h + ρG, "
            "v ← βv + (1-β)·mean(G²), λ ← λ − α ĥ/√v̂ (bias-corrected). Its steps do not depend on the scale of the "
            "losses, and G does not vanish at a vertex of the simplex, so a mixture can leave one. 'masoba': the "
            "paper's h ← (1-ρ)h + ρD, λ ← λ − αh, whose α must match the hypergradient's scale.",
            "choices": ["normalized", "masoba"],
        },
    )
    upper_learning_rate: float | None = field(
        default=None,
        metadata={
            "help": "Upper-level step size α. Default (None): with upper_update='normalized', for domain mixtures "
            "5 / (training steps − upper_warmup_steps), so that a domain's logit, which moves by at most about α "
            "per step, can travel about 5 over any run length (0.005 for 1000 steps); for example weights 0.25 (an "
            "example's logit moves only when it is in the batch); with 'masoba', 1.0."
        },
    )
    upper_rms_decay: float = field(
        default=DEFAULT_RMS_DECAY,
        metadata={"help": "upper_update='normalized': decay β of the running mean square v of the weight gradient G."},
    )
    moving_average_weight: float = field(
        default=0.1,
        metadata={"help": "MA-SOBA moving-average weight ρ ∈ (0, 1]: h ← (1-ρ) h + ρ D."},
    )
    upper_warmup_steps: int = field(
        default=0,
        metadata={"help": "Optimizer steps before the first upper-level (λ) update; θ and z are updated meanwhile."},
    )
    initial_sample_weights: str | None = field(
        default=None,
        metadata={
            "help": "Sample mode: a sample_weights.json written by an earlier run on the same training set (same "
            "order). Every weight starts at its learned value w_i (λ_i = log(w_i / (1 − w_i))) instead of 0.5 and "
            "keeps being learned. With a freshly initialised model this is the second stage that lets the weights "
            "act from the first step, before the model has fit the examples they push down."
        },
    )
    upper_batch_size: int | None = field(
        default=None,
        metadata={"help": "Per-device batch size of the upper (target) set; defaults to per_device_train_batch_size."},
    )
    z_norm_bound: float | None = field(
        default=5.0,
        metadata={
            "help": "Radius R of the projection Π_R of the auxiliary variable z ≈ H⁻¹∇f (None: no projection). z does "
            "not change with a common scale of the losses; it stayed ≤ 2.5 on healthy known-answer runs but grew "
            "without bound once the model memorised its training set (0.7 → 8.6 in 1200 steps) or when γ·H was "
            "unstable (losses ×10: 1.9 → 85 in 600 steps). The default radius caps both without changing the "
            "learned mixtures measured."
        },
    )
    z_dtype: str = field(
        default="float32",
        metadata={
            "help": "Storage of the auxiliary variable z (one value per trainable parameter). 'bfloat16' halves it "
            "(4 -> 2 bytes per parameter): each update is computed in float32, a block of rows at a time, and "
            "stochastically rounded back, so it is unbiased and small steps are not lost to rounding.",
            "choices": ["float32", "bfloat16"],
        },
    )
    mixture_floor: float = field(
        default=0.0,
        metadata={"help": "Domain mode: ε in w = (1-ε) softmax(λ) + ε/K, keeping every domain's weight ≥ ε/K."},
    )
    balanced_domain_batches: bool = field(
        default=True,
        metadata={
            "help": "Domain mode: draw training batches round-robin over domains so each batch holds every domain "
            "equally often (the learned weights are then directly a sampling mixture)."
        },
    )
    loss_normalization: str = field(
        default="sequence",
        metadata={
            "help": "How a batch's token losses become g and f. 'sequence' (default): ℓ_i is example i's mean token "
            "loss and a batch's loss the mean over examples, so a domain's (or example's) weight means the same "
            "whatever its lengths. 'token': the Trainer's num_items_in_batch normalisation, every target token "
            "counts once over the optimizer step (example i then weighs n_i / mean n, n_i its target tokens).",
            "choices": ["sequence", "token"],
        },
    )

    loss_chunk_size: int | None = field(
        default=None,
        metadata={
            "help": "Causal LMs: compute the per-example losses from the base model's final hidden states in chunks "
            "of this many tokens, each chunk's logits recomputed in backward instead of kept (activation "
            "checkpointing of the head and the loss). The [batch, tokens, vocab] logits and their "
            "gradient (309 MB each for GPT-2 at 3 x 512 tokens in fp32) are then never held whole, at the cost of one "
            "more head product per pass. Checked once per run against the model's own logits (models that scale or "
            "soft-cap their logits after the head are refused). None (default): the model's own logits, as the Trainer."
        },
    )

    def __post_init__(self) -> None:
        if self.fp16:
            raise ValueError(
                "fp16 mixed precision is not supported: the bilevel passes compute their own gradients, which a "
                "GradScaler never scales, so small fp16 gradients would underflow to zero. Use bf16=True (same "
                "memory, no loss scaling needed) or fp32."
            )
        super().__post_init__()
        if self.bilevel_method not in ("bros", "masoba"):
            raise ValueError(f"bilevel_method must be 'bros' or 'masoba', got {self.bilevel_method!r}.")
        if self.upper_level not in ("domain", "sample"):
            raise ValueError(f"upper_level must be 'domain' or 'sample', got {self.upper_level!r}.")
        if self.sketch_kind not in ("rademacher", "gaussian"):
            raise ValueError(f"sketch_kind must be 'rademacher' or 'gaussian', got {self.sketch_kind!r}.")
        if self.aux_step_scaling not in ("rank_ratio", "none"):
            raise ValueError(
                f"aux_step_scaling must be 'rank_ratio' or 'none', got {self.aux_step_scaling!r}."
            )
        if self.hessian_mode not in ("auto", "autograd", "finite_difference"):
            raise ValueError(
                f"hessian_mode must be 'auto', 'autograd' or 'finite_difference', got {self.hessian_mode!r}."
            )
        if self.upper_update not in ("normalized", "masoba"):
            raise ValueError(f"upper_update must be 'normalized' or 'masoba', got {self.upper_update!r}.")
        if self.loss_normalization not in ("sequence", "token"):
            raise ValueError(f"loss_normalization must be 'sequence' or 'token', got {self.loss_normalization!r}.")
        self._check_step_sizes()
        for field_name in ("lower_full_space_modules", "full_space_modules"):
            modules = list(getattr(self, field_name) or [])
            if "none" in modules and len(modules) > 1:
                raise ValueError(
                    f"{field_name}={modules}: 'none' (sketch every matrix) cannot be combined with module names."
                )
        if self.z_dtype not in ("float32", "bfloat16"):
            raise ValueError(f"z_dtype must be 'float32' or 'bfloat16', got {self.z_dtype!r}.")
        if self.loss_chunk_size is not None and self.loss_chunk_size < 1:
            raise ValueError(f"loss_chunk_size must be ≥ 1 (tokens per chunk) or None, got {self.loss_chunk_size}.")
        if self.upper_batch_size is not None and self.upper_batch_size < 1:
            raise ValueError(f"upper_batch_size must be ≥ 1, got {self.upper_batch_size}.")
        if self.initial_sample_weights is not None and self.upper_level != "sample":
            raise ValueError(
                f"initial_sample_weights={self.initial_sample_weights!r} sets per-example weights, but "
                f"upper_level={self.upper_level!r}: use upper_level='sample', or drop initial_sample_weights."
            )
        if self.upper_warmup_steps < 0:
            raise ValueError(f"upper_warmup_steps must be ≥ 0, got {self.upper_warmup_steps}.")
        if not 0.0 <= self.mixture_floor < 1.0:
            raise ValueError(f"mixture_floor must be in [0, 1), got {self.mixture_floor}.")
        if self.optim not in SUPPORTED_OPTIMIZERS:
            raise ValueError(
                f"optim={self.optim!r} is not supported for the lower level (its state lives in the r-dim "
                f"coordinates); use one of {list(SUPPORTED_OPTIMIZERS)}."
            )
        if self.neftune_noise_alpha is not None:
            raise ValueError(
                f"neftune_noise_alpha={self.neftune_noise_alpha} is not supported: NEFTune adds fresh random noise to "
                "the embeddings on every training-mode forward pass, and a bilevel step compares several passes "
                "(finite differences of gradients and losses at θ ± δd), which the noise would swamp. Set "
                "neftune_noise_alpha=None."
            )
        if self.fsdp:
            raise ValueError(
                "FSDP is not supported: it frees/shards parameters after backward, which breaks the bilevel "
                "second-order passes. Use DDP (accelerate launch --multi_gpu) instead."
            )
        if self.deepspeed:
            raise ValueError(
                "DeepSpeed is not supported (ZeRO-3 partitions parameters, breaking second-order passes, and the "
                "lower optimizer state lives in the subspace). Use DDP (accelerate launch --multi_gpu) instead."
            )
        ckpt_kwargs = self.activation_checkpointing_kwargs or {}
        reentrant = isinstance(ckpt_kwargs, dict) and ckpt_kwargs.get("use_reentrant")
        if self.activation_checkpointing and reentrant:
            raise ValueError(
                "Reentrant activation checkpointing is incompatible with torch.autograd.grad, which the bilevel "
                "passes use. Set activation_checkpointing_kwargs={'use_reentrant': False} (the default)."
            )
        # Validates the remaining knobs (the run's length, which sets the default α, is the Trainer's to know).
        self.bilevel_hyperparameters(num_training_steps=max(self.max_steps, 1))

    def _check_step_sizes(self) -> None:
        """Step sizes, perturbations and the moving-average weight, named by their config fields.

        ``learning_rate=0`` is refused too: the lower level θ would never move, so z and λ would be
        learned around the initial model only (use a plain evaluation loop for that).
        """
        positive = {
            "learning_rate": "lower step size β",
            "aux_learning_rate": "auxiliary step size γ",
            "upper_learning_rate": "upper step size α on λ",
            "finite_difference_eps": "relative finite-difference perturbation",
        }
        for name, meaning in positive.items():
            value = getattr(self, name)
            if name in ("upper_learning_rate", "finite_difference_eps") and value is None:
                continue  # set from the run: resolved_upper_learning_rate, resolved_finite_difference_eps
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                default = self.__dataclass_fields__[name].default
                raise ValueError(
                    f"{name} ({meaning}) must be a finite number > 0 (default {default}), got {value}."
                )
        if not 0.0 < self.moving_average_weight <= 1.0:
            default = self.__dataclass_fields__["moving_average_weight"].default
            raise ValueError(
                f"moving_average_weight ρ must be in (0, 1] (1: no averaging; default {default}), got "
                f"{self.moving_average_weight}."
            )
        if self.z_norm_bound is not None and not self.z_norm_bound > 0:
            raise ValueError(f"z_norm_bound must be > 0, or None for no projection, got {self.z_norm_bound}.")
        limit = self.aux_step_limit
        if limit is not None and not (isinstance(limit, (int, float)) and 0.0 < limit < 2.0):
            raise ValueError(
                f"aux_step_limit must be in (0, 2) (the auxiliary step stops contracting at 2; default "
                f"{self.__dataclass_fields__['aux_step_limit'].default}), or None for no limit, got {limit}."
            )
        for name in ("subspace_rank", "sketch_resample_interval"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be an integer ≥ 1, got {getattr(self, name)}.")

    def resolved_upper_learning_rate(self, num_training_steps: int | None = None) -> float:
        """α: ``upper_learning_rate`` if set, else the default of the update rule and upper level (see the
        field's help); domain mixtures need the run's length ``num_training_steps`` (default: max_steps)."""
        if self.upper_learning_rate is not None:
            return self.upper_learning_rate
        if self.upper_update == "masoba":
            return 1.0
        if self.upper_level == "sample":
            return DEFAULT_SAMPLE_UPPER_LR
        steps = num_training_steps if num_training_steps is not None else self.max_steps
        if steps is None or steps < 1:
            raise ValueError(
                "The default upper_learning_rate of a domain mixture is set from the run's length; pass max_steps "
                "(or num_training_steps), or set upper_learning_rate."
            )
        return DOMAIN_LOGIT_TRAVEL / max(steps - self.upper_warmup_steps, 1)

    def resolved_hessian_mode(self) -> str:
        """``hessian_mode`` with "auto" decided: finite differences, in every precision (in bf16 with the larger
        step of :meth:`resolved_finite_difference_eps`, which keeps the memory of a plain backward where double
        backward needs about twice it)."""
        return "finite_difference" if self.hessian_mode == "auto" else self.hessian_mode

    def resolved_finite_difference_eps(self, half_precision: bool | None = None) -> float:
        """``finite_difference_eps``, or its default for the precision the passes run in: ``half_precision``
        (the Accelerator's mixed precision or half-precision weights; default: ``bf16``)."""
        if self.finite_difference_eps is not None:
            return self.finite_difference_eps
        half = self.bf16 if half_precision is None else half_precision
        return DEFAULT_FD_EPS_HALF_PRECISION if half else DEFAULT_FD_EPS

    def bilevel_hyperparameters(
        self, half_precision: bool | None = None, num_training_steps: int | None = None
    ) -> BilevelHyperparameters:
        """The solver's view of this config (raises ValueError on invalid values); ``half_precision`` as in
        :meth:`resolved_finite_difference_eps`, ``num_training_steps`` as in :meth:`resolved_upper_learning_rate`."""
        return BilevelHyperparameters(
            method=self.bilevel_method,
            rank=self.subspace_rank,
            sketch=self.sketch_kind,
            resample_every=self.sketch_resample_interval,
            hessian_mode=self.resolved_hessian_mode(),
            aux_lr=self.aux_learning_rate,
            aux_step_scaling=self.aux_step_scaling,
            upper_lr=self.resolved_upper_learning_rate(num_training_steps),
            ma_weight=self.moving_average_weight,
            upper_rule=self.upper_update,
            upper_rms_decay=self.upper_rms_decay,
            z_radius=self.z_norm_bound,
            aux_step_limit=self.aux_step_limit,
            fd_eps=self.resolved_finite_difference_eps(half_precision),
            upper_warmup_steps=self.upper_warmup_steps,
            z_dtype=None if self.z_dtype == "float32" else self.z_dtype,
        )
