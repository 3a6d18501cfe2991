#!/usr/bin/env python
"""Learn one weight per training example of an image classifier under label noise (BROS sample mode).

In the style of transformers' ``examples/pytorch/image-classification/run_image_classification.py``:
three argument dataclasses (``ModelArguments``, ``DataArguments``, :class:`bros_hf.BROSConfig`)
parsed with ``HfArgumentParser``, from the command line or from one ``.json``/``.yaml`` file.

The bilevel problem ("data hyper-cleaning"): a fraction ``--noise_rate`` of the training labels is
corrupted (``--noise_kind uniform``: a different class uniformly at random; ``pair``: y → y+1 mod C).
The lower level trains a ViT on the weighted training loss (1/B) Σ σ(λ_i) ℓ_i; the upper level moves
the per-example logits λ so that the loss on a small *clean* validation split (the target set) goes
down. Examples whose label disagrees with what the clean split teaches get their weight pushed down.

Trainings with the same model initialisation, the same number of steps and the same lower optimizer
settings (optimizer, learning rate, schedule, batch size, weight decay, clipping):

(a) plain ``transformers.Trainer`` on the noisy training set,
(b) :class:`bros_hf.BROSTrainer` (``upper_level="sample"``) on the noisy training set, target = the
    clean validation split (with ``--compare_masoba``, also full-space MA-SOBA),
(d) second stage: plain ``transformers.Trainer`` on the examples whose learned weight is ≥ a threshold, one
    training per candidate in ``--keep_thresholds``; the one whose model is most accurate on the clean validation
    split is reported (:func:`bros_hf.selection.choose_threshold`; ``--no_second_stage`` skips it),
(e) refit: :class:`bros_hf.BROSTrainer` on a fresh model with every weight starting at its learned value
    (``initial_sample_weights``; ``--no_refit`` skips it),
(c) plain ``transformers.Trainer`` on the uncorrupted training examples only (an oracle).

Reported: test accuracy of each, the share of the noise's accuracy loss it wins back (gap closed =
(acc − acc_a) / (acc_c − acc_a)), and how well the learned weights flag the corrupted examples (AUROC,
F1 of "corrupted iff weight < 0.5", see :func:`digits.detection_metrics` (recipes/digits.py)).

Quick start (offline, CPU, about 3 minutes; ``--compare_masoba`` adds about 2): scikit-learn's
digits (8×8 grey images, upsampled to 16×16; 997 noisy train / 300 clean validation / 500 test), 40% uniform
label noise, a tiny ViT (2 layers, width 64, patch 4; 70 k parameters) built from a ``ViTConfig``, one thread::

    python recipes/vit_sample_reweighting.py --output_dir outputs/vit_sample_reweighting --compare_masoba

Measured with the defaults (600 steps each, seed 0, 2026-12-02, ``--compare_masoba``, 310 s)::

    | run                                          | test accuracy | gap closed | AUROC | F1    |
    | (a) plain Trainer, noisy labels              | 0.780         |            |       |       |
    | (b) BROSTrainer, bros                        | 0.896         | 0.65       | 0.954 | 0.915 |
    | (d) plain Trainer, examples bros keeps       | 0.924 (539)   | 0.81       |       |       |
    | (e) BROSTrainer refit, bros                  | 0.890         | 0.62       | 0.949 | 0.893 |
    | (b) BROSTrainer, masoba                      | 0.892         | 0.63       | 0.954 | 0.901 |
    | (d) plain Trainer, examples masoba keeps     | 0.870 (595)   | 0.51       |       |       |
    | (e) BROSTrainer refit, masoba                | 0.898         | 0.66       | 0.966 | 0.907 |
    | (c) plain Trainer, clean examples (598)      | 0.958         |            |       |       |

AUROC and F1 are those of the learned (tail-averaged) weights; the last iterate's AUROC is 0.939 (bros) and
0.933 (masoba). BROS keeps the ViT's classification head and its [1, ...] class token and position embeddings
full-space (``full_space_modules=["head"]``, the default); with every matrix sketched the same command gave bros
0.874 / AUROC 0.915, kept 0.880, refit 0.900. (d) keeps the examples at or above the threshold, among
``--keep_thresholds`` 0.5, 0.65 and 0.8, whose plain Trainer is most accurate on the clean validation split (bros:
0.937, 0.947, 0.910, so 0.65; test 0.912, 0.924, 0.894). The kept examples still hold corrupted labels, which a plain
Trainer memorises in 600 steps; the refit starts every weight where the first run ended, so the corrupted examples
are down-weighted from the first step. With another noise draw (``--noise_seed 1``) bros gives 0.836 in the run
(AUROC 0.949), 0.866 kept (threshold 0.8), 0.868 refit (plain 0.720, oracle 0.946); with ``--noise_kind pair
--noise_rate 0.3`` 0.906 (0.947), 0.924 kept (threshold 0.65), 0.932 (plain 0.756, oracle 0.952). Every upper-level and auxiliary knob is the package
default: the auxiliary step γ = 0.05 is limited by ``aux_step_limit`` (without the limit z reached its norm
bound and the weights were noise: AUROC 0.616 at the former upper step α = 0.5, which gave 0.892 with the limit); the previous recipe settings (γ = 0.01, ‖z‖ ≤ 1, 50 warm-up
steps, autograd) gave 0.848 / AUROC 0.887. The frozen-weights control (``--run_frozen_weights_control``) tells what the
learned weights contribute beyond the subspace lower updates (an earlier version: 0.756); the true-weights control
(``--run_true_weights_control``: every weight starts at the truth and is still learned) what a perfect ranking would
give: 0.924 (AUROC 1.000; 98 s with ``--no_run_baselines --no_second_stage --no_refit``).

With a hub (model, image processor and data downloaded; noise injected into the train labels the same
way; the clean validation split is carved out of the train split unless ``--validation_split`` names
one)::

    python recipes/vit_sample_reweighting.py --output_dir outputs/vit_cifar10 \\
        --dataset_name cifar10 --model_name_or_path google/vit-base-patch16-224-in21k \\
        --max_steps 2000 --per_device_train_batch_size 64 --learning_rate 5e-5 --val_size 1000

``--model_name_or_path``/``--image_processor_name``/``--dataset_name`` also take local directories
(``save_pretrained`` output, an ``imagefolder`` directory...). Outputs in ``--output_dir``:
``report.json`` (accuracies, detection metrics, timings, settings), ``weights_histogram.png`` (weights
of clean vs corrupted examples), ``bros/sample_weights.json`` (every example's weight) and a Markdown
table on stdout.
"""

