"""bros-hf: memory-efficient stochastic bilevel optimization (BROS, MA-SOBA) for Hugging Face.

``bros_hf.core`` is the method on plain tensors and needs torch only; ``BROSConfig`` and
``BROSTrainer`` adapt it to the ``transformers`` Trainer, and ``group_texts_by_domain`` packs tokenized
text into blocks that keep one domain each; they are imported on first use, so that
``import bros_hf.core`` does not load transformers or datasets.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from bros_hf.core.engine import BilevelEngine, BilevelHyperparameters, Terms, make_lower_loss
from bros_hf.core.estimators import coordinate_gradient, cross_term, hessian_action, lower_pass
from bros_hf.core.sketch import Sketch
from bros_hf.core.upper import DomainMixture, SampleWeights, UpperVariable

if TYPE_CHECKING:
    from bros_hf.config import BROSConfig
    from bros_hf.packing import group_texts_by_domain
    from bros_hf.trainer import BROSTrainer

__version__ = "0.1.0"

_HUGGING_FACE_ADAPTER = {
    "BROSConfig": "bros_hf.config",
    "BROSTrainer": "bros_hf.trainer",
    "group_texts_by_domain": "bros_hf.packing",
}

__all__ = [
    "BROSConfig",
    "BROSTrainer",
    "BilevelEngine",
    "BilevelHyperparameters",
    "DomainMixture",
    "SampleWeights",
    "Sketch",
    "Terms",
    "UpperVariable",
    "coordinate_gradient",
    "cross_term",
    "group_texts_by_domain",
    "hessian_action",
    "lower_pass",
    "make_lower_loss",
]


def __getattr__(name: str) -> Any:
    if name in _HUGGING_FACE_ADAPTER:
        return getattr(importlib.import_module(_HUGGING_FACE_ADAPTER[name]), name)
    raise AttributeError(f"module 'bros_hf' has no attribute {name!r}")
