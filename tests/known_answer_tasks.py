"""Known-answer tasks for the upper level (domain mixtures and per-example weights).

Construction: every training domain d has its own labelling rule p_d(y|x) = 1[y = argmax W_d x] on a
shared input distribution x ~ N(0, I). Each target example draws its label from rule d with
probability π_d. A well-specified lower level trained on the mixture w learns
p_w(y|x) = Σ_d w_d p_d(y|x) (each domain enters with weight w_d), whose expected target
cross-entropy E_x[ -Σ_d π_d log p_w(y_d(x)|x) ] is minimised exactly at w = π (Gibbs' inequality,
pointwise in x whenever the rules disagree). So the bilevel answer is known: w* = π.

The construction lives in :mod:`benchmarks.mixture_tasks` (the mixture benchmark uses it too); this
module re-exports it for the tests.
"""

from __future__ import annotations

from benchmarks.mixture_tasks import rule_mixture_task, total_variation

__all__ = ["rule_mixture_task", "total_variation"]
