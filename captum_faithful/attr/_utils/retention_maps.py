r"""FEI's retention maps: how free parameters become nested maps of exact coverage.

Two steps, each a pure function or a small class, unit-tested on its own:

1. **Where the parameters live** (one hook, :meth:`MapParameterisation.to_pixels`):
   a map is defined on C *cells* and spread over the H x W pixels by a linear operator
   with non-negative weights whose rows sum to one, so that it keeps the order of two
   maps and their range [0, 1]:

   - :class:`PixelMaps`: one cell per pixel (the operator is the identity);
   - :class:`GroupMaps`: one cell per group of a Captum ``feature_mask``;
   - :class:`SmoothMaps`: cells on a coarse grid with a stride, upsampled bilinearly
     (Extremal Perturbations' low-resolution masks).

   Cell c covers the share :math:`\omega_c` of the pixels (the column sums of the
   operator divided by HW), so the mean of a pixel map is
   :math:`\sum_c \omega_c \alpha_c`: coverage can be set exactly on the cells.

2. **Nested maps of exact coverage** (:func:`balance_potentials`,
   :func:`entry_distribution`): each cell holds a distribution over the level at which
   it enters the maps, :math:`p_c = \mathrm{softmax}(u_c + g)` over
   :math:`e = 1, \dots, K + 1` (the last entry is "never"), and
   :math:`\alpha_k(c) = \sum_{e \le k} p_{c,e}`. The maps are nested and in [0, 1] by
   construction, whatever the parameters :math:`u`. The potentials :math:`g` (one per
   level, shared by the cells of a map) are solved so that every level holds exactly
   its share of the pixels,

   .. math::
       \sum_c \omega_c\, p_{c,e} = q_e - q_{e-1} \quad (q_0 = 0,\ q_{K+1} = 1),

   hence :math:`\mathrm{mean}(\alpha_k) = q_k` exactly (the column marginals of an
   entropic transport plan). :math:`g` minimises the convex function
   :math:`F(g) = \sum_c \omega_c \,\mathrm{logsumexp}(u_c + g) - \sum_e m_e g_e`;
   Newton's method with a line search finds it in a few steps, in float64, warm
   started from the previous iteration's solution. The gradient with respect to
   :math:`u` is the implicit one, :math:`dg/du = -H^{-1} \partial S / \partial u`,
   written out as the backward of :func:`entry_distribution` (no Newton step is
   differentiated through).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

#: Largest coverage error the solver leaves (on the level increments, float64).
BALANCE_TOLERANCE = 1e-11
#: Halvings of a Newton step that does not decrease F, at most.
_HALVINGS = 30
#: Largest change of a potential in one Newton step.
_MAX_STEP = 4.0
#: FEI maps its free parameters u to logits ``LOGIT_BOUND * tanh(u / LOGIT_BOUND)``:
#: linear for the values Adam reaches in a few hundred steps, and bounded so that
#: the balance stays well within float64: from a cold start, Newton converged in at
#: most 47 steps for logits at +-30 (50 random draws each of 2, 3, 9, 64 and 1024
#: cells, K = 5), where logits of +-1000 did not converge in 500.
LOGIT_BOUND = 30.0


def level_masses(levels: Sequence[float]) -> Tensor:
    """The share of pixels entering at each level: ``q_e - q_{e-1}``, then ``1 - q_K``
    (float64, length K + 1)."""
    bounds = torch.tensor((0.0, *levels, 1.0), dtype=torch.float64)
    return torch.diff(bounds)


def _balance_state(
    logits: Tensor, weights: Tensor, masses: Tensor, g: Tensor
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """At the potentials g: entry distributions p (B, C, E), ``weights * p``, the
    residual :math:`S(g) - m` (B, E) and :math:`F(g)` (B,)."""
    z = logits + g.unsqueeze(1)
    spread = torch.logsumexp(z, dim=-1)
    p = torch.exp(z - spread.unsqueeze(-1))
    weighted = p * weights.unsqueeze(-1)
    value = (weights * spread).sum(-1) - (g * masses).sum(-1)
    return p, weighted, weighted.sum(1) - masses, value


def _hessian(p: Tensor, weighted: Tensor) -> Tensor:
    r"""Hessian of F on the first E - 1 potentials (the last stays 0):
    :math:`\sum_c \omega_c (\mathrm{diag}\, p_c - p_c p_c^T)`, plus a ridge of 1e-12."""
    head, weighted = p[..., :-1], weighted[..., :-1]
    hessian = torch.bmm(weighted.transpose(1, 2), head).neg_()
    hessian.diagonal(dim1=-2, dim2=-1).add_(weighted.sum(1)).add_(1e-12)
    return hessian


def _newton_direction(p: Tensor, weighted: Tensor, residual: Tensor) -> Tensor:
    """Newton's step on the first E - 1 potentials (the last stays 0), from the
    balance state."""
    step = torch.linalg.solve(_hessian(p, weighted), residual[..., :-1].unsqueeze(-1))
    return F.pad(step.squeeze(-1), (0, 1))


@torch.no_grad()
def balance_potentials(
    logits: Tensor,
    weights: Tensor,
    masses: Tensor,
    start: Tensor | None = None,
    tolerance: float = BALANCE_TOLERANCE,
    max_steps: int = 500,
) -> Tensor:
    r"""Potentials g (B, E) with :math:`\sum_c \omega_c \mathrm{softmax}(u_c + g) = m`.

    Newton's method on the convex :math:`F`; a step is at most ``_MAX_STEP`` in every
    potential and is halved, map by map, until it decreases :math:`F`.

    Args:
        logits (Tensor): :math:`u`, shape (B, C, E).
        weights (Tensor): :math:`\omega`, shape (B, C) or (1, C), rows summing to 1.
        masses (Tensor): :math:`m`, shape (E,), positive, summing to 1.
        start (Tensor, optional): warm start (B, E); ``None`` starts at
                    :math:`\log m`, the solution for constant logits.
        tolerance (float, optional): stop when every :math:`|S_e - m_e|` is below.
        max_steps (int, optional): Newton steps at most.

    Returns:
        Tensor: g in float64, last column 0.

    Raises:
        RuntimeError: if the balance is not reached within ``max_steps`` (logits
            whose differences exceed about a hundred are beyond float64; FEI bounds
            its logits to [-LOGIT_BOUND, LOGIT_BOUND]).
    """
    logits = logits.detach().double()
    weights = weights.double()
    masses = masses.to(device=logits.device, dtype=torch.float64)
    if start is None:
        g = (masses.log() - masses[-1].log()).expand(logits.shape[0], -1).clone()
    else:
        g = start.detach().double()
        g = g - g[:, -1:]
    p, weighted, residual, value = _balance_state(logits, weights, masses, g)
    for _ in range(max_steps):
        if float(residual.abs().max()) < tolerance:
            return g
        direction = _newton_direction(p, weighted, residual)
        largest = direction.abs().amax(-1)
        step = (_MAX_STEP / largest.clamp(min=_MAX_STEP)).to(g.dtype)
        for _ in range(_HALVINGS):
            candidate = g - step.unsqueeze(-1) * direction
            state = _balance_state(logits, weights, masses, candidate)
            worse = state[3] > value + 1e-13 * value.abs().clamp(min=1.0)
            if not bool(worse.any()):
                break
            step = torch.where(worse, step / 2, step)
        g, (p, weighted, residual, value) = candidate, state
    if float(residual.abs().max()) >= tolerance:
        raise RuntimeError(
            "FEI could not set the coverage of its maps exactly (largest error "
            f"{float(residual.abs().max()):.2g} after {max_steps} Newton steps)"
        )
    return g


def entry_distribution(logits: Tensor, weights: Tensor, potentials: Tensor) -> Tensor:
    r""":math:`p = \mathrm{softmax}(u + g)` at the balanced potentials, with the implicit
    gradient with respect to ``logits``.

    ``potentials`` must solve the balance for ``logits`` (from
    :func:`balance_potentials`, which holds the level masses). Computed in float64; shape (B, C, E). The backward is the implicit derivative, written
    out: with :math:`\bar p` the incoming gradient, :math:`g` depends on :math:`u`
    through :math:`S(g, u) = 0`, so :math:`dg/du = -H^{-1} \partial S / \partial u`
    (:math:`H` the Hessian of F, on the first E - 1 potentials). With
    :math:`\bar z_c = p_c \odot (\bar p_c - \langle \bar p_c, p_c \rangle)` (the
    softmax's backward) and :math:`\lambda = H^{-1} \sum_c \bar z_c` (last entry 0),

    .. math::
        \bar u_c = p_c \odot \big(a_c - \langle a_c, p_c \rangle\big), \qquad
        a_c = \bar p_c - \omega_c \lambda .

    This equals autograd through one Newton step taken at the solution (whose
    derivative is the implicit one), at a fraction of the cost.
    """
    return _BalancedEntries.apply(logits, weights, potentials.detach())


class _BalancedEntries(torch.autograd.Function):
    """softmax(u + g(u)) with g the balanced potentials (see
    :func:`entry_distribution`)."""

    @staticmethod
    def forward(
        ctx: Any, logits: Tensor, weights: Tensor, potentials: Tensor
    ) -> Tensor:
        weights = weights.to(device=logits.device, dtype=torch.float64)
        u = logits.detach().double()
        p = torch.softmax(u + potentials.double().unsqueeze(1), dim=-1)
        ctx.save_for_backward(p, weights)
        ctx.logits_dtype = logits.dtype
        return p

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, None, None]:
        p, weights = ctx.saved_tensors
        grad = grad.double()
        z_grad = p * (grad - (grad * p).sum(-1, keepdim=True))
        weighted = p * weights.unsqueeze(-1)
        multiplier = torch.linalg.solve(
            _hessian(p, weighted), z_grad.sum(1)[..., :-1].unsqueeze(-1)
        )
        multiplier = F.pad(multiplier.squeeze(-1), (0, 1))
        adjusted = grad - weights.unsqueeze(-1) * multiplier.unsqueeze(1)
        u_grad = p * (adjusted - (adjusted * p).sum(-1, keepdim=True))
        return u_grad.to(ctx.logits_dtype), None, None


def nested_cell_maps(entries: Tensor) -> Tensor:
    r"""Cell maps :math:`\alpha_k(c) = \sum_{e \le k} p_{c,e}`, shape (B, K, C), from the
    entry distribution (B, C, K + 1)."""
    return torch.cumsum(entries[..., :-1], dim=-1).clamp(max=1.0).transpose(-1, -2)


class MapParameterisation:
    """Cells of a map and the linear spread of cell values over the pixels.

    Subclasses set ``n_cells`` and ``weights`` (float64, (1 or N, n_cells), each row
    the share of the pixels every cell covers, summing to one) and implement
    :meth:`to_pixels`.
    """

    n_cells: int
    weights: Tensor

    def __init__(self, height: int, width: int) -> None:
        self.height, self.width = height, width

    def to_pixels(self, cell_maps: Tensor) -> Tensor:
        """(G, N, K, n_cells) cell values -> (G, N, K, H, W) pixel maps."""
        raise NotImplementedError


class PixelMaps(MapParameterisation):
    """One cell per pixel."""

    def __init__(self, height: int, width: int, device: torch.device) -> None:
        super().__init__(height, width)
        self.n_cells = height * width
        self.weights = torch.full(
            (1, self.n_cells), 1.0 / self.n_cells, dtype=torch.float64, device=device
        )

    def to_pixels(self, cell_maps: Tensor) -> Tensor:
        return cell_maps.unflatten(-1, (self.height, self.width))


class GroupMaps(MapParameterisation):
    """One cell per group of a feature mask: every pixel of a group takes its value.

    Args:
        ids (Tensor): group index in ``[0, n_groups)`` of every pixel, shape
                    (1 or N, H, W), int64.
        n_groups (int): number of groups.
    """

    def __init__(self, ids: Tensor, n_groups: int) -> None:
        super().__init__(ids.shape[-2], ids.shape[-1])
        self.ids = ids.flatten(1)
        self.n_cells = n_groups
        counts = torch.zeros(
            self.ids.shape[0], n_groups, dtype=torch.float64, device=ids.device
        )
        counts.scatter_add_(1, self.ids, torch.ones_like(self.ids, dtype=torch.float64))
        self.weights = counts / self.ids.shape[1]

    def to_pixels(self, cell_maps: Tensor) -> Tensor:
        if self.ids.shape[0] == 1:
            pixels = cell_maps.index_select(-1, self.ids[0])
        else:
            index = self.ids.view(1, -1, 1, self.ids.shape[1])
            index = index.expand(*cell_maps.shape[:-1], -1)
            pixels = cell_maps.gather(-1, index)
        return pixels.unflatten(-1, (self.height, self.width))


class SmoothMaps(MapParameterisation):
    r"""Cells on a grid of ``ceil(H / stride) x ceil(W / stride)``, upsampled bilinearly
    to the image (``align_corners=False``: a tent of half-width ``stride`` around each
    cell centre, replicated at the border).

    Bilinear upsampling is separable: with :math:`R` (H x h) and :math:`C` (W x w) the
    one-dimensional linear interpolation matrices, a grid map :math:`c` becomes
    :math:`R\,c\,C^T`. Two small matrix products (taken once, from
    ``F.interpolate`` of the identity, so the weights are PyTorch's) are much cheaper
    to run and to differentiate than ``upsample_bilinear2d`` on many small maps.
    Bilinear weights are non-negative and sum to one at every pixel, so the
    upsampled maps stay nested and in [0, 1]; a cell's weight is its share of the
    upsampled pixels, :math:`(\sum_i R_{i a})(\sum_j C_{j b}) / (HW)`.
    """

    def __init__(
        self, height: int, width: int, stride: int, device: torch.device
    ) -> None:
        super().__init__(height, width)
        self.grid = (-(-height // stride), -(-width // stride))
        self.n_cells = self.grid[0] * self.grid[1]
        self.rows = _linear_interpolation(self.grid[0], height, device)
        self.columns = _linear_interpolation(self.grid[1], width, device)
        share = torch.outer(self.rows.sum(0), self.columns.sum(0))
        self.weights = share.reshape(1, -1) / (height * width)

    def to_pixels(self, cell_maps: Tensor) -> Tensor:
        rows, columns = self.rows, self.columns
        if rows.dtype != cell_maps.dtype:
            rows, columns = rows.to(cell_maps.dtype), columns.to(cell_maps.dtype)
        leading = cell_maps.shape[:-1]
        # along the width as one matrix product over all grid rows, then the height
        across = cell_maps.reshape(-1, self.grid[1]) @ columns.T
        pixels = rows @ across.view(-1, self.grid[0], self.width)
        return pixels.view(*leading, self.height, self.width)


def _linear_interpolation(cells: int, size: int, device: torch.device) -> Tensor:
    """(size, cells) float64 weights of 1-D linear upsampling, ``align_corners=False``
    (column c is cell c's one-hot vector upsampled by ``F.interpolate``)."""
    identity = torch.eye(cells, dtype=torch.float64, device=device).unsqueeze(0)
    upsampled = F.interpolate(identity, size=size, mode="linear", align_corners=False)
    return upsampled[0].T.contiguous()