from __future__ import annotations

import copy
import logging
import math
import os
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any

import datasets
import numpy as np
import torch
import transformers
from accelerate import PartialState
from torch.nn import functional as F
from transformers import (
    AutoConfig,
    AutoImageProcessor,
    AutoModelForImageClassification,
    Trainer,
    TrainingArguments,
    ViTConfig,
    ViTForImageClassification,
    ViTImageProcessor,
)

from bros_hf import BROSConfig, BROSTrainer
from bros_hf.export import write_json_atomic
from bros_hf.selection import DEFAULT_THRESHOLDS, choose_threshold

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # sibling modules, also when loaded by path
from _common import close_process_group, explained_hub_errors, parse_with_defaults, setup_logging  # noqa: E402
from digits import corrupt_labels, detection_metrics, gap_closed, load_noisy_digits  # noqa: E402

logger = logging.getLogger("vit_sample_reweighting")

# ------------------------------------------------------------------------------------------------------
# Arguments and recipe defaults
# ------------------------------------------------------------------------------------------------------


@dataclass
class ModelArguments:
    model_name_or_path: str | None = field(
        default=None,
        metadata={
            "help": "Pretrained image classifier (hub id or local directory). Default: a tiny ViT built from a "
            "ViTConfig (random init) with the sizes below."
        },
    )
    image_processor_name: str | None = field(
        default=None,
        metadata={
            "help": "Image processor (hub id or local directory); default: the one of --model_name_or_path."
        },
    )
    cache_dir: str | None = field(default=None, metadata={"help": "Cache directory for hub downloads."})
    image_size: int = field(
        default=16,
        metadata={"help": "Tiny ViT: input resolution (digits are upsampled from 8×8 bilinearly)."},
    )
    patch_size: int = field(default=4, metadata={"help": "Tiny ViT: patch size."})
    num_channels: int = field(default=1, metadata={"help": "Tiny ViT: input channels (1 = grey, 3 = RGB)."})
    hidden_size: int = field(default=64, metadata={"help": "Tiny ViT: hidden size."})
    num_hidden_layers: int = field(default=2, metadata={"help": "Tiny ViT: number of transformer layers."})
    num_attention_heads: int = field(default=4, metadata={"help": "Tiny ViT: attention heads."})
    intermediate_size: int = field(default=128, metadata={"help": "Tiny ViT: MLP width."})
    attn_implementation: str | None = field(
        default=None,
        metadata={
            "help": "Attention kernel ('eager', 'sdpa'; default: the library's choice). BROSTrainer forces SDPA's "
            "math kernel around second-order passes, so every choice works with hessian_mode=autograd."
        },
    )


