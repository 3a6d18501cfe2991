"""Plumbing shared by the recipes: recipe defaults merged into the parsed arguments, logging.

Each recipe imports it as a sibling module (``from _common import ...``); the recipes put their own
folder on ``sys.path`` first, so this works when they run as scripts and when tests load them by path.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
from collections.abc import Iterator
from typing import Any

import datasets
import torch
import transformers
from transformers import HfArgumentParser, TrainingArguments


def given_options(argv: list[str]) -> set[str]:
    """Names of the ``--options`` present on a command line (``--x v``, ``--x=v``, ``--x``)."""
    names = set()
    for token in argv:
        if token.startswith("--"):
            names.add(token[2:].split("=", 1)[0].replace("-", "_"))
    return names


def read_config_file(path: str) -> dict[str, Any]:
    """The options of a ``.json`` or ``.yaml``/``.yml`` argument file, as a dict."""
    with open(path) as handle:
        if path.endswith(".json"):
            return json.load(handle)
        import yaml

        return yaml.safe_load(handle)


def parse_with_defaults(
    dataclass_types: tuple[type, ...],
    argv: list[str] | None,
    defaults: dict[str, Any],
    defaults_if_given: dict[str, dict[str, Any]] | None = None,
    reasons: dict[str, str] | None = None,
) -> tuple[tuple[Any, ...], set[str]]:
    """Parse ``dataclass_types`` with ``HfArgumentParser``, filling every default the user did not give.

    ``argv`` (default ``sys.argv[1:]``) is either command-line options or the path of one
    ``.json``/``.yaml`` file. The recipe ``defaults`` (plus ``use_cpu=True`` when CUDA is missing) are
    injected *before* parsing, so ``TrainingArguments.__post_init__`` sees final values. For each
    ``option: extra`` of ``defaults_if_given``, ``extra`` joins the defaults when ``option`` is on the
    command line (or set to a non-empty value in the file). ``reasons`` ({option: why the recipe departs
    from the package default}) is appended to those options' help.

    Returns the parsed dataclasses and the names of the options given explicitly.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = HfArgumentParser(dataclass_types)
    defaults = dict(defaults)
    if not torch.cuda.is_available():
        defaults["use_cpu"] = True  # also what makes `accelerate launch --multi_gpu` use gloo on CPU
    parser.set_defaults(**defaults)  # what --help shows; the values themselves are injected below
    _explain_recipe_defaults(parser, reasons or {})
    _own_options_first(parser, dataclass_types)
    if len(argv) == 1 and argv[0].endswith((".json", ".yaml", ".yml")):
        values = read_config_file(argv[0])
        for option, extra in (defaults_if_given or {}).items():
            if values.get(option):
                defaults.update(extra)
        return tuple(parser.parse_dict({**defaults, **values})), set(values)
    given = given_options(argv)
    for option, extra in (defaults_if_given or {}).items():
        if option in given:
            defaults.update(extra)
    filled: list[str] = []
    for name, value in defaults.items():
        if name not in given:
            filled += [f"--{name}", str(value)]
    return tuple(parser.parse_args_into_dataclasses(args=filled + argv)), given


def setup_logging(logger: logging.Logger, args: TrainingArguments) -> None:
    """Log to stdout; ``logger``, datasets and transformers at the process's level (quieter on ranks > 0)."""
    logging.basicConfig(
        format="%(asctime)s - %(levelname)s - %(name)s - %(message)s",
        datefmt="%H:%M:%S",
        handlers=[logging.StreamHandler(sys.stdout)],
    )
    level = args.get_process_log_level()
    logger.setLevel(level)
    datasets.utils.logging.set_verbosity(level)
    transformers.utils.logging.set_verbosity(level)


def set_cpu_threads(logger: logging.Logger, requested: int | None, args: TrainingArguments, config_built: bool) -> None:
    """torch intra-op threads when training on CPU: ``requested``, else OMP_NUM_THREADS if set (torch reads it),
    else 1 for a config-built model (tiny matrices: extra threads only add OpenMP overhead), else torch's default."""
    if not (args.use_cpu or not torch.cuda.is_available()):
        return
    threads = requested
    if threads is None and "OMP_NUM_THREADS" not in os.environ and config_built:
        threads = 1
    if threads is not None:
        torch.set_num_threads(threads)
        logger.info("Using %d CPU thread(s) per process.", threads)


def close_process_group() -> None:
    """Destroy the torch.distributed process group, if any, before the interpreter exits (a gloo group
    left to interpreter teardown can abort a finished rank: "terminate called without an active exception")."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def _explain_recipe_defaults(parser: HfArgumentParser, reasons: dict[str, str]) -> None:
    """Append "Recipe default, not the package's: <reason>" to the help of every option in ``reasons``."""
    actions = {action.dest: action for action in parser._actions}
    unknown = sorted(set(reasons) - set(actions))
    if unknown:
        raise ValueError(f"Reasons given for options the parser does not have: {unknown}.")
    for name, reason in reasons.items():
        note = f"Recipe default, not the package's: {reason}".replace("%", "%%")
        actions[name].help = f"{actions[name].help or ''} {note}".strip()


def _own_options_first(parser: HfArgumentParser, dataclass_types: tuple[type, ...]) -> None:
    """In --help, list the options the recipe's dataclasses define themselves (the recipe's, then BROSConfig's
    bilevel options) before the hundred that BROSConfig inherits from TrainingArguments. argparse has no public
    way to reorder options, so this stably sorts each group's action list, which is all its help formatter reads."""
    inherited = {
        name
        for dataclass_type in dataclass_types
        for base in dataclass_type.__mro__[1:]
        for name in getattr(base, "__dataclass_fields__", {})
    }
    for group in parser._action_groups:
        group._group_actions.sort(key=lambda action: action.dest in inherited)


@contextlib.contextmanager
def explained_hub_errors(what: str, name: str | None) -> Iterator[None]:
    """Turn a failed hub or disk load of ``name`` into one line that says what failed and how to pass local
    files (SystemExit: no traceback), instead of the chained tracebacks of the hub client."""
    try:
        yield
    except (OSError, ValueError) as error:
        reason = (str(error).strip().splitlines() or [type(error).__name__])[0].rstrip(".")
        offline = " The hub is not reachable from here (or HF_HUB_OFFLINE=1)." if _hub_offline() else ""
        raise SystemExit(
            f"error: could not load {what} {name!r}: {reason}.{offline} Pass a local folder (a save_pretrained "
            "directory, or data files such as --train_files) instead of a hub name."
        ) from None


def _hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")
