"""Random subspace sketches: r-dim coordinates ↔ full parameter tensors.

For a parameter tensor viewed as a matrix W ∈ R^{m×n} (first dimension kept, all others
flattened into n; for ``nn.Linear`` this is [out_features, in_features], so n is the input
dimension), a sketch is a random matrix P ∈ R^{n×r} with i.i.d. entries of variance 1/r, so that
E[P Pᵀ] = I. Coordinates A ∈ R^{m×r} describe the perturbation W + A Pᵀ; the gradient with
respect to A at A = 0 is ∇_W g · P, and S_P = P Pᵀ acts on W's rows from the right.

Which tensors are sketched: every tensor with at least two dimensions whose flattened input
dimension n is larger than the rank r. Biases, LayerNorm/RMSNorm scales, and any tensor with
n ≤ r stay in full space (their "sketch" is the identity, P = I). Note that GPT-2's ``Conv1D``
stores weights as [in, out], so for it the sketched dimension is the output dimension; embeddings
[vocab, d] are sketched along d. (The trainer gives the embeddings' *lower* update U the identity by
default, ``BROSConfig.lower_full_space_modules``; their P and Q stay random.)

Full space (MA-SOBA) is the identity sketch for every tensor: the same code path, no copy.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Mapping
from typing import Literal

import torch
from torch import Tensor

SketchKind = Literal["rademacher", "gaussian"]


def sketched_dim(tensor: Tensor) -> int:
    """Input dimension n of a tensor viewed as a matrix [shape[0], numel / shape[0]]."""
    return tensor.numel() // tensor.shape[0] if tensor.dim() >= 2 else tensor.numel()


def is_sketched(tensor: Tensor, rank: int) -> bool:
    """Whether a tensor gets a rank-``rank`` sketch (dim ≥ 2 and input dimension n > r)."""
    return tensor.dim() >= 2 and sketched_dim(tensor) > rank


def random_matrix(n: int, rank: int, generator: torch.Generator, kind: SketchKind = "rademacher") -> Tensor:
    """Draw P ∈ R^{n×r} with E[P Pᵀ] = I.

    ``rademacher``: entries ±1/√r with equal probability. ``gaussian``: entries N(0, 1/r).
    Drawn on the generator's device, in float32.
    """
    if kind == "rademacher":
        signs = torch.randint(0, 2, (n, rank), generator=generator, device=generator.device, dtype=torch.float32)
        return signs.mul_(2.0 / math.sqrt(rank)).sub_(1.0 / math.sqrt(rank))
    if kind == "gaussian":
        return torch.randn(n, rank, generator=generator, device=generator.device).div_(math.sqrt(rank))
    raise ValueError(f"Unknown sketch kind {kind!r}: use 'rademacher' or 'gaussian'.")


def _stacked(tensors: list[Tensor]) -> Tensor:
    """The tensors stacked along a new first dimension (a view, not a copy, for a single tensor)."""
    return tensors[0].unsqueeze(0) if len(tensors) == 1 else torch.stack(tensors)


class Sketch:
    """Per-tensor sketch matrices for a dict of parameters.

    ``matrices[name]`` is P ∈ R^{n×r} or ``None`` for full space (P = I).
    Maps full tensors x to coordinates Pᵀx (``reduce``), coordinates a to full tensors P a
    (``expand``), and full tensors to their projection S_P x = P Pᵀ x (``project``).
    """

    def __init__(self, matrices: Mapping[str, Tensor | None]):
        self.matrices: dict[str, Tensor | None] = dict(matrices)

    @classmethod
    def identity(cls, params: Mapping[str, Tensor]) -> Sketch:
        """The full-space sketch (P = I for every tensor): MA-SOBA."""
        return cls({name: None for name in params})

    @classmethod
    def sample(
        cls,
        params: Mapping[str, Tensor],
        rank: int,
        generator: torch.Generator,
        kind: SketchKind = "rademacher",
    ) -> Sketch:
        """Draw an independent P for every sketched tensor, in ``params`` order, from ``generator``.

        All matrices come from one draw on the generator's device (one kernel, not one per tensor), as
        views of one buffer; they are moved to their tensors' devices where those differ."""
        if rank < 1:
            raise ValueError(f"subspace rank must be ≥ 1, got {rank}.")
        sketched = {name: sketched_dim(t) for name, t in params.items() if is_sketched(t, rank)}
        flat = random_matrix(sum(sketched.values()), rank, generator, kind)
        blocks = dict(zip(sketched, torch.split(flat, list(sketched.values())), strict=True))
        return cls({name: blocks[name].to(t.device) if name in blocks else None for name, t in params.items()})

    def with_identity(self, names: Collection[str]) -> Sketch:
        """This sketch with P = I (full space) for ``names``; the other matrices are shared, not copied.

        No names: this sketch itself (so U = P stays one sketch and its coordinates one probe)."""
        if not names:
            return self
        return Sketch({n: (None if n in names else p) for n, p in self.matrices.items()})

    def to(self, device: torch.device | str) -> Sketch:
        return Sketch({n: (None if p is None else p.to(device)) for n, p in self.matrices.items()})

    def coordinate_shape(self, name: str, tensor: Tensor) -> torch.Size:
        """Shape of the coordinates of ``tensor``: [m, r] if sketched, else the tensor's own shape."""
        matrix = self.matrices[name]
        return tensor.shape if matrix is None else torch.Size((tensor.shape[0], matrix.shape[1]))

    def zeros_like(self, params: Mapping[str, Tensor], requires_grad: bool = False) -> dict[str, Tensor]:
        """Zero coordinates for every tensor in ``params`` (optionally leaf tensors requiring grad)."""
        return {
            name: torch.zeros(
                self.coordinate_shape(name, t), dtype=t.dtype, device=t.device, requires_grad=requires_grad
            )
            for name, t in params.items()
        }

    def reduce_one(self, name: str, full: Tensor) -> Tensor:
        """Pᵀ x for one tensor, as [m, r] coordinates (x viewed as [m, n])."""
        matrix = self.matrices[name]
        if matrix is None:
            return full
        return full.reshape(full.shape[0], -1) @ matrix.to(full.dtype)

    def expand_one(self, name: str, coords: Tensor, shape: torch.Size) -> Tensor:
        """P a for one tensor: [m, r] coordinates back to a full tensor of ``shape``."""
        matrix = self.matrices[name]
        if matrix is None:
            return coords
        return (coords @ matrix.to(coords.dtype).T).reshape(shape)

    def add_expanded_(self, name: str, target: Tensor, coords: Tensor, alpha: float = 1.0) -> None:
        """target ← target + alpha · P a for one tensor, in place and in target's dtype: ``addmm_`` on target
        viewed as [m, n], so no full-size P a is formed (a non-contiguous target takes P a formed first)."""
        matrix = self.matrices[name]
        if matrix is None:
            target.add_(coords, alpha=alpha)
        elif target.is_contiguous():
            flat = target.view(target.shape[0], -1)
            flat.addmm_(coords.to(target.dtype), matrix.T.to(target.dtype), alpha=alpha)
        else:
            target.add_(self.expand_one(name, coords, target.shape).to(target.dtype), alpha=alpha)

    def expanded_norm_sq_sum(
        self, coords: Mapping[str, Tensor], weights: Mapping[str, float] | None = None
    ) -> Tensor:
        """Σ_n w_n ‖P a_n‖²_F over the tensors of ``coords`` (w_n = 1 without ``weights``), each term computed as
        tr(a_n (PᵀP) a_nᵀ) with the r×r Gram matrix (P a_n is never formed; ‖a_n‖² for full space); a float32
        scalar on the first tensor's device, no host synchronisation.

        Tensors with the same weight whose matrices and coordinates share shapes go through one batched Gram product
        (``bmm``), full-space ones through one ``_foreach_norm``: a few kernels per distinct layer shape instead of
        five per tensor (for small models, a measurable share of a step's interpreter time)."""
        groups: dict[tuple, list[str]] = {}
        for name, a in coords.items():
            matrix, weight = self.matrices[name], 1.0 if weights is None else weights[name]
            key = (a.device, weight) if matrix is None else (a.device, weight, a.shape, matrix.shape)
            groups.setdefault(key, []).append(name)
        device = next(iter(coords.values())).device if coords else torch.device("cpu")
        total = torch.zeros((), device=device)
        for key, members in groups.items():
            if len(key) == 2:
                squares = torch.stack(torch._foreach_norm([coords[n] for n in members])).float().square()
            else:
                a = _stacked([coords[n] for n in members]).float()
                basis = _stacked([self.matrices[n] for n in members]).to(a.device)
                squares = (a @ (basis.mT @ basis)) * a
            total += key[1] * squares.sum().to(device)
        return total

    def reduce(self, full: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """Pᵀ x for every tensor."""
        return {name: self.reduce_one(name, x) for name, x in full.items()}

    def expand(self, coords: Mapping[str, Tensor], like: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """P a for every tensor, shaped like ``like``."""
        return {name: self.expand_one(name, a, like[name].shape) for name, a in coords.items()}

    def project(self, full: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """S_P x = P Pᵀ x for every tensor (identity for full-space tensors)."""
        return self.expand(self.reduce(full), full)

    def rank_ratio(self, name: str, tensor: Tensor) -> float:
        """r / n for a sketched tensor, 1 for a full-space one (used to scale the auxiliary step)."""
        matrix = self.matrices[name]
        return 1.0 if matrix is None else matrix.shape[1] / matrix.shape[0]

    def state_dict(self) -> dict[str, Tensor]:
        return {name: matrix for name, matrix in self.matrices.items() if matrix is not None}

    @classmethod
    def from_state_dict(cls, names: list[str], state: Mapping[str, Tensor]) -> Sketch:
        return cls({name: state.get(name) for name in names})
