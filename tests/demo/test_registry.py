"""The demo registry's FG-TransMM rows on a small ViT with random SAEs, where the
real and the shuffled decoders must give different maps."""

from types import SimpleNamespace

import gating_fixtures as fx
import pytest
import torch

from captum_faithful.demo.gating import GatingChoice
from captum_faithful.demo.registry import (
    COMPARISONS,
    METHODS,
    SHUFFLED_VARIANT,
    Settings,
)
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