@dataclass
class DataArguments:
    dataset_name: str | None = field(
        default=None,
        metadata={
            "help": "Image classification dataset for datasets.load_dataset (hub id such as 'cifar10', or a local "
            "directory such as an imagefolder). Default: scikit-learn's digits, offline."
        },
    )
    dataset_config_name: str | None = field(default=None, metadata={"help": "Dataset configuration name."})
    image_column: str | None = field(
        default=None,
        metadata={"help": "Image column (default: the first of 'image', 'img', 'pixel_values')."},
    )
    label_column: str | None = field(
        default=None,
        metadata={"help": "Label column (default: the first of 'label', 'labels', 'fine_label')."},
    )
    train_split: str = field(default="train", metadata={"help": "Split the noisy training set comes from."})
    validation_split: str | None = field(
        default=None,
        metadata={
            "help": "Clean split used as the upper-level target. Default: --val_size examples carved out of the "
            "train split (stratified) before the noise is injected."
        },
    )
    test_split: str = field(default="test", metadata={"help": "Split the test accuracy is measured on."})
    val_size: int = field(default=300, metadata={"help": "Size of the clean validation (target) split."})
    test_size: int = field(default=500, metadata={"help": "Digits only: size of the test split."})
    max_train_samples: int | None = field(default=None, metadata={"help": "Truncate the noisy training set."})
    max_test_samples: int | None = field(default=None, metadata={"help": "Truncate the test set."})
    noise_rate: float = field(default=0.4, metadata={"help": "Fraction of training labels corrupted."})
    noise_kind: str = field(
        default="uniform",
        metadata={
            "help": "'uniform': a corrupted label becomes another class uniformly at random; 'pair': y → y+1 mod C.",
            "choices": ["uniform", "pair"],
        },
    )
    noise_seed: int = field(default=0, metadata={"help": "Seed of the split and of the label noise."})
    run_baselines: bool = field(
        default=True,
        metadata={
            "help": "Also train (a) plain Trainer on noisy labels and (c) plain Trainer on clean examples."
        },
    )
    second_stage: bool = field(
        default=True,
        metadata={
            "help": "Also train (d) a fresh plain Trainer on the training examples whose learned weight is ≥ a "
            "threshold, with the same settings as (a): one training per --keep_thresholds candidate, the one most "
            "accurate on the clean validation split reported (bros_hf.selection.choose_threshold)."
        },
    )
    refit: bool = field(
        default=True,
        metadata={
            "help": "Also train (e) a BROSTrainer on a fresh model with every example weight starting at its learned "
            "value (--initial_sample_weights bros/sample_weights.json), so the weights act from the first step."
        },
    )
    keep_thresholds: list[float] = field(
        default_factory=lambda: list(DEFAULT_THRESHOLDS),
        metadata={
            "help": "Second stage: candidate thresholds on the learned weight σ(λ_i); each keeps the examples at "
            "or above it, and the clean validation split picks one. A single value: no choice, no extra trainings."
        },
    )
    compare_masoba: bool = field(
        default=False,
        metadata={
            "help": "Also run BROSTrainer with bilevel_method='masoba' (full-space MA-SOBA, the reference "
            "method) and its second stage; roughly doubles the run time."
        },
    )
    run_frozen_weights_control: bool = field(
        default=False,
        metadata={
            "help": "Also train BROSTrainer with the weights frozen at 0.5 (upper_warmup_steps = max_steps): the "
            "same subspace lower updates without reweighting, to tell what the learned weights contribute."
        },
    )
    run_true_weights_control: bool = field(
        default=False,
        metadata={
            "help": "Also train BROSTrainer with every weight starting at the truth (clean 0.999, corrupted 0.001; "
            "--initial_sample_weights) and still learned: how far the run gets when the weights are right from the "
            "first step, to tell what the learned weights' ranking costs."
        },
    )
    num_threads: int | None = field(
        default=None,
        metadata={
            "help": "torch.set_num_threads for this process (CPU). Default: 1 for the built-in tiny ViT (its "
            "matmuls are too small to gain from threads; on a busy 2-core machine OpenMP oversubscription made a "
            "plain step 5-10x slower with 2 threads), torch's default for a --model_name_or_path model."
        },
    )

    def __post_init__(self) -> None:
        if not 0.0 <= self.noise_rate < 1.0:
            raise ValueError(f"--noise_rate must be in [0, 1), got {self.noise_rate}.")
        if self.noise_kind not in ("uniform", "pair"):
            raise ValueError(f"--noise_kind must be 'uniform' or 'pair', got {self.noise_kind!r}.")
        if self.val_size < 1:
            raise ValueError(f"--val_size must be ≥ 1, got {self.val_size}.")


# Recipe defaults, used for every field the user does not set: the lower level's settings (steps, batch, AdamW
# learning rate and schedule) and sample mode. Every upper-level and auxiliary knob is the package default
# (RECIPE_REASONS, shown in --help, would name a departure and the measurement that made it). 600 steps: the
# plain Trainer has then memorised many wrong labels (its test accuracy peaks near
# step 300 and falls), which is what the learned weights have to prevent.
TRUE_WEIGHTS_FILE = "true_sample_weights.json"  # --run_true_weights_control: clean 0.999, corrupted 0.001

