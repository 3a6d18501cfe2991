"""BROS data mixtures for supervised fine-tuning with TRL: :class:`BROSSFTTrainer` and :class:`BROSSFTConfig`.

TRL's ``SFTTrainer`` turns chat (``messages``), prompt/completion and plain-text datasets into token ids and
labels (chat template, completion-only or assistant-only masks, truncation, packing). ``BROSSFTTrainer`` keeps
all of that and learns the data mixture on top of it, as :class:`~bros_hf.trainer.BROSTrainer` does for
ready-made token blocks:

- lower level: θ ← θ − β ∇_θ g(λ, θ), g(λ, θ) = (1/n) Σ_i K w_{d_i}(λ) ℓ_i(θ) over the n examples i of a
  training batch, w = softmax(λ) the mixture over the K domains (``upper_level="sample"``: one weight σ(λ_i)
  per example), ℓ_i(θ) = mean over the target tokens t of example i (completion, assistant turns, or every
  token: whatever SFT's labels keep) of −log p_θ(y_{i,t} | y_{i,<t}) (BROSConfig's default
  ``loss_normalization="sequence"``);
- upper level: λ follows the hypergradient of f(θ) = mean_j ℓ_j(θ) over the *upper* (target) set, which goes
  through exactly the same SFT preparation as the training set (same chat template, same loss masks, same
  truncation), so that f and g measure the same thing.

Packing (``packing=True``): each packed row holds several examples (segments); every segment carries its own
key (its domain, or its example's index), so ℓ_s is still one example's mean token loss and the row's segments
are weighted separately. In domain mode every packed row holds one domain only (examples are packed within
their domain, as :func:`bros_hf.packing.group_texts_by_domain` does for pretraining blocks), so the balanced
domain sampler still draws each domain's rows equally often. A balanced batch of packed rows then holds about
the same number of *tokens* of every domain (unpacked: the same number of examples), so a domain of shorter
examples puts more segments ℓ_s into g. The upper set is packed too (see
:meth:`BROSSFTTrainer._prepare_upper_sft`): its ℓ_j are per packed example as well.

Example::

    from bros_hf.sft import BROSSFTConfig, BROSSFTTrainer

    args = BROSSFTConfig(output_dir="out", max_steps=500, domain_column="domain", packing=True)
    trainer = BROSSFTTrainer(model=model, args=args, train_dataset=chats, upper_dataset=target_chats,
                             processing_class=tokenizer)
    trainer.train()
    trainer.mixture_weights()   # {domain: weight}
"""

from __future__ import annotations

import copy
import importlib.metadata
import importlib.util
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import datasets
import torch
from packaging.version import Version
from torch import nn

from bros_hf.config import BROSConfig
from bros_hf.data import KEY_COLUMN
from bros_hf.trainer import BROSTrainer

MIN_TRL_VERSION = "1.16"
INSTALL_HINT = 'pip install "bros-hf[trl]"'

if importlib.util.find_spec("trl") is None:
    raise ImportError(
        f"bros_hf.sft needs TRL (trl>={MIN_TRL_VERSION}), which is not installed. Install it with: {INSTALL_HINT}"
    )
if Version(importlib.metadata.version("trl")) < Version(MIN_TRL_VERSION):
    raise ImportError(
        f"bros_hf.sft needs trl>={MIN_TRL_VERSION} (its SFTTrainer's dataset preparation and collator), found "
        f"trl {importlib.metadata.version('trl')}. Upgrade it with: {INSTALL_HINT} (or pip install -U trl)."
    )

from trl import SFTConfig, SFTTrainer  # noqa: E402
from trl.data_utils import pack_dataset  # noqa: E402
from trl.trainer.utils import global_then_local_main_first  # noqa: E402

# Per-token copy of the key, packed along with input_ids and labels, then read once per segment.
TOKEN_KEY_COLUMN = "_bros_token_key"
SEGMENT_LENGTHS_COLUMN = "seq_lengths"  # what trl's bfd packing names the segment lengths of a row


