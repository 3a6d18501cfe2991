"""Low-rank perturbations inside the layers: θ + Σ_k c_k B_k w_k without full-size copies.

For a weight W that a sketch views as [m, n] with basis B ∈ R^{n×r} and coordinates w ∈ R^{m×r},
the perturbed weight W + c · w Bᵀ changes a layer's output by a rank-r term:

- ``nn.Linear`` (W = [out, in], y = x Wᵀ):            Δy = c · (x B) wᵀ
- transposed linear layers such as GPT-2's ``Conv1D`` (W = [in, out], y = x W + b; named by the
  caller, so that this module needs torch only):     Δy = c · (x w) Bᵀ
- ``nn.Embedding`` (W = [vocab, d], y = W[ids]):       Δy = c · w[ids] Bᵀ

Forward hooks add these terms during a pass, so the weights themselves are used unchanged: no
W + w Bᵀ tensor is formed, none is saved for backward, and gradients with respect to w are r-dim
(Δy's backward never builds an [m, n] gradient).

First-order passes also take a *probe*: coordinates a that are zero and only there for ∂g/∂a. Its
term adds nothing to y and, since a = 0, nothing to ∂g/∂x either, so :class:`_ProbeGradient` skips
both and computes only ∂g/∂a in backward (Linear: ∂g/∂yᵀ (x B); Conv1D: xᵀ (∂g/∂y B); Embedding:
rows of ∂g/∂y B added at the ids), saving the output-size product (x B) aᵀ and the backward through it.

Tensors not used that way are materialised as in :class:`~bros_hf.core.estimators.MaterializedPerturber`
(θ + P a formed, then used by the module's own forward, which is right for any module): biases, norms,
convolutions, parameters used directly in a forward, full-space tensors, and the weights of layer
subclasses whose forward differs from their base class's (Gemma's scaled embeddings, OPT's learned
positional embeddings), which a hook would get wrong. Those cost one weight-size copy per pass.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.stateless import _reparametrize_module

from bros_hf.core.estimators import Probe, Shift


def _owners(model: nn.Module) -> dict[int, list[tuple[nn.Module, str]]]:
    """id(parameter) -> every (module, attribute) that holds it directly (tied weights: several)."""
    owners: dict[int, list[tuple[nn.Module, str]]] = {}
    for module in model.modules():
        for attribute, param in module._parameters.items():
            if param is not None:
                owners.setdefault(id(param), []).append((module, attribute))
    return owners


def _delta(module: nn.Module, inputs: tuple, terms: list[tuple[Tensor | float, Tensor, Tensor]]) -> Tensor:
    """Σ_k c_k Δy_k for one module (see the module docstring); c_k scales the small r-dim factor."""
    x = inputs[0]
    total = None
    for scale, basis, coords in terms:
        coords = scale * coords
        if isinstance(module, nn.Embedding):
            picked = F.embedding(x, coords, padding_idx=module.padding_idx)
            term = picked @ basis.to(picked.dtype).T
        elif isinstance(module, nn.Linear):
            term = F.linear(F.linear(x, basis.T.to(x.dtype)), coords.to(x.dtype))
        else:  # transposed linear (Conv1D): y = x W + b with W = [in, out]
            term = F.linear(F.linear(x, coords.T.to(x.dtype)), basis.to(x.dtype))
        total = term if total is None else total + term
    return total


def _probe_gradient(module: nn.Module, saved: Tensor, basis: Tensor, grad_out: Tensor) -> Tensor:
    """∂g/∂a for the a-term of ``module`` at a = 0 from ∂g/∂y and what forward saved (see _ProbeGradient)."""
    basis = basis.to(grad_out.dtype)
    if isinstance(module, nn.Embedding):
        rows = (grad_out @ basis).reshape(-1, basis.shape[1])
        grad = rows.new_zeros(module.num_embeddings, basis.shape[1]).index_add_(0, saved.reshape(-1), rows)
        if module.padding_idx is not None:
            grad[module.padding_idx] = 0
        return grad
    flat_grad = grad_out.reshape(-1, grad_out.shape[-1])
    flat_saved = saved.reshape(-1, saved.shape[-1]).to(grad_out.dtype)
    if isinstance(module, nn.Linear):
        return flat_grad.T @ flat_saved  # saved = x B
    return flat_saved.T @ (flat_grad @ basis)  # Conv1D: saved = x


class _ProbeGradient(torch.autograd.Function):
    """y ↦ y, with ∂g/∂a of the zero probe coordinates a computed in backward.

    Saves only what that needs: x B ([tokens, r]) for ``nn.Linear``, the ids for ``nn.Embedding``,
    and x for ``Conv1D`` (whose a sits on the input side).
    """

    @staticmethod
    def forward(ctx, output: Tensor, coords: Tensor, x: Tensor, basis: Tensor, module: nn.Module) -> Tensor:
        saved = F.linear(x, basis.T.to(x.dtype)) if isinstance(module, nn.Linear) else x
        ctx.save_for_backward(saved, basis)
        ctx.module = module
        ctx.coords_dtype = coords.dtype
        return output.view_as(output)

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        saved, basis = ctx.saved_tensors
        grad_coords = _probe_gradient(ctx.module, saved, basis, grad_out).to(ctx.coords_dtype)
        return grad_out, grad_coords, None, None, None


class LowRankPerturber:
    """Perturber for an ``nn.Module``: low-rank terms through forward hooks where the layer allows it.

    ``model`` must be the module the loss function calls (e.g. through ``functional_call``);
    parameters are matched by name to ``model.named_parameters()``. ``params`` are used as given
    (the estimators pass θ detached, full-space tensors as leaves to differentiate by).
    ``transposed_linear``: layer classes computing y = x W + b with W = [in, out] (GPT-2's
    ``Conv1D``; :func:`bros_hf.modules.model_perturber` passes it); their weights are otherwise
    materialised.
    """

    def __init__(self, model: nn.Module, transposed_linear: tuple[type[nn.Module], ...] = ()):
        self.model = model
        # A hook reproduces a layer's forward, so only layers whose forward is exactly that of a known class
        # are hooked: subclasses that change it (Gemma's scaled embeddings, OPT's offset positions) are not.
        exact_forwards = {kind.forward for kind in (nn.Linear, nn.Embedding, *transposed_linear)}
        owners = _owners(model)
        self.modules: dict[str, list[nn.Module]] = {}
        for name, param in model.named_parameters():
            holders = owners.get(id(param), [])
            if holders and all(type(m).forward in exact_forwards and attr == "weight" for m, attr in holders):
                embedding_ok = all(
                    getattr(m, "max_norm", None) is None for m, _ in holders if isinstance(m, nn.Embedding)
                )
                if embedding_ok:
                    self.modules[name] = [m for m, _ in holders]

    @contextmanager
    def __call__(
        self, params: Mapping[str, Tensor], shifts: list[Shift], probes: Sequence[Probe] = ()
    ) -> Iterator[dict[str, Tensor]]:
        per_module: dict[nn.Module, list[tuple[Tensor | float, Tensor, Tensor]]] = {}
        module_probes: dict[nn.Module, list[tuple[Tensor, Tensor]]] = {}
        out: dict[str, Tensor] = {}
        for name, p in params.items():
            value = p
            for basis, coords in probes:
                if name not in coords:
                    continue
                matrix = basis.matrices.get(name)
                if matrix is not None and name in self.modules:
                    for module in self.modules[name]:
                        module_probes.setdefault(module, []).append((matrix, coords[name]))
                else:
                    value = value + basis.expand_one(name, coords[name], p.shape).to(p.dtype)
            for scale, basis, coords in shifts:
                if name not in coords:
                    continue
                matrix = basis.matrices.get(name)
                if matrix is not None and name in self.modules:
                    for module in self.modules[name]:
                        per_module.setdefault(module, []).append((scale, matrix, coords[name]))
                else:
                    value = value + (scale * basis.expand_one(name, coords[name], p.shape)).to(p.dtype)
            out[name] = value

        def hook(module: nn.Module, inputs: tuple, output: Tensor) -> Tensor:
            if module in per_module:
                output = output + _delta(module, inputs, per_module[module]).to(output.dtype)
            for matrix, coords in module_probes.get(module, ()):
                output = _ProbeGradient.apply(output, coords, inputs[0], matrix, module)
            return output

        handles = [module.register_forward_hook(hook) for module in per_module.keys() | module_probes.keys()]
        try:
            # The model holds the perturbed tensors for the whole context, not only while the loss function's
            # functional_call runs: activation checkpointing recomputes the forward during backward, after that
            # call has put the module's own parameters back. (functional_call is built on this context manager,
            # which has no public form.)
            with _reparametrize_module(self.model, out, tie_weights=True):
                yield out
        finally:
            for handle in handles:
                handle.remove()
