"""A model built by hand with a known alternative pathway, for FEI's internal-faithfulness
tests: its weights are set, not trained, so the effect it shows does not depend on the
CPU or the thread count (only float rounding does)."""

from __future__ import annotations

import torch
from torch import nn


class AlternativePathway(nn.Module):
    """Two pathways into the logit of class 1 (class 0's logit is fixed at 0).

    - ``evidence`` (the model's own reasoning): a 1x1 convolution that reads the green
      channel, ReLU, summed over the image with a smooth spatial weight ``prior``.
    - ``edges`` (the alternative pathway): 2x2 differences of neighbouring red
      pixels in both directions and both signs, ReLU, averaged. Each kernel has exactly
      two non-zero weights on one channel, so a constant image gives exactly 0 (in
      any summation order): on blank images and on images with a constant red channel
      this pathway is silent, but mixing an image with a reference of another colour
      along a ragged mask wakes it up.

    An unconstrained optimiser of the insertion game raises class 1 through both
    pathways; ClipGrad ``vm`` sees the edge responses move away from their clean value
    (0) and blocks that gradient, so it can only use the evidence pathway.
    """

    def __init__(
        self,
        size: int = 12,
        evidence_weight: float = 0.005,
        edge_weight: float = 40.0,
        bias: float = 0.0,
    ) -> None:
        super().__init__()
        self.evidence = nn.Conv2d(3, 1, 1, bias=False)
        self.edges = nn.Conv2d(3, 4, 2, bias=False)
        self.relu = nn.ReLU()
        with torch.no_grad():
            self.evidence.weight.zero_()
            self.evidence.weight[0, 1] = 1.0
            weight = torch.zeros(4, 3, 2, 2)
            for kernel, (sign, other) in enumerate(
                [(1.0, (0, 1)), (-1.0, (0, 1)), (1.0, (1, 0)), (-1.0, (1, 0))]
            ):
                weight[kernel, 0, 0, 0] = sign
                weight[kernel, 0, other[0], other[1]] = -sign
            self.edges.weight.copy_(weight)
        rows, columns = torch.meshgrid(
            torch.arange(size), torch.arange(size), indexing="ij"
        )
        bump = torch.exp(
            -((rows - size / 3) ** 2 + (columns - size / 2) ** 2)
            / (2 * (size / 4) ** 2)
        )
        self.register_buffer("prior", 0.5 + bump)
        self.evidence_weight = evidence_weight
        self.edge_weight = edge_weight
        self.bias = bias
        self.eval()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        evidence = (self.relu(self.evidence(x))[:, 0] * self.prior).sum((1, 2))
        edges = self.relu(self.edges(x)).mean((1, 2, 3))
        logit = self.evidence_weight * evidence + self.edge_weight * edges + self.bias
        return torch.stack([torch.zeros_like(logit), logit], dim=1)


def blob_images(n: int, size: int = 12, seed: int = 0) -> torch.Tensor:
    """Images whose evidence is a green blob: constant red and blue channels (the edge
    pathway is silent on them), green = 0.3 x a random level + 0.7 x a Gaussian blob
    at a random place."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 3, 1, 1, generator=generator).expand(n, 3, size, size).clone()
    rows, columns = torch.meshgrid(
        torch.arange(size), torch.arange(size), indexing="ij"
    )
    for i in range(n):
        centre_row, centre_column = torch.randint(
            2, size - 2, (2,), generator=generator
        ).tolist()
        blob = torch.exp(
            -((rows - centre_row) ** 2 + (columns - centre_column) ** 2) / 4
        )
        x[i, 1] = 0.3 * x[i, 1] + 0.7 * blob
    return x


def blank_images(n: int, size: int = 12, seed: int = 0) -> torch.Tensor:
    """Constant images of random colours."""
    generator = torch.Generator().manual_seed(seed)
    colours = torch.rand(n, 3, 1, 1, generator=generator)
    return colours.expand(n, 3, size, size).contiguous()
