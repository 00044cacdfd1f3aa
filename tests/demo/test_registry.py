"""The demo registry: its FG-TransMM rows on a small ViT with random SAEs, where
the real and the shuffled decoders must give different maps; its curve metrics
under each reference, and the comparisons of UNI with IG under both."""

import inspect
from types import SimpleNamespace

import gating_fixtures as fx
import pandas as pd
import pytest
import torch

from captum_faithful import metrics
from captum_faithful.demo.gating import GatingChoice
from captum_faithful.demo.registry import (
    COMPARISONS,
    CURVE_REFERENCES,
    METHODS,
    METRIC_INFO,
    SHUFFLED_VARIANT,
    Explainer,
    Settings,
    comparisons,
    metrics_for,
)
from captum_faithful.evaluation import Results
from captum_faithful.studies import GatingConfiguration

GATED = [key for key, method in METHODS.items() if method.gated]


def _maps(chosen_variant, tmp_path, seed=0):
    demo = SimpleNamespace(vit=fx.vit(), saes=fx.saes())
    choice = GatingChoice(
        GatingConfiguration((0, 1), 0.5, 10.0, chosen_variant), (), n_images=0
    )
    settings = Settings(out=tmp_path, seed=seed)
    x = fx.images(4)
    target = demo.vit(x).logits.argmax(-1)
    explainers = {key: METHODS[key].build(demo, settings, choice) for key in GATED}
    maps = {key: explainer(x, target) for key, explainer in explainers.items()}
    return explainers, maps


@pytest.mark.parametrize("chosen_variant", ["combined", "activation", "gradient"])
def test_shuffled_control_differs_from_the_real_decoder(chosen_variant, tmp_path):
    """Whatever variant the validation chose, the control is the combined score with
    permuted decoder rows: on random SAEs its maps must differ from the combined
    score's with the real decoder, and the job must not take it for a twin of any
    real row (the demo once printed the chosen gradient variant's numbers as its
    own shuffled control)."""
    explainers, maps = _maps(chosen_variant, tmp_path)
    real = maps[f"fg-transmm-{SHUFFLED_VARIANT}"]
    shuffled = maps["fg-transmm-shuffled"]
    assert not torch.allclose(real, shuffled, rtol=1e-3, atol=1e-6)
    assert not torch.allclose(maps["fg-transmm"], shuffled, rtol=1e-3, atol=1e-6)
    identities = {key: explainers[key].identity for key in GATED}
    twins = {key for key in GATED if identities[key] == identities["fg-transmm"]}
    # FG-TransMM is the chosen variant's row and nothing else
    assert twins == {"fg-transmm", f"fg-transmm-{chosen_variant}"}
    assert torch.equal(maps["fg-transmm"], maps[f"fg-transmm-{chosen_variant}"])
    assert identities["fg-transmm-shuffled"] not in {
        identities[key] for key in GATED if key != "fg-transmm-shuffled"
    }


def test_shuffled_control_follows_the_seed(tmp_path):
    _, first = _maps("gradient", tmp_path, seed=0)
    _, again = _maps("gradient", tmp_path, seed=0)
    _, other = _maps("gradient", tmp_path, seed=1)
    assert torch.equal(first["fg-transmm-shuffled"], again["fg-transmm-shuffled"])
    assert not torch.allclose(
        first["fg-transmm-shuffled"], other["fg-transmm-shuffled"], rtol=1e-3
    )


def test_the_control_is_compared_with_the_same_score():
    pairs = {(a, b) for a, b, _ in COMPARISONS}
    assert (f"fg-transmm-{SHUFFLED_VARIANT}", "fg-transmm-shuffled") in pairs
    assert ("fg-transmm-shuffled", "transmm") in pairs
    # never the chosen variant against a control of another score
    assert ("fg-transmm", "fg-transmm-shuffled") not in pairs
    assert SHUFFLED_VARIANT in METHODS["fg-transmm-shuffled"].label


