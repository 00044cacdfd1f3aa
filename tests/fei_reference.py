"""Independent references for the FEI tests, written from the definitions and sharing
no code with the package: the balance of the maps by Sinkhorn's scaling, PyTorch's
bilinear upsampling as a matrix, and the hard insertion curve."""

from __future__ import annotations

import torch
from torch import Tensor

LOGIT_BOUND = 30.0


def sinkhorn_entries(
    logits: Tensor, weights: Tensor, masses: Tensor, iterations: int = 300
) -> Tensor:
    """Entry distributions p (B, C, E) with rows summing to one and
    ``sum_c weights_c p_ce = masses_e``, by Sinkhorn's alternating scaling in the log
    domain (differentiable by unrolling)."""
    log_w = weights.log().unsqueeze(-1)
    g = torch.zeros(logits.shape[0], 1, logits.shape[-1], dtype=logits.dtype)
    for _ in range(iterations):
        f = -torch.logsumexp(logits + g, dim=-1, keepdim=True)
        g = masses.log() - torch.logsumexp(logits + f + log_w, dim=1, keepdim=True)
    return torch.softmax(logits + g, dim=-1)


def masses_of(levels) -> Tensor:
    """q_1, q_2 - q_1, ..., 1 - q_K."""
    bounds = [0.0, *levels, 1.0]
    return torch.tensor(
        [b - a for a, b in zip(bounds, bounds[1:], strict=False)], dtype=torch.float64
    )


def linear_interpolation(size_in: int, size_out: int) -> Tensor:
    """PyTorch's bilinear (align_corners=False) along one axis, as a matrix, from its
    definition: source coordinate (i + 0.5) * in / out - 0.5, clamped at 0, linear
    between the two neighbouring cells (the last one repeated)."""
    matrix = torch.zeros(size_out, size_in, dtype=torch.float64)
    for i in range(size_out):
        source = max((i + 0.5) * size_in / size_out - 0.5, 0.0)
        low = int(source)
        high = min(low + 1, size_in - 1)
        frac = source - low
        matrix[i, low] += 1 - frac
        matrix[i, high] += frac
    return matrix


def hard_insertion_images(x, attributions, reference, n_steps):
    """Top-q pixels of M from x, the rest from R, for q = k / n_steps (ties by pixel
    index). Shape (N, n_steps + 1, C, H, W)."""
    n, _, h, w = x.shape
    score = attributions.expand_as(x).sum(1).reshape(n, -1).double()
    order = torch.sort(score, dim=1, descending=True, stable=True).indices
    curves = []
    for k in range(n_steps + 1):
        keep = torch.zeros(n, h * w, dtype=torch.bool)
        count = round(k * h * w / n_steps)
        keep.scatter_(1, order[:, :count], True)
        keep = keep.view(n, 1, h, w)
        curves.append(torch.where(keep, x, reference.expand_as(x)))
    return torch.stack(curves, dim=1)


def sorted_area(alpha: Tensor, q: float) -> Tensor:
    """mean((sort(vec alpha) - r)^2), r the ascending 0/1 vector with round(q HW)
    ones; within a run of equal values (neighbours closer than 1e-9) every element is compared with the mean of
    the run's targets, plus the spread of those targets (same value, symmetric
    gradient)."""
    values = alpha.flatten().sort().values
    plain = values.detach()
    size = values.numel()
    ones = round(q * size)
    r = [0.0] * (size - ones) + [1.0] * ones
    total = 0.0
    start = 0
    while start < size:
        end = start + 1
        while end < size and float(plain[end] - plain[end - 1]) <= 1e-9:
            end += 1
        mean = sum(r[start:end]) / (end - start)
        for i in range(start, end):
            total = total + (values[i] - mean) ** 2 + (r[i] - mean) ** 2
        start = end
    return total / size


class HandAdam:
    """Adam (PyTorch's defaults: betas 0.9 / 0.999, eps 1e-8), step by step."""

    def __init__(self, lr: float) -> None:
        self.lr, self.t, self.m, self.v = lr, 0, {}, {}

    def step(self, name: str, value: Tensor, grad: Tensor) -> Tensor:
        if name not in self.m:
            self.m[name] = torch.zeros_like(value)
            self.v[name] = torch.zeros_like(value)
        m = self.m[name] = 0.9 * self.m[name] + 0.1 * grad
        v = self.v[name] = 0.999 * self.v[name] + 0.001 * grad**2
        t = self.t
        return value - self.lr * (m / (1 - 0.9**t)) / (
            (v / (1 - 0.999**t)).sqrt() + 1e-8
        )
