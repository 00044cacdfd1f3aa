import os
from contextlib import contextmanager

import pytest
import torch
from helpers import small_cnn


def pytest_report_header(config):
    requested = os.environ.get("OMP_NUM_THREADS", "unset")
    return (
        f"torch {torch.__version__}: {torch.get_num_threads()} intra-op thread(s) "
        f"(OMP_NUM_THREADS={requested})"
    )


@pytest.fixture(autouse=True)
def _trained_tests_run_at_the_requested_thread_count(request):
    """A ``trained`` test asserts an effect whose size depends on the thread count the
    model was trained with; CI runs these tests with OMP_NUM_THREADS=1 and =2. Make
    sure torch really uses that many threads (nothing in the session changed it)."""
    requested = os.environ.get("OMP_NUM_THREADS")
    if requested and request.node.get_closest_marker("trained") is not None:
        assert torch.get_num_threads() == int(requested), (
            f"torch runs {torch.get_num_threads()} threads, OMP_NUM_THREADS={requested}"
        )


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
    """``load_demo(quick=True)``, trained once per session into ``demo_cache``.

    The demo trains on the process's thread count, at most four; here it trains on
    the test process's own (``OMP_NUM_THREADS``) uncapped, and the fixture checks it
    did, so that the ``trained`` runs with 1 and 2 threads really train two
    different models.
    """
    from captum_faithful.demo import load_demo, models

    threads = []

    @contextmanager
    def process_threads():
        threads.append(torch.get_num_threads())
        yield

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(models, "_training_threads", process_threads)
        demo = load_demo(quick=True)
    requested = os.environ.get("OMP_NUM_THREADS")
    assert threads, "the quick demo was not trained in this session"
    if requested:
        assert threads == [int(requested)], (threads, requested)
    return demo
