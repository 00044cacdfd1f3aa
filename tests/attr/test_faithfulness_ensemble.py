import pytest
import torch
import torch.nn.functional as F
from helpers import ModelSnapshot, digit_images, four_conv_cnn, small_cnn
from pathway_models import AlternativePathway, blank_images, blob_images
from torch import nn

from captum_faithful.attr import FaithfulnessEnsemble
from captum_faithful.attr._core.faithfulness_ensemble import (
    area_loss,
    monochrome_reference,
    quantile_levels,
)
from captum_faithful.metrics import activation_deviation

# ---------------------------------------------------------------- trained toy model


@pytest.fixture(scope="session")
def trained():
    """A 4-conv CNN trained for a few seconds on digits (held-out accuracy ~0.9)."""
    pytest.importorskip("sklearn")
    x, y = digit_images()
    model = four_conv_cnn()
    generator = torch.Generator().manual_seed(0)
    optimiser = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(6):
        order = torch.randperm(1500, generator=generator)
        for start in range(0, 1500, 64):
            rows = order[start : start + 64]
            loss = F.cross_entropy(model(x[rows]), y[rows])
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
    model.eval()
    for param in model.parameters():
        param.requires_grad_(False)
    with torch.no_grad():
        accuracy = (model(x[1500:]).argmax(1) == y[1500:]).float().mean().item()
    assert accuracy > 0.8
    images = x[1500:1508].clone()
    with torch.no_grad():
        predicted = model(images).argmax(1)
    return model, images, predicted


def hard_insertion_images(x, attributions, reference, n_steps):
    """Written independently of the library: top-q pixels of M from x, rest from R,
    for q = k / n_steps (ties by pixel index). Shape (N, n_steps + 1, C, H, W)."""
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


def curve_deviation(model, x, attributions, reference, n_steps=16):
    """Mean activation-deviation MSE over the hard insertion curve, per sample."""
    images = hard_insertion_images(x, attributions, reference, n_steps)
    steps = images.shape[1]
    clean = x.repeat_interleave(steps, dim=0)
    return (
        activation_deviation(model, "conv", clean, images.flatten(0, 1))["mse"]
        .view(-1, steps)
        .mean(1)
    )


# ---------------------------------------------------------------- structure


def test_maps_nested_mean_and_shapes(cnn):
    x = torch.rand(3, 3, 8, 8)
    fei = FaithfulnessEnsemble(cnn, n_iter=5)
    attributions, maps = fei.attribute(
        x, generator=torch.Generator().manual_seed(0), return_quantile_maps=True
    )
    assert maps.shape == (3, 5, 8, 8)
    assert attributions.shape == x.shape
    assert bool((maps[:, 1:] >= maps[:, :-1]).all())
    assert bool((maps >= 0).all() and (maps <= 1).all())
    assert torch.equal(attributions, maps.mean(1, keepdim=True).expand_as(x))
    both = FaithfulnessEnsemble(cnn, objective="both", quantiles=[0.2, 0.7], n_iter=3)
    attributions, maps = both.attribute(
        x, generator=torch.Generator().manual_seed(0), return_quantile_maps=True
    )
    assert maps.shape == (3, 4, 8, 8)
    assert bool((maps[:, 1] >= maps[:, 0]).all() and (maps[:, 3] >= maps[:, 2]).all())
    assert torch.allclose(attributions, maps.mean(1, keepdim=True).expand_as(x))


def test_quantile_levels_and_area_loss():
    assert quantile_levels(5) == pytest.approx([1 / 6, 2 / 6, 3 / 6, 4 / 6, 5 / 6])
    assert quantile_levels([0.1, 0.5]) == (0.1, 0.5)
    maps = torch.tensor([[[[1.0, 0.0], [0.5, 0.0]]]])  # (1, K=1, 2, 2)
    # q = 0.5 -> r = [0, 0, 1, 1]; sorted map = [0, 0, 0.5, 1]
    assert area_loss(maps, [0.5]).item() == pytest.approx(0.25 / 4)
    assert area_loss(maps, [0.25]).item() == pytest.approx((0.25 + 0) / 4)