RECIPE_DEFAULTS: dict[str, Any] = {
    "output_dir": "outputs/vit_sample_reweighting",
    "max_steps": 600,
    "per_device_train_batch_size": 64,
    "per_device_eval_batch_size": 256,
    "learning_rate": 3e-3,
    "lr_scheduler_type": "cosine",
    "warmup_steps": 0.05,
    "weight_decay": 0.0,
    "optim": "adamw_torch",
    "logging_steps": 50,
    "save_strategy": "no",
    "eval_strategy": "no",
    "report_to": "none",
    "seed": 0,
    "upper_level": "sample",
}
RECIPE_REASONS: dict[str, str] = {}
# With --dataset_name the image column is turned into pixel_values by an on-the-fly transform, so the
# Trainer must not drop "unused" columns before it runs.
HUB_DEFAULTS: dict[str, Any] = {"remove_unused_columns": False}


def parse_arguments(argv: list[str] | None = None) -> tuple[ModelArguments, DataArguments, BROSConfig]:
    """Parse the three dataclasses, filling every recipe default the user did not give (and
    ``HUB_DEFAULTS`` with ``--dataset_name``).

    Defaults are injected *before* parsing, so ``TrainingArguments.__post_init__`` sees final values.
    """
    parsed, _ = parse_with_defaults(
        (ModelArguments, DataArguments, BROSConfig),
        argv,
        RECIPE_DEFAULTS,
        {"dataset_name": HUB_DEFAULTS},
        reasons=RECIPE_REASONS,
    )
    return parsed


# ------------------------------------------------------------------------------------------------------
# Data
# ------------------------------------------------------------------------------------------------------


@dataclass
class NoisyImageData:
    """Datasets with ``pixel_values`` and ``labels`` (noisy for train, clean for val/test) + ground truth."""

    train: datasets.Dataset
    val: datasets.Dataset
    test: datasets.Dataset
    clean_labels: np.ndarray
    is_corrupted: np.ndarray
    num_labels: int
    id2label: dict[int, str]
    source: str

    def summary(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "num_train": len(self.train),
            "num_val": len(self.val),
            "num_test": len(self.test),
            "num_labels": self.num_labels,
            "corrupted_fraction": float(self.is_corrupted.mean()) if len(self.is_corrupted) else 0.0,
        }


def digits_pixels(x: np.ndarray, image_size: int, num_channels: int) -> np.ndarray:
    """Flat 8×8 digits in [0, 1] → float32 [N, C, S, S], bilinearly resized, normalised to [-1, 1]."""
    images = torch.from_numpy(np.asarray(x, dtype=np.float32)).reshape(-1, 1, 8, 8)
    if image_size != 8:
        images = F.interpolate(images, size=(image_size, image_size), mode="bilinear", align_corners=False)
    images = (images - 0.5) / 0.5
    return images.expand(-1, num_channels, -1, -1).contiguous().numpy()


def load_digits_data(data_args: DataArguments, image_size: int, num_channels: int) -> NoisyImageData:
    """scikit-learn digits via :func:`digits.load_noisy_digits`, as tensors shaped for the model."""
    noisy = load_noisy_digits(
        data_args.noise_rate, data_args.noise_kind, seed=data_args.noise_seed,
        val_size=data_args.val_size, test_size=data_args.test_size,
    )  # fmt: skip
    x_train, y_train, y_clean = noisy.x_train, noisy.y_train, noisy.y_train_clean
    x_test, y_test = noisy.x_test, noisy.y_test
    if data_args.max_train_samples is not None:
        x_train, y_train, y_clean = (a[: data_args.max_train_samples] for a in (x_train, y_train, y_clean))
    if data_args.max_test_samples is not None:
        x_test, y_test = x_test[: data_args.max_test_samples], y_test[: data_args.max_test_samples]

    def make(x: np.ndarray, y: np.ndarray) -> datasets.Dataset:
        pixels = digits_pixels(x, image_size, num_channels)
        return datasets.Dataset.from_dict({"pixel_values": pixels, "labels": y.astype(np.int64)}).with_format(
            "torch"
        )

    return NoisyImageData(
        train=make(x_train, y_train),
        val=make(noisy.x_val, noisy.y_val),
        test=make(x_test, y_test),
        clean_labels=np.asarray(y_clean),
        is_corrupted=np.asarray(y_train != y_clean),
        num_labels=10,
        id2label={i: str(i) for i in range(10)},
        source="sklearn digits",
    )


def _pick_column(ds: datasets.Dataset, given: str | None, candidates: tuple[str, ...], what: str) -> str:
    if given is not None:
        if given not in ds.column_names:
            raise ValueError(f"--{what}_column {given!r} is not a column of the dataset ({ds.column_names}).")
        return given
    for name in candidates:
        if name in ds.column_names:
            return name
    raise ValueError(f"Cannot find the {what} column among {ds.column_names}; pass --{what}_column.")


def make_image_transform(processor: Any, image_column: str, mode: str):
    """``set_transform`` function: images → ``pixel_values``; every other column passes through (the
    trainer's example-index column ``bros_key`` included)."""

    def transform(batch: dict[str, list]) -> dict[str, Any]:
        out = {k: v for k, v in batch.items() if k != image_column}
        images = [image.convert(mode) for image in batch[image_column]]
        out["pixel_values"] = processor(images=images, return_tensors="pt")["pixel_values"]
        return out

    return transform


