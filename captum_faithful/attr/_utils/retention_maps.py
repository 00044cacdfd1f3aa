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
   :math:`u` is the implicit one: one differentiable Newton step taken at the solution
   has exactly the derivative :math:`dg/du = -H^{-1} \partial S / \partial u`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

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


def _newton_direction(
    p: Tensor, weighted: Tensor, residual: Tensor, value: Tensor | None = None
) -> Tensor:
    r"""Newton's step on the first E - 1 potentials (the last stays 0), from the
    balance state: the Hessian of F is
    :math:`\sum_c \omega_c (\mathrm{diag}\, p_c - p_c p_c^T)`."""
    head = p[..., :-1]
    hessian = torch.diag_embed(weighted[..., :-1].sum(1)) - torch.einsum(
        "bce,bcf->bef", weighted[..., :-1], head
    )
    ridge = 1e-12 * torch.eye(hessian.shape[-1], dtype=p.dtype, device=p.device)
    step = torch.linalg.solve(hessian + ridge, residual[..., :-1].unsqueeze(-1))
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


def entry_distribution(
    logits: Tensor, weights: Tensor, masses: Tensor, potentials: Tensor
) -> Tensor:
    r""":math:`p = \mathrm{softmax}(u + g)` at the balanced potentials, with the implicit
    gradient with respect to ``logits``.

    ``potentials`` must solve the balance for ``logits`` (from
    :func:`balance_potentials`). One Newton step is taken with autograd: its value is
    the solution (the residual is zero there) and its derivative is the implicit
    derivative of the solution. Computed in float64; shape (B, C, E).
    """
    u = logits.double()
    weights = weights.double()
    masses = masses.to(device=u.device, dtype=torch.float64)
    step = _newton_direction(*_balance_state(u, weights, masses, potentials.detach()))
    g = potentials.detach() - step
    return torch.softmax(u + g.unsqueeze(1), dim=-1)


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
    """Cells on a grid of ``ceil(H / stride) x ceil(W / stride)``, upsampled bilinearly
    to the image (``align_corners=False``: a tent of half-width ``stride`` around each
    cell centre, replicated at the border).

    Bilinear weights are non-negative and sum to one at every pixel, so the upsampled
    maps stay nested and in [0, 1]; a cell's weight is its share of the upsampled
    pixels, computed once by differentiating the upsampling of a constant grid.
    """

    def __init__(
        self, height: int, width: int, stride: int, device: torch.device
    ) -> None:
        super().__init__(height, width)
        self.grid = (-(-height // stride), -(-width // stride))
        self.n_cells = self.grid[0] * self.grid[1]
        ones = torch.ones(
            1, 1, *self.grid, dtype=torch.float64, device=device, requires_grad=True
        )
        with torch.enable_grad():
            (share,) = torch.autograd.grad(self._upsample(ones).sum(), ones)
        self.weights = share.reshape(1, -1) / (height * width)

    def _upsample(self, grid_maps: Tensor) -> Tensor:
        return F.interpolate(
            grid_maps,
            size=(self.height, self.width),
            mode="bilinear",
            align_corners=False,
        )

    def to_pixels(self, cell_maps: Tensor) -> Tensor:
        leading = cell_maps.shape[:-1]
        grid_maps = cell_maps.reshape(-1, 1, *self.grid)
        return self._upsample(grid_maps).reshape(*leading, self.height, self.width)
