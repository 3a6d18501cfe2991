#!/usr/bin/env python
"""Learn the domain mixture of a supervised fine-tuning (chat) dataset with BROS, through TRL's SFTTrainer.

In the style of TRL's ``trl/scripts/sft.py``: argument dataclasses (``ModelArguments``, ``DataArguments``,
:class:`bros_hf.sft.BROSSFTConfig` = TRL's ``SFTConfig`` + :class:`bros_hf.BROSConfig`) parsed with
``HfArgumentParser``, from the command line or from one ``.json``/``.yaml`` file. The datasets go through
SFTTrainer's own preparation: chat template, completion-only or assistant-only loss masks, truncation to
``--max_length``, and packing with ``--packing True``.

The bilevel problem: the lower level fine-tunes the model on a mixture w = softmax(λ) of the training
domains, the upper level moves λ so that the loss on the *target* conversations goes down.

By default everything is local (no hub): :func:`synthetic_chat_domains` builds one-turn conversations in
three domains. The user sends a digit; the assistant continues from it: ``ascending`` counts up (mod 10),
``descending`` counts down, ``random`` answers random digits (3 to 8 of them, then ``<|end|>``). The user
turn does not say which, so the domains conflict on the first reply digit (later digits reveal the direction),
and the target set is 70 % ``ascending`` and 30 % ``descending`` conversations: the best training mixture for
it is near 0.7 / 0.3 / 0 (a model trained on mixture w answers x + 1 and x − 1 with probabilities in the ratio
w_asc : w_desc, the target's ratio is 0.7 : 0.3, and random replies only blur both). A word-level tokenizer
over the digits and the chat markers and a small Llama built from a config complete the set-up.

Quick start (CPU, under a minute on 2 cores)::

    python recipes/sft_data_mixture.py --output_dir outputs/sft_data_mixture

Measured with the defaults (300 steps of 12 rows, seed 42, 2 CPU cores shared with other runs, 2026-12-02);
every bilevel knob is the package default. "learned" is ``mixture_weights()`` (the tail average), "final" the
last iterate::

    | run                                            | ascending      | descending     | random         | train  |
    |                                                | learned  final | learned  final | learned  final |        |
    | messages (loss on every token)                 | 0.730    0.710 | 0.269    0.290 | 0.001    0.000 |  39 s  |
    | --data_format prompt_completion (completions)  | 0.717    0.683 | 0.282    0.317 | 0.001    0.000 |  66 s  |
    | --packing True (12 packed rows ≈ 70 chats)     | 0.706    0.712 | 0.293    0.288 | 0.000    0.000 | 112 s  |
    | --packing True --per_device_train_batch_size 3 | 0.706    0.648 | 0.291    0.352 | 0.002    0.000 |  26 s  |
    | best mixture for the target                    | 0.7            | 0.3            | 0              |        |

Eval loss on held-out ascending chats drops from 2.85 to 0.59 (messages). Before the auxiliary step limit
(``aux_step_limit``; a JSON config with ``"aux_step_limit": null`` switches it off) the first row learned
(0.528, 0.352, 0.119): z sat at its norm bound.

Your own data: ``--train_files`` (json/jsonl/parquet with a ``messages`` column, or ``prompt`` and
``completion``, plus the domain column ``--domain_column``) and ``--target_files`` (same format), with
``--model_name_or_path`` (a local folder or a hub id) for the model and its tokenizer (with a chat template).

Outputs in ``--output_dir``: ``mixture_weights.json`` (the learned mixture ``weights`` = tail average, and
``final``), ``mixture_weights.png`` (trajectory), ``report.json`` (mixture, per-domain eval loss before and
after, timings), the model and tokenizer.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import random
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, fields
from typing import Any

import datasets
import torch
import transformers
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedTokenizerFast,
    TrainingArguments,
    set_seed,
)

from bros_hf import BROSConfig
from bros_hf.export import write_json_atomic
from bros_hf.sft import BROSSFTConfig, BROSSFTTrainer

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # sibling modules, also when loaded by path
import _common  # noqa: E402
from _common import (  # noqa: E402
    close_process_group,
    explained_hub_errors,
    parse_with_defaults,
    set_cpu_threads,
    setup_logging,
)

logger = logging.getLogger("sft_data_mixture")

# ------------------------------------------------------------------------------------------------------
# Synthetic chat data and its tokenizer
# ------------------------------------------------------------------------------------------------------

DIGITS: tuple[str, ...] = tuple(str(d) for d in range(10))
SPECIAL_TOKENS: tuple[str, ...] = ("<pad>", "<|end|>", "<unk>", "<|system|>", "<|user|>", "<|assistant|>")
# Each turn: "<|role|> content <|end|> " (spaces separate the words the word-level tokenizer knows).
CHAT_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|> {{ message['content'] }} <|end|> {% endfor %}"
    "{% if add_generation_prompt %}<|assistant|> {% endif %}"
)
# The same rendering with the assistant's content and end-of-turn marked for assistant_only_loss.
CHAT_TEMPLATE_WITH_GENERATION = (
    "{% for message in messages %}{% if message['role'] == 'assistant' %}<|assistant|> {% generation %}"
    "{{ message['content'] }} <|end|>{% endgeneration %} {% else %}<|{{ message['role'] }}|> "
    "{{ message['content'] }} <|end|> {% endif %}{% endfor %}{% if add_generation_prompt %}<|assistant|> {% endif %}"
)
# How each synthetic domain continues the user's digit (None: random digits).
DOMAIN_STEPS: dict[str, int | None] = {"ascending": 1, "descending": -1, "random": None}
DEFAULT_TARGET_MIXTURE = {"ascending": 0.7, "descending": 0.3}


def chat_tokenizer(generation_markers: bool = False) -> PreTrainedTokenizerFast:
    """A word-level tokenizer over the digits and the chat markers (16 tokens), with a chat template.

    ``<|end|>`` ends every turn and is the eos token; ``<pad>`` pads. ``generation_markers=True`` uses
    :data:`CHAT_TEMPLATE_WITH_GENERATION` (needed by ``assistant_only_loss``)."""
    vocab = {token: index for index, token in enumerate(SPECIAL_TOKENS + DIGITS)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, eos_token="<|end|>", pad_token="<pad>", unk_token="<unk>"
    )
    tokenizer.chat_template = CHAT_TEMPLATE_WITH_GENERATION if generation_markers else CHAT_TEMPLATE
    return tokenizer


def _conversation(domain: str, rng: random.Random, min_reply: int, max_reply: int, data_format: str) -> dict[str, Any]:
    start = rng.randrange(10)
    length = rng.randint(min_reply, max_reply)
    step = DOMAIN_STEPS[domain]
    if step is None:
        reply = [rng.randrange(10) for _ in range(length)]
    else:
        reply = [(start + step * (k + 1)) % 10 for k in range(length)]
    user = {"role": "user", "content": str(start)}
    assistant = {"role": "assistant", "content": " ".join(str(d) for d in reply)}
    if data_format == "prompt_completion":
        return {"prompt": [user], "completion": [assistant], "domain": domain}
    return {"messages": [user, assistant], "domain": domain}


def _mixture_counts(mixture: dict[str, float], total: int) -> dict[str, int]:
    """Example counts per domain that sum to ``total`` (largest remainders)."""
    norm = sum(mixture.values())
    exact = {d: total * w / norm for d, w in mixture.items()}
    counts = {d: math.floor(x) for d, x in exact.items()}
    for d in sorted(exact, key=lambda d: exact[d] - counts[d], reverse=True)[: total - sum(counts.values())]:
        counts[d] += 1
    return counts


def synthetic_chat_domains(
    examples_per_domain: int = 400,
    target_examples: int = 200,
    target_mixture: dict[str, float] | None = None,
    eval_examples: int = 64,
    min_reply: int = 3,
    max_reply: int = 8,
    data_format: str = "messages",
    seed: int = 0,
) -> datasets.DatasetDict:
    """Local chat data in the domains of :data:`DOMAIN_STEPS` (see the module docstring).

    Splits: ``train`` (``examples_per_domain`` of every domain), ``target`` (``target_examples`` drawn with
    ``target_mixture``, default 70 % ascending / 30 % descending), and ``eval`` (``eval_examples`` of every
    domain). Columns: ``messages`` (``data_format="messages"``) or ``prompt`` and ``completion``
    (``"prompt_completion"``), and ``domain``."""
    if data_format not in ("messages", "prompt_completion"):
        raise ValueError(f"data_format must be 'messages' or 'prompt_completion', got {data_format!r}.")
    mixture = dict(DEFAULT_TARGET_MIXTURE if target_mixture is None else target_mixture)
    unknown = sorted(set(mixture) - set(DOMAIN_STEPS))
    if unknown or not mixture or min(mixture.values()) < 0 or sum(mixture.values()) <= 0:
        raise ValueError(f"target_mixture must give non-negative weights to domains of {sorted(DOMAIN_STEPS)}; got {mixture}.")
    if not 1 <= min_reply <= max_reply:
        raise ValueError(f"Need 1 ≤ min_reply ≤ max_reply, got {min_reply}, {max_reply}.")
    rng = random.Random(seed)

    def draw(counts: dict[str, int]) -> datasets.Dataset:
        rows = [
            _conversation(domain, rng, min_reply, max_reply, data_format)
            for domain, count in counts.items()
            for _ in range(count)
        ]
        return datasets.Dataset.from_list(rows)

    every = dict.fromkeys(DOMAIN_STEPS, examples_per_domain)
    return datasets.DatasetDict(
        train=draw(every),
        target=draw(_mixture_counts(mixture, target_examples)),
        eval=draw(dict.fromkeys(DOMAIN_STEPS, eval_examples)),
    )


def parse_mixture(text: str) -> dict[str, float]:
    """``"ascending=0.7,descending=0.3"`` → {"ascending": 0.7, "descending": 0.3}."""
    mixture = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, sep, value = part.partition("=")
        if not sep:
            raise ValueError(f"--target_mixture entries are domain=weight, got {part!r}.")
        mixture[name.strip()] = float(value)
    return mixture


# ------------------------------------------------------------------------------------------------------
# Arguments
# ------------------------------------------------------------------------------------------------------


@dataclass
class ModelArguments:
    """The model: a pretrained chat model, or a small Llama built from a config (random init)."""

    model_name_or_path: str | None = field(
        default=None,
        metadata={
            "help": "Pretrained causal LM (hub id or local folder) whose tokenizer has a chat template. Default: a "
            "Llama built from the size arguments, with the synthetic data's word-level tokenizer."
        },
    )
    hidden_size: int = field(default=64, metadata={"help": "Config-built model: hidden size."})
    num_layers: int = field(default=2, metadata={"help": "Config-built model: number of layers."})
    num_heads: int = field(default=4, metadata={"help": "Config-built model: number of attention heads."})
    intermediate_size: int = field(default=128, metadata={"help": "Config-built model: MLP inner size."})
    cpu_threads: int | None = field(
        default=None,
        metadata={
            "help": "torch intra-op threads on CPU. Default: OMP_NUM_THREADS if set, else 1 for a config-built model "
            "(tiny matrices: extra threads only add OpenMP overhead) and torch's default for a pretrained one."
        },
    )

    def __post_init__(self) -> None:
        for name in ("hidden_size", "num_layers", "num_heads", "intermediate_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be ≥ 1, got {getattr(self, name)}.")
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} must be divisible by num_heads {self.num_heads}.")


@dataclass
class DataArguments:
    """The training domains and the target set: local synthetic chat data, or files."""

    train_files: list[str] | None = field(
        default=None,
        metadata={
            "help": "Training data files (json/jsonl/parquet): a 'messages' column (or 'prompt' and 'completion') "
            "and the domain column (--domain_column). Default: the synthetic chat domains."
        },
    )
    target_files: list[str] | None = field(
        default=None, metadata={"help": "Target (upper) set files, in the training data's format. Needs --train_files."}
    )
    eval_files: list[str] | None = field(
        default=None, metadata={"help": "Evaluation files with the domain column (optional, with --train_files)."}
    )
    data_format: str = field(
        default="messages",
        metadata={
            "help": "Synthetic data: 'messages' conversations (loss on every token, or on the assistant's with "
            "--assistant_only_loss True) or 'prompt_completion' (loss on the completion only).",
            "choices": ["messages", "prompt_completion"],
        },
    )
    examples_per_domain: int = field(default=400, metadata={"help": "Synthetic data: training conversations per domain."})
    target_examples: int = field(default=200, metadata={"help": "Synthetic data: target conversations."})
    target_mixture: str = field(
        default="ascending=0.7,descending=0.3",
        metadata={"help": "Synthetic data: the target set's domain mixture, domain=weight pairs (the known answer)."},
    )
    eval_examples: int = field(default=64, metadata={"help": "Synthetic data: held-out conversations per domain."})
    synthetic_seed: int = field(default=0, metadata={"help": "Synthetic data: seed of the generator."})

    def __post_init__(self) -> None:
        if self.target_files and not self.train_files:
            raise ValueError("--target_files needs --train_files (the synthetic data has its own target set).")
        if self.train_files and not self.target_files:
            raise ValueError("--train_files needs --target_files: the upper level needs a target set.")
        for name in ("examples_per_domain", "target_examples"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be ≥ 1, got {getattr(self, name)}.")
        parse_mixture(self.target_mixture)


# Recipe defaults, used for every field the user does not set: the lower level's settings, sized so that the
# default run (synthetic chats, 3 domains, a 0.1 M-parameter Llama) finishes in about a minute on 2 CPU cores;
# fp32 and no activation checkpointing (TRL's bf16 / gradient_checkpointing defaults only slow a tiny CPU model
# down). Every upper-level and auxiliary knob is the package default.
RECIPE_DEFAULTS: dict[str, Any] = {
    "max_steps": 300,
    "learning_rate": 3e-3,
    "lr_scheduler_type": "cosine",
    "warmup_steps": 0.05,
    "per_device_train_batch_size": 12,
    "per_device_eval_batch_size": 64,
    "max_length": 64,
    "logging_steps": 25,
    "save_strategy": "no",
    "eval_strategy": "no",
    "report_to": "none",
    "seed": 42,
    "bf16": False,
    "activation_checkpointing": False,
}
RECIPE_REASONS: dict[str, str] = {}


@contextlib.contextmanager
def _bilevel_options_first() -> Iterator[None]:
    """In --help: the recipe's options, then BROSConfig's bilevel ones, then SFTConfig's, then TrainingArguments'.

    ``_common`` puts first the options no base class of a dataclass defines; every field of BROSSFTConfig is
    defined by a base (BROSConfig or SFTConfig), so its ordering is swapped for this one during parsing."""
    inherited = {f.name for f in fields(TrainingArguments)}
    bilevel = {f.name for f in fields(BROSConfig)} - inherited
    sft = {f.name for f in fields(BROSSFTConfig)} - inherited - bilevel

    def rank(dest: str) -> int:
        return 1 if dest in bilevel else 2 if dest in sft else 3 if dest in inherited else 0

    def order(parser: Any, dataclass_types: Sequence[type]) -> None:
        for group in parser._action_groups:
            group._group_actions.sort(key=lambda action: rank(action.dest))

    original = _common._own_options_first
    _common._own_options_first = order
    try:
        yield
    finally:
        _common._own_options_first = original


def parse_arguments(argv: list[str] | None = None) -> tuple[ModelArguments, DataArguments, BROSSFTConfig, set[str]]:
    """Parse the three dataclasses, filling every recipe default the user did not give (before parsing, so
    ``__post_init__`` sees the final values). Returns them and the option names given explicitly."""
    with _bilevel_options_first():
        (model_args, data_args, training_args), given = parse_with_defaults(
            (ModelArguments, DataArguments, BROSSFTConfig), argv, RECIPE_DEFAULTS, reasons=RECIPE_REASONS
        )
    return model_args, data_args, training_args, given


# ------------------------------------------------------------------------------------------------------
# Data, tokenizer and model
# ------------------------------------------------------------------------------------------------------


def _load_files(files: list[str]) -> datasets.Dataset:
    builders = {".json": "json", ".jsonl": "json", ".parquet": "parquet"}
    suffixes = {os.path.splitext(f)[1].lower() for f in files}
    unknown = sorted(suffixes - set(builders))
    if unknown or len(suffixes) != 1:
        raise ValueError(f"Data files must all be one of {sorted(builders)}; got {sorted(suffixes)}.")
    with explained_hub_errors("data files", ", ".join(files)):
        return datasets.load_dataset(builders[suffixes.pop()], data_files=files, split="train")


def load_data(data_args: DataArguments, training_args: BROSSFTConfig) -> datasets.DatasetDict:
    """train / target / eval splits (eval may be absent with files)."""
    if not data_args.train_files:
        training_args.domain_column = "domain"
        return synthetic_chat_domains(
            examples_per_domain=data_args.examples_per_domain,
            target_examples=data_args.target_examples,
            target_mixture=parse_mixture(data_args.target_mixture),
            eval_examples=data_args.eval_examples,
            data_format=data_args.data_format,
            seed=data_args.synthetic_seed,
        )
    splits = {"train": _load_files(data_args.train_files), "target": _load_files(data_args.target_files)}
    if data_args.eval_files:
        splits["eval"] = _load_files(data_args.eval_files)
    return datasets.DatasetDict(splits)


def build_model_and_tokenizer(
    model_args: ModelArguments, training_args: BROSSFTConfig
) -> tuple[torch.nn.Module, PreTrainedTokenizerFast]:
    """A pretrained model and its tokenizer, or a seeded config-built Llama with :func:`chat_tokenizer`."""
    set_seed(training_args.seed)
    name = model_args.model_name_or_path
    if name is not None:
        with explained_hub_errors("tokenizer", name):
            tokenizer = AutoTokenizer.from_pretrained(name)
        if tokenizer.chat_template is None:
            raise ValueError(f"Tokenizer {name} has no chat template; set one (tokenizer.chat_template) or pick a chat model.")
        with explained_hub_errors("model", name):
            model = AutoModelForCausalLM.from_pretrained(name)
        return model, tokenizer
    tokenizer = chat_tokenizer(generation_markers=training_args.assistant_only_loss)
    config = transformers.LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=model_args.hidden_size,
        intermediate_size=model_args.intermediate_size,
        num_hidden_layers=model_args.num_layers,
        num_attention_heads=model_args.num_heads,
        num_key_value_heads=model_args.num_heads,
        max_position_embeddings=max(training_args.max_length or 64, 64),
        bos_token_id=None,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True,
    )
    return transformers.LlamaForCausalLM(config), tokenizer


def split_by_domain(dataset: datasets.Dataset, column: str) -> dict[str, datasets.Dataset]:
    values = [str(v) for v in dataset[column]]
    return {
        name: dataset.select([i for i, v in enumerate(values) if v == name]).remove_columns(column)
        for name in sorted(set(values))
    }


def evaluate_domains(trainer: BROSSFTTrainer, eval_sets: dict[str, datasets.Dataset]) -> dict[str, float]:
    """{domain: mean eval loss} through SFTTrainer.evaluate (which prepares each set like the training set)."""
    if not eval_sets:
        return {}
    metrics = trainer.evaluate(eval_dataset=eval_sets)
    return {name: float(metrics[f"eval_{name}_loss"]) for name in eval_sets}


# ------------------------------------------------------------------------------------------------------
# Main
# ------------------------------------------------------------------------------------------------------


def _format_report(report: dict[str, Any]) -> str:
    lines = ["", "=" * 72, f"BROS SFT data mixture ({report['bilevel_method']}); target: {report['target']}"]
    mixture = report["mixture"]
    known = report.get("target_mixture") or {}
    lines.append(f"{'domain':<12}{'learned w':>10}{'final w':>9}{'target':>8}{'loss before':>13}{'after':>8}")
    for domain in report["domains"]:
        before = report["eval_before"].get(domain, float("nan"))
        after = report["eval_after"].get(domain, float("nan"))
        share = known.get(domain, 0.0) if known else float("nan")
        lines.append(
            f"{domain:<12}{mixture['average'][domain]:>10.3f}{mixture['final'][domain]:>9.3f}{share:>8.2f}"
            f"{before:>13.3f}{after:>8.3f}"
        )
    lines.append(f"train {report['train_seconds']:.0f} s, wall {report['wall_seconds']:.0f} s; report: {report['report_path']}")
    lines.append("=" * 72)
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    wall_start = time.time()
    model_args, data_args, training_args, _ = parse_arguments(argv)
    setup_logging(logger, training_args)
    if training_args.upper_level != "domain":
        raise ValueError("This recipe learns a domain mixture: upper_level must be 'domain'.")
    set_cpu_threads(logger, model_args.cpu_threads, training_args, config_built=model_args.model_name_or_path is None)

    splits = load_data(data_args, training_args)
    model, tokenizer = build_model_and_tokenizer(model_args, training_args)
    column = training_args.domain_column
    eval_sets = split_by_domain(splits["eval"], column) if "eval" in splits else {}
    trainer = BROSSFTTrainer(
        model=model,
        args=training_args,
        train_dataset=splits["train"],
        upper_dataset=splits["target"],
        processing_class=tokenizer,
    )
    domains = list(trainer.domains)
    logger.info(
        "Domains %s, %d training rows (packing=%s), %d target examples, model %.3f M parameters",
        domains, len(trainer.train_dataset), training_args.packing, len(splits["target"]),
        sum(p.numel() for p in model.parameters()) / 1e6,
    )  # fmt: skip
    report: dict[str, Any] = {
        "bilevel_method": training_args.bilevel_method,
        "domains": domains,
        "target": "synthetic target" if not data_args.train_files else ", ".join(data_args.target_files),
        "target_mixture": parse_mixture(data_args.target_mixture) if not data_args.train_files else None,
        "data_format": data_args.data_format if not data_args.train_files else "files",
        "packing": training_args.packing,
        "max_steps": training_args.max_steps,
        "per_device_train_batch_size": training_args.per_device_train_batch_size,
        "eval_before": evaluate_domains(trainer, eval_sets),
    }
    start = time.time()
    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    report["train_seconds"] = round(time.time() - start, 1)
    trainer.save_model()
    report["mixture"] = {"average": trainer.mixture_weights(), "final": trainer.final_mixture_weights()}
    report["eval_after"] = evaluate_domains(trainer, eval_sets)
    report["wall_seconds"] = round(time.time() - wall_start, 1)
    report["report_path"] = os.path.join(training_args.output_dir, "report.json")
    if training_args.process_index == 0:
        write_json_atomic(report["report_path"], report)
        print(_format_report(report), flush=True)
    return report


if __name__ == "__main__":
    main()
    close_process_group()
