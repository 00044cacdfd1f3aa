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

Around them, what FEI keeps of its maps: the coverage levels :math:`q_k`
(:func:`quantile_levels`), the sorted-area term that pushes maps towards binary
masks (:func:`area_loss`, built once per image size as :class:`AreaLoss`), and the
state of one input's maps during the optimisation (:class:`InputMaps`: the
parameters, the cell weights and the potentials of the last balance).
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

from captum_faithful._utils import check_float, check_int

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


def quantile_levels(quantiles: int | Sequence[float]) -> tuple[float, ...]:
    """The coverage levels q_k: ``k / (K + 1)`` for an int K, else the sequence."""
    if isinstance(quantiles, numbers.Integral) and not isinstance(quantiles, bool):
        count = check_int("quantiles", quantiles, minimum=1)
        return tuple(k / (count + 1) for k in range(1, count + 1))
    if isinstance(quantiles, Tensor):
        quantiles = quantiles.tolist()
    if not isinstance(quantiles, Sequence) or isinstance(quantiles, str):
        raise TypeError(
            "`quantiles` must be an int (the number of levels) or an increasing "
            f"sequence of numbers in (0, 1), got {quantiles!r}"
        )
    levels = tuple(
        check_float("quantiles", q, 0.0, 1.0, low_inclusive=False, high_inclusive=False)
        for q in quantiles
    )
    if not levels:
        raise ValueError("`quantiles` must not be empty")
    if any(b <= a for a, b in zip(levels, levels[1:], strict=False)):
        raise ValueError(f"`quantiles` must be strictly increasing, got {levels}")
    return levels


#: Map values closer than this to the coverage boundary are one run of ties in
#: :func:`area_loss`.
TIE_TOLERANCE = 1e-9


def area_loss(maps: Tensor, levels: Sequence[float]) -> Tensor:
    r"""Sorted-area term per map, shape ``maps.shape[:-2]`` (maps: (..., K, H, W)).

    .. math::
        L_{area}(\alpha_k, q_k) = \mathrm{mean}\big((\mathrm{sort}(\mathrm{vec}\,
        \alpha_k) - r_k)^2\big)

    with :math:`r_k` the ascending 0/1 vector holding :math:`n_k =` ``round(q_k H W)``
    ones. FEI's maps have their coverage by construction, so here it pushes them
    towards a binary mask.

    Equal values (all of them in a uniform start map, many in a smooth map) make the
    sort's order among them arbitrary. The value does not depend on that order, but
    the gradient would: it would push the tied pixels that the sort happens to put
    last towards 1 (a raster-order pattern). The gradient used is the symmetric one:
    each pixel is pulled towards the mean target of its run of tied values. Only
    the run at the boundary between the :math:`n_k` largest values and the rest can
    mix targets, so no sort is needed: with :math:`z` the largest value outside the
    :math:`n_k` largest (one ``kthvalue`` call for all maps) and :math:`t` the
    smallest inside (:math:`z` itself when the tie at :math:`z` reaches into the
    :math:`n_k` largest, else the smallest value above it), a pixel above the
    boundary is pulled to 1 and one below it to 0; when :math:`t - z` is at most
    :data:`TIE_TOLERANCE` (so that rounding does not decide), the m values within the tolerance of :math:`[z, t]` form the boundary
    run, holding j of the ones, and are pulled to :math:`j / m`. The term is then
    :math:`\mathrm{mean}((\alpha_k - \tilde r_k)^2) + j (m - j) / (m H W)`, the
    second part being the sorted targets' spread about their run means, so that the
    value equals the sorted formula.
    """
    return AreaLoss(levels, maps.shape[-2] * maps.shape[-1], maps.device)(maps)