def load_hub_data(
    data_args: DataArguments, model_args: ModelArguments, seed: int
) -> tuple[NoisyImageData, transformers.PretrainedConfig]:
    """An image classification dataset through ``datasets.load_dataset``; images become ``pixel_values``
    through the model's image processor in an on-the-fly ``set_transform``. Returns the data and the
    model config (its label set comes from the data)."""
    with explained_hub_errors("dataset", data_args.dataset_name):
        raw = datasets.load_dataset(
            data_args.dataset_name, data_args.dataset_config_name, cache_dir=model_args.cache_dir
        )
    train = raw[data_args.train_split]
    image_column = _pick_column(train, data_args.image_column, ("image", "img", "pixel_values"), "image")
    label_column = _pick_column(train, data_args.label_column, ("label", "labels", "fine_label"), "label")
    feature = train.features[label_column]
    if isinstance(feature, datasets.ClassLabel):
        num_labels, id2label = feature.num_classes, dict(enumerate(feature.names))
    else:
        num_labels = int(max(train[label_column])) + 1
        id2label = {i: str(i) for i in range(num_labels)}
    stratify = label_column if isinstance(feature, datasets.ClassLabel) else None
    if data_args.validation_split is not None:
        val = raw[data_args.validation_split]
    else:
        parts = train.train_test_split(test_size=data_args.val_size, seed=seed, stratify_by_column=stratify)
        train, val = parts["train"], parts["test"]
    test = raw[data_args.test_split]
    train = train.shuffle(seed=seed)
    if data_args.max_train_samples is not None:
        train = train.select(range(min(data_args.max_train_samples, len(train))))
    if data_args.max_test_samples is not None:
        test = test.select(range(min(data_args.max_test_samples, len(test))))

    clean = np.asarray(train[label_column], dtype=np.int64)
    rng = np.random.default_rng(data_args.noise_seed)
    noisy = corrupt_labels(clean, data_args.noise_rate, data_args.noise_kind, rng, num_classes=num_labels)

    config = model_config(model_args, num_labels, id2label)
    processor = load_processor(model_args, config)
    mode = "L" if image_geometry(config)[1] == 1 else "RGB"

    def keep(ds: datasets.Dataset, labels: Any) -> datasets.Dataset:
        ds = ds.select_columns([image_column]).add_column("labels", [int(v) for v in labels])
        ds.set_transform(make_image_transform(processor, image_column, mode))
        return ds

    data = NoisyImageData(
        train=keep(train, noisy),
        val=keep(val, val[label_column]),
        test=keep(test, test[label_column]),
        clean_labels=clean,
        is_corrupted=noisy != clean,
        num_labels=num_labels,
        id2label=id2label,
        source=data_args.dataset_name,
    )
    return data, config


# ------------------------------------------------------------------------------------------------------
# Model
# ------------------------------------------------------------------------------------------------------


def model_config(
    model_args: ModelArguments, num_labels: int, id2label: dict[int, str]
) -> transformers.PretrainedConfig:
    labels = {"num_labels": num_labels, "id2label": id2label, "label2id": {v: k for k, v in id2label.items()}}
    if model_args.model_name_or_path is not None:
        with explained_hub_errors("model config", model_args.model_name_or_path):
            return AutoConfig.from_pretrained(model_args.model_name_or_path, cache_dir=model_args.cache_dir, **labels)
    return ViTConfig(
        image_size=model_args.image_size,
        patch_size=model_args.patch_size,
        num_channels=model_args.num_channels,
        hidden_size=model_args.hidden_size,
        num_hidden_layers=model_args.num_hidden_layers,
        num_attention_heads=model_args.num_attention_heads,
        intermediate_size=model_args.intermediate_size,
        **labels,
    )


def build_model(
    model_args: ModelArguments, config: transformers.PretrainedConfig, seed: int
) -> torch.nn.Module:
    """Same seed → same initial weights (the pretrained body and the freshly initialised head)."""
    transformers.set_seed(seed)
    kwargs = {}
    if model_args.attn_implementation is not None:
        kwargs["attn_implementation"] = model_args.attn_implementation
    if model_args.model_name_or_path is not None:
        with explained_hub_errors("model", model_args.model_name_or_path):
            return AutoModelForImageClassification.from_pretrained(
                model_args.model_name_or_path, config=config, cache_dir=model_args.cache_dir,
                ignore_mismatched_sizes=True, **kwargs,
            )  # fmt: skip
    if model_args.attn_implementation is not None:
        config._attn_implementation = model_args.attn_implementation
    return ViTForImageClassification(config)


def load_processor(model_args: ModelArguments, config: transformers.PretrainedConfig) -> Any:
    name = model_args.image_processor_name or model_args.model_name_or_path
    if name is not None:
        with explained_hub_errors("image processor", name):
            return AutoImageProcessor.from_pretrained(name, cache_dir=model_args.cache_dir)
    channels = config.num_channels
    return ViTImageProcessor(
        size={"height": config.image_size, "width": config.image_size},
        image_mean=[0.5] * channels,
        image_std=[0.5] * channels,
    )


