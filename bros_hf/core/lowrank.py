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
term adds nothing to y and, since a = 0, nothing to ∂g/∂x either, so it is never formed: only ∂g/∂a is
computed in backward (Linear: ∂g/∂yᵀ (x B); Conv1D: xᵀ (∂g/∂y B); Embedding: rows of ∂g/∂y B added at the
ids), saving the output-size product (x B) aᵀ and the backward through it. In first-order passes (the
finite-difference passes and the upper pass) the direction's shift is a constant, so one node per layer
(:class:`_LowRankTerms`) adds every shift into the layer's own output in place (``addmm_``: no output-sized
Δy, which for a language model head is a logits-sized buffer; into one new tensor when the output is a view) and
computes every probe's gradient from one product with all bases. Linear layers (``nn.Linear``, Conv1D) in float32
or float64 instead run as one node at the shifted weight W + c w Bᵀ (:class:`_ShiftedLayer`), formed in forward
and again in backward, never saved, where W has no more entries than the layer's input (out ≤ tokens) or is small
(at most :data:`SMALL_WEIGHT_ENTRIES`): fewer products and one autograd node instead of two. Second-order passes
(``hessian_mode="autograd"``), whose shift carries a graph, add Δy out of place (:func:`_delta`) and take each
probe through :class:`_ProbeGradient`.

Tensors not used that way are materialised as in :class:`~bros_hf.core.estimators.MaterializedPerturber`
(θ + P a formed, then used by the module's own forward, which is right for any module): biases, norms,
convolutions, parameters used directly in a forward, full-space tensors, and the weights of layer
subclasses whose forward differs from their base class's (Gemma's scaled embeddings, OPT's learned
positional embeddings), which a hook would get wrong. Those cost one weight-size copy per pass.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bros_hf.core.estimators import Probe, Shift


def _owners(model: nn.Module) -> dict[int, list[tuple[nn.Module, str]]]:
    """id(parameter) -> every (module, attribute) that holds it directly (tied weights: several)."""
    owners: dict[int, list[tuple[nn.Module, str]]] = {}
    for module in model.modules():
        for attribute, param in module._parameters.items():
            if param is not None:
                owners.setdefault(id(param), []).append((module, attribute))
    return owners


@contextmanager
def _installed(
    holders: Mapping[str, list[tuple[nn.Module, str]]], tensors: Mapping[str, Tensor]
) -> Iterator[None]:
    """Put each named tensor in every module attribute that holds that parameter (tied weights: all of them) and
    put the parameters back on exit.

    What ``torch.func.functional_call(..., tie_weights=True)`` does, without recomputing the tied names and member
    paths from ``named_parameters()`` on every call (under cProfile, 0.57 ms of every pass of a 0.1 M-parameter ViT):
    ``holders`` is computed once per model (:func:`_owners`), and a pass only assigns into the modules' parameter
    dicts."""
    saved: list[tuple[nn.Module, str, Tensor]] = []
    try:
        for name, value in tensors.items():
            for module, attribute in holders[name]:
                saved.append((module, attribute, module._parameters[attribute]))
                module._parameters[attribute] = value
        yield
    finally:
        for module, attribute, original in reversed(saved):
            module._parameters[attribute] = original


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


def _is_differentiable(scale: Tensor | float, coords: Tensor) -> bool:
    return coords.requires_grad or (isinstance(scale, Tensor) and scale.requires_grad)


def _add_products(ctx, output: Tensor, factors: list[tuple[Tensor, Tensor]]) -> Tensor:
    """output + Σ_k L_k R_kᵀ (each term a rank-r product, [rows, r] × [r, m]), without an output-sized temporary.

    In place (``addmm_``, and ``ctx.mark_dirty``) on a contiguous tensor of its own that autograd lets change;
    otherwise (a view, such as the output of a linear layer with a bias on a 3-d input or of GPT-2's Conv1D, or a
    leaf requiring grad: transformers' enable_input_require_grads makes the input embeddings' output one) the first
    term goes out of place into a new tensor (one read of the output, one write, where a copy then an in-place add
    would be two of each). Without terms the output is returned as it is."""
    if not factors:
        return output
    own = output.is_contiguous() and not output._is_view() and not (output.is_leaf and output.requires_grad)
    width = output.shape[-1]
    if own:
        flat = output.view(-1, width)
        ctx.mark_dirty(output)
    else:
        (left, right), factors = factors[0], factors[1:]
        flat = torch.addmm(output.reshape(-1, width), left, right.T)
    for left, right in factors:
        flat.addmm_(left, right.T)
    return output if own else flat.view(output.shape)


