"""The neutral references of the curve metrics (issue #24 §1): ``baselines="mean"``
(the image's mean colour) and ``baselines="random_color"`` (one random colour per
image, FEI's kind of reference), for insertion_auc, deletion_auc and
faithfulness_correlation; and the defaults, unchanged."""

import functools

import pytest
import torch
from torch import nn

from captum_faithful._baselines import monochrome_reference
from captum_faithful.metrics import (
    deletion_auc,
    faithfulness_correlation,
    insertion_auc,
)

METRICS = {
    "insertion": functools.partial(insertion_auc, n_steps=6),
    "deletion": functools.partial(deletion_auc, n_steps=6),
    "faithfulness_correlation": functools.partial(
        faithfulness_correlation, n_samples=8
    ),
}


def fixed_model():
    """A tiny CNN whose weights are a formula (no random initialisation)."""
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1),
        nn.Tanh(),
        nn.AdaptiveAvgPool2d(2),
        nn.Flatten(),
        nn.Linear(16, 3),
    )
    with torch.no_grad():
        for i, p in enumerate(model.parameters()):
            steps = torch.arange(p.numel(), dtype=torch.float64)
            p.copy_(torch.sin(steps * (0.7 + i)).view(p.shape))
    return model.eval()


def fixed_images():
    steps = torch.arange(2 * 3 * 8 * 8, dtype=torch.float64)
    return ((torch.sin(steps * 0.37) + 1) / 2).view(2, 3, 8, 8).float()


def fixed_attributions(x):
    steps = torch.arange(x.numel(), dtype=torch.float64)
    return torch.cos(steps * 0.53).view(x.shape).float()


class Recorder:
    """A forward function that records every batch it is given (and draws no
    random numbers: the global generator is left to the metric)."""

    def __init__(self):
        self.seen = []

    def __call__(self, x):
        self.seen.append(x.detach().clone())
        return x.float().flatten(1)[:, :3]


def filled_reference(x, baselines, generator=None):
    """The reference insertion actually fills in: with ``n_steps=1`` the only
    perturbed copy of each image shows no feature of it, only the baseline."""
    recorder = Recorder()
    insertion_auc(
        recorder,
        x,
        torch.ones_like(x, dtype=torch.float32),
        baselines=baselines,
        n_steps=1,
        generator=generator,
    )
    clean, copies = recorder.seen
    assert torch.equal(clean, x)
    return copies


def seeded(seed=0):
    return torch.Generator().manual_seed(seed)


def distinct_images(n=4):
    torch.manual_seed(5)
    # channels with different ranges, so that "inside the range" is per channel
    return torch.rand(n, 3, 8, 8) * torch.tensor([1.0, 0.5, 2.0]).view(1, 3, 1, 1)


def test_mean_is_the_per_channel_mean_colour_computed_by_hand():
    # image 0: channel c holds 4c .. 4c + 3 on its 2x2 pixels; image 1: 10x that
    x = torch.arange(12, dtype=torch.float32).view(1, 3, 2, 2)
    x = torch.cat([x, 10 * x])
    by_hand = torch.tensor([[1.5, 5.5, 9.5], [15.0, 55.0, 95.0]]).view(2, 3, 1, 1)
    copies = filled_reference(x, "mean")
    assert torch.equal(copies, by_hand.expand(2, 3, 2, 2))


@pytest.mark.parametrize("metric", list(METRICS))
def test_mean_equals_the_explicit_mean_colour_tensor(metric):
    model, x = fixed_model(), fixed_images()
    attr = fixed_attributions(x)
    colour = torch.stack(
        [torch.tensor([float(x[n, c].sum()) / 64 for c in range(3)]) for n in range(2)]
    ).view(2, 3, 1, 1)
    fn = METRICS[metric]
    by_name = fn(model, x, attr, baselines="mean", generator=seeded())
    by_tensor = fn(model, x, attr, baselines=colour, generator=seeded())
    torch.testing.assert_close(by_name, by_tensor, rtol=0, atol=1e-6)


def test_random_color_is_one_colour_per_image_inside_its_range():
    x = distinct_images()
    copies = filled_reference(x, "random_color", seeded())
    colours = copies[:, :, :1, :1]
    assert torch.equal(copies, colours.expand_as(copies))  # constant across pixels
    low = x.amin(dim=(2, 3), keepdim=True)
    high = x.amax(dim=(2, 3), keepdim=True)
    assert bool((colours >= low).all()) and bool((colours <= high).all())
    # different images, different colours (in every channel)
    flat = colours.flatten(1)
    for i in range(4):
        for j in range(i + 1, 4):
            assert bool((flat[i] != flat[j]).all())
    # the three channels of one image are drawn separately, not one grey level
    spread = (colours - low) / (high - low)
    assert bool((spread[:, 0] != spread[:, 1]).all())