def image_geometry(config: transformers.PretrainedConfig) -> tuple[int, int]:
    size = getattr(config, "image_size", 224)
    size = size[0] if isinstance(size, (tuple, list)) else size
    return int(size), int(getattr(config, "num_channels", 3))


# ------------------------------------------------------------------------------------------------------
# Training and evaluation
# ------------------------------------------------------------------------------------------------------


def test_accuracy(trainer: Trainer, test: datasets.Dataset) -> float:
    output = trainer.predict(test)
    logits = output.predictions[0] if isinstance(output.predictions, tuple) else output.predictions
    return float((np.asarray(logits).argmax(-1) == np.asarray(output.label_ids)).mean())


def plain_arguments(args: BROSConfig, output_dir: str) -> TrainingArguments:
    """The same lower-level settings for a plain Trainer (a copy of the BROSConfig, another output_dir)."""
    plain = copy.deepcopy(args)
    plain.output_dir = output_dir
    return plain


def train_plain(
    name: str,
    model_args: ModelArguments,
    config: Any,
    args: BROSConfig,
    train: datasets.Dataset,
    test: datasets.Dataset,
    validation: datasets.Dataset | None = None,
) -> dict[str, Any]:
    model = build_model(model_args, config, args.seed)
    trainer = Trainer(
        model=model, args=plain_arguments(args, os.path.join(args.output_dir, name)), train_dataset=train
    )
    start = time.perf_counter()
    result = trainer.train()
    wall = time.perf_counter() - start
    run = {
        "test_accuracy": test_accuracy(trainer, test),
        "train_loss": float(result.training_loss),
        "num_train": len(train),
        "wall_time_s": wall,
    }
    if validation is not None:
        run["validation_accuracy"] = test_accuracy(trainer, validation)
    return run


def train_kept(
    name: str,
    model_args: ModelArguments,
    config: Any,
    args: BROSConfig,
    data: NoisyImageData,
    weights: np.ndarray,
    thresholds: list[float],
) -> dict[str, Any]:
    """(d): a plain Trainer on the examples kept at each candidate threshold (``name/kept_N``, N examples); the run
    whose model is most accurate on the clean validation split, with ``threshold`` and every candidate's accuracies."""
    by_count: dict[int, dict[str, Any]] = {}  # thresholds keep nested sets, so the count names the set

    def validation_accuracy(keep: list[int]) -> float:
        run = train_plain(
            f"{name}/kept_{len(keep)}", model_args, config, args, data.train.select(keep), data.test,
            validation=data.val,
        )
        by_count[len(keep)] = run
        return run["validation_accuracy"]

    choice = choose_threshold(weights, validation_accuracy, thresholds)
    by_threshold = {t: by_count[choice.kept[t]] for t in choice.scores}
    return {
        **by_threshold[choice.threshold],
        "threshold": choice.threshold,
        "candidates": {
            f"{t:g}": {k: run[k] for k in ("validation_accuracy", "test_accuracy", "num_train")}
            for t, run in by_threshold.items()
        },
    }


def train_bros(
    model_args: ModelArguments,
    config: Any,
    args: BROSConfig,
    data: NoisyImageData,
    name: str = "bros",
    initial_sample_weights: str | None = None,
) -> tuple[dict[str, Any], np.ndarray]:
    model = build_model(model_args, config, args.seed)
    bros_args = plain_arguments(args, os.path.join(args.output_dir, name))
    if initial_sample_weights is not None:
        bros_args.initial_sample_weights = initial_sample_weights
    trainer = BROSTrainer(model=model, args=bros_args, train_dataset=data.train, upper_dataset=data.val)
    start = time.perf_counter()
    result = trainer.train()
    wall = time.perf_counter() - start
    weights = trainer.sample_weights().numpy()  # the tail average: the weights to use
    final = trainer.final_sample_weights().numpy()
    metrics = detection_metrics(weights, data.is_corrupted)
    report = {
        "test_accuracy": test_accuracy(trainer, data.test),
        "train_loss": float(result.training_loss),
        "num_train": len(data.train),
        "wall_time_s": wall,
        "parameters": sum(p.numel() for p in model.parameters()),
        "detection": metrics,
        "detection_final_weights": detection_metrics(final, data.is_corrupted),
        "weights": {
            "mean_clean": float(weights[~data.is_corrupted].mean()),
            "mean_corrupted": float(weights[data.is_corrupted].mean()) if data.is_corrupted.any() else None,
        },
    }
    return report, weights


# ------------------------------------------------------------------------------------------------------
# Outputs
# ------------------------------------------------------------------------------------------------------


