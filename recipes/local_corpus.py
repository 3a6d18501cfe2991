"""A small multi-domain text corpus built only from files that every Python installation has.

Meant for causal-LM data-mixture experiments that must run offline (no Hugging Face hub). Domains:

``code``
    Source of the Python standard library modules (``*.py`` under ``sysconfig.get_paths()["stdlib"]``),
    without test suites, ``site-packages``, the ``encodings`` code-page tables, the generated
    ``pydoc_data`` module (that text is the ``docs`` domain) and the machine-specific
    ``_sysconfigdata*`` files.
``docs``
    The language reference and library topics that ``help()`` shows, from ``pydoc_data.topics.topics``.
``legal``
    LICENSE / LICENCE / COPYING / NOTICE files of the installed distributions (found through
    ``importlib.metadata``), plus CPython's own ``LICENSE.txt`` when it is installed. Identical license
    texts shipped by many packages are removed by the chunk deduplication.
``prose``
    The docstrings (module, class, function) of the same standard-library files as ``code``, extracted
    with :mod:`ast`: English technical prose. It overlaps in content with ``code`` (which still contains
    its docstrings), but no chunk is shared between the two.

Documents are split into chunks of about ``chunk_chars`` characters on line boundaries, exact duplicate
chunks (after whitespace normalisation) are removed, and each domain is capped and split into ``train``,
``target`` and ``eval``. :func:`train_bpe_tokenizer` trains a byte-level BPE tokenizer on the result and
:func:`tokenize_and_group` turns a split into fixed-length blocks that never mix domains.

The ``legal`` domain depends on which distributions are installed, so the corpus is deterministic for a
given environment (Python version and installed packages), not across environments.
"""

from __future__ import annotations

import ast
import hashlib
import importlib.metadata
import json
import os
import random
import re
import shutil
import sys
import sysconfig
import tempfile
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path

import datasets
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

DOMAINS: tuple[str, ...] = ("code", "docs", "legal", "prose")
"""All domain names, in the order they appear in the built splits."""

SPLITS: tuple[str, ...] = ("train", "target", "eval")

EOS_TOKEN = "<|endoftext|>"

# Bump when the corpus construction changes, so that old cache entries are not reused.
_FORMAT_VERSION = 1

# Collect this many times ``max_docs_per_domain`` chunks before the final shuffle-and-cap, so that the
# kept chunks come from many documents while large domains are not read and parsed completely.
_OVERSAMPLE = 2

# Chunks with fewer non-whitespace characters than this are dropped (e.g. a lone closing bracket).
_MIN_CHUNK_CHARS = 16

# Docstrings shorter than this ("Return self.") carry almost no prose and are skipped.
_MIN_DOCSTRING_CHARS = 40

