import pytest
import torch
import torch.nn.functional as F
from fei_reference import linear_interpolation, sinkhorn_entries

from captum_faithful.attr._utils.retention_maps import (
    LOGIT_BOUND,
    GroupMaps,
    PixelMaps,
    SmoothMaps,
    balance_potentials,
    entry_distribution,
    level_masses,
    nested_cell_maps,
)

LEVELS = (0.2, 0.5, 0.9)


@pytest.mark.parametrize("scale", [0.0, 1.0, 8.0, 1e6])
def test_balance_gives_exact_coverage_and_matchessinkhorn_entries(scale):
    """Exact coverage for any logits FEI can produce: they are bounded by
    LOGIT_BOUND (scale 1e6 saturates every logit at +-LOGIT_BOUND)."""
    generator = torch.Generator().manual_seed(0)
    logits = scale * torch.randn(4, 9, 4, generator=generator, dtype=torch.float64)
    logits = LOGIT_BOUND * torch.tanh(logits / LOGIT_BOUND)
    weights = torch.rand(4, 9, generator=generator, dtype=torch.float64) + 0.1
    weights = weights / weights.sum(1, keepdim=True)
    masses = level_masses(LEVELS)
    assert torch.allclose(
        masses, torch.tensor([0.2, 0.3, 0.4, 0.1], dtype=torch.float64)
    )
    p = entry_distribution(logits, weights, balance_potentials(logits, weights, masses))
    maps = nested_cell_maps(p)  # (4, K, 9)
    coverage = (maps * weights.unsqueeze(1)).sum(-1)
    assert torch.allclose(
        coverage, torch.tensor(LEVELS, dtype=torch.float64), atol=1e-9
    )
    assert bool((maps[:, 1:] >= maps[:, :-1]).all())
    assert bool((maps >= 0).all() and (maps <= 1).all())
    if scale <= 8.0:  # Sinkhorn needs very many iterations for peaked logits
        assert torch.allclose(p, sinkhorn_entries(logits, weights, masses), atol=1e-7)


def test_constant_logits_give_uniform_maps_at_their_levels():
    masses = level_masses(LEVELS)
    logits = torch.zeros(2, 5, 4, dtype=torch.float64)
    weights = torch.full((1, 5), 0.2, dtype=torch.float64)
    g = balance_potentials(logits, weights, masses)
    maps = nested_cell_maps(entry_distribution(logits, weights, g))
    expected = torch.tensor(LEVELS, dtype=torch.float64).view(1, 3, 1).expand(2, 3, 5)
    assert torch.allclose(maps, expected, atol=1e-12)


def test_gradient_is_the_derivative_of_the_balanced_solution():
    """The one differentiable Newton step at the solution against autograd through
    a converged Sinkhorn (an independent solver) and against finite differences."""
    generator = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 6, 4, generator=generator, dtype=torch.float64)
    weights = torch.rand(2, 6, generator=generator, dtype=torch.float64) + 0.2
    weights = weights / weights.sum(1, keepdim=True)
    masses = level_masses(LEVELS)
    probe = torch.randn(2, 6, 4, generator=generator, dtype=torch.float64)

    def ours(u):
        g = balance_potentials(u, weights, masses, tolerance=1e-14)
        return entry_distribution(u, weights, g)

    u = logits.clone().requires_grad_()
    (ours(u) * probe).sum().backward()
    v = logits.clone().requires_grad_()
    (sinkhorn_entries(v, weights, masses, iterations=400) * probe).sum().backward()
    assert torch.allclose(u.grad, v.grad, atol=1e-7)
    assert torch.autograd.gradcheck(ours, (logits.clone().requires_grad_(),))


def test_balance_raises_rather_than_return_an_inexact_coverage():
    logits = 30 * torch.sign(torch.randn(2, 9, 4, dtype=torch.float64))
    weights = torch.full((1, 9), 1 / 9, dtype=torch.float64)
    with pytest.raises(RuntimeError, match="coverage of its maps exactly"):
        balance_potentials(logits, weights, level_masses(LEVELS), max_steps=1)


def test_warm_start_reaches_the_same_solution():
    generator = torch.Generator().manual_seed(2)
    logits = 3 * torch.randn(3, 7, 4, generator=generator, dtype=torch.float64)
    weights = torch.full((1, 7), 1 / 7, dtype=torch.float64)
    masses = level_masses(LEVELS)
    cold = balance_potentials(logits, weights, masses)
    warm = balance_potentials(logits, weights, masses, start=cold + 0.3)
    assert torch.allclose(cold, warm, atol=1e-8)
    assert torch.equal(cold[:, -1], torch.zeros(3, dtype=torch.float64))