class _TinyViT(torch.nn.Module):
    """A classifier with the ``config.patch_size`` the demo reads from its ViT."""

    def __init__(self) -> None:
        super().__init__()
        self.config = SimpleNamespace(patch_size=4)
        self.net = torch.nn.Sequential(
            torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 3)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


@pytest.mark.parametrize("key", ["saliency", "transmm"])
def test_curve_metrics_under_both_references(key, tmp_path):
    """The demo scores insertion and deletion under the methods' references (blur,
    black) and under one random colour per image drawn from the generator
    evaluate() hands the metric: each row equals the metric called directly with
    that reference (on the ViT with its patches as features), and the neutral rows
    differ from the default ones."""
    torch.manual_seed(0)
    if METHODS[key].model == "cnn":
        model = torch.nn.Sequential(
            torch.nn.Conv2d(3, 4, 3, padding=1),
            torch.nn.ReLU(),
            torch.nn.Flatten(),
            torch.nn.Linear(4 * 8 * 8, 3),
        )
        feature_mask = None
    else:
        model = _TinyViT()
        feature_mask = metrics.patch_mask(torch.zeros(1, 3, 8, 8), 4)
    images = torch.rand(5, 3, 8, 8)
    masks = torch.zeros(5, 1, 8, 8)
    attributions = torch.randn(5, 3, 8, 8)
    target = model(images).argmax(-1)
    settings = Settings(out=tmp_path, quick=True)
    explainer = Explainer(lambda x, t: attributions)
    rows = metrics_for(METHODS[key], explainer, model, images, masks, settings)
    assert set(CURVE_REFERENCES) <= set(rows)
    expected = {
        "insertion": (metrics.insertion_auc, "blur"),
        "deletion": (metrics.deletion_auc, "zero"),
        "insertion_random_color": (metrics.insertion_auc, "random_color"),
        "deletion_random_color": (metrics.deletion_auc, "random_color"),
    }
    values = {}
    for name, (metric, baselines) in expected.items():
        # evaluate() passes a generator to every metric that takes one
        assert "generator" in inspect.signature(rows[name]).parameters
        values[name] = rows[name](
            model,
            images,
            attributions,
            target=target,
            generator=torch.Generator().manual_seed(7),
        )
        direct = metric(
            model,
            images,
            attributions,
            target=target,
            baselines=baselines,
            feature_mask=feature_mask,
            n_steps=50,
            generator=torch.Generator().manual_seed(7),
        )
        torch.testing.assert_close(values[name], direct, rtol=0, atol=1e-12)
    for curve in ("insertion", "deletion"):
        assert not torch.allclose(values[curve], values[f"{curve}_random_color"])
    # another generator state draws other colours
    other = rows["insertion_random_color"](
        model,
        images,
        attributions,
        target=target,
        generator=torch.Generator().manual_seed(8),
    )
    assert not torch.allclose(other, values["insertion_random_color"])


def test_uni_is_compared_with_both_igs_under_both_references():
    """Each of UNI vs IG (black) and UNI vs IG (blur) is tested on insertion and
    deletion under the methods' references and under the random colour."""
    n = 6
    rows = [
        {
            "index": i,
            "method": method,
            "metric": metric,
            "value": 0.1 * shift + 0.01 * i,
            "seconds": 0.1,
        }
        for shift, method in enumerate(("uni", "ig-black", "ig-blur"))
        for metric in METRIC_INFO
        for i in range(n)
    ]
    results = Results(
        pd.DataFrame(rows),
        {"settings": {"methods": ["uni", "ig-black", "ig-blur"]}},
    )
    tests = comparisons(results, ("uni", "ig-black", "ig-blur"))
    compared = {(t.a, t.b, t.metric) for t in tests}
    for ig in ("ig-black", "ig-blur"):
        for metric in CURVE_REFERENCES:
            assert ("uni", ig, metric) in compared
    labels = {METRIC_INFO[m][0] for m in CURVE_REFERENCES}
    assert labels == {
        "insertion AUC (blur)",
        "insertion AUC (random colour)",
        "deletion AUC (black)",
        "deletion AUC (random colour)",
    }