def _joined(bases: Sequence[Tensor]) -> Tensor:
    """[B_1 … B_k] side by side (one product with all bases at once); a single basis as it is."""
    return bases[0] if len(bases) == 1 else torch.cat(bases, dim=1)


def _unpack_bases(
    tensors: Sequence[Tensor], n_probes: int
) -> tuple[Sequence[Tensor], Sequence[Tensor], Sequence[Tensor]]:
    """(probe bases, shift bases, shifts) from a node's saved ``[*bases, *shifts]``, bases the probes' then the
    shifts' (one shift per shift basis)."""
    n_bases = (len(tensors) + n_probes) // 2
    bases, shifts = tensors[:n_bases], tensors[n_bases:]
    return bases[:n_probes], bases[n_probes:], shifts


def _probe_gradients(
    module: nn.Module, saved: Tensor, probe_bases: Sequence[Tensor], flat_grad: Tensor, coords_dtypes: Sequence
) -> list[Tensor]:
    """∂g/∂a for each zero probe a of ``module`` from ∂g/∂y ([rows, out]) and what forward saved, one product with
    all bases at once (see :class:`_LowRankTerms`): x B for ``nn.Linear``, the ids for ``nn.Embedding``, x for
    Conv1D."""
    if not probe_bases:
        return []
    dtype = flat_grad.dtype
    if isinstance(module, nn.Linear):
        grads = flat_grad.T @ (saved if saved.dtype == dtype else saved.to(dtype))
    else:
        rows = flat_grad @ _joined(probe_bases).to(dtype)
        if isinstance(module, nn.Embedding):
            grads = rows.new_zeros(module.num_embeddings, rows.shape[1]).index_add_(0, saved.reshape(-1), rows)
            if module.padding_idx is not None:
                grads[module.padding_idx] = 0
        else:
            grads = saved.reshape(-1, saved.shape[-1]).to(dtype).T @ rows
    # One contiguous tensor per probe (not column views of one buffer: they reach optimizers and all-reduces).
    if len(probe_bases) == 1:
        return [grads.to(coords_dtypes[0])]
    pieces = grads.split([b.shape[1] for b in probe_bases], dim=1)
    return [g.to(c).contiguous() for g, c in zip(pieces, coords_dtypes, strict=True)]