# Directory names skipped anywhere below the standard library root.
_SKIPPED_STDLIB_DIRS = frozenset(
    {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__", "pydoc_data", "encodings"}
)

_LICENSE_NAME = re.compile(r"^(LICEN[CS]E|COPYING|NOTICE)", re.IGNORECASE)
_NOT_TEXT_SUFFIXES = frozenset({".py", ".pyc", ".pyi", ".so", ".pyd", ".dll", ".dylib"})
_MAX_LICENSE_BYTES = 1_000_000

_FEATURES = datasets.Features({"text": datasets.Value("string"), "domain": datasets.Value("string")})


# --------------------------------------------------------------------------------------------------
# Document sources: each yields document texts, in an order shuffled by ``rng``.
# --------------------------------------------------------------------------------------------------


def _stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def _stdlib_source_files() -> list[Path]:
    """Sorted standard-library ``*.py`` files, without tests, site-packages and generated tables."""
    root = _stdlib_root()
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(
            name for name in dirnames if name not in _SKIPPED_STDLIB_DIRS and not name.startswith("config-")
        )
        for name in filenames:
            if name.endswith(".py") and not name.startswith("_sysconfigdata"):
                files.append(Path(dirpath) / name)
    return sorted(files)


def _read_text(path: Path) -> str:
    with open(path, encoding="utf-8", errors="replace") as handle:
        return handle.read()


def _iter_code(rng: random.Random) -> Iterator[str]:
    files = _stdlib_source_files()
    rng.shuffle(files)
    for path in files:
        yield _read_text(path)


def _docstrings_in_source_order(tree: ast.AST) -> Iterator[str]:
    if isinstance(tree, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
        docstring = ast.get_docstring(tree, clean=True)
        if docstring and len(docstring) >= _MIN_DOCSTRING_CHARS:
            yield docstring
    for child in ast.iter_child_nodes(tree):
        yield from _docstrings_in_source_order(child)


def _iter_prose(rng: random.Random) -> Iterator[str]:
    files = _stdlib_source_files()
    rng.shuffle(files)
    for path in files:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # invalid escape sequences etc. in old modules
            try:
                tree = ast.parse(_read_text(path))
            except (SyntaxError, ValueError):
                continue
        text = "\n\n".join(_docstrings_in_source_order(tree))
        if text:
            yield text


def _iter_docs(rng: random.Random) -> Iterator[str]:
    try:
        from pydoc_data.topics import topics
    except ImportError:  # some distributions package pydoc_data separately
        return
    names = sorted(topics)
    rng.shuffle(names)
    for name in names:
        yield topics[name]


def _license_files() -> list[Path]:
    """Sorted license-like files of installed distributions, plus CPython's LICENSE.txt."""
    found = set()
    for dist in importlib.metadata.distributions():
        for file in dist.files or []:
            if _LICENSE_NAME.match(file.name) and Path(file.name).suffix.lower() not in _NOT_TEXT_SUFFIXES:
                path = Path(dist.locate_file(file)).resolve()
                if path.is_file() and path.stat().st_size <= _MAX_LICENSE_BYTES:
                    found.add(path)
    cpython_license = _stdlib_root() / "LICENSE.txt"
    if cpython_license.is_file():
        found.add(cpython_license.resolve())
    return sorted(found)


def _iter_legal(rng: random.Random) -> Iterator[str]:
    files = _license_files()
    rng.shuffle(files)
    for path in files:
        text = _read_text(path)
        if "\x00" not in text:  # skip anything binary that happens to be called LICENSE
            yield text


_SOURCES: dict[str, Callable[[random.Random], Iterator[str]]] = {
    "code": _iter_code,
    "docs": _iter_docs,
    "legal": _iter_legal,
    "prose": _iter_prose,
}


# --------------------------------------------------------------------------------------------------
# Chunking, deduplication, splitting
# --------------------------------------------------------------------------------------------------


def _chunk_document(text: str, chunk_chars: int) -> list[str]:
    """Split ``text`` into pieces of at most about ``chunk_chars`` characters, on line boundaries.

    Lines longer than ``chunk_chars`` are cut into ``chunk_chars`` pieces. A final piece shorter than a
    quarter of ``chunk_chars`` is merged into the previous chunk, and near-empty chunks are dropped.
    """
    lines = []
    for line in text.splitlines(keepends=True):
        while len(line) > chunk_chars:
            lines.append(line[:chunk_chars])
            line = line[chunk_chars:]
        lines.append(line)

    chunks: list[str] = []
    current: list[str] = []
    current_len = 0
    for line in lines:
        if current and current_len + len(line) > chunk_chars:
            chunks.append("".join(current))
            current, current_len = [], 0
        current.append(line)
        current_len += len(line)
    if current:
        tail = "".join(current)
        if chunks and len(tail) < chunk_chars // 4:
            chunks[-1] += tail
        else:
            chunks.append(tail)
    return [chunk for chunk in chunks if len("".join(chunk.split())) >= _MIN_CHUNK_CHARS]


def _chunk_key(chunk: str) -> str:
    """Hash of the whitespace-normalised chunk, used to find exact duplicates."""
    return hashlib.sha1(" ".join(chunk.split()).encode("utf-8")).hexdigest()


def _collect_domain_chunks(
    domain: str, max_chunks: int, chunk_chars: int, seed: int, seen: set[str]
) -> list[str]:
    """Up to ``max_chunks`` unique, shuffled chunks of one domain (``seen`` holds keys used so far)."""
    rng = random.Random(f"{seed}:{domain}")
    chunks = []
    for document in _SOURCES[domain](rng):
        for chunk in _chunk_document(document, chunk_chars):
            key = _chunk_key(chunk)
            if key not in seen:
                seen.add(key)
                chunks.append(chunk)
        if len(chunks) >= _OVERSAMPLE * max_chunks:
            break
    rng.shuffle(chunks)
    return chunks[:max_chunks]


def _split_sizes(domain: str, n: int, target_fraction: float, eval_fraction: float) -> tuple[int, int, int]:
    n_target = max(1, round(n * target_fraction))
    n_eval = max(1, round(n * eval_fraction))
    n_train = n - n_target - n_eval
    if n_train < 1:
        raise ValueError(
            f"domain {domain!r} has only {n} chunks, too few for non-empty train/target/eval splits"
        )
    return n_train, n_target, n_eval


def _build_corpus(
    domains: Sequence[str],
    max_docs_per_domain: int,
    chunk_chars: int,
    target_fraction: float,
    eval_fraction: float,
    seed: int,
) -> datasets.DatasetDict:
    rows: dict[str, dict[str, list[str]]] = {split: {"text": [], "domain": []} for split in SPLITS}
    seen: set[str] = set()
    for domain in domains:
        chunks = _collect_domain_chunks(domain, max_docs_per_domain, chunk_chars, seed, seen)
        if not chunks:
            raise ValueError(f"domain {domain!r} has no documents in this Python installation")
        n_train, n_target, _ = _split_sizes(domain, len(chunks), target_fraction, eval_fraction)
        parts = {
            "train": chunks[:n_train],
            "target": chunks[n_train : n_train + n_target],
            "eval": chunks[n_train + n_target :],
        }
        for split, texts in parts.items():
            rows[split]["text"].extend(texts)
            rows[split]["domain"].extend([domain] * len(texts))
    return datasets.DatasetDict(
        {split: datasets.Dataset.from_dict(rows[split], features=_FEATURES) for split in SPLITS}
    )


# --------------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------------


def _resolve_domains(domains: Sequence[str] | None) -> list[str]:
    if domains is None:
        return list(DOMAINS)
    if isinstance(domains, str):
        domains = [domains]
    unknown = sorted(set(domains) - set(DOMAINS))
    if unknown:
        raise ValueError(f"unknown domain(s) {unknown}; available domains are {list(DOMAINS)}")
    if not domains:
        raise ValueError("domains must not be empty")
    return [domain for domain in DOMAINS if domain in domains]


def _environment_fingerprint(domains: Sequence[str]) -> dict[str, object]:
    """What the corpus depends on besides the arguments: Python version and, for ``legal``, packages."""
    fingerprint: dict[str, object] = {"python": sys.version, "stdlib": str(_stdlib_root())}
    if "legal" in domains:
        fingerprint["distributions"] = sorted(
            f"{dist.metadata['Name']}=={dist.version}" for dist in importlib.metadata.distributions()
        )
    return fingerprint


def _cache_key(arguments: dict[str, object]) -> str:
    payload = json.dumps(arguments, sort_keys=True, default=str)
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()[:20]


def build_local_corpus(
    cache_dir: str | os.PathLike | None = None,
    *,
    domains: Sequence[str] | None = None,
    max_docs_per_domain: int = 400,
    chunk_chars: int = 2000,
    target_fraction: float = 0.1,
    eval_fraction: float = 0.1,
    seed: int = 0,
) -> datasets.DatasetDict:
    """Build (or load from ``cache_dir``) the multi-domain corpus.

    Args:
        cache_dir: If given, the corpus is saved under ``cache_dir/local_corpus-<hash>`` (hash of all
            arguments, the Python version and, for ``legal``, the installed distributions) and loaded
            from there by later calls with the same arguments.
        domains: Names from :data:`DOMAINS`; ``None`` means all of them. Rows are ordered by domain in
            the order of :data:`DOMAINS`, whatever order is given here.
        max_docs_per_domain: Maximum number of chunks kept per domain (before splitting).
        chunk_chars: Approximate chunk length in characters; chunks end on line boundaries.
        target_fraction: Fraction of each domain's chunks that goes to the ``target`` split.
        eval_fraction: Fraction of each domain's chunks that goes to the ``eval`` split. ``train`` gets
            the rest; every split gets at least one chunk of every domain.
        seed: Seed of the per-domain ``random.Random`` used for shuffling.

    Returns:
        A ``DatasetDict`` with splits ``train``, ``target`` and ``eval`` and string columns ``text`` and
        ``domain``. No chunk (after whitespace normalisation) appears twice in the whole corpus.

    Raises:
        ValueError: For an unknown domain name, invalid sizes or fractions, or a domain with no
            documents (or too few chunks to fill the three splits).
    """
    resolved = _resolve_domains(domains)
    if max_docs_per_domain < 3:
        raise ValueError("max_docs_per_domain must be at least 3 (one chunk per split)")
    if chunk_chars < 1:
        raise ValueError("chunk_chars must be positive")
    if not (0 <= target_fraction < 1 and 0 <= eval_fraction < 1 and target_fraction + eval_fraction < 1):
        raise ValueError("target_fraction and eval_fraction must be in [0, 1) and sum to less than 1")
    build_args = {
        "domains": resolved,
        "max_docs_per_domain": max_docs_per_domain,
        "chunk_chars": chunk_chars,
        "target_fraction": target_fraction,
        "eval_fraction": eval_fraction,
        "seed": seed,
    }
    if cache_dir is None:
        return _build_corpus(**build_args)

    cache_root = Path(cache_dir)
    key = _cache_key({**build_args, "format": _FORMAT_VERSION, "env": _environment_fingerprint(resolved)})
    target_dir = cache_root / f"local_corpus-{key}"
    if (target_dir / "dataset_dict.json").is_file():
        return datasets.load_from_disk(str(target_dir))

    corpus = _build_corpus(**build_args)
    cache_root.mkdir(parents=True, exist_ok=True)
    tmp_dir = Path(tempfile.mkdtemp(prefix=f".tmp-{target_dir.name}-", dir=cache_root))
    try:
        corpus.save_to_disk(str(tmp_dir))
        os.replace(tmp_dir, target_dir)
    except OSError:
        # Another process won the race and already wrote the same entry: use theirs.
        if not (target_dir / "dataset_dict.json").is_file():
            raise
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)
    return datasets.load_from_disk(str(target_dir))


def train_bpe_tokenizer(
    texts: Iterable[str], vocab_size: int = 2048, save_dir: str | os.PathLike | None = None
) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer (GPT-2 style) on ``texts``.

    The vocabulary holds the 256 byte symbols, the special token ``<|endoftext|>`` (used as bos, eos,
    pad and unk token) and the learned merges, ``vocab_size`` entries at most. Any string round-trips
    through ``encode``/``decode``.

    If ``save_dir`` already holds a saved tokenizer it is loaded and ``texts`` is ignored; otherwise the
    trained tokenizer is saved there with ``save_pretrained``.
    """
    if save_dir is not None and (Path(save_dir) / "tokenizer.json").is_file():
        return PreTrainedTokenizerFast.from_pretrained(str(save_dir))

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(texts, trainer=trainer)

    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=EOS_TOKEN,
        eos_token=EOS_TOKEN,
        unk_token=EOS_TOKEN,
        pad_token=EOS_TOKEN,
    )
    if save_dir is not None:
        tokenizer.save_pretrained(str(save_dir))
    return tokenizer


def tokenize_and_group(
    dataset: datasets.Dataset,
    tokenizer: PreTrainedTokenizerFast,
    block_size: int = 128,
    *,
    text_column: str = "text",
    keep_columns: Sequence[str] = ("domain",),
    num_proc: int | None = None,
) -> datasets.Dataset:
    """Tokenize ``dataset`` and cut it into blocks of exactly ``block_size`` tokens for causal-LM training.

    Like ``group_texts`` in transformers' ``run_clm.py``, but documents are only concatenated with
    documents that have the same values in ``keep_columns`` (by default: the same domain), so a block
    never mixes domains. An eos token is appended to every document. Rows are sorted by
    ``keep_columns`` first; then each batch of 1000 rows is concatenated per group and cut into
    blocks, and every remainder shorter than ``block_size`` is dropped.

    Returns:
        A dataset with columns ``input_ids``, ``attention_mask``, ``labels`` (a copy of ``input_ids``)
        and ``keep_columns``.
    """
    if block_size < 1:
        raise ValueError("block_size must be positive")
    eos_id = tokenizer.eos_token_id
    if eos_id is None:
        raise ValueError("the tokenizer has no eos token")
    keep_columns = list(keep_columns)
    missing = [name for name in [text_column, *keep_columns] if name not in dataset.column_names]
    if missing:
        raise ValueError(f"dataset has no column(s) {missing}; columns are {dataset.column_names}")

    def tokenize(batch: dict[str, list]) -> dict[str, list]:
        ids = tokenizer(batch[text_column], add_special_tokens=False)["input_ids"]
        return {"input_ids": [doc + [eos_id] for doc in ids]}

    tokenized = dataset.map(
        tokenize,
        batched=True,
        num_proc=num_proc,
        remove_columns=[name for name in dataset.column_names if name not in keep_columns],
        desc="Tokenizing",
    )
    if keep_columns:
        # Stable sort by group, so that each group is one contiguous run and keeps its document order.
        keys = list(zip(*(tokenized[name] for name in keep_columns), strict=True))
        tokenized = tokenized.select(sorted(range(len(keys)), key=keys.__getitem__))

    def group(batch: dict[str, list]) -> dict[str, list]:
        out: dict[str, list] = {"input_ids": [], "attention_mask": [], "labels": []}
        out.update({name: [] for name in keep_columns})
        run: list[int] = []
        for i, ids in enumerate(batch["input_ids"]):
            key = [batch[name][i] for name in keep_columns]
            run.extend(ids)
            is_last_of_run = i + 1 == len(batch["input_ids"]) or key != [
                batch[name][i + 1] for name in keep_columns
            ]
            if not is_last_of_run:
                continue
            for start in range(0, len(run) - block_size + 1, block_size):
                block = run[start : start + block_size]
                out["input_ids"].append(block)
                out["attention_mask"].append([1] * block_size)
                out["labels"].append(list(block))
                for name, value in zip(keep_columns, key, strict=True):
                    out[name].append(value)
            run = []
        return out

    grouped = tokenized.map(
        group,
        batched=True,
        batch_size=1000,
        num_proc=num_proc,
        remove_columns=tokenized.column_names,
        desc=f"Grouping into blocks of {block_size}",
    )
    return grouped.select_columns(["input_ids", "attention_mask", "labels", *keep_columns])
