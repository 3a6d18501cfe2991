"""How accurate are the finite-difference terms? Relative error against double backward, per eps.

    python -m benchmarks.fd_accuracy                 # fp32, bf16 autocast and bf16 weights, eps 2e-4 ... 5e-2

One lower pass of a 2-layer Llama (width 64, vocab 256, batch 6 × 32, 3 domains) in the rank-16
subspace, forward hooks as in the trainer; ``lower_pass(mode="finite_difference")`` is compared with
``mode="autograd"`` (exact in the same precision) for the lower gradient (central differences, sketched
tensors), the embeddings' full-space lower gradient (one-sided: ∇g(θ − δd), as the trainer's default
``lower_full_space_modules`` takes it), the Hessian action and the cross term. This is where
``DEFAULT_FD_EPS`` (fp32) and ``DEFAULT_FD_EPS_HALF_PRECISION`` (bf16) come from; which mode learns the better
mixture in bf16 is :mod:`benchmarks.bf16_mixtures`.
"""

from __future__ import annotations

import argparse
import contextlib

import torch
from torch.func import functional_call
from torch.nn.attention import SDPBackend, sdpa_kernel

from bros_hf import DomainMixture, Sketch, lower_pass
from bros_hf.core.estimators import SubspaceVector
from bros_hf.losses import per_example_losses
from bros_hf.modules import full_space_parameter_names, model_perturber
from tests.toy import tiny_llama

EPS = (2e-4, 5e-4, 1e-3, 2e-3, 5e-3, 1e-2, 2e-2, 5e-2)
PRECISIONS = ("fp32", "bf16", "bf16-weights")  # bf16: autocast over fp32 weights; bf16-weights: model.to(bf16)


def _relative_error(estimate: torch.Tensor, reference: torch.Tensor) -> float:
    return float((estimate - reference).norm() / reference.norm())


def _flat(tensors: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([t.flatten() for t in tensors.values()])


def measure(precision: str, rank: int = 16, seed: int = 0) -> list[dict[str, float]]:
    """One row per eps: relative errors of gradient, Hessian action and cross term in ``precision``."""
    model = tiny_llama(vocab=256, hidden=64, layers=2, heads=4, kv_heads=4, seed=seed).eval()
    if precision == "bf16-weights":
        model = model.to(torch.bfloat16)
    params = {n: p.detach() for n, p in model.named_parameters()}
    ids = torch.randint(0, 256, (6, 32), generator=torch.Generator().manual_seed(seed))
    keys = torch.tensor([0, 1, 2] * 2)
    upper = DomainMixture(["A", "B", "C"])
    upper.logits.copy_(torch.tensor([0.5, -0.2, -0.3]))
    autocast = (
        torch.autocast("cpu", dtype=torch.bfloat16) if precision == "bf16" else contextlib.nullcontext()
    )

    def lower_loss(lam, p):
        with autocast:
            logits = functional_call(model, p, args=(), kwargs={"input_ids": ids})
        return (upper.coefficients(keys, lam) * per_example_losses(logits, ids)).mean()

    generator = torch.Generator().manual_seed(seed)
    sketch_p, sketch_q = Sketch.sample(params, rank, generator), Sketch.sample(params, rank, generator)
    z = {n: torch.randn(p.shape, generator=generator) for n, p in params.items()}
    direction = SubspaceVector(sketch_q, sketch_q.reduce(z))
    embeddings = set(full_space_parameter_names(model, ["embeddings"], dict(model.named_parameters())))
    kwargs = dict(
        direction=direction,
        with_cross=True,
        lower_sketch=sketch_p.with_identity(embeddings),
        perturber=model_perturber(model),
    )
    rows = []
    with sdpa_kernel(SDPBackend.MATH):
        exact = lower_pass(lower_loss, upper.logits, params, sketch_p, mode="autograd", **kwargs)
        for eps in EPS:
            fd = lower_pass(
                lower_loss, upper.logits, params, sketch_p, mode="finite_difference", fd_eps=eps, **kwargs
            )
            sketched = {n: g for n, g in fd.grad.items() if n not in embeddings}
            rows.append(
                {
                    "eps": eps,
                    "gradient": _relative_error(_flat(sketched), _flat({n: exact.grad[n] for n in sketched})),
                    "embedding_gradient": _relative_error(
                        _flat({n: fd.grad[n] for n in embeddings}),
                        _flat({n: exact.grad[n] for n in embeddings}),
                    ),
                    "hessian_action": _relative_error(_flat(fd.hessian_action), _flat(exact.hessian_action)),
                    "cross_term": _relative_error(fd.cross, exact.cross),
                }
            )
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--precisions", nargs="+", default=list(PRECISIONS), choices=PRECISIONS)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    print("| precision | eps | gradient | embedding gradient (one-sided) | Hessian action | cross term |")
    print("|---|---|---|---|---|---|")
    for precision in args.precisions:
        for row in measure(precision):
            print(
                f"| {precision} | {row['eps']:g} | {row['gradient']:.1e} | {row['embedding_gradient']:.1e} "
                f"| {row['hessian_action']:.1e} | {row['cross_term']:.1e} |"
            )


if __name__ == "__main__":
    main()