class _LowRankTerms(torch.autograd.Function):
    """y ↦ y + Σ_s c_s Δy_s for constant shifts (added in place, without forming Δy_s), with ∂g/∂a of the zero
    probe coordinates computed in backward: one node per layer and pass, and one product with all bases at once.

    ``bases`` holds the probes' bases then the shifts'; ``shifts`` the shifts' scaled coordinates c_s w_s (no
    gradient: first-order passes, where the direction is a constant). With B = [B_1 … B_k] the probes' bases:

    - Linear (y = x Wᵀ):    Δy_s = (x B_s)(c_s w_s)ᵀ;  ∂g/∂a = ∂g/∂yᵀ (x B);  ∂g/∂x += (∂g/∂y c_s w_s) B_sᵀ
    - Conv1D (y = x W):     Δy_s = (x c_s w_s) B_sᵀ;   ∂g/∂a = xᵀ (∂g/∂y B);  ∂g/∂x += (∂g/∂y B_s)(c_s w_s)ᵀ
    - Embedding (y = W[x]): Δy_s = (c_s w_s)[x] B_sᵀ;  ∂g/∂a = rows of ∂g/∂y B added at the ids
    """

    @staticmethod
    def forward(ctx, output: Tensor, x: Tensor, module: nn.Module, bases: list[Tensor], shifts: list[Tensor],
                *probe_coords: Tensor) -> Tensor:
        # Written for few Python-level operations per call: at small widths the layer's own product costs less
        # than the interpreter's work around this node, which runs for every hooked layer in every pass.
        dtype, n_probes = output.dtype, len(probe_coords)
        shift_bases = bases[n_probes:]
        if isinstance(module, nn.Linear):
            projected = F.linear(x, _joined(bases).T.to(x.dtype))
            projected = projected.reshape(-1, projected.shape[-1])
            factors, start = [], projected.shape[1] - sum(b.shape[1] for b in shift_bases)
            saved = projected[:, :start].contiguous() if shifts else projected
            for coords, basis in zip(shifts, shift_bases, strict=True):
                end = start + basis.shape[1]
                factors.append((projected[:, start:end], coords))
                start = end
        elif isinstance(module, nn.Embedding):
            factors = [(F.embedding(x.reshape(-1), c.to(dtype)), b) for c, b in zip(shifts, shift_bases, strict=True)]
            saved = x
        else:  # transposed linear (Conv1D)
            flat_x = x.reshape(-1, x.shape[-1])
            factors = [(flat_x @ c.to(x.dtype), b) for c, b in zip(shifts, shift_bases, strict=True)]
            saved = x
        if any(left.dtype != dtype or right.dtype != dtype for left, right in factors):
            factors = [(left.to(dtype), right.to(dtype)) for left, right in factors]
        out = _add_products(ctx, output, factors)
        ctx.save_for_backward(saved, *bases, *shifts)
        ctx.module, ctx.n_probes, ctx.coords_dtypes = module, n_probes, [c.dtype for c in probe_coords]
        return out

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        saved, *rest = ctx.saved_tensors  # x B, x or the ids; then the bases and the shifts
        probe_bases, shift_bases, shifts = _unpack_bases(rest, ctx.n_probes)
        module, dtype = ctx.module, grad_out.dtype
        flat_grad = grad_out.reshape(-1, grad_out.shape[-1])
        grad_probes = _probe_gradients(module, saved, probe_bases, flat_grad, ctx.coords_dtypes)
        grad_x = None
        if shifts and ctx.needs_input_grad[1] and not isinstance(module, nn.Embedding):
            for coords, basis in zip(shifts, shift_bases, strict=True):
                if isinstance(module, nn.Linear):
                    term = (flat_grad @ coords.to(dtype)) @ basis.T.to(dtype)
                else:
                    term = (flat_grad @ basis.to(dtype)) @ coords.T.to(dtype)
                grad_x = term if grad_x is None else grad_x.add_(term)
            grad_x = grad_x.reshape(*grad_out.shape[:-1], grad_x.shape[-1])
        return grad_out, grad_x, None, None, None, *grad_probes


def _shifted_weight(weight: Tensor, bases: Sequence[Tensor], shifts: Sequence[Tensor]) -> Tensor:
    """W + Σ_s (c_s w_s) B_sᵀ in W's own layout ([out, in] for ``nn.Linear``, [in, out] for Conv1D): a new tensor
    (at least one shift)."""
    dtype = weight.dtype
    (coords, basis), *others = zip(shifts, bases, strict=True)
    shifted = torch.addmm(weight, coords.to(dtype), basis.T.to(dtype))
    for coords, basis in others:
        shifted.addmm_(coords.to(dtype), basis.T.to(dtype))
    return shifted


SMALL_WEIGHT_ENTRIES = 1 << 18
"""Weights with at most this many entries (1 MB in float32) run a first-order pass at their shifted weight whatever
the number of tokens (:func:`_fuses_shift_into_weight`). Timed one layer at a time (one thread, r = 16), the
shifted-weight node took 0.74–0.94 × the time of the output terms for such layers with more outputs than tokens
(128–768 tokens), and 0.97–1.18 × for larger ones (256–1 536 tokens)."""


