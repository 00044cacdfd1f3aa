"""patching_distance and patching_rank_correlation against NumPy and scipy."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from captum_faithful import patching_distance as root_distance
from captum_faithful.metrics import patching_distance, patching_rank_correlation

stats = pytest.importorskip("scipy.stats")


def pair(seed=0, shape=(3, 4, 6), dtype=torch.float32):
    generator = torch.Generator().manual_seed(seed)
    a = torch.randn(shape, generator=generator, dtype=dtype)
    return a, a + 0.5 * torch.randn(shape, generator=generator, dtype=dtype)


def test_distance_is_the_l2_norm_per_example():
    a, r = pair()
    expected = np.linalg.norm((a.double() - r.double()).numpy().reshape(3, -1), axis=1)
    got = patching_distance(a, r)
    assert got.shape == (3,) and got.dtype == torch.float64
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-12)
    assert torch.equal(patching_distance(a, a), torch.zeros(3, dtype=torch.float64))
    assert root_distance is patching_distance


def test_rank_correlation_is_scipys_spearman_per_example():
    a, r = pair(seed=1)
    # ties: scipy gives tied values their average rank
    a[0, 0, :3] = 0.25
    r[1, 2, :] = r[1, 1, :]
    expected = [
        stats.spearmanr(x.ravel(), y.ravel()).statistic
        for x, y in zip(a.double().numpy(), r.double().numpy(), strict=True)
    ]
    got = patching_rank_correlation(a, r)
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(
        patching_rank_correlation(a, -a).numpy(), [-1.0] * 3, rtol=1e-12
    )
    # a monotone transform keeps the order: correlation 1
    np.testing.assert_allclose(
        patching_rank_correlation(a, a.double().exp()).numpy(), [1.0] * 3
    )


def test_rank_correlation_of_a_constant_example_is_nan():
    a, r = pair(shape=(2, 3, 4))
    a[1] = 0.0
    got = patching_rank_correlation(a, r)
    assert torch.isfinite(got[0]) and torch.isnan(got[1])


@pytest.mark.parametrize("metric", [patching_distance, patching_rank_correlation])
def test_bad_arguments_are_named(metric):
    a, r = pair()
    cases = [
        ((a.numpy(), r), TypeError, "`attributions` must be a tensor"),
        ((a, r.tolist()), TypeError, "`reference` must be a tensor"),
        ((a, r[:, :3]), ValueError, "same shape"),
        ((a[0, 0], r[0, 0]), ValueError, r"`attributions` must have shape \(N"),
        ((a[:0], r[:0]), ValueError, "N >= 1"),
        ((a[:, :0], r[:, :0]), ValueError, "at least one value"),
        ((a > 0, r), TypeError, "real numbers"),
    ]
    nan = r.clone()
    nan[1, 2, 3] = float("nan")
    cases.append(((a, nan), ValueError, "`reference` contains NaN or Inf"))
    inf = a.clone()
    inf[0, 0, 0] = float("inf")
    cases.append(((inf, r), ValueError, "`attributions` contains NaN or Inf"))
    for args, error, message in cases:
        with pytest.raises(error, match=message):
            metric(*args)
