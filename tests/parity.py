"""Shared check of the low-rank hooks: the same lower pass through materialised θ + P a and through the hooks."""

from __future__ import annotations

from collections.abc import Mapping

from torch import Tensor
from torch.nn.attention import SDPBackend, sdpa_kernel

from bros_hf import Sketch, lower_pass
from bros_hf.core.estimators import LowerLossFn, LowerPassResult, SubspaceVector


def materialised_and_hooked(
    lower_loss: LowerLossFn,
    lam: Tensor,
    params: Mapping[str, Tensor],
    sketch_p: Sketch,
    sketch_q: Sketch,
    z: Mapping[str, Tensor],
    hooks,
    *,
    mode: str = "autograd",
    lower_sketch: Sketch | None = None,
) -> tuple[LowerPassResult, LowerPassResult]:
    """(materialised, hooked) results of ``lower_pass`` with d = S_Q z and the cross term (SDPA math kernel)."""
    results = []
    with sdpa_kernel(SDPBackend.MATH):
        for perturber in (None, hooks):
            results.append(
                lower_pass(
                    lower_loss,
                    lam,
                    params,
                    sketch_p,
                    direction=SubspaceVector(sketch_q, sketch_q.reduce(dict(z))),
                    with_cross=True,
                    lower_sketch=lower_sketch,
                    mode=mode,
                    perturber=perturber,
                )
            )
    return results[0], results[1]