class AreaLoss:
    """:func:`area_loss` for maps of ``size`` pixels at ``levels``, with everything
    that depends only on them (ones per level, ranks, the padding of the joint
    ``kthvalue``) built once: FEI evaluates it at every iteration."""

    def __init__(
        self, levels: Sequence[float], size: int, device: torch.device
    ) -> None:
        self.size = size
        ones = [round(q * size) for q in levels]
        self.ones = torch.tensor(ones, dtype=torch.float64, device=device).view(-1, 1)
        # ascending 1-based rank of z, the largest value outside the ones, per level
        # (kept within 1..size - 1; the levels of no or of all ones are set at the end)
        rank = [min(max(size - n, 1), size - 1) for n in ones]
        self.rank = torch.tensor(rank, device=device).view(-1, 1)
        # One kthvalue for every level: level k's row gets max(rank) - rank_k copies
        # of -inf in front (+inf fill the rest), so its rank_k-th value is the padded
        # row's max(rank)-th.
        self.top = max(rank)
        width = self.top - min(rank)
        self.prefix = torch.tensor(
            [
                [-torch.inf] * (self.top - r) + [torch.inf] * (r - min(rank))
                for r in rank
            ],
            dtype=torch.float64,
            device=device,
        ).view(len(rank), width)
        none = [n == 0 for n in ones]
        every = [n == size for n in ones]
        self.fixed = None
        if any(none) or any(every):
            self.none = torch.tensor(none, device=device).view(-1, 1)
            self.every = torch.tensor(every, device=device).view(-1, 1)
            self.fixed = (self.none | self.every).squeeze(-1)

    def __call__(self, maps: Tensor) -> Tensor:
        """Area term per map, shape ``maps.shape[:-2]`` (maps: (..., K, H, W))."""
        flat = maps.flatten(-2)
        with torch.no_grad():
            tied, spread = self.targets(flat.detach())
        return ((flat - tied) ** 2).mean(dim=-1) + spread

    def targets(self, values: Tensor) -> tuple[Tensor, Tensor]:
        """The run-averaged targets (shape of ``values``: (..., K, S)) and the spread
        term (..., K), for all levels at once."""
        dtype, size = values.dtype, self.size
        padded = values
        if self.prefix.shape[-1] > 0:
            prefix = self.prefix.to(dtype).expand(*values.shape[:-1], -1)
            padded = torch.cat([prefix, values], dim=-1)
        low = padded.kthvalue(self.top, dim=-1, keepdim=True).values
        # the next value up: low itself when its tie reaches past rank_k, else the
        # smallest value above it (one kthvalue less)
        at_most_low = values <= low
        next_up = values.masked_fill(at_most_low, torch.inf).amin(-1, keepdim=True)
        high = torch.where(at_most_low.sum(-1, keepdim=True) > self.rank, low, next_up)
        split = high - low <= TIE_TOLERANCE
        if not bool(split.any()):
            # no map has a tie run at its boundary: the plain 0/1 targets
            tied = (values >= high).to(dtype)
            spread = values.new_zeros(values.shape[:-1])
        else:
            above = values > high + TIE_TOLERANCE
            run = split & (values >= low - TIE_TOLERANCE) & ~above
            members = run.sum(-1, keepdim=True).to(dtype).clamp(min=1)
            # the ones inside the run
            inside = self.ones.to(dtype) - above.sum(-1, keepdim=True)
            tied = torch.where(run, inside / members, (values >= high).to(dtype))
            spread = torch.where(
                split, inside * (members - inside) / (members * size), 0.0
            ).squeeze(-1)
        if self.fixed is not None:
            tied = torch.where(self.none, 0.0, torch.where(self.every, 1.0, tied))
            spread = torch.where(self.fixed, 0.0, spread)
        return tied, spread


@dataclass
class InputMaps:
    """The maps of one input tensor: where they live, their parameters, and the
    potentials of the last balance (the warm start of the next one)."""

    parameterisation: MapParameterisation
    logits: Tensor
    weights: Tensor
    area: AreaLoss
    potentials: Tensor | None = None

    def pixel_maps(
        self, masses: Tensor, logits: Tensor | None = None, differentiable: bool = True
    ) -> Tensor:
        """(G, N, K, H, W) nested maps of exact coverage, in float64, from ``logits``
        (default: the parameters)."""
        logits = self.logits if logits is None else logits
        games, n, cells, entries = logits.shape
        flat = LOGIT_BOUND * torch.tanh(logits.flatten(0, 1) / LOGIT_BOUND)
        self.potentials = balance_potentials(
            flat,
            self.weights,
            masses,
            start=self.potentials,
            # coverage within 1e-7 while optimising (the implicit gradient's error
            # is of the same order); the returned maps are balanced to 1e-11
            tolerance=1e-7 if differentiable else BALANCE_TOLERANCE,
        )
        if differentiable:
            p = entry_distribution(flat, self.weights, self.potentials)
        else:
            p = torch.softmax(flat.double() + self.potentials.unsqueeze(1), dim=-1)
        cell_maps = nested_cell_maps(p).view(games, n, entries - 1, cells)
        return self.parameterisation.to_pixels(cell_maps)