def test_smooth_maps_are_bilinear_upsampling_with_pixel_share_weights():
    height, width, stride = 10, 7, 4  # grid 3 x 2, not a multiple of the stride
    smooth = SmoothMaps(height, width, stride, torch.device("cpu"))
    assert smooth.grid == (3, 2) and smooth.n_cells == 6
    rows = linear_interpolation(3, height)
    columns = linear_interpolation(2, width)
    cells = torch.rand(2, 1, 3, 6, dtype=torch.float64)
    expected = rows @ cells.view(2, 1, 3, 3, 2) @ columns.T
    assert torch.allclose(smooth.to_pixels(cells), expected, atol=1e-12)
    share = torch.outer(rows.sum(0), columns.sum(0)).reshape(1, -1) / (height * width)
    assert torch.allclose(smooth.weights, share, atol=1e-12)
    assert smooth.weights.sum().item() == pytest.approx(1.0)
    # coverage on the cells is the mean of the upsampled map
    assert torch.allclose(
        (cells * smooth.weights).sum(-1), smooth.to_pixels(cells).mean((-2, -1))
    )


@pytest.mark.parametrize(
    "height, width, stride", [(32, 32, 4), (10, 7, 4), (9, 13, 3), (5, 6, 1), (7, 7, 8)]
)
def test_smooth_maps_match_pytorch_bilinear_upsampling_with_gradients(
    height, width, stride
):
    """The separable matrix products give ``F.interpolate``'s values and gradients
    (also for stride 1, a stride larger than the image, and odd sizes)."""
    smooth = SmoothMaps(height, width, stride, torch.device("cpu"))
    generator = torch.Generator().manual_seed(height * width + stride)
    cells = torch.rand(
        2, 3, 4, smooth.n_cells, generator=generator, dtype=torch.float64
    )
    upstream = torch.randn(
        2, 3, 4, height, width, generator=generator, dtype=torch.float64
    )
    ours_in = cells.clone().requires_grad_()
    ours = smooth.to_pixels(ours_in)
    (ours * upstream).sum().backward()
    theirs_in = cells.clone().requires_grad_()
    theirs = F.interpolate(
        theirs_in.view(-1, 1, *smooth.grid),
        size=(height, width),
        mode="bilinear",
        align_corners=False,
    ).view(2, 3, 4, height, width)
    (theirs * upstream).sum().backward()
    assert ours.shape == (2, 3, 4, height, width)
    assert torch.allclose(ours, theirs, atol=1e-13, rtol=0)
    assert torch.allclose(ours_in.grad, theirs_in.grad, atol=1e-12, rtol=0)


def test_group_and_pixel_maps_spread_cell_values():
    ids = torch.tensor([[[0, 0, 1], [2, 2, 2]]])  # one mask for every sample
    groups = GroupMaps(ids, 3)
    assert torch.allclose(
        groups.weights, torch.tensor([[2 / 6, 1 / 6, 3 / 6]], dtype=torch.float64)
    )
    cells = torch.tensor([0.1, 0.7, 0.3], dtype=torch.float64).view(1, 1, 1, 3)
    expected = torch.tensor([[0.1, 0.1, 0.7], [0.3, 0.3, 0.3]], dtype=torch.float64)
    assert torch.equal(groups.to_pixels(cells)[0, 0, 0], expected)
    per_sample = GroupMaps(torch.tensor([[[0, 1, 1]], [[1, 1, 0]]]), 2)
    assert torch.allclose(
        per_sample.weights,
        torch.tensor([[1 / 3, 2 / 3], [1 / 3, 2 / 3]], dtype=torch.float64),
    )
    cells = torch.tensor([[0.0, 1.0], [0.5, 0.25]], dtype=torch.float64).view(
        1, 2, 1, 2
    )
    assert per_sample.to_pixels(cells)[0, :, 0, 0].tolist() == [
        [0.0, 1.0, 1.0],
        [0.25, 0.25, 0.5],
    ]
    pixels = PixelMaps(2, 3, torch.device("cpu"))
    values = torch.arange(6, dtype=torch.float64).view(1, 1, 1, 6)
    assert torch.equal(pixels.to_pixels(values)[0, 0, 0], values.view(2, 3))
    assert torch.allclose(
        pixels.weights, torch.full((1, 6), 1 / 6, dtype=torch.float64)
    )
