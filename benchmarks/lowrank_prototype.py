"""Prototype of the proposed memory fix: sketched perturbations through forward hooks (no weight copies).

The current estimators evaluate g at θ + P a + Σ c_k x_k by materialising a full-size tensor per
weight (``bros_hf.estimators._perturbed``) and passing it through ``functional_call``; autograd then
keeps that copy for backward and forms the full-size gradient of the copy. For ``nn.Linear``
(W ∈ R^{m×n}, sketch P ∈ R^{n×r}, coordinates A ∈ R^{m×r}) the perturbation can instead be applied
to activations:

    x (W + A Pᵀ + c U Bᵀ)ᵀ = x Wᵀ + (x P) Aᵀ + c (x B) Uᵀ

and for ``nn.Embedding`` (sketched along d) ``W[ids] + A[ids] Pᵀ + c U[ids] Bᵀ``. Every direction
the estimators use is low-rank in this form: S_Q z = (z Q) Qᵀ, S_P z = (z P) Pᵀ. The model then runs
on its own (detached) weights; the only extra activations are [tokens × r]; no tensor of a weight's
size is created, and the gradient w.r.t. A is (∂y)ᵀ (x P) directly. Unsketched tensors (norms,
biases, modules without a hook) keep the materialised path (they are small).

This module implements the finite-difference lower pass that way (``fd_lower_pass_hooked``, the same
outputs as ``bros_hf.estimators.lower_pass(mode="finite_difference")``) and measures, in fresh
subprocesses, the peak memory of one whole step (lower pass, upper pass, z update, AdamW on the
coordinates, fold θ ← θ + P Δa) against a plain AdamW step and the current implementation:

    python -m benchmarks.lowrank_prototype --size llama-m --rank 16
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

Factored = tuple[Tensor, Tensor]  # (U [m, r], B [n, r]): the perturbation U Bᵀ of an [m, n] weight


def factored_projection(sketch, z: Mapping[str, Tensor]) -> dict[str, Tensor | Factored]:
    """S z per tensor, as (z P, P) for sketched tensors (never expanded) and S z = z otherwise."""
    out: dict[str, Tensor | Factored] = {}
    for name, value in z.items():
        matrix = sketch.matrices[name]
        out[name] = value if matrix is None else (value.reshape(value.shape[0], -1) @ matrix, matrix)
    return out


def factored_norm(vectors: Mapping[str, Tensor | Factored]) -> float:
    total = 0.0
    for value in vectors.values():
        if isinstance(value, tuple):
            u, b = value
            total += float(((u @ (b.T @ b)) * u).sum())  # ‖U Bᵀ‖_F² without forming U Bᵀ
        else:
            total += float(value.float().pow(2).sum())
    return total**0.5


class LowRankHooks:
    """Forward hooks adding (x P) Aᵀ + Σ c (x B) Uᵀ to every hooked Linear/Embedding output."""

    def __init__(self, model: nn.Module, sketch, names: set[str]):
        self.sketch = sketch
        self.modules: dict[str, nn.Module] = {}
        for module_name, module in model.named_modules():
            name = f"{module_name}.weight" if module_name else "weight"
            if (
                name in names
                and sketch.matrices.get(name) is not None
                and type(module) in (nn.Linear, nn.Embedding)
            ):
                self.modules[name] = module

    @contextlib.contextmanager
    def active(self, coords: Mapping[str, Tensor] | None, shifts: list[tuple[float, Mapping[str, Any]]]):
        handles = []
        for name, module in self.modules.items():
            terms = []
            if coords is not None:
                terms.append((1.0, coords[name], self.sketch.matrices[name]))
            for scale, vectors in shifts:
                u, b = vectors[name]
                terms.append((scale, u, b))
            if not terms:
                continue
            handles.append(module.register_forward_hook(self._hook(terms, isinstance(module, nn.Embedding))))
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()

    @staticmethod
    def _hook(terms, embedding: bool):
        def hook(module, inputs, output):
            x = inputs[0]
            for scale, u, b in terms:
                if embedding:
                    extra = u[x] @ b.T.to(u.dtype)
                else:
                    extra = (x @ b.to(x.dtype)) @ u.T.to(x.dtype)
                output = output + (extra if scale == 1.0 else scale * extra)
            return output

        return hook


def _params_for(params, hooks: LowRankHooks, coords, shifts) -> dict[str, Tensor]:
    """Detached θ for hooked tensors; the materialised θ + a + Σ c x for the others (small ones)."""
    out = {}
    for name, p in params.items():
        value = p.detach()
        if name not in hooks.modules:
            if coords is not None:
                value = value + hooks.sketch.expand_one(name, coords[name], p.shape)
            for scale, vectors in shifts:
                v = vectors[name]
                if isinstance(v, tuple):  # sketched tensor without a hook: materialise U Bᵀ
                    v = (v[0] @ v[1].T).reshape(p.shape)
                value = value + scale * v
        out[name] = value
    return out


def coordinate_gradient_hooked(loss_fn, lam, params, hooks, shifts) -> tuple[Tensor, dict[str, Tensor]]:
    coords = hooks.sketch.zeros_like(params, requires_grad=True)
    with hooks.active(coords, shifts):
        loss = loss_fn(lam.detach(), _params_for(params, hooks, coords, shifts))
    names = list(coords)
    grads = torch.autograd.grad(loss, [coords[n] for n in names], allow_unused=True)
    return loss.detach(), {
        n: (torch.zeros_like(coords[n]) if g is None else g) for n, g in zip(names, grads, strict=True)
    }


def lambda_gradient_hooked(loss_fn, lam, params, hooks, shifts) -> Tensor:
    lam_leaf = lam.detach().clone().requires_grad_(True)
    with hooks.active(None, shifts):
        loss = loss_fn(lam_leaf, _params_for(params, hooks, None, shifts))
    (grad,) = torch.autograd.grad(loss, [lam_leaf], allow_unused=True)
    return torch.zeros_like(lam_leaf) if grad is None else grad


def fd_lower_pass_hooked(
    loss_fn, lam, params, hooks, direction, cross_vector, fd_eps=1e-3, fd_eps_cross=5e-3
):
    """(loss, Pᵀ∇g, Pᵀ H d, ∂_λ⟨∇g, v⟩) with d, v factored: what ``lower_pass(mode="finite_difference")`` returns."""
    from bros_hf.estimators import global_norm

    scale = max(float(global_norm(params)), 1.0)
    loss, grads = coordinate_gradient_hooked(loss_fn, lam, params, hooks, [])
    norm = factored_norm(direction)
    if norm == 0.0:
        hessian = {n: torch.zeros_like(g) for n, g in grads.items()}
    else:
        delta = fd_eps * scale / norm
        _, plus = coordinate_gradient_hooked(loss_fn, lam, params, hooks, [(delta, direction)])
        _, minus = coordinate_gradient_hooked(loss_fn, lam, params, hooks, [(-delta, direction)])
        hessian = {n: (plus[n] - minus[n]) / (2 * delta) for n in plus}
    norm = factored_norm(cross_vector)
    if norm == 0.0:
        cross = torch.zeros_like(lam)
    else:
        delta = fd_eps_cross * scale / norm
        plus = lambda_gradient_hooked(loss_fn, lam, params, hooks, [(delta, cross_vector)])
        minus = lambda_gradient_hooked(loss_fn, lam, params, hooks, [(-delta, cross_vector)])
        cross = (plus - minus) / (2 * delta)
    return loss, grads, hessian, cross


# ------------------------------------------------------------------------------------ measurement
def _setup(size_name: str, rank: int, seed: int = 0):
    from benchmarks.data import DOMAINS, build_data, collate
    from benchmarks.models import SIZES, build_model
    from bros_hf import BilevelEngine, BilevelHyperparameters, DomainMixture
    from bros_hf.losses import per_example_losses

    size = SIZES[size_name]
    model = build_model(size, seed)
    train, target, _ = build_data(size, 32, 16, 4, seed)
    lower_batch = collate([train[i] for i in range(0, 96, 16)])
    keys = torch.tensor([DOMAINS.index(train[i]["domain"]) for i in range(0, 96, 16)])
    upper_batch = collate([target[i] for i in range(6)])
    upper = DomainMixture(list(DOMAINS))
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    engine = BilevelEngine(
        params, upper, BilevelHyperparameters(method="bros", rank=rank, hessian_mode="finite_difference")
    )

    def losses(p, batch):
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        return per_example_losses(
            functional_call(model, p, args=(), kwargs=inputs, strict=False), batch["labels"]
        )

    def lower_loss(lam, p):
        ell = losses(p, lower_batch)
        return (upper.coefficients(keys, lam) * ell).mean()

    return model, params, engine, upper, lower_loss, lambda p: losses(p, upper_batch).mean(), lower_batch


def check_equivalence(size_name: str = "llama-xs", rank: int = 8) -> dict[str, float]:
    """Relative differences between the hooked and the current finite-difference lower pass."""
    from bros_hf.estimators import lower_pass

    torch.manual_seed(0)
    model, params, engine, upper, lower_loss, _, _ = _setup(size_name, rank)
    for z in engine.z.values():
        z.normal_(0, 1e-2)
    try:  # bros_hf API with subspace vectors (basis, coordinates)
        from bros_hf.estimators import SubspaceVector

        direction = SubspaceVector(engine.sketch_q, engine.sketch_q.reduce(engine.z))
        cross_vector = SubspaceVector(engine.sketch_p, engine.sketch_p.reduce(engine.z))
    except ImportError:  # earlier API: full tensors
        direction, cross_vector = engine.sketch_q.project(engine.z), engine.sketch_p.project(engine.z)
    current = lower_pass(
        lower_loss,
        upper.logits,
        params,
        engine.sketch_p,
        direction=direction,
        cross_vector=cross_vector,
        mode="finite_difference",
    )
    hooks = LowRankHooks(model, engine.sketch_p, set(params))
    loss, grads, hessian, cross = fd_lower_pass_hooked(
        lower_loss,
        upper.logits,
        params,
        hooks,
        factored_projection(engine.sketch_q, engine.z),
        factored_projection(engine.sketch_p, engine.z),
    )

    def rel(a: dict[str, Tensor], b: dict[str, Tensor]) -> float:
        num = sum(float((a[n] - b[n]).pow(2).sum()) for n in a) ** 0.5
        den = sum(float(b[n].pow(2).sum()) for n in b) ** 0.5
        return num / max(den, 1e-30)

    return {
        "hooked_modules": len(hooks.modules),
        "loss": abs(float(loss - current.loss)),
        "grad_rel": rel(grads, current.grad),
        "hessian_rel": rel(hessian, current.hessian_action),
        "cross_rel": float((cross - current.cross).norm() / current.cross.norm().clamp_min(1e-30)),
    }


def step_memory(size_name: str, variant: str, rank: int, steps: int = 3) -> dict[str, Any]:
    """Peak memory over a post-build baseline of ``steps`` whole steps of ``variant``, plus z's bytes (the
    Trainer allocates z after its baseline, this set-up before); CPU time of the last step."""
    from benchmarks.worker import MemoryMeter

    torch.set_num_threads(1)
    model, params, engine, upper, lower_loss, upper_loss, lower_batch = _setup(size_name, rank)
    meter = MemoryMeter("cpu")
    model(**lower_batch).loss.backward()
    model.zero_grad(set_to_none=True)
    meter.take_baseline()
    peaks, cpu = [], []
    z_mb = sum(z.numel() * z.element_size() for z in engine.z.values()) / (1024.0 * 1024.0)
    if variant == "plain":
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
        for _ in range(steps):
            meter.reset()
            started = time.process_time()
            model(**lower_batch).loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            cpu.append(time.process_time() - started)
            peaks.append(meter.peak_mb())
        z_mb = 0.0  # plain training holds no z
    else:
        for _ in range(steps):
            meter.reset()
            started = time.process_time()
            engine.begin_step()  # T = 1: new sketches, so fresh coordinates and AdamW state (as the Trainer does)
            coords = {
                n: nn.Parameter(torch.zeros(engine.sketch_p.coordinate_shape(n, p)))
                for n, p in params.items()
            }
            optimizer = torch.optim.AdamW(coords.values(), lr=1e-3)
            if variant == "current":
                lower = engine.lower_terms(lower_loss)
                upper_value, upper_grad = engine.upper_terms(upper_loss)
                grads, hessian, cross = lower.grad, lower.hessian_action, lower.cross
            else:
                hooks = LowRankHooks(model, engine.sketch_p, set(params))
                _, grads, hessian, cross = fd_lower_pass_hooked(
                    lower_loss,
                    upper.logits,
                    params,
                    hooks,
                    factored_projection(engine.sketch_q, engine.z),
                    factored_projection(engine.sketch_p, engine.z),
                )
                _, upper_grad = coordinate_gradient_hooked(
                    lambda _l, p: upper_loss(p), upper.logits, params, hooks, []
                )
            engine.update_auxiliary(hessian, upper_grad)
            engine.update_upper(-cross)
            for n, c in coords.items():
                c.grad = grads[n]
            optimizer.step()
            engine.apply_coordinates({n: c.detach() for n, c in coords.items()})
            engine.end_step()
            cpu.append(time.process_time() - started)
            peaks.append(meter.peak_mb())
    # z (4 B/param) is allocated before the baseline here (the Trainer allocates it inside train()): add it back.
    return {
        "size": size_name,
        "variant": variant,
        "rank": rank,
        "peaks_mb": peaks,
        "peak_mb": max(peaks) + z_mb,
        "z_mb_added": z_mb,
        "step_cpu_s": cpu[-1],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", default="llama-m")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--variants", nargs="+", default=["plain", "current", "hooked"])
    parser.add_argument("--single", help=argparse.SUPPRESS)
    parser.add_argument(
        "--check", action="store_true", help="Only compare hooked vs current outputs (llama-xs)."
    )
    args = parser.parse_args(argv)
    if args.check:
        print(json.dumps(check_equivalence()))
        return 0
    if args.single:
        print("RESULT " + json.dumps(step_memory(args.size, args.single, args.rank)))
        return 0
    from benchmarks.run import REPO_ROOT, child_env

    for variant in args.variants:
        command = [
            sys.executable,
            "-m",
            "benchmarks.lowrank_prototype",
            "--size",
            args.size,
            "--rank",
            str(args.rank),
        ]
        proc = subprocess.run(
            command + ["--single", variant], cwd=REPO_ROOT, env=child_env(), capture_output=True, text=True
        )
        line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
        print(line[0][7:] if line else f"{variant} failed: {proc.stderr[-2000:]}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