@dataclass
class BROSSFTConfig(SFTConfig, BROSConfig):
    """``SFTConfig`` and ``BROSConfig`` in one: every SFT field (``max_length``, ``packing``,
    ``completion_only_loss``, ``assistant_only_loss``...) and every bilevel field (``upper_level``,
    ``domain_column``, ``bilevel_method``...).

    Defaults are SFTConfig's, so that swapping ``SFTConfig`` for ``BROSSFTConfig`` changes nothing about the
    SFT run: where TRL changes a ``TrainingArguments`` default (``learning_rate=2e-5``, ``logging_steps=10``,
    ``gradient_checkpointing=True``, ``bf16`` on unless ``fp16``) TRL's default holds. The bilevel fields have
    BROSConfig's defaults; with ``bf16=True`` finite differences take their half-precision step (see BROSConfig).

    ``__post_init__`` runs SFTConfig's, which runs BROSConfig's (through TRL's base config) and with it
    ``TrainingArguments``'s: BROSConfig's validation holds unchanged.
    """


class BROSSFTTrainer(BROSTrainer, SFTTrainer):
    """``trl.SFTTrainer`` whose training steps are BROS bilevel steps: learns a domain mixture (or example
    weights) of an SFT dataset against ``upper_dataset``.

    Takes SFTTrainer's arguments (``processing_class``, ``peft_config``, ``formatting_func``, ...) plus
    ``upper_dataset``, the target set, in the same format as the training set (``messages``, prompt/completion
    or text; prepared the same way). The training set needs the domain column (``args.domain_column``) in
    domain mode.

    Construction order: BROSTrainer keys the raw training examples (``bros_key``), SFTTrainer prepares the
    datasets (:meth:`_prepare_dataset` carries the key through tokenisation, truncation and packing), then the
    bilevel set-up reads the keys of the *prepared* rows and prepares the upper set (:meth:`_setup_bilevel`).

    Streamed training sets (``datasets.IterableDataset``, domain mode, as BROSTrainer takes them) are supported
    without packing.

    Not supported (each refused at construction with the fix): vision-language datasets, ``loss_type="dft"``,
    ``packing_strategy="wrapped"`` with ``packing=True``, ``activation_offloading``, NEFTune
    (``neftune_noise_alpha``, refused by BROSConfig), Mixture-of-Experts router auxiliary losses, pre-packed datasets under
    ``skip_prepare_dataset``, packing a streamed training set. Training steps do not compute SFT's ``entropy`` /
    ``mean_token_accuracy`` (evaluation does); ``num_tokens`` is logged.
    """

    _tag_names = ["trl", "sft", "bros-hf"]
    _name = "BROS-SFT"

    def __init__(
        self,
        model: nn.Module | str | None = None,
        args: BROSSFTConfig | None = None,
        train_dataset: Any = None,
        upper_dataset: Any = None,
        eval_dataset: Any = None,
        data_collator: Any = None,
        **kwargs: Any,
    ):
        if args is None:
            args = BROSSFTConfig(output_dir="bros_sft_output")
        if not (isinstance(args, BROSConfig) and isinstance(args, SFTConfig)):
            raise TypeError(
                f"BROSSFTTrainer needs a BROSSFTConfig (both a BROSConfig and an SFTConfig), got "
                f"{type(args).__name__}. Build one with the same fields: BROSSFTConfig(**{{...}}) from "
                "bros_hf.sft, which takes every SFTConfig and BROSConfig field."
            )
        self._reject_unsupported(args, train_dataset, kwargs)
        super().__init__(
            model=model,
            args=args,
            train_dataset=train_dataset,
            upper_dataset=upper_dataset,
            eval_dataset=eval_dataset,
            data_collator=data_collator,
            **kwargs,
        )

    # ------------------------------------------------------------------ what cannot be combined
    @staticmethod
    def _reject_unsupported(args: BROSSFTConfig, train_dataset: Any, kwargs: dict[str, Any]) -> None:
        """Refuse TRL features the bilevel steps would silently ignore or get wrong, before any work."""
        if args.loss_type != "nll":
            raise ValueError(
                f"loss_type={args.loss_type!r} is not supported by BROSSFTTrainer: the bilevel passes compute "
                "each example's mean negative log-likelihood ℓ_i themselves (loss_type='nll'), and a DFT-weighted "
                "loss would only be used for evaluation. Set loss_type='nll'."
            )
        if args.activation_offloading:
            raise ValueError(
                "activation_offloading=True is not supported by BROSSFTTrainer: the bilevel passes take first- and "
                "second-order gradients with torch.autograd.grad, outside the offloading context SFTTrainer puts "
                "around its training step. Use gradient_checkpointing=True to save activation memory instead."
            )
        if args.packing and args.packing_strategy == "wrapped":
            raise ValueError(
                "packing_strategy='wrapped' is not supported by BROSSFTTrainer: it cuts examples mid-sequence and "
                "lets them attend across the cut, so a packed row has no per-example losses to weight by domain or "
                "example. Use packing_strategy='bfd' (the default) or 'bfd_split'."
            )
        dataset_kwargs = args.dataset_kwargs if isinstance(args.dataset_kwargs, dict) else {}
        columns = getattr(train_dataset, "column_names", None) or []
        if dataset_kwargs.get("skip_prepare_dataset") and SEGMENT_LENGTHS_COLUMN in columns:
            raise ValueError(
                f"The training set is pre-packed (it has a {SEGMENT_LENGTHS_COLUMN!r} column) and "
                "dataset_kwargs={'skip_prepare_dataset': True} keeps it as it is, so every packed row would get "
                "one domain (or example) key for several examples. Pass the unpacked examples and set packing=True: "
                "BROSSFTTrainer then packs them with one key per packed example."
            )
        streamed = isinstance(train_dataset, datasets.IterableDataset)
        if streamed and args.shuffle_dataset and args.upper_level == "domain" and args.balanced_domain_batches:
            raise ValueError(
                "shuffle_dataset=True on a streamed training set would shuffle away the round-robin order of "
                "balanced_domain_batches (each batch holding every domain equally often). Set shuffle_dataset=False "
                "(the balanced stream already interleaves the domains), or balanced_domain_batches=False."
            )
        sample = _first_example(train_dataset)
        if sample is not None and ("image" in sample or "images" in sample):
            raise ValueError(
                "Vision-language datasets (an 'image' or 'images' column) are not supported by BROSSFTTrainer: "
                "SFTTrainer processes them on the fly in its collator, without the per-example labels and keys the "
                "bilevel passes need. Use a text-only dataset."
            )
        if kwargs.get("compute_loss_func") is not None and args.packing:
            raise ValueError(
                "compute_loss_func with packing=True is not supported: a loss function of the whole batch cannot "
                "tell the packed examples of a row apart, and the bilevel passes need one loss per example. Set "
                "packing=False, or drop compute_loss_func (the built-in loss is per example and packing-aware)."
            )

    def _check_after_sft_setup(self) -> None:
        """What is only known once SFTTrainer has looked at the model."""
        if getattr(self, "aux_loss_enabled", False):
            raise ValueError(
                f"{type(self.model).__name__} is a Mixture-of-Experts model with a router load-balancing loss "
                f"(router_aux_loss_coef={self.router_aux_loss_coef}), which the bilevel passes do not add to "
                "the per-example losses. Set router_aux_loss_coef=0.0 in BROSSFTConfig to train without it."
            )

    # ------------------------------------------------------------------ keys through SFT's preparation
    def _prepare_dataset(
        self,
        dataset: Any,
        processing_class: Any,
        args: SFTConfig,
        packing: bool,
        formatting_func: Callable[[dict], str] | None,
        dataset_name: str,
    ) -> Any:
        """SFTTrainer's preparation, keeping the ``bros_key`` column of the (keyed) training set.

        Without packing, SFT's maps and filters keep extra columns, so the key rides along. With packing, SFT
        keeps only ``input_ids`` and ``labels``; here the examples are prepared unpacked (SFT's own steps up to
        packing: chat template, tokenisation, labels; no truncation, which packing does), then packed by
        :meth:`_pack_with_keys`, which gives each packed row the list of its segments' keys, in segment order.
        """
        columns = getattr(dataset, "column_names", None) or []
        if packing and SEGMENT_LENGTHS_COLUMN in columns and "input_ids" in columns:
            # Already packed (SFTTrainer.evaluate prepares a dict of eval sets, then Trainer.evaluate calls it
            # again on every prepared set): packing the packed rows again would merge their segments into one
            # sequence, attending across examples.
            return dataset
        if not _has_column(dataset, KEY_COLUMN):
            return super()._prepare_dataset(dataset, processing_class, args, packing, formatting_func, dataset_name)
        if not packing:
            prepared = super()._prepare_dataset(dataset, processing_class, args, False, formatting_func, dataset_name)
            self._check_key_survived(prepared, dataset_name)
            return prepared
        if not isinstance(dataset, datasets.Dataset):
            raise ValueError(
                f"packing=True needs a map-style training set to pack with its keys; got a streamed "
                f"{type(dataset).__name__}. Materialise it (datasets.Dataset.from_generator(lambda: (yield from "
                "ds), features=ds.features)), or train unpacked (packing=False; padding_free=True still avoids "
                "padding)."
            )
        if args.max_length is None:
            raise ValueError("When packing is enabled, `max_length` can't be `None`.")
        unpacked_args = copy.copy(args)  # SFT's steps before packing: no truncation, no shuffle (done below)
        unpacked_args.max_length = None
        unpacked_args.shuffle_dataset = False
        unpacked = super()._prepare_dataset(dataset, processing_class, unpacked_args, False, formatting_func, dataset_name)
        self._check_key_survived(unpacked, dataset_name)
        with global_then_local_main_first():
            return BROSSFTTrainer._pack_with_keys(unpacked, args, dataset_name)

    @staticmethod
    def _check_key_survived(dataset: Any, dataset_name: str) -> None:
        if not _has_column(dataset, KEY_COLUMN):
            raise RuntimeError(
                f"TRL's dataset preparation dropped the {KEY_COLUMN!r} column of the {dataset_name} set, so its "
                f"examples lost their domain / example keys. This TRL version is not supported by BROSSFTTrainer "
                f"(tested with trl>={MIN_TRL_VERSION}); please report it."
            )

    @staticmethod
    def _pack_with_keys(dataset: datasets.Dataset, args: BROSSFTConfig, dataset_name: str) -> datasets.Dataset:
        """Pack tokenised examples as SFT would (``pack_dataset``, ``args.packing_strategy``), with a per-token
        copy of every example's key packed along; each row's ``bros_key`` becomes the list of the keys found at
        its segments' first tokens (one per segment, in row order). In domain mode, examples are packed within
        their domain, so every row holds one domain."""
        num_proc = args.dataset_num_proc
        spread = dataset.map(
            _spread_keys, batched=True, num_proc=num_proc, desc=f"Keying the tokens of the {dataset_name} dataset"
        )
        columns = ["input_ids", "labels", TOKEN_KEY_COLUMN]
        if args.upper_level == "domain":  # (self.args is not set yet: this runs inside SFTTrainer.__init__)
            groups: dict[int, list[int]] = {}
            for index, key in enumerate(dataset.with_format(None)[KEY_COLUMN]):
                groups.setdefault(int(key), []).append(index)
            parts = [spread.select(indices) for _, indices in sorted(groups.items())]
        else:
            parts = [spread]
        map_kwargs = {"num_proc": num_proc, "desc": f"Packing {dataset_name} dataset"}
        packed_parts = []
        for part in parts:
            part = part.select_columns(columns)
            if args.shuffle_dataset:
                part = part.shuffle(seed=args.seed)
            packed_parts.append(pack_dataset(part, args.max_length, args.packing_strategy, map_kwargs))
        packed = datasets.concatenate_datasets(packed_parts) if len(packed_parts) > 1 else packed_parts[0]
        packed = packed.map(
            _segment_keys,
            batched=True,
            remove_columns=[TOKEN_KEY_COLUMN],
            num_proc=num_proc,
            desc=f"Keying the packed segments of the {dataset_name} dataset",
        )
        if args.shuffle_dataset:
            packed = packed.shuffle(seed=args.seed)
        return packed

    # ------------------------------------------------------------------ bilevel set-up on prepared data
    def _setup_bilevel(self, keyed_train: Any, train_dataset: Any, upper_dataset: Any) -> None:
        """BROSTrainer's set-up on the SFT-prepared sets: the prepared (possibly packed) training rows and the
        upper set prepared like them. ``keyed_train`` (the raw examples with their keys) only gives the number
        of examples, for one weight per example in sample mode."""
        self._check_after_sft_setup()
        sample_mode = self.args.upper_level == "sample"  # (a map-style set: streams are domain mode only)
        self._example_keys = [int(k) for k in keyed_train.with_format(None)[KEY_COLUMN]] if sample_mode else None
        upper = self._prepare_upper_sft(upper_dataset, train_dataset)
        super()._setup_bilevel(self.train_dataset, self.train_dataset, upper)

    def _read_keys(self, dataset: Any) -> list[int] | None:
        """Keys as BROSTrainer's sampler and upper variable use them. Sample mode: one per example of the
        user's training set (its index), so ``sample_weights()`` stays aligned with it even when SFT drops or
        packs rows. Domain mode: one per prepared row (its domain; a packed row holds one domain)."""
        if self.args.upper_level == "sample":
            return self._example_keys
        if not isinstance(dataset, datasets.Dataset):  # a stream: its keys come as it is read
            return BROSTrainer._read_keys(dataset)
        keys = []
        for index, key in enumerate(dataset.with_format(None)[KEY_COLUMN]):
            if isinstance(key, list):
                if not key or any(k != key[0] for k in key):
                    raise ValueError(
                        f"Packed training row {index} holds segments of domains {sorted(set(key))}: balanced domain "
                        "batches need one domain per row. Let BROSSFTTrainer pack the examples (packing=True)."
                    )
                key = key[0]
            keys.append(int(key))
        return keys

    def _prepare_upper_sft(self, upper_dataset: Any, train_dataset: Any) -> Any:
        """The upper set through SFT's preparation, as the training set: same chat template, formatting
        function, loss masks (completion-only / assistant-only), truncation to ``max_length`` and packing.

        Packed like the training rows, an upper batch of ``upper_batch_size`` (default
        ``per_device_train_batch_size``) rows holds about as many tokens as a training batch; its examples are
        told apart by their position ids, so f(θ) = mean_j ℓ_j(θ) still averages one mean token loss per target
        example (BROSTrainer's per-segment losses), with or without packing."""
        if self._skip_prepare_dataset:
            self._reject_skip_prepare_without_labels({"upper": upper_dataset}, self.data_collator)
            return upper_dataset
        if not isinstance(upper_dataset, datasets.Dataset):
            raise ValueError(
                f"upper_dataset must be a datasets.Dataset to go through SFT's preparation like the training set, "
                f"got {type(upper_dataset).__name__}. Convert it (datasets.Dataset.from_list(rows)), or pass both "
                "sets tokenised with labels and dataset_kwargs={'skip_prepare_dataset': True}."
            )
        if len(upper_dataset) == 0:
            raise ValueError("The upper (target) set is empty: pass a non-empty upper_dataset.")
        self._check_same_format(train_dataset, upper_dataset)
        if KEY_COLUMN in upper_dataset.column_names:  # keys belong to training examples only
            upper_dataset = upper_dataset.remove_columns(KEY_COLUMN)
        self._raw_upper_dataset = upper_dataset  # its domain column, which packing drops, is checked on it
        prepared = self._prepare_dataset(
            upper_dataset, self.processing_class, self.args, self.args.packing, self._formatting_func, "upper"
        )
        if len(prepared) == 0:
            raise ValueError(
                f"SFT's preparation dropped every example of the upper (target) set: truncated to max_length="
                f"{self.args.max_length} tokens, none keeps a target token (completion / assistant token). Raise "
                "max_length."
            )
        return prepared

    def _build_upper_variable(self, upper_dataset: Any) -> Any:
        """BROSTrainer's, with the upper set's domains checked on the unprepared set (packing drops the column)."""
        return super()._build_upper_variable(getattr(self, "_raw_upper_dataset", upper_dataset))

    def _check_same_format(self, train_dataset: Any, upper_dataset: datasets.Dataset) -> None:
        """SFT decides the loss masks from the training set's format; an upper set of another format would
        be scored on other tokens (e.g. prompts included), so f and g would measure different things."""
        if self._formatting_func is not None:  # both sets become text through the same function
            return
        train_format = _dataset_format(_first_example(train_dataset))
        upper_format = _dataset_format(_first_example(upper_dataset))
        if train_format is None or upper_format is None or train_format == upper_format:
            return
        raise ValueError(
            f"The upper (target) set is {upper_format} but the training set is {train_format}. SFT builds the loss "
            "masks from the training set's format, so the target set must have the same one (e.g. both "
            "'messages' conversations, or both prompt/completion) to be scored on the same tokens. Convert the "
            "target set to the training set's format."
        )

    # ------------------------------------------------------------------ training step, logs, checkpoints
    def training_step(self, model: nn.Module, inputs: dict[str, Any], num_items_in_batch: Any = None) -> torch.Tensor:
        """BROSTrainer's bilevel step (SFTTrainer's ``compute_loss`` is not called in training); counts the
        step's tokens for SFT's ``num_tokens`` metric."""
        self._count_train_tokens(inputs)
        return super().training_step(model, inputs, num_items_in_batch)

    def _count_train_tokens(self, inputs: dict[str, Any]) -> None:
        if "attention_mask" in inputs:
            local = inputs["attention_mask"].sum()
        elif "position_ids" in inputs:
            local = torch.tensor(inputs["position_ids"].size(1))
        else:
            return
        total = self.accelerator.gather_for_metrics(local.to(self.args.device).reshape(1)).sum().item()
        self._total_train_tokens += int(total) // self._tp_size
        self._metrics["train"]["num_tokens"] = [float(self._total_train_tokens)]

    def _save_checkpoint(self, model: nn.Module, trial: Any) -> None:
        """SFTTrainer's model card, then BROSTrainer's atomic checkpoint."""
        name = self.args.hub_model_id.split("/")[-1] if self.args.hub_model_id else None
        self.create_model_card(model_name=name or _output_name(self.args.output_dir))
        super()._save_checkpoint(model, trial)