def test_random_color_is_reproducible_and_independent_of_the_batch():
    x = distinct_images()
    first = filled_reference(x, "random_color", seeded(3))
    again = filled_reference(x, "random_color", seeded(3))
    assert torch.equal(first, again)
    other = filled_reference(x, "random_color", seeded(4))
    assert not bool((other == first).any())
    # each image alone, and the batch reversed: the same colours
    for n in range(4):
        alone = filled_reference(x[n : n + 1], "random_color", seeded(3))
        assert torch.equal(alone[0], first[n])
    reversed_batch = filled_reference(x.flip(0), "random_color", seeded(3))
    assert torch.equal(reversed_batch.flip(0), first)


def test_random_color_follows_the_global_generator_without_a_generator():
    x = distinct_images(2)
    torch.manual_seed(11)
    first = filled_reference(x, "random_color")
    torch.manual_seed(11)
    assert torch.equal(filled_reference(x, "random_color"), first)
    torch.manual_seed(11)
    assert torch.equal(first, monochrome_reference(x).expand_as(x))


def test_random_color_of_integer_images_is_a_whole_colour_inside_the_range():
    torch.manual_seed(6)
    x = torch.randint(20, 200, (3, 3, 8, 8), dtype=torch.uint8)
    copies = filled_reference(x, "random_color", seeded())
    assert copies.dtype == torch.uint8
    colours = copies[:, :, :1, :1]
    assert torch.equal(copies, colours.expand_as(copies))
    exact = monochrome_reference(x.double(), seeded())
    assert torch.equal(colours, exact.round().to(torch.uint8))
    assert bool((colours >= x.amin(dim=(2, 3), keepdim=True)).all())
    assert bool((colours <= x.amax(dim=(2, 3), keepdim=True)).all())


@pytest.mark.parametrize("metric", ["insertion", "deletion"])
def test_random_color_equals_the_explicit_tensor(metric):
    model, x = fixed_model(), fixed_images()
    attr = fixed_attributions(x)
    fn = METRICS[metric]
    by_name, curves = fn(
        model,
        x,
        attr,
        baselines="random_color",
        generator=seeded(2),
        return_curves=True,
    )
    colour = monochrome_reference(x, seeded(2))
    by_tensor, tensor_curves = fn(model, x, attr, baselines=colour, return_curves=True)
    assert torch.equal(by_name, by_tensor) and torch.equal(curves, tensor_curves)
    # and the reference matters: blur and zero give other values
    for other in ("blur", "zero"):
        assert not torch.equal(fn(model, x, attr, baselines=other), by_name)


def test_faithfulness_correlation_draws_its_subsets_before_the_colours():
    model, x = fixed_model(), fixed_images()
    attr = fixed_attributions(x)
    by_name = faithfulness_correlation(
        model, x, attr, baselines="random_color", n_samples=8, generator=seeded(2)
    )
    # the subsets take the first number of the generator, the colours the second;
    # so the subsets are those of any other baseline with the same generator
    generator = seeded(2)
    torch.randint(0, 2**62, (1,), generator=generator)
    colour = monochrome_reference(x, generator)
    by_tensor = faithfulness_correlation(
        model, x, attr, baselines=colour, n_samples=8, generator=seeded(2)
    )
    assert torch.equal(by_name, by_tensor)
    assert not torch.equal(
        faithfulness_correlation(
            model, x, attr, baselines="zero", n_samples=8, generator=seeded(2)
        ),
        by_name,
    )


def test_tuple_inputs_take_one_reference_per_input():
    torch.manual_seed(7)
    a, b = torch.rand(2, 3, 8, 8), torch.rand(2, 2, 6, 6)
    seen = []

    def forward(x, y):
        seen.append((x.clone(), y.clone()))
        return torch.stack([x.mean((1, 2, 3)), y.mean((1, 2, 3))], dim=1)

    attr = (torch.ones_like(a), torch.ones_like(b))
    insertion_auc(
        forward,
        (a, b),
        attr,
        baselines=("random_color", "zero"),
        n_steps=1,
        generator=seeded(1),
    )
    first, second = seen[1]
    assert torch.equal(first, monochrome_reference(a, seeded(1)).expand_as(a))
    assert torch.equal(second, torch.zeros_like(b))
    # one string for both inputs: one draw per input, in order
    seen.clear()
    insertion_auc(
        forward, (a, b), attr, baselines="random_color", n_steps=1, generator=seeded(1)
    )
    generator = seeded(1)
    expected_a = monochrome_reference(a, generator)
    expected_b = monochrome_reference(b, generator)
    assert torch.equal(seen[1][0], expected_a.expand_as(a))
    assert torch.equal(seen[1][1], expected_b.expand_as(b))