def save_histogram(path: str, weights: np.ndarray, is_corrupted: np.ndarray, title: str) -> str | None:
    """Two overlaid histograms: weights of clean and of corrupted examples (written atomically)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        logger.warning("matplotlib is not installed: no histogram (pip install matplotlib).")
        return None
    bins = np.linspace(0.0, 1.0, 41)
    figure, axis = plt.subplots(figsize=(6, 4))
    clean, corrupted = weights[~is_corrupted], weights[is_corrupted]
    axis.hist(clean, bins=bins, alpha=0.6, color="tab:blue", label=f"clean (n={clean.size})")
    axis.hist(corrupted, bins=bins, alpha=0.6, color="tab:red", label=f"corrupted (n={corrupted.size})")
    axis.axvline(0.5, color="grey", linestyle="--", linewidth=1)
    axis.set_xlabel("learned example weight σ(λ_i)")
    axis.set_ylabel("training examples")
    axis.set_title(title)
    axis.legend()
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-", suffix=".png")
    os.close(fd)
    try:
        figure.savefig(tmp, dpi=100, bbox_inches="tight")
        os.replace(tmp, path)
    finally:
        plt.close(figure)
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def add_gap_closure(runs: dict[str, Any]) -> None:
    """Every reweighted run gets gap_closure = (acc − acc_plain_noisy) / (acc_oracle − acc_plain_noisy): the
    share of the accuracy lost to label noise that it wins back (1 = as good as training on the clean examples)."""
    plain, oracle = runs["plain_noisy"]["test_accuracy"], runs["oracle_clean"]["test_accuracy"]
    for name, run in runs.items():
        if name not in ("plain_noisy", "oracle_clean"):
            run["gap_closure"] = gap_closed(run["test_accuracy"], plain, oracle)


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return f"{value:.{digits}f}"


def _threshold(run: dict[str, Any] | None) -> str:
    """The second stage's chosen threshold, as the table shows it."""
    if run is None:
        return ""
    chosen = f"{run['threshold']:g}"
    return chosen if len(run["candidates"]) == 1 else f"{chosen} (chosen on validation)"