# ---------------------------------------------------------------------------------- helpers
def _first_example(dataset: Any) -> dict[str, Any] | None:
    if dataset is None:
        return None
    try:
        example = dataset[0] if hasattr(dataset, "__getitem__") and hasattr(dataset, "__len__") else next(iter(dataset))
    except (IndexError, StopIteration, KeyError, TypeError):
        return None
    return example if isinstance(example, dict) else None


def _has_column(dataset: Any, column: str) -> bool:
    """Whether a ``datasets`` set (map-style or streamed, declared columns or not) has ``column``."""
    names = getattr(dataset, "column_names", None)
    if names is not None:
        return column in names
    if isinstance(dataset, datasets.IterableDataset):
        example = _first_example(dataset)
        return example is not None and column in example
    return False


def _dataset_format(example: dict[str, Any] | None) -> str | None:
    """'prompt/completion' or 'language-modeling', conversational or not; None for tokenised examples."""
    if example is None or "input_ids" in example:
        return None
    kind = "prompt/completion" if "prompt" in example and "completion" in example else "language-modeling"
    conversational = any(
        isinstance(example.get(key), list) and example[key] and isinstance(example[key][0], dict)
        for key in ("messages", "conversations", "prompt", "completion")
    )
    return f"{'conversational' if conversational else 'plain-text'} {kind}"


def _output_name(output_dir: str | None) -> str:
    return (output_dir or "").rstrip("/").split("/")[-1] or "model"


def _spread_keys(batch: dict[str, list]) -> dict[str, list]:
    """Every token gets its example's key."""
    return {TOKEN_KEY_COLUMN: [[int(k)] * len(ids) for k, ids in zip(batch[KEY_COLUMN], batch["input_ids"], strict=True)]}


def _segment_keys(batch: dict[str, list]) -> dict[str, list]:
    """One key per packed segment: the token key at each segment's first position."""
    keys = []
    for token_keys, lengths in zip(batch[TOKEN_KEY_COLUMN], batch[SEGMENT_LENGTHS_COLUMN], strict=True):
        starts, offset = [], 0
        for length in lengths:
            starts.append(offset)
            offset += int(length)
        keys.append([int(token_keys[s]) for s in starts])
    return {KEY_COLUMN: keys}


__all__ = ["BROSSFTConfig", "BROSSFTTrainer"]