def _fuses_shift_into_weight(module: nn.Module, x: Tensor, shifted: bool = True) -> bool:
    """Whether :class:`_ShiftedLayer` is both right and cheaper than the layer plus :class:`_LowRankTerms` here.

    - Right: the weight takes no gradient (the pass's lower update for this tensor is not full-space) and the
      layer runs in float32 or float64 without autocast. In bfloat16 the weight is rounded once for every token:
      a direction of δ‖d‖ = 2e-3 ‖θ‖ sits near half a bfloat16 unit of W's entries, so its rounding error would be
      the same for every token instead of averaging out over them, as rounding in the layer's output does.
    - Cheaper and no larger (``shifted``: a pass with a constant shift): W has at most as many entries as the
      layer's input x ([tokens, in]), i.e. out ≤ tokens, or at most :data:`SMALL_WEIGHT_ENTRIES` entries. Then
      forming W + c w Bᵀ (once in forward, once in backward; [out, in] written, never saved) costs no more memory
      than x (or than 1 MB) and less time than adding c (x B) wᵀ to the output and c (∂g/∂y w) Bᵀ to ∂g/∂x: for
      out ≤ tokens the products are fewer; for a small layer, one autograd node instead of two outweighs them. A
      wide layer at fewer tokens than its width (a language-model head, out = vocabulary ≫ tokens) keeps the terms:
      forming its weight twice costs about as much as the terms or more, and its transient weight can be a sizeable
      share of the pass's memory. Without a shift (the upper pass: probes only) W is used as it is: one node instead
      of two.
    """
    weight = module.weight
    return (
        not weight.requires_grad
        and x.dtype == weight.dtype
        and x.dtype in (torch.float32, torch.float64)
        and not torch.is_autocast_enabled(x.device.type)
        and (not shifted or weight.numel() <= max(x.numel(), SMALL_WEIGHT_ENTRIES))
    )


class _ShiftedLayer(torch.autograd.Function):
    """A linear layer at W + Σ_s c_s w_s B_sᵀ for constant shifts (none: W), with ∂g/∂a of the zero probe
    coordinates, in one node: the shifts go into a weight formed in forward and again in backward (never saved),
    instead of into the output (:class:`_LowRankTerms`, a second node after the layer's own). With W' that weight
    and B = [B_1 … B_k] the probes' bases:

    - Linear (y = x W'ᵀ + b):  ∂g/∂x = ∂g/∂y W';   ∂g/∂a = ∂g/∂yᵀ (x B)
    - Conv1D (y = x W' + b):   ∂g/∂x = ∂g/∂y W'ᵀ;  ∂g/∂a = xᵀ (∂g/∂y B)

    and ∂g/∂b = Σ_rows ∂g/∂y. W itself takes no gradient (:func:`_fuses_shift_into_weight`). Saves x B (Linear)
    or x (Conv1D), W, and the r-dim factors: no more than the layer's own forward would.
    """

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None, module: nn.Module, bases: list[Tensor],
                shifts: list[Tensor], *probe_coords: Tensor) -> Tensor:
        n_probes = len(probe_coords)
        probe_bases, shift_bases = bases[:n_probes], bases[n_probes:]
        shifted = _shifted_weight(weight, shift_bases, shifts) if shifts else weight
        flat_x = x.reshape(-1, x.shape[-1])
        if isinstance(module, nn.Linear):
            output = F.linear(x, shifted, bias)
            saved = None
            if probe_bases:
                saved = flat_x @ _joined(probe_bases).to(x.dtype)
        else:  # transposed linear (Conv1D)
            flat = flat_x @ shifted if bias is None else torch.addmm(bias, flat_x, shifted)
            output = flat.view(*x.shape[:-1], shifted.shape[1])
            saved = x if probe_bases else None
        ctx.save_for_backward(saved, weight, *bases, *shifts)
        ctx.module, ctx.n_probes, ctx.coords_dtypes = module, n_probes, [c.dtype for c in probe_coords]
        return output

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        saved, weight, *rest = ctx.saved_tensors
        probe_bases, shift_bases, shifts = _unpack_bases(rest, ctx.n_probes)
        module = ctx.module
        flat_grad = grad_out.reshape(-1, grad_out.shape[-1])
        grad_probes = _probe_gradients(module, saved, probe_bases, flat_grad, ctx.coords_dtypes)
        grad_x = grad_bias = None
        if ctx.needs_input_grad[0]:
            shifted = _shifted_weight(weight, shift_bases, shifts) if shifts else weight
            flat_x_grad = flat_grad @ (shifted if isinstance(module, nn.Linear) else shifted.T)
            grad_x = flat_x_grad.view(*grad_out.shape[:-1], flat_x_grad.shape[-1])
        if ctx.needs_input_grad[2]:
            grad_bias = flat_grad.sum(0)
        return grad_x, None, grad_bias, None, None, None, *grad_probes