def test_monochrome_reference_is_reproducible_and_in_channel_range():
    x = torch.rand(4, 3, 5, 5) * torch.tensor([1.0, 2.0, 3.0]).view(1, 3, 1, 1)
    a = monochrome_reference(x, torch.Generator().manual_seed(3))
    b = monochrome_reference(x, torch.Generator().manual_seed(3))
    c = monochrome_reference(x, torch.Generator().manual_seed(4))
    assert a.shape == (4, 3, 1, 1) and torch.equal(a, b) and not torch.equal(a, c)
    assert bool((a >= x.amin((2, 3), keepdim=True)).all())
    assert bool((a <= x.amax((2, 3), keepdim=True)).all())


@pytest.mark.parametrize(
    ("objective", "area_weight"),
    [("insertion", 0.5), ("deletion", 0.5), ("both", None)],
)
def test_two_adam_steps_match_hand_written_games(objective, area_weight):
    """The games and Adam, written out sample by sample, level by level."""
    model = small_cnn()
    x = torch.rand(2, 3, 6, 6)
    reference = torch.tensor([0.2, 0.9, 0.4, 0.7, 0.1, 0.5]).view(2, 3, 1, 1)
    levels, target, lr, n_iter = (0.25, 0.5, 0.75), [1, 3], 0.05, 2
    fei = FaithfulnessEnsemble(
        model,
        clip="none",
        quantiles=list(levels),
        objective=objective,
        n_iter=n_iter,
        lr=lr,
        area_weight=area_weight,
    )
    _, maps = fei.attribute(
        x, baselines=reference, target=target, return_quantile_maps=True
    )

    games = {"insertion": [1], "deletion": [-1], "both": [1, -1]}[objective]
    steps = [0.25, 0.25, 0.25]
    u = torch.log(torch.expm1(torch.tensor(steps))).view(1, 1, 3, 1, 1)
    u = u.repeat(len(games), 2, 1, 6, 6).requires_grad_()
    m, v = torch.zeros_like(u), torch.zeros_like(u)
    for t in range(1, n_iter + 1):
        weight = area_weight if area_weight is not None else 200.0 * (t / n_iter) ** 2
        loss = 0.0
        for g, sign in enumerate(games):
            for i in range(2):
                total = torch.zeros(6, 6)
                for k, q in enumerate(levels):
                    total = total + F.softplus(u[g, i, k])
                    alpha = total.clamp(max=1.0)
                    keep = alpha if sign > 0 else 1 - alpha
                    image = keep * x[i] + (1 - keep) * reference[i]
                    prob = model(image.unsqueeze(0)).softmax(1)[0, target[i]]
                    ones = round(q * 36)
                    r = torch.cat([torch.zeros(36 - ones), torch.ones(ones)])
                    area = ((alpha.flatten().sort().values - r) ** 2).mean()
                    loss = loss - sign * prob + weight * area
        (grad,) = torch.autograd.grad(loss, u)
        with torch.no_grad():
            m = 0.9 * m + 0.1 * grad
            v = 0.999 * v + 0.001 * grad**2
            m_hat, v_hat = m / (1 - 0.9**t), v / (1 - 0.999**t)
            u -= lr * m_hat / (v_hat.sqrt() + 1e-8)
    expected = torch.cumsum(F.softplus(u.detach()), dim=2).clamp(max=1.0)
    expected = expected.permute(1, 0, 2, 3, 4).flatten(1, 2)
    assert torch.allclose(maps, expected, atol=1e-5)
    assert not torch.allclose(maps[:, :3], torch.tensor(levels).view(1, 3, 1, 1))


def test_same_generator_same_result_and_model_untouched(cnn):
    cnn.train()  # a model left in train mode stays in train mode
    for p in cnn[0].parameters():
        p.requires_grad_(False)
    snapshot = ModelSnapshot.take(cnn)
    x = torch.rand(2, 3, 8, 8)
    x_before = x.clone()
    fei = FaithfulnessEnsemble(cnn, n_iter=4)
    a = fei.attribute(x, generator=torch.Generator().manual_seed(7))
    b = fei.attribute(x, generator=torch.Generator().manual_seed(7))
    c = fei.attribute(x, generator=torch.Generator().manual_seed(8))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    snapshot.assert_same(cnn)
    assert torch.equal(x, x_before)