@pytest.mark.parametrize("metric", list(METRICS))
def test_other_baselines_leave_the_generator_alone(metric):
    model, x = fixed_model(), fixed_images()
    generator = seeded(9)
    state = generator.get_state()
    baselines = "blur" if metric != "faithfulness_correlation" else "mean"
    if metric == "faithfulness_correlation":
        # its subsets take exactly one number, whatever the baseline
        METRICS[metric](
            model, x, fixed_attributions(x), baselines=baselines, generator=generator
        )
        reference = seeded(9)
        torch.randint(0, 2**62, (1,), generator=reference)
        assert torch.equal(generator.get_state(), reference.get_state())
    else:
        METRICS[metric](
            model, x, fixed_attributions(x), baselines=baselines, generator=generator
        )
        assert torch.equal(generator.get_state(), state)


# Computed with the implementation before the neutral references were added
# (commit fde080e), on the fixed model and images above: the defaults must not move.
STORED_DEFAULTS = {
    "insertion": [0.5807479880750179, 0.6843399815261364],
    "deletion": [0.6540594510734081, 0.621131207793951],
    "faithfulness_correlation": [-0.5421858465859082, -0.5488257036601137],
}


def test_defaults_are_unchanged():
    model, x = fixed_model(), fixed_images()
    attr = fixed_attributions(x)
    values = {
        "insertion": insertion_auc(model, x, attr, n_steps=8),
        "deletion": deletion_auc(model, x, attr, n_steps=8),
        "faithfulness_correlation": faithfulness_correlation(
            model, x, attr, n_samples=10, generator=seeded(0)
        ),
    }
    for name, value in values.items():
        expected = torch.tensor(STORED_DEFAULTS[name], dtype=torch.float64)
        torch.testing.assert_close(value, expected, rtol=0, atol=1e-6)
    # and the defaults are the documented ones: blur, zero, zero
    torch.testing.assert_close(
        insertion_auc(model, x, attr, n_steps=8, baselines="blur"),
        values["insertion"],
        rtol=0,
        atol=0,
    )
    torch.testing.assert_close(
        deletion_auc(model, x, attr, n_steps=8, baselines="zero"),
        values["deletion"],
        rtol=0,
        atol=0,
    )


@pytest.mark.parametrize("metric", list(METRICS))
@pytest.mark.parametrize(
    "change,error,message",
    [
        (dict(baselines="random_colour"), ValueError, "`baselines`.*random_color"),
        (dict(baselines=("random_color", "zero")), ValueError, "`baselines`"),
        (dict(generator=0), TypeError, "`generator`"),
        (dict(generator=torch.manual_seed), TypeError, "`generator`"),
        (
            dict(inputs=torch.rand(2, 12), baselines="random_color"),
            ValueError,
            r"`baselines='random_color'` needs image inputs",
        ),
        (
            dict(inputs=torch.rand(2, 3, 8), baselines="random_color"),
            ValueError,
            r"`baselines='random_color'` needs image inputs",
        ),
    ],
)
def test_bad_arguments_are_named_before_any_forward(metric, change, error, message):
    def model(x):
        model.calls += 1
        return x.flatten(1)[:, :3]

    model.calls = 0
    change = dict(change)  # the parameters are shared by the metrics
    inputs = change.pop("inputs", torch.rand(2, 3, 8, 8))
    generator = seeded(0)
    state = generator.get_state()
    change.setdefault("generator", generator)
    with pytest.raises(error, match=message):
        METRICS[metric](model, inputs, torch.rand_like(inputs), **change)
    assert model.calls == 0
    assert torch.equal(generator.get_state(), state)


def test_evaluate_scores_every_method_on_the_same_colours(tmp_path):
    from captum.attr import Saliency
    from helpers import small_cnn
    from torch.utils.data import DataLoader, TensorDataset

    from captum_faithful import evaluate

    model = small_cnn(n_classes=5)
    images = distinct_images(6)
    loader = DataLoader(TensorDataset(images), batch_size=4)
    saliency = Saliency(model)

    def gradient(inputs, target):
        inputs = inputs.detach().clone().requires_grad_()
        return saliency.attribute(inputs, target=target)

    # two copies of one method: the same values only if both draw the same colours
    explainers = {"a": gradient, "b": gradient}
    metrics = {
        "random": functools.partial(insertion_auc, baselines="random_color", n_steps=4),
        "blur": functools.partial(insertion_auc, n_steps=4),
    }

    def run(name):
        results = evaluate(
            model, loader, explainers, metrics, out=tmp_path / name, show_progress=False
        )
        table = results.table.set_index(["index", "method", "metric"])["value"]
        return table.sort_index()

    first, second = run("first"), run("second")
    assert first.equals(second)  # reproducible: the generators come from the seed
    for metric in metrics:
        a = first.xs(("a", metric), level=("method", "metric"))
        b = first.xs(("b", metric), level=("method", "metric"))
        assert a.equals(b)
    random = first.xs("random", level="metric")
    assert not random.equals(first.xs("blur", level="metric"))
