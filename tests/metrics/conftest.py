"""Fixtures shared by the metric tests."""

import pytest
import torch


@pytest.fixture
def images():
    """Three random 3 x 12 x 12 images (seed 1)."""
    torch.manual_seed(1)
    return torch.rand(3, 3, 12, 12)
