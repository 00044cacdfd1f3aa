import os
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


@pytest.fixture(scope="session")
def demo_cache(tmp_path_factory):
    """One model cache folder for the whole test session (CAPTUM_FAITHFUL_CACHE).

    The demo's models are trained at most once per session, into this folder, and
    every test (and tutorial) that loads them afterwards reads the same cache.
    """
    folder = tmp_path_factory.mktemp("captum_faithful_cache")
    before = os.environ.get("CAPTUM_FAITHFUL_CACHE")
    os.environ["CAPTUM_FAITHFUL_CACHE"] = str(folder)
    yield folder
    if before is None:
        os.environ.pop("CAPTUM_FAITHFUL_CACHE", None)
    else:
        os.environ["CAPTUM_FAITHFUL_CACHE"] = before


@pytest.fixture(scope="session")
def quick_demo(demo_cache):
    """``load_demo(quick=True)``, trained once per session into ``demo_cache``."""
    from captum_faithful.demo import load_demo

    return load_demo(quick=True)