def test_model_untouched_when_the_forward_raises():
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.LazyLinear(3)
    )
    model(torch.rand(2, 3, 6, 6))
    model.train()  # BatchNorm statistics would move during the optimisation
    snapshot = ModelSnapshot.take(model)
    calls = []

    def forward(inp):
        calls.append(1)
        if len(calls) > 3:
            raise RuntimeError("boom")
        return model(inp)

    with pytest.raises(RuntimeError, match="boom"):
        FaithfulnessEnsemble(forward, model=model, n_iter=10).attribute(
            torch.rand(2, 3, 6, 6)
        )
    snapshot.assert_same(model)
    FaithfulnessEnsemble(model, n_iter=3).attribute(torch.rand(2, 3, 6, 6))
    snapshot.assert_same(model)


def test_samples_are_optimised_independently(cnn):
    x = torch.rand(3, 3, 8, 8)
    reference = torch.rand(3, 3, 1, 1)
    fei = FaithfulnessEnsemble(cnn, n_iter=5)
    together = fei.attribute(x, baselines=reference, target=[0, 1, 2])
    alone = fei.attribute(x[1:2], baselines=reference[1:2], target=[1])
    assert torch.allclose(together[1:2], alone, atol=1e-5)


def test_deletion_game_is_never_clipped(cnn):
    x = torch.rand(2, 3, 8, 8)
    kwargs = dict(baselines=0.5, target=[2, 5], return_quantile_maps=True)
    _, both_vm = FaithfulnessEnsemble(cnn, objective="both", n_iter=6).attribute(
        x, **kwargs
    )
    _, del_none = FaithfulnessEnsemble(
        cnn, clip="none", objective="deletion", n_iter=6
    ).attribute(x, **kwargs)
    _, ins_vm = FaithfulnessEnsemble(cnn, objective="insertion", n_iter=6).attribute(
        x, **kwargs
    )
    _, ins_none = FaithfulnessEnsemble(cnn, clip="none", n_iter=6).attribute(
        x, **kwargs
    )
    assert torch.allclose(both_vm[:, 5:], del_none, atol=1e-5)
    assert torch.allclose(both_vm[:, :5], ins_vm, atol=1e-5)
    assert not torch.allclose(ins_vm, ins_none, atol=1e-3)


