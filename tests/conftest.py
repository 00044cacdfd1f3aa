import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))

from helpers import small_cnn  # noqa: E402


@pytest.fixture
def cnn():
    return small_cnn()


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