class InstalledParameters(dict):
    """The perturbed tensors a :class:`LowRankPerturber` context yields, which it has also installed in the model
    for the whole context: a loss function may call the model directly instead of through ``functional_call``
    (which would swap every tensor in and out a second time)."""


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
        self.holders = {name: owners[id(param)] for name, param in model.named_parameters()}
        self.modules: dict[str, list[nn.Module]] = {}
        for name, holders in self.holders.items():
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
        unknown = sorted(set(params) - set(self.holders))
        if unknown:
            raise KeyError(
                f"{unknown[:5]} are not parameters of the {type(self.model).__name__} this perturber was built for "
                "(LowRankPerturber matches tensors by their names in model.named_parameters()). Build the perturber "
                "on the module the loss function calls, after any wrapping that renames parameters."
            )
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

        # Constant shifts (first-order passes): each module's node arguments, made once per pass rather than in
        # every call of the hook (a module may run several times per pass: shared layers, activation checkpointing).
        hooked = per_module.keys() | module_probes.keys()
        constant: dict[nn.Module, tuple[list[Tensor], list[Tensor], list[Tensor]]] = {}
        for module in hooked:
            shifts_here, probes_here = per_module.get(module, []), module_probes.get(module, [])
            if not any(_is_differentiable(scale, coords) for scale, _, coords in shifts_here):
                bases = [matrix for matrix, _ in probes_here] + [matrix for _, matrix, _ in shifts_here]
                scaled = [scale * coords for scale, _, coords in shifts_here]
                constant[module] = (bases, scaled, [c for _, c in probes_here])

        def hook(module: nn.Module, inputs: tuple, output: Tensor) -> Tensor:
            node_arguments = constant.get(module)
            if node_arguments is not None:
                bases, scaled, probe_coords = node_arguments
                return _LowRankTerms.apply(output, inputs[0], module, bases, scaled, *probe_coords)
            output = output + _delta(module, inputs, per_module.get(module, [])).to(output.dtype)
            for matrix, coords in module_probes.get(module, []):
                output = _ProbeGradient.apply(output, coords, inputs[0], matrix, module)
            return output

        # Linear layers in first-order passes run through a forward of this context's own, which puts the shift into
        # the weight (and the probes into the same node) where that is right and cheaper (_fuses_shift_into_weight).
        # Not where something else already replaced the instance's forward (accelerate's device hooks do): those
        # keep the output hook.
        reweighted = {
            module for module in constant if not isinstance(module, nn.Embedding) and "forward" not in vars(module)
        }
        handles = [module.register_forward_hook(hook) for module in hooked if module not in reweighted]
        try:
            for module in reweighted:
                vars(module)["forward"] = _shifted_forward(module, *constant[module])
            # The model holds the perturbed tensors for the whole context, not only while the loss function's
            # functional_call runs: activation checkpointing recomputes the forward during backward, after that
            # call has put the module's own parameters back.
            with _installed(self.holders, out):
                yield InstalledParameters(out)
        finally:
            for handle in handles:
                handle.remove()
            for module in reweighted:
                vars(module).pop("forward", None)


def _shifted_forward(
    module: nn.Module, bases: list[Tensor], scaled: list[Tensor], probe_coords: list[Tensor]
) -> Callable[..., Tensor]:
    """The forward of a linear layer (``nn.Linear`` or Conv1D) for a first-order pass with constant shifts: the
    layer at W + Σ_s c_s w_s B_sᵀ (:class:`_ShiftedLayer`) where :func:`_fuses_shift_into_weight` says so, else
    the layer's own forward and :class:`_LowRankTerms` (what the output hook does for other layers)."""
    layer_forward = type(module).forward

    def forward(*args: Any, **kwargs: Any) -> Tensor:
        x = args[0] if args else next(iter(kwargs.values()))
        if _fuses_shift_into_weight(module, x, shifted=bool(scaled)):
            return _ShiftedLayer.apply(x, module.weight, module.bias, module, bases, scaled, *probe_coords)
        return _LowRankTerms.apply(layer_forward(module, *args, **kwargs), x, module, bases, scaled, *probe_coords)

    return forward