def test_tuple_inputs_resnet_and_inplace_vgg_style():
    torchvision = pytest.importorskip("torchvision")
    resnet = torchvision.models.resnet18(weights=None, num_classes=5).eval()
    snapshot = ModelSnapshot.take(resnet)
    x = torch.rand(2, 3, 32, 32)
    for layers in ("conv", "early", "late", ["layer1.0.conv1", resnet.layer4[1].conv2]):
        attributions = FaithfulnessEnsemble(resnet, layers=layers, n_iter=2).attribute(
            x
        )
        assert attributions.shape == x.shape
    snapshot.assert_same(resnet)
    vgg_style = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.ReLU(inplace=True),
        nn.Conv2d(8, 8, 3, padding=1),
        nn.ReLU(inplace=True),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 4),
    ).eval()
    FaithfulnessEnsemble(vgg_style, n_iter=2).attribute(torch.rand(2, 3, 8, 8))

    class TwoImages(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Conv2d(3, 4, 3), nn.Conv2d(1, 4, 3)

        def forward(self, left, right, scale):
            return (self.a(left) + self.b(right)).mean((2, 3)) * scale

    model = TwoImages()
    left, right = torch.rand(2, 3, 6, 6), torch.rand(2, 1, 6, 6)
    scale = torch.tensor([[1.0], [2.0]])
    (ma, mb), (qa, qb) = FaithfulnessEnsemble(model, n_iter=3).attribute(
        (left, right), additional_forward_args=(scale,), return_quantile_maps=True
    )
    assert ma.shape == left.shape and mb.shape == right.shape
    assert qa.shape == (2, 5, 6, 6) and qb.shape == (2, 5, 6, 6)


def test_noise_tunnel_and_progress_bar(cnn, capsys):
    from captum.attr import NoiseTunnel

    x = torch.rand(2, 3, 8, 8)
    fei = FaithfulnessEnsemble(cnn, n_iter=2)
    smoothed = NoiseTunnel(fei).attribute(x, nt_samples=2, target=1, stdevs=0.05)
    assert smoothed.shape == x.shape
    pytest.importorskip("tqdm")
    fei.attribute(x, show_progress=True)
    assert "FEI" in capsys.readouterr().err


def test_bad_input_raises_clear_errors(cnn):
    x = torch.rand(2, 3, 8, 8)
    with pytest.raises(ValueError, match="`clip`"):
        FaithfulnessEnsemble(cnn, clip="all")
    with pytest.raises(ValueError, match="`objective`"):
        FaithfulnessEnsemble(cnn, objective="auc")
    for bad in ([0.0, 0.5], [0.5, 1.0], [0.5, 0.3], [0.3, 0.3], []):
        with pytest.raises(ValueError, match="`quantiles`"):
            FaithfulnessEnsemble(cnn, quantiles=bad)
    with pytest.raises(ValueError, match="`quantiles`"):
        FaithfulnessEnsemble(cnn, quantiles=0)
    with pytest.raises(ValueError, match="`n_iter`"):
        FaithfulnessEnsemble(cnn, n_iter=0)
    for bad_lr in (0.0, -0.1):
        with pytest.raises(ValueError, match="`lr`"):
            FaithfulnessEnsemble(cnn, lr=bad_lr)
    with pytest.raises(ValueError, match="`area_weight`"):
        FaithfulnessEnsemble(cnn, area_weight=-1.0)
    with pytest.raises(ValueError, match="no submodule named 'conv7'"):
        FaithfulnessEnsemble(cnn, layers=["conv7"])
    mlp = nn.Sequential(nn.Flatten(), nn.Linear(192, 3))
    with pytest.raises(ValueError, match="Conv2d"):
        FaithfulnessEnsemble(mlp, layers="conv")
    with pytest.raises(TypeError, match="model"):
        FaithfulnessEnsemble(lambda t: cnn(t))
    fei = FaithfulnessEnsemble(cnn, n_iter=1)
    with pytest.raises(ValueError, match=r"\(N, C, H, W\)"):
        fei.attribute(torch.rand(2, 8, 8))
    with pytest.raises(ValueError, match="NaN"):
        fei.attribute(torch.full_like(x, float("nan")))
    with pytest.raises(ValueError, match="`baselines`"):
        fei.attribute(x, baselines=torch.zeros(2, 3, 4, 4))
    with pytest.raises(ValueError, match="`target`"):
        fei.attribute(x, target=10)
    with pytest.raises(TypeError, match="`generator`"):
        fei.attribute(x, generator=0)


# ---------------------------------------------------------------- trained model


def test_coverage_within_0_1_of_each_level_after_default_iterations(trained):
    model, images, predicted = trained
    for clip in ("vm", "none"):
        _, maps = FaithfulnessEnsemble(model, clip=clip).attribute(
            images,
            target=predicted,
            generator=torch.Generator().manual_seed(0),
            return_quantile_maps=True,
        )
        coverage = maps.mean(dim=(2, 3))
        levels = torch.tensor(quantile_levels(5))
        assert float((coverage - levels).abs().max()) < 0.1, clip


def test_vm_keeps_activations_closer_than_none_on_a_model_with_an_alternative_pathway():
    """On a model built with a known alternative pathway (``AlternativePathway``: red
    edges that wake up when an image is mixed with a reference along a ragged mask),
    ``vm`` moves the activations less than ``none`` along the hard insertion curve.

    The model is constructed, not trained, so the effect does not depend on the CPU.
    Measured vm / none deviation ratio (this test's images are seed 0), for image
    seeds 0-3, identical with OMP_NUM_THREADS=1 and 2: real 0.796, 0.731, 0.768,
    0.679; blank 0.864, 0.833, 0.768, 0.672.
    """
    model = AlternativePathway()
    cases = {
        "real": (blob_images(12, seed=0), 100),
        "blank": (blank_images(12, seed=0), 50),
    }
    ratios = {}
    for name, (x, reference_seed) in cases.items():
        reference = torch.rand(
            12, 3, 1, 1, generator=torch.Generator().manual_seed(reference_seed)
        )
        deviation = {}
        for clip in ("none", "vm"):
            attributions = FaithfulnessEnsemble(model, clip=clip).attribute(
                x, baselines=reference, target=1
            )
            deviation[clip] = curve_deviation(model, x, attributions, reference).mean()
        ratios[name] = float(deviation["vm"] / deviation["none"])
    assert ratios["real"] < 0.9, ratios
    assert ratios["blank"] < 0.93, ratios


def _insertion_scores(trained):
    from captum.attr import IntegratedGradients

    from captum_faithful.metrics import insertion_auc

    model, images, predicted = trained
    reference = monochrome_reference(images, torch.Generator().manual_seed(2))
    fei = FaithfulnessEnsemble(model, clip="none").attribute(
        images, baselines=reference, target=predicted
    )
    ig = IntegratedGradients(model)
    attributions = {
        "fei": fei,
        # Captum's IG as a pipeline runs it: its default (zero) baseline
        "ig": ig.attribute(images, target=predicted, n_steps=32),
        # IG told the metric's reference: its path has the curve's two end points
        "ig_reference": ig.attribute(
            images, baselines=reference.expand_as(images), target=predicted, n_steps=32
        ),
        "random": torch.rand(images.shape, generator=torch.Generator().manual_seed(3)),
    }
    return {
        name: float(
            insertion_auc(
                model, images, attr, target=predicted, baselines=reference, n_steps=32
            ).mean()
        )
        for name, attr in attributions.items()
    }


@pytest.fixture(scope="module")
def insertion_scores(trained):
    return _insertion_scores(trained)


def test_fei_none_beats_random_attributions_on_insertion(insertion_scores):
    scores = insertion_scores
    assert scores["fei"] > scores["random"] + 0.1, scores


def test_fei_none_beats_integrated_gradients_on_insertion(insertion_scores):
    # measured: FEI none 0.87, Captum IG (zero baseline) 0.60, random 0.56
    scores = insertion_scores
    assert scores["fei"] > scores["ig"] + 0.1, scores


@pytest.mark.xfail(
    strict=True,
    reason="measured on this digits CNN: FEI none 0.87 vs 0.92 for IG whose baseline "
    "is the metric's own reference. The curve saturates by coverage 1/6, the smallest "
    "of FEI's default levels, and the mean of K=5 near-binary maps cannot order the "
    "pixels inside its top sixth, where IG's fine ranking earns its lead",
)
def test_fei_none_beats_integrated_gradients_told_the_reference(insertion_scores):
    scores = insertion_scores
    assert scores["fei"] > scores["ig_reference"], scores


class _FixedMaps:
    """Stands in for FaithfulnessEnsemble inside blank_image_diagnostic: returns a
    known map per rule and records how it was built and called."""

    calls: list = []

    def __init__(self, forward_func, **settings):
        self.settings = settings

    def attribute(self, inputs, baselines, target, additional_forward_args):
        clip = self.settings["clip"]
        seed = {"none": 11, "vm": 12}[clip]
        attributions = torch.rand(
            inputs.shape[0],
            1,
            *inputs.shape[2:],
            generator=torch.Generator().manual_seed(seed),
        )
        _FixedMaps.calls.append((self.settings, inputs, baselines, target))
        return attributions.expand_as(inputs)


def _conv_outputs(model, x):
    """The two conv outputs of ``small_cnn``, by calling its layers one by one."""
    with torch.no_grad():
        first = model[0](x)
        second = model[3](model[2](model[1](first)))
    return [first, second]


def test_blank_image_diagnostic_matches_its_definition(cnn, monkeypatch):
    """Every number of the report, rebuilt by hand from the maps the explainer gave
    (a stand-in, so this checks the diagnostic and not FEI, which has its own tests):
    the reference drawn in ``value_range``, the hard insertion curve, its mean
    probability and trapezoid AUC, and the activation deviation written out."""
    from captum_faithful.attr._core import blank_image_diagnostic as module

    _FixedMaps.calls = []
    monkeypatch.setattr(module, "FaithfulnessEnsemble", _FixedMaps)
    blank = torch.rand(4, 3, 1, 1, generator=torch.Generator().manual_seed(5))
    blank = blank.expand(-1, -1, 8, 8).contiguous()
    n_steps = 8
    report = module.blank_image_diagnostic(
        cnn,
        blank,
        clips=["none", "vm"],
        layers="early",
        quantiles=3,
        n_iter=7,
        lr=0.2,
        area_weight=4.0,
        n_steps=n_steps,
        value_range=(0.2, 0.9),
        generator=torch.Generator().manual_seed(1),
    )
    assert set(report) == {"none", "vm"}
    draw = torch.rand(4, 3, 1, 1, generator=torch.Generator().manual_seed(1))
    reference = 0.2 + 0.7 * draw
    with torch.no_grad():
        target = cnn(blank).argmax(1)
    assert [c[0]["clip"] for c in _FixedMaps.calls] == ["none", "vm"]
    for settings, inputs, baselines, called_target in _FixedMaps.calls:
        assert settings["layers"] == "early" and settings["quantiles"] == 3
        assert settings["n_iter"] == 7 and settings["lr"] == 0.2
        assert settings["area_weight"] == 4.0 and settings["model"] is cnn
        assert torch.equal(inputs, blank)
        assert torch.allclose(baselines, reference)
        assert torch.equal(torch.as_tensor(called_target), target)
    steps = n_steps + 1
    for clip, seed in (("none", 11), ("vm", 12)):
        attributions = torch.rand(
            4, 1, 8, 8, generator=torch.Generator().manual_seed(seed)
        )
        curve = hard_insertion_images(blank, attributions, reference, n_steps)
        with torch.no_grad():
            probs = cnn(curve.flatten(0, 1)).softmax(1).view(4, steps, -1)
        probs = probs.gather(2, target.view(4, 1, 1).expand(4, steps, 1)).squeeze(2)
        assert torch.allclose(report[clip]["probability"], probs.mean(1), atol=1e-6)
        trapezoid = (probs[:, 1:] + probs[:, :-1]).sum(1) / (2 * n_steps)
        assert torch.allclose(report[clip]["insertion_auc"], trapezoid, atol=1e-6)
        clean = _conv_outputs(cnn, blank)
        mse, cosine = torch.zeros(4), torch.zeros(4)
        for k in range(steps):
            perturbed = _conv_outputs(cnn, curve[:, k])
            for h, h_tilde in zip(clean, perturbed, strict=True):
                h, h_tilde = h.flatten(1).double(), h_tilde.flatten(1).double()
                mse += ((h_tilde - h) ** 2).mean(1).float() / (2 * steps)
                dot = (h * h_tilde).sum(1)
                norms = h.norm(dim=1) * h_tilde.norm(dim=1)
                cosine += (dot / norms).float() / (2 * steps)
        assert torch.allclose(report[clip]["mse"], mse, rtol=1e-4)
        assert torch.allclose(report[clip]["cosine"], cosine, atol=1e-5)


def test_blank_image_diagnostic_vm_finds_less_evidence_than_none():
    """On blank images, the unconstrained optimiser composes evidence through the
    model's alternative pathway (red edges between the blank image and the reference);
    ``vm`` blocks it and finds less.

    ``AlternativePathway`` is constructed, not trained, so the effect does not depend
    on the CPU. Measured mean probability along the hard insertion curve, none - vm,
    for blank-image seeds 0-3 (this test: seed 0), identical with OMP_NUM_THREADS=1
    and 2: 0.075, 0.107, 0.095, 0.073 (none 0.75-0.85, vm 0.68-0.77).
    """
    from captum_faithful.attr import blank_image_diagnostic

    report = blank_image_diagnostic(
        AlternativePathway(),
        blank_images(12, seed=0),
        clips=["none", "vm"],
        n_steps=16,
        generator=torch.Generator().manual_seed(50),
    )
    none_p = float(report["none"]["probability"].mean())
    vm_p = float(report["vm"]["probability"].mean())
    assert vm_p < none_p - 0.04, (vm_p, none_p)


def test_blank_image_diagnostic_bad_input(cnn):
    from captum_faithful.attr import blank_image_diagnostic

    blank = torch.zeros(2, 3, 8, 8)
    with pytest.raises(ValueError, match="constant"):
        blank_image_diagnostic(cnn, torch.rand(2, 3, 8, 8))
    with pytest.raises(ValueError, match="`clips`"):
        blank_image_diagnostic(cnn, blank, clips=["vm", "strong"])
    with pytest.raises(ValueError, match="`clips`"):
        blank_image_diagnostic(cnn, blank, clips=["vm", "vm"])
    with pytest.raises(ValueError, match="`value_range`"):
        blank_image_diagnostic(cnn, blank, value_range=(1.0, 0.0))
    with pytest.raises(ValueError, match="`n_iter`"):
        blank_image_diagnostic(cnn, blank, n_iter=0)
    with pytest.raises(ValueError, match="`baselines`"):
        blank_image_diagnostic(cnn, blank, baselines=torch.zeros(3, 3, 1, 1))
