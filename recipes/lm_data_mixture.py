#!/usr/bin/env python
"""Learn a domain mixture for causal-LM training with BROS, then (optionally) train on it.

In the style of transformers' ``examples/pytorch/language-modeling/run_clm.py``: three argument
dataclasses (``ModelArguments``, ``DataArguments``, :class:`bros_hf.BROSConfig`) parsed with
``HfArgumentParser``, from the command line or from one ``.json``/``.yaml`` file.

The bilevel problem: the lower level trains the model on a mixture w = softmax(λ) of the training
domains, the upper level moves λ so that the loss on a *target* set goes down. By default everything
is local (no hub): the corpus is :func:`local_corpus.build_local_corpus` (recipes/local_corpus.py) (Python standard
library source ``code``, its docstrings ``prose``, ``help()`` topics ``docs``, package licenses
``legal``), a byte-level BPE tokenizer is trained on its train split, and a small Llama-style model is
built from a config. The target set is the ``target`` split of ``--target_domains`` (default
``docs``), the training set the ``train`` split of all domains, and the per-domain ``eval`` splits
give perplexities before and after training.

Quick start (CPU, about 3-5 minutes on 2 cores; data, tokenizer and blocks are cached for the next run)::

    python recipes/lm_data_mixture.py --output_dir outputs/lm_data_mixture

Learn the mixture and then also train a fresh model with the plain ``transformers.Trainer`` on the
learned mixture and one on the uniform mixture (same steps and seed), comparing target perplexity
(about 5-7 minutes)::

    python recipes/lm_data_mixture.py --output_dir outputs/lm_data_mixture --apply_mixture auto

Only apply an already learned mixture (no bilevel run; 200 plain steps per mixture by default)::

    python recipes/lm_data_mixture.py --output_dir outputs/lm_apply --max_steps 0 \\
        --apply_mixture outputs/lm_data_mixture/mixture_weights.json

Two CPU processes (DDP over gloo)::

    accelerate launch --config_file recipes/accelerate/cpu_ddp_2proc.yaml \\
        recipes/lm_data_mixture.py --output_dir outputs/lm_ddp

With a hub: ``--model_name_or_path``, ``--dataset_name`` (needs a domain column, see
``--domain_column``), or local ``--train_files`` (json/jsonl/parquet/csv with a domain column, or one
file per domain whose stem is the domain name) and ``--target_files``. ``--lora_r 8`` trains LoRA
adapters (then the adapters are the lower level θ).

Outputs in ``--output_dir``: ``mixture_weights.json`` (learned mixture ``weights`` = tail average, and ``final``),
``mixture_weights.png`` (trajectory), ``report.json`` (mixture, per-domain perplexity before/after,
apply-mixture comparison, timings), the trained model and tokenizer; with ``--apply_mixture``,
``apply_mixture/learned/`` and ``apply_mixture/uniform/`` hold each model trained with the plain Trainer
and its ``eval_results.json``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import datasets
import torch
import transformers
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    Trainer,
    default_data_collator,
    set_seed,
)

from bros_hf import BROSConfig, BROSTrainer
from bros_hf.export import write_json_atomic

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # sibling modules, also when loaded by path
from _common import (  # noqa: E402
    close_process_group,
    explained_hub_errors,
    parse_with_defaults,
    set_cpu_threads,
    setup_logging,
)
from local_corpus import build_local_corpus, tokenize_and_group, train_bpe_tokenizer  # noqa: E402

logger = logging.getLogger("lm_data_mixture")

# Bump when the cached tokenizer/block layout changes.
_CACHE_VERSION = 1

_FILE_BUILDERS = {
    ".json": "json",
    ".jsonl": "json",
    ".parquet": "parquet",
    ".csv": "csv",
    ".txt": "text",
    ".text": "text",
    ".md": "text",
}


@dataclass
class ModelArguments:
    """The model: a pretrained checkpoint, or a small causal LM built from a config (random init)."""

    model_name_or_path: str | None = field(
        default=None,
        metadata={"help": "Pretrained model (hub id or local path). Default: build a model from the size arguments."},
    )
    tokenizer_name: str | None = field(
        default=None,
        metadata={
            "help": "Pretrained tokenizer (default: the model's, or a byte-level BPE trained on the train split "
            "when the model is built from a config)."
        },
    )
    model_type: str = field(
        default="llama",
        metadata={"help": "Architecture of a config-built model.", "choices": ["llama", "gpt2"]},
    )
    hidden_size: int = field(default=128, metadata={"help": "Config-built model: hidden size."})
    num_layers: int = field(default=4, metadata={"help": "Config-built model: number of layers."})
    num_heads: int = field(default=4, metadata={"help": "Config-built model: number of attention heads."})
    intermediate_size: int = field(default=384, metadata={"help": "Config-built model: MLP inner size."})
    vocab_size: int = field(
        default=4096,
        metadata={"help": "Vocabulary size of the BPE tokenizer trained when no pretrained tokenizer is given."},
    )
    block_size: int = field(
        default=128,
        metadata={"help": "Tokens per training block (documents of one domain are concatenated and cut)."},
    )
    attn_implementation: str = field(
        default="sdpa",
        metadata={
            "help": "Attention kernel. 'sdpa' is fine: BROSTrainer switches to the math kernel for double backward.",
            "choices": ["sdpa", "eager", "flash_attention_2"],
        },
    )
    torch_dtype: str | None = field(
        default=None,
        metadata={
            "help": "dtype to load a pretrained model in (default: its saved dtype, float32 for config-built).",
            "choices": ["auto", "float32", "bfloat16", "float16"],
        },
    )
    cpu_threads: int | None = field(
        default=None,
        metadata={
            "help": "torch intra-op threads when training on CPU. Default: OMP_NUM_THREADS if set, else 1 for a "
            "config-built model (its matrices are small: on a shared 2-core machine 2 threads made the bilevel "
            "step 4-10x slower than 1) and torch's default for a pretrained model."
        },
    )
    trust_remote_code: bool = field(default=False, metadata={"help": "Allow custom model/tokenizer code from the hub."})
    lora_r: int = field(
        default=0, metadata={"help": "LoRA rank; > 0 trains PEFT LoRA adapters instead of all weights."}
    )
    lora_alpha: float = field(default=16.0, metadata={"help": "LoRA scaling alpha."})
    lora_dropout: float = field(
        default=0.0,
        metadata={"help": "LoRA dropout (0 keeps the lower-level passes of one step on the same function)."},
    )
    lora_target_modules: list[str] | None = field(
        default=None,
        metadata={"help": "Modules that get adapters (default: 'all-linear', every linear layer but the head)."},
    )

    def __post_init__(self) -> None:
        if self.model_type not in ("llama", "gpt2"):
            raise ValueError(f"model_type must be 'llama' or 'gpt2', got {self.model_type!r}.")
        for name in ("hidden_size", "num_layers", "num_heads", "intermediate_size", "vocab_size", "block_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be ≥ 1, got {getattr(self, name)}.")
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} must be divisible by num_heads {self.num_heads}.")
        if self.vocab_size < 258:
            raise ValueError("vocab_size must be ≥ 258 (256 byte symbols, the eos token and one merge).")
        if self.lora_r < 0:
            raise ValueError(f"lora_r must be ≥ 0, got {self.lora_r}.")


@dataclass
class DataArguments:
    """Where the training domains and the target set come from.

    Exactly one source for the training data: ``dataset_name``, ``train_files`` or (default) the local
    corpus. The target set is ``target_files`` if given, else the examples of ``target_domains`` held
    out of the training data. The domain subset is ``--domains`` (a BROSConfig field).
    """

    dataset_name: str | None = field(
        default=None, metadata={"help": "datasets.load_dataset name (hub or local script); needs a domain column."}
    )
    dataset_config_name: str | None = field(default=None, metadata={"help": "Config name of dataset_name."})
    train_split: str = field(default="train", metadata={"help": "Training split of dataset_name."})
    target_split: str | None = field(
        default=None,
        metadata={
            "help": "Split of dataset_name holding target examples (default: 'target' if the dataset has it, "
            "else target_fraction of the train split is held out)."
        },
    )
    eval_split: str | None = field(
        default=None,
        metadata={
            "help": "Evaluation split of dataset_name (default: 'validation' or 'eval' if present, else "
            "eval_fraction of the train split is held out)."
        },
    )
    train_files: list[str] | None = field(
        default=None,
        metadata={
            "help": "Local training files (json/jsonl/parquet/csv/txt). A file with a domain column keeps it; "
            "otherwise every example of the file gets the file stem as its domain."
        },
    )
    target_files: list[str] | None = field(
        default=None,
        metadata={
            "help": "Local files forming the target set (all their examples, any domain); eval_fraction of them "
            "is held out for the 'target' perplexity."
        },
    )
    text_column: str = field(default="text", metadata={"help": "Column with the raw text."})
    target_domains: list[str] = field(
        default_factory=lambda: ["docs"],
        metadata={
            "help": "Domain(s) whose held-out examples form the target set when no target_files are given. "
            "Default 'docs' (the Python help() topics of the local corpus)."
        },
    )
    max_docs_per_domain: int | None = field(
        default=400,
        metadata={
            "help": "Cap on documents per domain: for the local corpus, chunks per domain before the train/target/"
            "eval split; for dataset_name/train_files, documents per domain and source split. None: no cap."
        },
    )
    chunk_chars: int = field(default=2000, metadata={"help": "Local corpus: characters per chunk (document)."})
    target_fraction: float = field(
        default=0.1, metadata={"help": "Fraction of each domain held out as target examples (if not given)."}
    )
    eval_fraction: float = field(
        default=0.1, metadata={"help": "Fraction of each domain held out for evaluation (if not given)."}
    )
    corpus_seed: int = field(
        default=0, metadata={"help": "Seed of the corpus construction and held-out splits (not the training seed)."}
    )
    max_eval_blocks_per_domain: int | None = field(
        default=None, metadata={"help": "Evaluate on at most this many blocks per domain (None: all)."}
    )
    cache_dir: str | None = field(
        default=None,
        metadata={
            "help": "Cache for the corpus, tokenizer and tokenized blocks (and hub downloads). Default: "
            "$BROS_HF_CACHE, else ~/.cache/bros_hf. Use 'none' to disable."
        },
    )
    overwrite_cache: bool = field(default=False, metadata={"help": "Rebuild cached tokenizer and blocks."})
    preprocessing_num_workers: int | None = field(
        default=None, metadata={"help": "Processes for tokenization (datasets.map num_proc)."}
    )
    apply_mixture: str | None = field(
        default=None,
        metadata={
            "help": "PATH to a mixture_weights.json, or 'auto' for the mixture this run learns: train a fresh "
            "model with the plain transformers.Trainer on data sampled with that mixture and one on the uniform "
            "mixture (same steps and seed), and compare target perplexity."
        },
    )
    apply_mixture_weights: str = field(
        default="average",
        metadata={
            "help": "Which mixture of the JSON to apply: the learned one ('average', the tail average the trainer "
            "reports as mixture_weights()) or the last iterate ('final').",
            "choices": ["average", "final"],
        },
    )
    apply_mixture_steps: int | None = field(
        default=None,
        metadata={"help": "Optimizer steps of each apply-mixture run (default: max_steps, or the recipe's 200 "
                  "when --max_steps 0)."},
    )
    apply_mixture_learning_rate: float | None = field(
        default=None,
        metadata={"help": "Learning rate of the plain (full-space AdamW) apply-mixture runs (default: 1e-3)."},
    )

    def __post_init__(self) -> None:
        if self.dataset_name is not None and self.train_files is not None:
            raise ValueError("Pass either --dataset_name or --train_files, not both.")
        if not (0 <= self.target_fraction < 1 and 0 < self.eval_fraction < 1):
            raise ValueError("target_fraction must be in [0, 1) and eval_fraction in (0, 1).")
        if self.target_fraction + self.eval_fraction >= 1:
            raise ValueError("target_fraction + eval_fraction must be < 1.")
        if self.max_docs_per_domain is not None and self.max_docs_per_domain < 3:
            raise ValueError("max_docs_per_domain must be ≥ 3 (one document per split).")
        if not self.target_domains and not self.target_files:
            raise ValueError("Give --target_domains or --target_files: the upper level needs a target set.")


# ------------------------------------------------------------------------------------------------------
# Arguments and recipe defaults
# ------------------------------------------------------------------------------------------------------

# Recipe defaults, used for every field the user does not set: the lower level's settings, sized so that the
# default run (local corpus, 4 domains, 1.4 M-parameter Llama) finishes in a few minutes on 2 CPU cores. Every
# bilevel knob is the package default (RECIPE_REASONS, shown in --help, would name a departure and the
# measurement that made it; hessian_mode="autograd" was one until the auxiliary step limit: with it, on seed 42
# with --apply_mixture auto, the package default (finite differences) gives learned-mixture docs perplexity 394.5
# against 394.4 with autograd, uniform 539.8, and docs weight 0.791 against 0.678).
RECIPE_DEFAULTS: dict[str, Any] = {
    "max_steps": 200,
    "learning_rate": 3e-3,
    "lr_scheduler_type": "cosine",
    "warmup_steps": 0.05,
    "weight_decay": 0.0,
    "optim": "adamw_torch",
    "logging_steps": 10,
    "save_strategy": "no",
    "eval_strategy": "no",
    "report_to": "none",
    "per_device_eval_batch_size": 32,
    "seed": 42,
}
RECIPE_REASONS: dict[str, str] = {}
# Training batch size: the smallest multiple of the number of domains K that is ≥ this (set after the
# data is loaded, so that every balanced batch holds each domain equally often).
DEFAULT_MIN_BATCH_SIZE = 8
APPLY_MIXTURE_DEFAULT_LR = 1e-3
MAX_INTERLEAVED_EXAMPLES = 2_000_000


def parse_arguments(argv: list[str] | None = None) -> tuple[ModelArguments, DataArguments, BROSConfig, set[str]]:
    """Parse the three dataclasses, filling every recipe default the user did not give.

    Defaults are injected *before* parsing, so ``TrainingArguments.__post_init__`` sees final values.
    Returns the parsed arguments and the set of option names given explicitly.
    """
    (model_args, data_args, training_args), given = parse_with_defaults(
        (ModelArguments, DataArguments, BROSConfig), argv, RECIPE_DEFAULTS, reasons=RECIPE_REASONS
    )
    return model_args, data_args, training_args, given


def resolve_cache_dir(data_args: DataArguments) -> Path | None:
    value = data_args.cache_dir
    if value is not None and value.lower() == "none":
        return None
    if value is None:
        value = os.environ.get("BROS_HF_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "bros_hf")
    path = Path(value)
    path.mkdir(parents=True, exist_ok=True)
    return path


# ------------------------------------------------------------------------------------------------------
# Raw data: DatasetDict(train, target, eval) with columns text, domain (target may lack domain)
# ------------------------------------------------------------------------------------------------------


def _ensure_text_domain(ds: datasets.Dataset, text_column: str, domain_column: str | None) -> datasets.Dataset:
    if text_column not in ds.column_names:
        raise ValueError(f"No text column {text_column!r} (columns: {ds.column_names}); set --text_column.")
    keep = [text_column] + ([domain_column] if domain_column and domain_column in ds.column_names else [])
    ds = ds.select_columns(keep)
    if text_column != "text":
        ds = ds.rename_column(text_column, "text")
    if domain_column and domain_column in ds.column_names:
        if domain_column != "domain":
            ds = ds.rename_column(domain_column, "domain")
        if ds.features["domain"].dtype != "string":
            ds = ds.cast_column("domain", datasets.Value("string"))
    return ds


def _domain_indices(ds: datasets.Dataset) -> dict[str, list[int]]:
    groups: dict[str, list[int]] = {}
    for i, value in enumerate(ds["domain"]):
        groups.setdefault(str(value), []).append(i)
    return groups


def _cap_per_domain(ds: datasets.Dataset, cap: int | None, seed: int) -> datasets.Dataset:
    """Keep at most ``cap`` random documents of each domain (original order otherwise)."""
    if cap is None:
        return ds
    generator = torch.Generator().manual_seed(seed)
    keep: list[int] = []
    for indices in _domain_indices(ds).values():
        if len(indices) > cap:
            order = torch.randperm(len(indices), generator=generator)[:cap].tolist()
            indices = [indices[i] for i in sorted(order)]
        keep.extend(indices)
    return ds.select(sorted(keep)) if len(keep) < len(ds) else ds


def _carve(ds: datasets.Dataset, fractions: dict[str, float], seed: int) -> dict[str, datasets.Dataset]:
    """Split every domain of ``ds`` at random: ``fractions`` of it go to the named parts, the rest to
    ``train``. Each named part gets at least one document of each domain with ≥ len(fractions)+1 docs."""
    generator = torch.Generator().manual_seed(seed)
    parts: dict[str, list[int]] = {name: [] for name in ["train", *fractions]}
    for domain, indices in sorted(_domain_indices(ds).items()):
        order = [indices[i] for i in torch.randperm(len(indices), generator=generator).tolist()]
        start = 0
        for name, fraction in fractions.items():
            n = max(1, round(fraction * len(order))) if fraction > 0 else 0
            if len(order) - start - n < 1:
                raise ValueError(f"Domain {domain!r} has too few documents ({len(indices)}) to hold out {name}.")
            parts[name].extend(order[start : start + n])
            start += n
        parts["train"].extend(order[start:])
    return {name: ds.select(sorted(indices)) for name, indices in parts.items()}


def _load_files(files: list[str], data_args: DataArguments, domain_column: str, cache: str | None, *, stem_domain: bool):
    parts = []
    for file in files:
        suffix = Path(file).suffix.lower()
        if suffix not in _FILE_BUILDERS:
            raise ValueError(f"Unsupported file type {file!r}; use one of {sorted(_FILE_BUILDERS)}.")
        builder = _FILE_BUILDERS[suffix]
        kwargs = {"sample_by": "paragraph"} if builder == "text" else {}
        ds = datasets.load_dataset(builder, data_files=file, split="train", cache_dir=cache, **kwargs)
        text_column = "text" if builder == "text" else data_args.text_column  # plain text: always "text"
        ds = _ensure_text_domain(ds, text_column, domain_column)
        if stem_domain and "domain" not in ds.column_names:
            ds = ds.add_column("domain", [Path(file).stem] * len(ds))
        parts.append(ds)
    return datasets.concatenate_datasets(parts) if len(parts) > 1 else parts[0]


def _filter_domains(ds: datasets.Dataset, domains: list[str] | None) -> datasets.Dataset:
    if not domains:
        return ds
    wanted = set(domains)
    keep = [i for i, value in enumerate(ds["domain"]) if value in wanted]
    return ds.select(keep)


def load_raw_data(data_args: DataArguments, training_args: BROSConfig, cache: Path | None) -> datasets.DatasetDict:
    """train/target/eval splits with columns ``text`` and ``domain``."""
    seed = data_args.corpus_seed
    cap = data_args.max_docs_per_domain
    hub_cache = str(cache / "datasets") if cache is not None else None
    column = training_args.domain_column
    if data_args.dataset_name is None and data_args.train_files is None:
        corpus = build_local_corpus(
            cache,
            domains=training_args.domains,
            max_docs_per_domain=cap or 400,
            chunk_chars=data_args.chunk_chars,
            target_fraction=data_args.target_fraction,
            eval_fraction=data_args.eval_fraction,
            seed=seed,
        )
        splits = dict(corpus)
    else:
        if data_args.dataset_name is not None:
            with explained_hub_errors("dataset", data_args.dataset_name):
                loaded = datasets.load_dataset(
                    data_args.dataset_name, data_args.dataset_config_name, cache_dir=hub_cache
                )
            if data_args.train_split not in loaded:
                raise ValueError(f"{data_args.dataset_name} has no split {data_args.train_split!r}: {list(loaded)}.")
            source = {
                name: _ensure_text_domain(ds, data_args.text_column, column) for name, ds in loaded.items()
            }
            for name, ds in source.items():
                if "domain" not in ds.column_names:
                    raise ValueError(
                        f"Split {name!r} of {data_args.dataset_name} has no domain column {column!r}; set "
                        "--domain_column (a BROSConfig field) to the column naming each example's source."
                    )
            train = source[data_args.train_split]
            target_split = data_args.target_split or ("target" if "target" in source else None)
            eval_split = data_args.eval_split or next((s for s in ("validation", "eval") if s in source), None)
            given = {"target": target_split, "eval": eval_split}
            for role, split in given.items():
                if split is not None and split not in source:
                    raise ValueError(f"{data_args.dataset_name} has no split {split!r} (for {role}): {list(source)}.")
        else:
            train = _load_files(data_args.train_files, data_args, column, hub_cache, stem_domain=True)
            given = {"target": None, "eval": None}
            source = {}
        train = _filter_domains(train, training_args.domains)
        train = _cap_per_domain(train, cap, seed)
        fractions = {}
        if data_args.target_files is None and given["target"] is None:
            fractions["target"] = data_args.target_fraction
        if given["eval"] is None:
            fractions["eval"] = data_args.eval_fraction
        splits = _carve(train, fractions, seed)
        for role, split in given.items():
            if split is not None:
                splits[role] = _cap_per_domain(_filter_domains(source[split], training_args.domains), cap, seed)
    if data_args.target_files is not None:
        target = _load_files(data_args.target_files, data_args, None, hub_cache, stem_domain=False)
        target = target.shuffle(seed=seed)
        n_eval = max(1, round(data_args.eval_fraction * len(target)))
        if len(target) - n_eval < 1:
            raise ValueError("target_files hold too few documents to hold out an eval part.")
        splits["target"] = target.select(range(n_eval, len(target)))
        splits["target_eval"] = target.select(range(n_eval))
    return datasets.DatasetDict(splits)


# ------------------------------------------------------------------------------------------------------
# Tokenizer and blocks (cached)
# ------------------------------------------------------------------------------------------------------


def _hash(payload: Any) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _fingerprint(ds: datasets.Dataset) -> str:
    return getattr(ds, "_fingerprint", None) or _hash(ds[:]["text"])


def load_tokenizer(model_args: ModelArguments, raw: datasets.DatasetDict, cache: Path | None, overwrite: bool):
    name = model_args.tokenizer_name or model_args.model_name_or_path
    if name is not None:
        with explained_hub_errors("tokenizer", name):
            tokenizer = AutoTokenizer.from_pretrained(
                name, trust_remote_code=model_args.trust_remote_code, cache_dir=str(cache / "hub") if cache else None
            )
        if tokenizer.eos_token is None:
            raise ValueError(f"Tokenizer {name} has no eos token (needed between documents of a block).")
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        return tokenizer
    save_dir = None
    if cache is not None:
        key = _hash([_CACHE_VERSION, _fingerprint(raw["train"]), model_args.vocab_size])
        save_dir = cache / "tokenizers" / f"bpe{model_args.vocab_size}-{key}"
        if overwrite and save_dir.exists():
            shutil.rmtree(save_dir)
    return train_bpe_tokenizer(raw["train"]["text"], vocab_size=model_args.vocab_size, save_dir=save_dir)


def _tokenizer_fingerprint(tokenizer) -> str:
    with tempfile.TemporaryDirectory() as tmp:
        files = tokenizer.save_pretrained(tmp)
        digest = hashlib.sha256()
        for file in sorted(files):
            if os.path.isfile(file):
                digest.update(Path(file).read_bytes())
    return digest.hexdigest()[:16]


def make_blocks(
    raw: datasets.DatasetDict, tokenizer, block_size: int, cache: Path | None, data_args: DataArguments
) -> datasets.DatasetDict:
    tok_key = _tokenizer_fingerprint(tokenizer)
    out = {}
    for split, ds in raw.items():
        keep = ("domain",) if "domain" in ds.column_names else ()
        path = None
        if cache is not None:
            key = _hash([_CACHE_VERSION, _fingerprint(ds), tok_key, block_size, keep])
            path = cache / "blocks" / f"{split}-{key}"
            if data_args.overwrite_cache and path.exists():
                shutil.rmtree(path)
            if (path / "dataset_info.json").is_file():
                out[split] = datasets.load_from_disk(str(path))
                continue
        blocks = tokenize_and_group(
            ds, tokenizer, block_size, keep_columns=keep, num_proc=data_args.preprocessing_num_workers
        )
        if len(blocks) == 0:
            raise ValueError(f"Split {split!r} has no complete block of {block_size} tokens; lower --block_size.")
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{path.name}-", dir=path.parent))
            try:
                blocks.save_to_disk(str(tmp))
                os.replace(tmp, path)
            except OSError:
                if not (path / "dataset_info.json").is_file():
                    raise
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
            blocks = datasets.load_from_disk(str(path))
        out[split] = blocks
    return datasets.DatasetDict(out)


def split_by_domain(ds: datasets.Dataset, domains: list[str], limit: int | None = None) -> dict[str, datasets.Dataset]:
    groups = _domain_indices(ds)
    out = {}
    for domain in domains:
        indices = groups.get(domain, [])
        if limit is not None:
            indices = indices[:limit]
        if indices:
            out[domain] = ds.select(indices)
    return out


# ------------------------------------------------------------------------------------------------------
# Model
# ------------------------------------------------------------------------------------------------------


def build_model(model_args: ModelArguments, tokenizer, seed: int) -> torch.nn.Module:
    """A pretrained model, or a fresh config-built one (seeded); with LoRA adapters if lora_r > 0."""
    set_seed(seed)
    if model_args.model_name_or_path is not None:
        dtype = model_args.torch_dtype
        dtype = dtype if dtype in (None, "auto") else getattr(torch, dtype)
        with explained_hub_errors("model", model_args.model_name_or_path):
            model = AutoModelForCausalLM.from_pretrained(
                model_args.model_name_or_path,
                dtype=dtype,
                attn_implementation=model_args.attn_implementation,
                trust_remote_code=model_args.trust_remote_code,
            )
        if len(tokenizer) > model.get_input_embeddings().weight.shape[0]:
            model.resize_token_embeddings(len(tokenizer))
    else:
        common = {
            "vocab_size": len(tokenizer),
            "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.eos_token_id,
            "pad_token_id": tokenizer.pad_token_id,
            "tie_word_embeddings": True,
        }
        if model_args.model_type == "llama":
            config = transformers.LlamaConfig(
                hidden_size=model_args.hidden_size,
                num_hidden_layers=model_args.num_layers,
                num_attention_heads=model_args.num_heads,
                num_key_value_heads=model_args.num_heads,
                intermediate_size=model_args.intermediate_size,
                max_position_embeddings=model_args.block_size,
                **common,
            )
        else:
            config = transformers.GPT2Config(
                n_embd=model_args.hidden_size,
                n_layer=model_args.num_layers,
                n_head=model_args.num_heads,
                n_inner=model_args.intermediate_size,
                n_positions=model_args.block_size,
                **common,
            )
        config._attn_implementation = model_args.attn_implementation
        model = AutoModelForCausalLM.from_config(config, attn_implementation=model_args.attn_implementation)
    if model_args.lora_r > 0:
        from peft import LoraConfig, get_peft_model

        lora = LoraConfig(
            r=model_args.lora_r,
            lora_alpha=model_args.lora_alpha,
            lora_dropout=model_args.lora_dropout,
            target_modules=model_args.lora_target_modules or "all-linear",
            task_type="CAUSAL_LM",
        )
        model = get_peft_model(model, lora)
    return model


def count_parameters(model: torch.nn.Module) -> tuple[int, int]:
    seen, total, trainable = set(), 0, 0
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel()
        trainable += p.numel() if p.requires_grad else 0
    return total, trainable


# ------------------------------------------------------------------------------------------------------
# Evaluation and mixtures
# ------------------------------------------------------------------------------------------------------


def perplexity(loss: float) -> float:
    return math.exp(loss) if loss < 700 else float("inf")


def evaluate_sets(trainer: Trainer, eval_sets: dict[str, datasets.Dataset]) -> dict[str, dict[str, float]]:
    """{name: {"loss", "perplexity"}} with one trainer.evaluate per set (metric_key_prefix per set)."""
    results = {}
    for name, ds in eval_sets.items():
        metrics = trainer.evaluate(eval_dataset=ds, metric_key_prefix=f"eval_{name}")
        loss = float(metrics[f"eval_{name}_loss"])
        results[name] = {"loss": loss, "perplexity": perplexity(loss)}
    return results


def read_mixture(path: str, which: str) -> dict[str, float]:
    """{domain: weight} from a mixture_weights.json ('final'/'average' entries) or a plain mapping."""
    with open(path) as handle:
        payload = json.load(handle)
    weights = payload.get(which, payload) if isinstance(payload, dict) else None
    if not isinstance(weights, dict) or not all(isinstance(v, (int, float)) for v in weights.values()):
        raise ValueError(f"{path} holds no {{domain: weight}} mapping under {which!r} (nor at top level).")
    return {str(k): float(v) for k, v in weights.items()}


def mixture_dataset(
    per_domain: dict[str, datasets.Dataset], weights: dict[str, float], seed: int
) -> tuple[datasets.Dataset, dict[str, float]]:
    """interleave_datasets of the per-domain sets with probabilities = weights (normalised; zero-weight
    domains dropped), ``stopping_strategy="all_exhausted"``."""
    unknown = sorted(set(weights) - set(per_domain))
    if unknown:
        raise ValueError(f"Mixture names domains {unknown} that the training data lacks ({sorted(per_domain)}).")
    used = {d: w for d, w in weights.items() if w > 1e-6}
    total = sum(used.values())
    if total <= 0:
        raise ValueError(f"Mixture {weights} has no positive weight.")
    probabilities = {d: w / total for d, w in used.items()}
    names = list(probabilities)
    # "all_exhausted" draws until every domain was seen once: about max_d n_d / p_d examples. For a tiny
    # weight on a large domain that is millions of indices; "first_exhausted" samples the same mixture
    # (the Trainer then runs several epochs over it).
    expected = max(len(per_domain[d]) / probabilities[d] for d in names)
    strategy = "all_exhausted" if expected <= MAX_INTERLEAVED_EXAMPLES else "first_exhausted"
    if strategy != "all_exhausted":
        logger.warning(
            "Mixture %s would need ~%d examples to exhaust every domain; using stopping_strategy='first_exhausted'.",
            probabilities,
            int(expected),
        )
    mixed = datasets.interleave_datasets(
        [per_domain[d].remove_columns("domain") for d in names],
        probabilities=[probabilities[d] for d in names],
        seed=seed,
        stopping_strategy=strategy,
    )
    return mixed, probabilities


def apply_mixtures(
    model_args: ModelArguments,
    data_args: DataArguments,
    training_args: BROSConfig,
    tokenizer,
    train_by_domain: dict[str, datasets.Dataset],
    eval_sets: dict[str, datasets.Dataset],
    learned: dict[str, float],
    target_name: str,
) -> dict[str, Any]:
    """Train a fresh model with the plain Trainer on the learned and on the uniform mixture."""
    steps = data_args.apply_mixture_steps or (
        training_args.max_steps if training_args.max_steps > 0 else RECIPE_DEFAULTS["max_steps"]
    )
    if steps is None or steps < 1:
        raise ValueError("apply_mixture needs a positive --apply_mixture_steps (or --max_steps).")
    lr = data_args.apply_mixture_learning_rate or APPLY_MIXTURE_DEFAULT_LR
    uniform = {d: 1.0 / len(train_by_domain) for d in train_by_domain}
    results: dict[str, Any] = {"steps": steps, "learning_rate": lr, "mixture_key": data_args.apply_mixture_weights}
    for label, weights in (("learned", learned), ("uniform", uniform)):
        train_ds, probabilities = mixture_dataset(train_by_domain, weights, training_args.seed)
        args = dataclasses.replace(
            training_args,
            output_dir=os.path.join(training_args.output_dir, "apply_mixture", label),
            max_steps=steps,
            learning_rate=lr,
            save_strategy="no",
            eval_strategy="no",
        )
        # A plain Trainer ignores the BROSConfig fields; only TrainingArguments matter here.
        model = build_model(model_args, tokenizer, training_args.seed)
        trainer = Trainer(
            model=model,
            args=args,
            train_dataset=train_ds,
            data_collator=default_data_collator,
            processing_class=tokenizer,
        )
        start = time.time()
        trainer.train()
        elapsed = time.time() - start
        trainer.save_model()  # apply_mixture/<label>/: the model trained on that mixture, with its tokenizer
        evaluation = evaluate_sets(trainer, eval_sets)
        results[label] = {
            "mixture": probabilities,
            "train_seconds": round(elapsed, 1),
            "eval": evaluation,
            "target_perplexity": evaluation[target_name]["perplexity"],
            "model_dir": args.output_dir,
        }
        write_json_atomic(os.path.join(args.output_dir, "eval_results.json"), results[label])
        del trainer, model
    results["target"] = target_name
    results["target_perplexity_ratio"] = (
        results["learned"]["target_perplexity"] / results["uniform"]["target_perplexity"]
    )
    return results


# ------------------------------------------------------------------------------------------------------
# Main
# ------------------------------------------------------------------------------------------------------


def _format_report(report: dict[str, Any]) -> str:
    lines = ["", "=" * 72, f"BROS data mixture ({report['bilevel_method']}), target: {report['target']}"]
    mixture = report.get("mixture")
    if mixture:
        lines.append(f"{'domain':<12}{'final w':>9}{'avg w':>9}{'ppl before':>12}{'ppl after':>11}")
        for domain in report["domains"]:
            before = report["eval_before"].get(domain, {}).get("perplexity", float("nan"))
            after = report["eval_after"].get(domain, {}).get("perplexity", float("nan"))
            lines.append(
                f"{domain:<12}{mixture['final'][domain]:>9.3f}{mixture['average'][domain]:>9.3f}"
                f"{before:>12.2f}{after:>11.2f}"
            )
        if report["target"] not in report["domains"]:
            before = report["eval_before"][report["target"]]["perplexity"]
            after = report["eval_after"][report["target"]]["perplexity"]
            lines.append(f"{report['target']:<12}{'':>18}{before:>12.2f}{after:>11.2f}")
    applied = report.get("apply_mixture")
    if applied:
        learned, uniform = applied["learned"], applied["uniform"]
        mix = ", ".join(f"{d}={w:.2f}" for d, w in learned["mixture"].items())
        lines.append(f"apply mixture ({applied['steps']} plain Trainer steps each; learned: {mix}):")
        lines.append(
            f"  target ppl: learned {learned['target_perplexity']:.2f} vs uniform {uniform['target_perplexity']:.2f}"
            f"  (ratio {applied['target_perplexity_ratio']:.3f})"
        )
    lines.append(f"wall time {report['wall_seconds']:.0f} s; report: {report['report_path']}")
    lines.append("=" * 72)
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    wall_start = time.time()
    model_args, data_args, training_args, given = parse_arguments(argv)
    setup_logging(logger, training_args)
    transformers.utils.logging.enable_default_handler()
    transformers.utils.logging.enable_explicit_format()
    if training_args.upper_level != "domain":
        raise ValueError("This recipe learns a domain mixture: upper_level must be 'domain'.")
    logger.info("Model %s\nData %s", model_args, data_args)
    cache = resolve_cache_dir(data_args)
    set_cpu_threads(logger, model_args.cpu_threads, training_args, config_built=model_args.model_name_or_path is None)

    # ---- data (rank 0 builds the caches first, the other ranks then load them)
    with training_args.main_process_first(desc="corpus, tokenizer and blocks"):
        raw = load_raw_data(data_args, training_args, cache)
        tokenizer = load_tokenizer(model_args, raw, cache, data_args.overwrite_cache)
        blocks = make_blocks(raw, tokenizer, model_args.block_size, cache, data_args)
    training_args.domain_column = "domain"  # the loaders renamed the user's domain column to "domain"

    train_blocks = blocks["train"]
    domains = training_args.domains or sorted(set(train_blocks["domain"]))
    train_by_domain = split_by_domain(train_blocks, domains)
    missing = [d for d in domains if d not in train_by_domain]
    if missing:
        raise ValueError(f"Domains {missing} have no training block of {model_args.block_size} tokens.")
    if data_args.target_files is None:
        unknown = sorted(set(data_args.target_domains) - set(domains))
        if unknown:
            raise ValueError(f"--target_domains {unknown} are not training domains {domains}.")
        target_domains = list(data_args.target_domains)
        target_blocks = blocks["target"].filter(lambda d: d in set(target_domains), input_columns="domain")
        target_name = target_domains[0] if len(target_domains) == 1 else "target"
    else:
        target_domains = []
        target_blocks = blocks["target"]
        target_name = "target"
    if len(target_blocks) == 0:
        raise ValueError("The target set has no complete block; lower --block_size or raise max_docs_per_domain.")
    limit = data_args.max_eval_blocks_per_domain
    eval_sets = split_by_domain(blocks["eval"], domains, limit)
    if target_name == "target":
        if data_args.target_files is not None:
            eval_sets["target"] = blocks["target_eval"]
        else:
            pooled = blocks["eval"].filter(lambda d: d in set(target_domains), input_columns="domain")
            eval_sets["target"] = pooled.select(range(min(len(pooled), limit))) if limit else pooled
    if target_name not in eval_sets:
        raise ValueError(f"No eval block for the target {target_name!r}.")

    k = len(domains)
    if "per_device_train_batch_size" not in given:
        training_args.per_device_train_batch_size = k * math.ceil(DEFAULT_MIN_BATCH_SIZE / k)
    elif training_args.per_device_train_batch_size % k:
        logger.warning(
            "per_device_train_batch_size=%d is not a multiple of the %d domains: balanced batches will not hold "
            "every domain equally often.",
            training_args.per_device_train_batch_size,
            k,
        )

    # ---- model and bilevel trainer
    model = build_model(model_args, tokenizer, training_args.seed)
    total_params, trainable_params = count_parameters(model)
    logger.info(
        "Domains %s (train blocks %s), target %s (%d blocks); model %.2f M parameters (%.2f M trainable)",
        domains,
        {d: len(ds) for d, ds in train_by_domain.items()},
        target_name,
        len(target_blocks),
        total_params / 1e6,
        trainable_params / 1e6,
    )
    train_dataset = datasets.concatenate_datasets([train_by_domain[d] for d in domains])
    trainer = BROSTrainer(
        model=model,
        args=training_args,
        train_dataset=train_dataset,
        upper_dataset=target_blocks,
        data_collator=default_data_collator,
        processing_class=tokenizer,
    )
    report: dict[str, Any] = {
        "bilevel_method": training_args.bilevel_method,
        "domains": domains,
        "target": target_name,
        "target_domains": target_domains,
        "model": model_args.model_name_or_path or f"{model_args.model_type} from config",
        "parameters": total_params,
        "trainable_parameters": trainable_params,
        "train_blocks": {d: len(ds) for d, ds in train_by_domain.items()},
        "target_blocks": len(target_blocks),
        "block_size": model_args.block_size,
        "max_steps": training_args.max_steps,
        "per_device_train_batch_size": training_args.per_device_train_batch_size,
        "world_size": training_args.world_size,
        "bilevel": {
            name: getattr(training_args, name)
            for name in (
                "subspace_rank",
                "hessian_mode",
                "learning_rate",
                "aux_learning_rate",
                "aux_step_limit",
                "upper_learning_rate",
                "moving_average_weight",
                "mixture_floor",
                "sketch_resample_interval",
            )
        },
    }

    if training_args.max_steps != 0:  # --max_steps 0: only apply a given mixture (no bilevel run)
        report["eval_before"] = evaluate_sets(trainer, eval_sets)
        train_start = time.time()
        train_result = trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
        report["train_seconds"] = round(time.time() - train_start, 1)
        trainer.save_model()
        trainer.save_metrics("train", train_result.metrics)
        trainer.save_state()
        every = max(1, int(training_args.logging_steps) if training_args.logging_steps >= 1 else 1)
        history = trainer.mixture_history
        report["mixture"] = {
            "final": trainer.final_mixture_weights(),
            "average": trainer.mixture_weights(),
            "trajectory": {
                str(step): dict(zip(domains, [round(w, 4) for w in history[step - 1]], strict=True))
                for step in range(every, len(history) + 1, every)
            },
        }
        report["eval_after"] = evaluate_sets(trainer, eval_sets)
    del trainer, model

    # ---- optional: train on the learned mixture with the plain Trainer, against the uniform mixture
    if data_args.apply_mixture is not None:
        if data_args.apply_mixture == "auto":
            if "mixture" not in report:
                raise ValueError("--apply_mixture auto needs a bilevel run (--max_steps > 0).")
            learned = report["mixture"][data_args.apply_mixture_weights]
        else:
            learned = read_mixture(data_args.apply_mixture, data_args.apply_mixture_weights)
        report["apply_mixture"] = apply_mixtures(
            model_args, data_args, training_args, tokenizer, train_by_domain, eval_sets, learned, target_name
        )

    report["wall_seconds"] = round(time.time() - wall_start, 1)
    report["report_path"] = os.path.join(training_args.output_dir, "report.json")
    if training_args.process_index == 0:
        write_json_atomic(report["report_path"], report)
        print(_format_report(report), flush=True)
    return report


if __name__ == "__main__":
    main()
    close_process_group()