def markdown_table(report: dict[str, Any]) -> str:
    runs = report["runs"]
    method = report["settings"]["bilevel_method"]
    rows = [
        ("(a) plain Trainer, noisy labels", runs.get("plain_noisy")),
        (f"(b) BROSTrainer sample weights ({method})", runs.get("bros")),
        (f"(d) plain Trainer, examples {method} weighs ≥ {_threshold(runs.get('bros_second_stage'))}",
         runs.get("bros_second_stage")),
        (f"(e) BROSTrainer ({method}), fresh model, weights start learned", runs.get("bros_refit")),
        ("(b) BROSTrainer sample weights (masoba)", runs.get("masoba")),
        (f"(d) plain Trainer, examples masoba weighs ≥ {_threshold(runs.get('masoba_second_stage'))}",
         runs.get("masoba_second_stage")),
        ("(e) BROSTrainer (masoba), fresh model, weights start learned", runs.get("masoba_refit")),
        ("(b0) BROSTrainer, weights frozen at 0.5 (control)", runs.get("bros_frozen_weights")),
        (f"(b1) BROSTrainer ({method}), weights starting at the truth (control)", runs.get("bros_true_weights")),
        ("(c) plain Trainer, clean examples only (oracle)", runs.get("oracle_clean")),
    ]
    lines = [
        "| run | train examples | test accuracy | gap closed | AUROC | F1 | AUROC (last iterate) | wall time (s) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, run in rows:
        if run is None:
            continue
        detection = run.get("detection", {})
        final = run.get("detection_final_weights", {})
        lines.append(
            f"| {name} | {run['num_train']} | {_fmt(run['test_accuracy'])} | {_fmt(run.get('gap_closure'), 2)} | "
            f"{_fmt(detection.get('auroc'))} | {_fmt(detection.get('f1'))} | {_fmt(final.get('auroc'))} | "
            f"{_fmt(run['wall_time_s'], 1)} |"
        )
    return "\n".join(lines)


SETTINGS_KEYS = (
    "bilevel_method", "upper_level", "subspace_rank", "sketch_kind", "sketch_resample_interval", "full_space_modules",
    "hessian_mode", "aux_learning_rate", "aux_step_scaling", "aux_step_limit", "z_norm_bound", "upper_learning_rate", "moving_average_weight",
    "upper_warmup_steps", "upper_batch_size", "max_steps", "per_device_train_batch_size", "gradient_accumulation_steps",
    "learning_rate", "lr_scheduler_type", "warmup_steps", "weight_decay", "optim", "max_grad_norm", "seed",
)  # fmt: skip


def main(argv: list[str] | None = None) -> dict[str, Any]:
    wall_start = time.time()
    model_args, data_args, args = parse_arguments(argv)
    setup_logging(logger, args)
    if args.upper_level != "sample":
        raise ValueError("This recipe learns per-example weights: upper_level must be 'sample'.")
    num_threads = data_args.num_threads
    if num_threads is None and model_args.model_name_or_path is None:
        num_threads = 1
    if num_threads is not None:
        torch.set_num_threads(num_threads)

    if data_args.dataset_name is None:
        config = model_config(model_args, 10, {i: str(i) for i in range(10)})
        data = load_digits_data(data_args, *image_geometry(config))
    else:
        data, config = load_hub_data(data_args, model_args, args.seed)
    logger.info("Data %s", data.summary())

    runs: dict[str, Any] = {}
    if data_args.run_baselines:
        logger.info("(a) plain Trainer on the noisy training set")
        runs["plain_noisy"] = train_plain("plain_noisy", model_args, config, args, data.train, data.test)
    methods = [args.bilevel_method] + (["masoba"] if data_args.compare_masoba and args.bilevel_method != "masoba" else [])
    learned: dict[str, np.ndarray] = {}
    for method in methods:
        logger.info("(b) BROSTrainer (%s, sample weights)", method)
        method_args = plain_arguments(args, args.output_dir)
        method_args.bilevel_method = method
        name = "bros" if method == args.bilevel_method else method
        runs[name], learned[name] = train_bros(model_args, config, method_args, data, name=name)
        if data_args.second_stage:
            logger.info("(d) plain Trainer on the examples %s weighs ≥ each of %s", method, data_args.keep_thresholds)
            runs[f"{name}_second_stage"] = train_kept(
                f"{name}_second_stage", model_args, config, args, data, learned[name], data_args.keep_thresholds
            )
        if data_args.refit:
            logger.info("(e) BROSTrainer (%s) on a fresh model, weights starting at the learned ones", method)
            learned_path = os.path.join(args.output_dir, name, "sample_weights.json")
            PartialState().wait_for_everyone()  # the main process wrote the file at the end of training
            runs[f"{name}_refit"], _ = train_bros(
                model_args, config, method_args, data, name=f"{name}_refit", initial_sample_weights=learned_path
            )
    weights = learned["bros"]
    if data_args.run_frozen_weights_control:
        logger.info("(b0) BROSTrainer with the example weights frozen at 0.5")
        frozen = plain_arguments(args, args.output_dir)
        frozen.upper_warmup_steps = args.max_steps
        runs["bros_frozen_weights"], _ = train_bros(
            model_args, config, frozen, data, name="bros_frozen_weights"
        )
    if data_args.run_true_weights_control:
        logger.info("(b1) BROSTrainer with the example weights starting at the truth")
        true_path = os.path.join(args.output_dir, TRUE_WEIGHTS_FILE)
        if args.process_index == 0:
            os.makedirs(args.output_dir, exist_ok=True)
            truth = np.where(data.is_corrupted, 1e-3, 1.0 - 1e-3)
            write_json_atomic(true_path, {"weights": {str(i): float(w) for i, w in enumerate(truth)}})
        PartialState().wait_for_everyone()
        runs["bros_true_weights"], _ = train_bros(
            model_args, config, args, data, name="bros_true_weights", initial_sample_weights=true_path
        )
    if data_args.run_baselines:
        logger.info("(c) plain Trainer on the clean training examples only")
        clean_train = data.train.select(np.flatnonzero(~data.is_corrupted).tolist())
        runs["oracle_clean"] = train_plain("oracle_clean", model_args, config, args, clean_train, data.test)
        add_gap_closure(runs)
    parameters = runs["bros"]["parameters"]
    for run in runs.values():
        run.pop("parameters", None)

    report: dict[str, Any] = {
        "data": {**data.summary(), "noise_rate": data_args.noise_rate, "noise_kind": data_args.noise_kind},
        "model": {
            "name": model_args.model_name_or_path or "ViT from ViTConfig",
            "parameters": parameters,
        },
        "settings": {k: getattr(args, k) for k in SETTINGS_KEYS},
        "runs": runs,
    }
    if "plain_noisy" in runs:
        report["bros_minus_plain_noisy_accuracy"] = (
            runs["bros"]["test_accuracy"] - runs["plain_noisy"]["test_accuracy"]
        )
    report["wall_time_s"] = time.time() - wall_start
    if args.process_index == 0:
        os.makedirs(args.output_dir, exist_ok=True)
        detection = runs["bros"]["detection"]
        title = f"{args.bilevel_method}: AUROC {_fmt(detection['auroc'])}, F1 {_fmt(detection['f1'])}"
        histogram = save_histogram(
            os.path.join(args.output_dir, "weights_histogram.png"), weights, data.is_corrupted, title
        )
        report["histogram_path"] = histogram
        report["report_path"] = os.path.join(args.output_dir, "report.json")
        write_json_atomic(report["report_path"], report)
        print(f"\nLabel noise {data_args.noise_rate:.0%} ({data_args.noise_kind}) on {data.source}, "
              f"{args.max_steps} steps each:\n")  # fmt: skip
        print(markdown_table(report))
        print(
            f"\nreport: {report['report_path']}; histogram: {histogram}; total {report['wall_time_s']:.0f} s"
        )
    return report


if __name__ == "__main__":
    main()
    close_process_group()
