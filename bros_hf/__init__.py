"""bros-hf: memory-efficient stochastic bilevel optimization (BROS, MA-SOBA) for Hugging Face."""

from bros_hf.config import BROSConfig
from bros_hf.estimators import coordinate_gradient, cross_term, hessian_action, lower_pass
from bros_hf.sketch import Sketch
from bros_hf.solver import BilevelEngine, BilevelHyperparameters, make_lower_loss
from bros_hf.trainer import BROSTrainer
from bros_hf.upper import DomainMixture, SampleWeights, UpperVariable

__version__ = "0.1.0"

__all__ = [
    "BROSConfig",
    "BROSTrainer",
    "BilevelEngine",
    "BilevelHyperparameters",
    "DomainMixture",
    "SampleWeights",
    "Sketch",
    "UpperVariable",
    "coordinate_gradient",
    "cross_term",
    "hessian_action",
    "lower_pass",
    "make_lower_loss",
]
